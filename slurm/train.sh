#!/bin/bash
# Train `restore` on SLURM: one srun task per node, each a torchrun (`python -m job.torchrun`) that starts one
# training process per GPU (on CPU nodes: NPROC_PER_NODE, else --ntasks-per-node processes with gloo); rendezvous
# c10d on the first node. Any number of ranks works with any number of shards.
#
#   sbatch [--nodes=N] [--gpus-per-node=G] [--ntasks-per-node=T] [--partition=P] [--time=HH:MM:SS] \
#          [--output=LOG] slurm/train.sh --shards SHARDS_DIR --out RUN_DIR [key=value ...]
#
# Everything after the script goes to `python -m job.train` unchanged, so every training option works here.
# Before any srun, `python -m job.plan` checks the command on the first node (settings, shards, run dir, resume
# target, precision on this node's devices) and logs how the samples are shared over the ranks.
# `resume=auto` is added unless given (and always on a requeued run that has a checkpoint): a requeued or
# resubmitted job continues from RUN_DIR/checkpoints/latest; a fresh RUN_DIR starts at step 0.
#
# Run dir (docs/architecture.md): RUN_DIR/config.json, metrics.jsonl, tb/, checkpoints/step_*.pt, checkpoints/latest
# (the newest complete checkpoint), checkpoints/best.pt, done.json (written when training finished).
# Log: sbatch's --output (default ./slurm-restore-train-<jobid>.out), appended to across requeues.
#
# Preemption and the time limit: SLURM sends USR1 to this batch shell --signal seconds before the limit (below:
# 120 s). The shell passes it to every process of the training step; the job writes a checkpoint and exits 75; then
# the shell requeues the job (`scontrol requeue`), and the next run resumes (resume=auto). A job that SLURM kills
# itself (scontrol requeue, preemption, scancel) sends SIGTERM to the step: the job checkpoints in KillWait; a requeue
# from SLURM brings it back the same way.
# Exit status: 0 finished (RUN_DIR/done.json); 75 stopped by USR1 and requeued, or stopped by SLURM's SIGTERM
# after a checkpoint (RUN_DIR/preempted.json); 2 bad arguments or settings, refused before srun with one line
# (`train.sh[JOB]: error: ...` or `job.plan: error: ...`), nothing written; otherwise the first failed rank's own
# exit code (1 for a Python exception; its traceback and one `job.torchrun: error:` line naming it are in the log).
#
# Site settings live in slurm/site.env beside this script (copy site.env.example; absent is fine), or in the file
# named by RESTORE_SITE_ENV: modules, venv, python, NCCL/GLOO interfaces, CPU processes per node. The SBATCH_*
# variables in it (partition, account, GPUs) are sbatch's own: `source slurm/site.env` before sbatch so that they
# apply at submission. Nothing site-specific is edited into this script.
#
#SBATCH --job-name=restore-train
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=1
#SBATCH --cpus-per-task=1
#SBATCH --time=00:30:00
#SBATCH --requeue
#SBATCH --signal=B:USR1@120
#SBATCH --open-mode=append
#SBATCH --output=slurm-%x-%j.out
set -uo pipefail

log() { echo "train.sh[${SLURM_JOB_ID:-nojob}]: $*" >&2; }

if [[ -z ${SLURM_JOB_ID:-} ]]; then
    log "error: not inside a SLURM job: submit it with sbatch (see the header of $0)"
    exit 2
fi

