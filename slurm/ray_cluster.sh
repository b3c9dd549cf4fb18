#!/bin/bash
# Batch inference over a SLURM allocation: a Ray head on the first node, a Ray worker on every other node (srun),
# then `python -m restore.batch_infer --address HEAD:PORT` on the batch host with all the arguments given here.
#
#   sbatch [--nodes=N] [--gpus-per-node=G] [--cpus-per-task=C] [--time=HH:MM:SS] \
#          slurm/ray_cluster.sh --shards data/shards/test --checkpoint runs/exp1 --out submission.zip
#
# One model actor per GPU of the allocation by default (batch_infer counts the cluster's GPUs); pass --workers /
# --gpus-per-worker to change that. The shards, checkpoints, --png-dir and --out must be on a filesystem all nodes
# see (the actors write the PNGs, the batch host builds the zip). A rerun of the same command resumes: finished
# PNGs are skipped. Exit status: batch_infer's (0 done, 2 bad input), or 1 when Ray did not come up.
#
# Site settings (modules, venv, python) come from slurm/site.env beside this script or RESTORE_SITE_ENV, as for
# slurm/train.sh. RAY_PORT (default 6379) picks the head's port; RAY_WAIT_S (default 120) how long to wait for
# all nodes to join.
#
#SBATCH --job-name=restore-infer
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=1
#SBATCH --cpus-per-task=2
#SBATCH --time=01:00:00
#SBATCH --output=slurm-%x-%j.out
set -uo pipefail

here=${SLURM_SUBMIT_DIR:-$(pwd)}
site_env=${RESTORE_SITE_ENV:-$here/slurm/site.env}
# shellcheck disable=SC1090
[[ -f $site_env ]] && source "$site_env"
PYTHON=${PYTHON:-python}
RAY=${RAY:-$(dirname "$(command -v "$PYTHON")")/ray}
[[ -x $RAY ]] || RAY=ray

# Ray's token authentication: every node and the driver must present the head's token. Export it so that srun
# hands it to each step even where HOME (~/.ray/auth_token) is not shared between nodes.
export RAY_AUTH_MODE=${RAY_AUTH_MODE:-token}
if [[ $RAY_AUTH_MODE == token && -z ${RAY_AUTH_TOKEN:-} ]]; then
    RAY_AUTH_TOKEN=$("$RAY" get-auth-token --generate 2>/dev/null) || { echo "ray_cluster: error: no Ray auth token" >&2; exit 1; }
    export RAY_AUTH_TOKEN
fi

mapfile -t nodes < <(scontrol show hostnames "${SLURM_JOB_NODELIST:?run this under sbatch or salloc}")
head=${nodes[0]}
head_ip=$(getent ahostsv4 "$head" | awk 'NR==1 {print $1}')
port=${RAY_PORT:-6379}
address="$head_ip:$port"
cpus=${SLURM_CPUS_PER_TASK:-${SLURM_CPUS_ON_NODE:-1}}
gpus=${SLURM_GPUS_ON_NODE:-0}
n=${#nodes[@]}

pids=()
stop_ray() {
    # srun forwards SIGTERM to `ray start --block`, which stops that node's Ray processes.
    for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null; done
    wait 2>/dev/null
}
trap stop_ray EXIT

echo "ray_cluster: head $head ($address), $n node(s), $cpus CPUs and $gpus GPUs each, auth mode $RAY_AUTH_MODE"
srun --nodes=1 --ntasks=1 --nodelist="$head" --overlap \
    "$RAY" start --head --node-ip-address="$head_ip" --port="$port" --num-cpus="$cpus" --num-gpus="$gpus" \
    --include-dashboard=false --block &
pids+=($!)
if (( n > 1 )); then
    srun --nodes=$((n - 1)) --ntasks=$((n - 1)) --ntasks-per-node=1 --exclude="$head" --overlap \
        "$RAY" start --address="$address" --num-cpus="$cpus" --num-gpus="$gpus" --block &
    pids+=($!)
fi

# Wait until every node has joined (a driver started earlier would see a smaller cluster and too few actors).
deadline=$((SECONDS + ${RAY_WAIT_S:-120}))
until alive=$("$PYTHON" - "$address" 2>/dev/null <<'EOF'
import sys, logging, ray
ray.init(address=sys.argv[1], logging_level=logging.ERROR)
print(sum(1 for node in ray.nodes() if node["Alive"]))
EOF
) && (( alive >= n )); do
    if (( SECONDS > deadline )); then
        echo "ray_cluster: error: only ${alive:-0} of $n Ray nodes up after ${RAY_WAIT_S:-120}s" >&2
        exit 1
    fi
    sleep 2
done
echo "ray_cluster: $alive node(s) up"

"$PYTHON" -m restore.batch_infer --address "$address" "$@"
rc=$?
echo "ray_cluster: batch_infer exited $rc"
exit $rc