# Under sbatch this file runs from a spool copy: find the repository through the job's Command.
script_path=$0
cmd=$(scontrol show job "$SLURM_JOB_ID" 2>/dev/null | sed -n 's/^ *Command=//p' | head -n1)
(($#)) && cmd=${cmd% "$*"}   # Command= is the submitted path followed by the arguments
[[ -n $cmd && -f $cmd ]] && script_path=$cmd
SLURM_DIR=$(cd "$(dirname "$script_path")" && pwd)
REPO_ROOT=${RESTORE_ROOT:-$(dirname "$SLURM_DIR")}
if [[ ! -f $REPO_ROOT/job/train.py ]]; then
    log "error: cannot find the repository (no $REPO_ROOT/job/train.py); set RESTORE_ROOT"
    exit 2
fi

SITE_ENV=${RESTORE_SITE_ENV:-$SLURM_DIR/site.env}
if [[ -f $SITE_ENV ]]; then
    log "site settings from $SITE_ENV"
    set -a
    # shellcheck disable=SC1090
    source "$SITE_ENV" || { log "error: $SITE_ENV failed"; exit 2; }
    set +a
fi
if [[ -n ${MODULES:-} ]]; then
    # shellcheck disable=SC2086
    module load $MODULES || { log "error: module load $MODULES failed"; exit 2; }
fi
if [[ -n ${VENV:-} ]]; then
    # shellcheck disable=SC1091
    source "$VENV/bin/activate" || { log "error: cannot activate venv $VENV"; exit 2; }
fi
export PYTHON=${PYTHON:-python}
export PYTHONPATH=$REPO_ROOT${PYTHONPATH:+:$PYTHONPATH}

# The two paths the job needs: check them here so that a typo fails now, with the name, not inside N x G processes.
shards='' out=''
args=("$@")
for ((i = 0; i < ${#args[@]}; i++)); do
    case ${args[i]} in
    --shards) shards=${args[i + 1]:-} ;;
    --shards=*) shards=${args[i]#--shards=} ;;
    --out) out=${args[i + 1]:-} ;;
    --out=*) out=${args[i]#--out=} ;;
    esac
done
if [[ -z $shards ]]; then log "error: --shards SHARDS_DIR is required"; exit 2; fi
if [[ ! -d $shards ]]; then log "error: shards dir $shards does not exist (cwd $PWD)"; exit 2; fi
if [[ -z $out ]]; then log "error: --out RUN_DIR is required"; exit 2; fi

have_resume=0
for a in "$@"; do [[ $a == resume=* ]] && have_resume=1; done
if ((${SLURM_RESTART_COUNT:-0} > 0)) && [[ -f $out/checkpoints/latest ]]; then
    set -- "$@" resume=auto   # a requeued run continues its own checkpoints, whatever the first run started from
elif ((!have_resume)); then
    set -- "$@" resume=auto
fi

# Counts come from the allocation. srun no longer inherits --cpus-per-task from sbatch (Slurm >= 22.05); the one
# srun task of a node gets the CPUs of all the node's tasks (--ntasks-per-node x --cpus-per-task).
export NNODES=${SLURM_JOB_NUM_NODES:-${SLURM_NNODES:-1}}
tasks_per_node=${SLURM_NTASKS_PER_NODE:-1}
tasks_per_node=${tasks_per_node%%(*}   # "2(x3)" -> 2
[[ $tasks_per_node =~ ^[1-9][0-9]*$ ]] || tasks_per_node=1
export RESTORE_TASKS_PER_NODE=$tasks_per_node
export SRUN_CPUS_PER_TASK=$(( ${SLURM_CPUS_PER_TASK:-1} * tasks_per_node ))
MASTER_HOST=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n1)
# A port per job id (stable across requeues of the same job, distinct for jobs sharing a node).
export RDZV_ENDPOINT=$MASTER_HOST:$((29500 + SLURM_JOB_ID % 20000))

# Processes per node: NPROC_PER_NODE, else the node's GPUs, else --ntasks-per-node CPU processes (gloo).
# No nvidia-smi count: on nodes without device cgroups it shows GPUs that belong to other jobs.
read -r -d '' NPROC_RULE <<'EOF'
if [[ -n ${NPROC_PER_NODE:-} ]]; then nproc=$NPROC_PER_NODE
elif [[ ${SLURM_GPUS_ON_NODE:-0} =~ ^[1-9] ]]; then nproc=$SLURM_GPUS_ON_NODE
elif [[ -n ${CUDA_VISIBLE_DEVICES:-} && $CUDA_VISIBLE_DEVICES != NoDevFiles ]]; then
    IFS=, read -ra gpus <<<"$CUDA_VISIBLE_DEVICES"; nproc=${#gpus[@]}
else nproc=${RESTORE_TASKS_PER_NODE:-1}; fi
EOF

# The whole command checked once, here on the first node, before any srun: a bad setting is one line and exit 2.
eval "$NPROC_RULE"
if ! "$PYTHON" -m job.plan --check-device --quiet --world-size $((NNODES * nproc)) "$@"; then
    log "error: the job refused its command (the line above); nothing was started or written"
    exit 2
fi

# Runs once per node (srun task).
read -r -d '' NODE_LAUNCH <<'EOF'
if [[ ${SLURM_NODEID:-0} == 0 ]]; then is_host=true; else is_host=false; fi
# The task's CPUs shared by its processes (torchrun sets 1 only for nproc > 1; more threads than CPUs thrash).
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-$(( ${SLURM_CPUS_PER_TASK:-1} / nproc > 0 ? ${SLURM_CPUS_PER_TASK:-1} / nproc : 1 ))}
# USR1 (the stop notice) reaches every process of the step. torchrun must not die of it: it ignores it, and so do
# its workers until the job installs its own handler (the batch shell repeats the notice until the step ends).
trap '' USR1
echo "node ${SLURMD_NODENAME:-?} (${SLURM_NODEID:-0}/$NNODES): torchrun nproc-per-node=$nproc threads=$OMP_NUM_THREADS rdzv=$RDZV_ENDPOINT" >&2
# job.torchrun: torchrun's agent with the job's exit codes (2 bad input, 75 preempted, else the failed rank's).
exec "$PYTHON" -m job.torchrun --nnodes="$NNODES" --nproc-per-node="$nproc" \
    --rdzv-backend=c10d --rdzv-endpoint="$RDZV_ENDPOINT" --rdzv-id="$SLURM_JOB_ID" \
    --rdzv-conf="is_host=$is_host" --max-restarts=0 -- "$@"
EOF
NODE_LAUNCH=$NPROC_RULE$'\n'$NODE_LAUNCH

stop_requested=0 resender=''
on_usr1() {
    ((stop_requested)) && return
    stop_requested=1
    log "USR1 (time limit or preemption notice): asking the job to checkpoint and stop"
    # Repeated: a worker still starting up has no handler yet and ignores it.
    (while :; do scancel --signal=USR1 "$SLURM_JOB_ID" || true; sleep 5; done) &
    resender=$!
}
on_term() { log "SIGTERM: the job is being stopped by SLURM; waiting for the checkpoint"; }
trap on_usr1 USR1
trap on_term TERM

started=$(date +%s)
log "$NNODES node(s) $(scontrol show hostnames "$SLURM_JOB_NODELIST" | tr '\n' ' ')| restart ${SLURM_RESTART_COUNT:-0} | out $out"
srun --nodes="$NNODES" --ntasks="$NNODES" --ntasks-per-node=1 --kill-on-bad-exit=1 \
    bash -c "$NODE_LAUNCH" restore-node "$@" &
srun_pid=$!
# `wait` returns early when a trapped signal arrives: keep waiting until srun itself is gone, then take its status.
while kill -0 "$srun_pid" 2>/dev/null; do wait "$srun_pid"; done
wait "$srun_pid"
rc=$?
[[ -n $resender ]] && kill "$resender" 2>/dev/null

fresh() { [[ -f $1 && $(stat -c %Y "$1") -ge $started ]]; }
# The run dir tells how the job ended (done.json / preempted.json), whatever srun reports for the nodes.
if ((rc == 0)) || fresh "$out/done.json"; then
    log "finished: $out/done.json"
    exit 0
fi
if ((stop_requested)); then
    log "stopped before the end (srun exit $rc): requeueing job $SLURM_JOB_ID; it resumes from $out/checkpoints/latest"
    scontrol requeue "$SLURM_JOB_ID" || { log "error: scontrol requeue failed"; exit 1; }
    exit 75
fi
if fresh "$out/preempted.json"; then
    log "stopped by SLURM after a checkpoint ($out/preempted.json); a requeue resumes from it"
    exit 75
fi
if ((rc == 2)); then
    log "error: the job refused its input on a node (the line above); nothing was trained"
    exit 2
fi
log "training failed: srun exit $rc (the failed rank and its exit code are above)"
exit "$rc"
