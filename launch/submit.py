"""Submit the training job to SLURM with submitit: one task per GPU, N nodes; or run it here with ``--local``.

    python launch/submit.py --nodes 2 --gpus-per-node 4 --partition gpu --timeout 1440 \\
        --shards SHARDS_DIR --out RUN_DIR [--wait] [key=value ...]

Launcher options are listed below; everything else (``--shards``, ``--out`` and the ``key=value`` overrides) is the
training job's own command line (``python -m job.train --help``), checked here before anything is submitted.
Each task runs the job in-process with RANK/WORLD_SIZE/LOCAL_RANK/MASTER_ADDR/MASTER_PORT taken from submitit's
JobEnvironment. SLURM sends SIGUSR1 ``--signal-delay`` seconds before the time limit (or a preemption notice); the
job writes a checkpoint and stops; then submitit requeues a fresh copy of the callable, which resumes from
``RUN_DIR/checkpoints/latest`` (``resume=auto``). Logs and submitit's pickles go to ``--logs`` (default
``RUN_DIR/submitit``). Site settings: ``slurm/site.env`` or ``$RESTORE_SITE_ENV`` (see ``slurm/site.env.example``)
is sourced at the start of the job (modules, venv, network interfaces); ``SBATCH_PARTITION``/``SBATCH_ACCOUNT``
exported before submission are sbatch's own defaults. docs/slurm.md has the whole story.

Exit status: 0 submitted (or, with ``--wait``, finished; or the run is already finished and nothing was submitted),
2 bad arguments or a refused submission (one line, ``submit: error: ...``; nothing submitted or written), otherwise
the job's exit code (``--wait``: 2 the job refused its input on its nodes, 75 stopped after a checkpoint and not
requeued, 1 a crash; the tail of task 0's log is printed).
"""
from __future__ import annotations

import os
import sys

if __name__ == "__main__":
    # Run as a script path: make the repository importable and run the module itself (so that the pickled
    # callable is `launch.submit.TrainTask`, importable in the job, not a class of `__main__`).
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    from launch.submit import main as _main

    sys.exit(_main())

import argparse
import json
import re
import shutil
import signal
import subprocess
import time
from pathlib import Path
from typing import Any

# The stop notice is SIGUSR1, as for slurm/train.sh and job.train; submitit reads this when it is imported.
os.environ.setdefault("SUBMITIT_PREEMPT_SIGNAL", "USR1")
import submitit  # noqa: E402

REPO_ROOT = Path(__file__).resolve().parents[1]
SITE_ENV = Path(os.environ.get("RESTORE_SITE_ENV") or REPO_ROOT / "slurm" / "site.env")
EXIT_BAD_INPUT, EXIT_PREEMPTED = 2, 75
TERMINAL_STATES = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL",
                   "DEADLINE", "PREEMPTED", "SPECIAL_EXIT"}


class SubmitError(Exception):
    """The job cannot be submitted as asked: exit 2 with the message."""


def rendezvous_port(job_id: str) -> int:
    """A port per job (stable across its requeues), away from the ports slurm/train.sh derives."""
    digits = re.sub(r"\D", "", job_id) or "0"
    return 39500 + int(digits) % 20000


class TrainTask:
    """The submitted callable: one instance per task; ``checkpoint()`` gives SLURM a fresh copy to requeue."""

    def __init__(self, job_argv: list[str], run_dir: Path) -> None:
        self.job_argv, self.run_dir = list(job_argv), Path(run_dir)

    def __call__(self) -> dict[str, Any]:
        env = submitit.JobEnvironment()
        # One task's CPUs for its threads (the default, all cores, oversubscribes a node shared by tasks).
        os.environ.setdefault("OMP_NUM_THREADS", os.environ.get("SLURM_CPUS_PER_TASK", "1"))
        os.environ.update(
            RANK=str(env.global_rank), WORLD_SIZE=str(env.num_tasks), LOCAL_RANK=str(env.local_rank),
            LOCAL_WORLD_SIZE=str(max(1, env.num_tasks // max(1, env.num_nodes))),
            MASTER_ADDR=env.hostnames[0], MASTER_PORT=str(rendezvous_port(env.job_id)))
        print(f"submit: {env}; master {os.environ['MASTER_ADDR']}:{os.environ['MASTER_PORT']}", flush=True)
        from job import train  # after OMP_NUM_THREADS: torch reads it when imported
        # submitit's handler of the stop notice (checkpoint() + requeue); job.train replaces it while it trains.
        submitit_handler = signal.getsignal(signal.SIGUSR1)
        rc = train.main(self.job_argv)
        run_dir = self.run_dir
        if rc == train.EXIT_OK:
            done = run_dir / train.DONE
            return {"run_dir": str(run_dir), "done": json.loads(done.read_text()) if done.exists() else None}
        if rc == EXIT_PREEMPTED:
            preempted = json.loads((run_dir / train.PREEMPTED).read_text())
            if preempted.get("signal") == "SIGUSR1" and callable(submitit_handler):
                # The notice came from SLURM's --signal (time limit) or a preemption notice: the checkpoint is
                # written; hand the notice to submitit, which (on rank 0) pickles checkpoint() and requeues.
                print(f"submit: stopped at step {preempted.get('step')}: requeueing", flush=True)
                signal.signal(signal.SIGUSR1, submitit_handler)
                signal.raise_signal(signal.SIGUSR1)
            # SIGTERM (scancel, scontrol requeue, preemption by SLURM): SLURM decides; no result is written.
            sys.exit(EXIT_PREEMPTED)
        # Bad config/input (2) or a crash: no result pickle; the job's exit code is SLURM's ExitCode.
        sys.exit(rc)

    def checkpoint(self) -> submitit.helpers.DelayedSubmission:
        # The run dir holds the state: a fresh copy resumes from its latest complete checkpoint (resume=auto),
        # whatever the first run started from (resume=never, or a checkpoint to fine-tune).
        argv = self.job_argv
        if (self.run_dir / "checkpoints" / "latest").exists():
            argv = [a for a in argv if not a.startswith("resume=")] + ["resume=auto"]
        return submitit.helpers.DelayedSubmission(TrainTask(argv, self.run_dir))


# ------------------------------------------------------------------------------------------------- the parser
def launcher_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="python launch/submit.py", add_help=False, description=__doc__.split("\n\n")[0],
        usage="%(prog)s [launcher options] --shards SHARDS_DIR --out RUN_DIR [key=value ...]")
    g = ap.add_argument_group("launcher options")
    g.add_argument("-h", "--help", action="store_true", help="this help, then the training job's")
    g.add_argument("--nodes", type=int, default=1, help="nodes (default 1)")
    g.add_argument("--gpus-per-node", type=int, default=0, help="GPUs per node; one task per GPU (default 0: CPU)")
    g.add_argument("--tasks-per-node", type=int, default=None,
                   help="tasks per node (default: --gpus-per-node, or 1 without GPUs)")
    g.add_argument("--cpus-per-task", type=int, default=None, help="CPUs per task (default: the cluster's)")
    g.add_argument("--mem-gb", type=int, default=None, help="memory per node in GB (default: the cluster's)")
    g.add_argument("--partition", default=None, help="partition (default: $SBATCH_PARTITION or the cluster's)")
    g.add_argument("--account", default=None, help="account (default: $SBATCH_ACCOUNT or none)")
    g.add_argument("--timeout", type=int, default=60, help="time limit in minutes (default 60)")
    g.add_argument("--signal-delay", type=int, default=120,
                   help="seconds before the time limit at which the job is told to checkpoint (default 120)")
    g.add_argument("--job-name", default="restore-train")
    g.add_argument("--logs", type=Path, default=None, help="submitit's folder (default RUN_DIR/submitit)")
    g.add_argument("--wait", action="store_true", help="wait for the job and exit with its status")
    g.add_argument("--local", action="store_true", help="run on this machine without SLURM (submitit local)")
    return ap


def parse(argv: list[str] | None) -> tuple[argparse.Namespace, list[str], argparse.Namespace]:
    """(launcher options, the job's argv, the job's parsed args); the job's own parser checks its part."""
    from job import train

    ap = launcher_parser()
    opts, job_argv = ap.parse_known_args(argv)
    if opts.help:
        ap.print_help()
        print("\ntraining job options (python -m job.train):\n")
        train.parse_args(["--help"])  # prints and exits 0
    job_args = train.parse_args(job_argv)  # exits 2 with the job's usage on a bad job argument
    # Absolute paths: the job may start in another directory (and does, for a site's default --chdir).
    job_args.shards, job_args.out = job_args.shards.absolute(), job_args.out.absolute()
    job_argv = ["--shards", str(job_args.shards), "--out", str(job_args.out), *job_args.overrides]
    return opts, job_argv, job_args


# ----------------------------------------------------------------------------------------------- the checks
def check_job_input(opts: argparse.Namespace, job_args: argparse.Namespace, world: int):
    """What the job would refuse at start, refused now (``job.train.check``, as ``job.plan`` does): bad overrides, a
    missing or unusable shards dir, a run dir or resume target the job cannot use. Any number of tasks works with
    any number of shards. The settings are not checked against devices: the nodes' GPUs are not this host's (the
    job checks ``precision`` on its nodes at start, exit 2). Returns the job's ``Launch``."""
    from job import config, train

    try:
        config.parse_overrides(job_args.overrides)
    except config.ConfigError as exc:
        raise SubmitError(str(exc)) from None
    if not job_args.shards.is_dir():
        raise SubmitError(f"shards dir {job_args.shards} does not exist")
    try:
        return train.check(job_args.shards, job_args.out, job_args.overrides, world, load_state=False)
    except train.LaunchError as exc:
        raise SubmitError(f"{exc} (for {world} task(s))") from None


def check_partition(partition: str | None) -> None:
    if shutil.which("sbatch") is None:
        raise SubmitError("sbatch not found: this machine is not a SLURM submit host (use --local to run here)")
    if partition is None:
        return
    out = subprocess.run(["sinfo", "-h", "-o", "%R"], capture_output=True, text=True, timeout=60)
    if out.returncode != 0:
        raise SubmitError(f"sinfo failed: {out.stderr.strip()}")
    known = sorted(set(out.stdout.split()))
    if partition not in known:
        raise SubmitError(f"partition {partition!r} does not exist on this cluster (partitions: {', '.join(known)})")


# ------------------------------------------------------------------------------------------------ the executor
def make_executor(opts: argparse.Namespace, run_dir: Path, tasks_per_node: int) -> submitit.Executor:
    folder = opts.logs or run_dir / "submitit"
    if opts.local:
        executor: submitit.Executor = submitit.LocalExecutor(folder=folder)
        executor.update_parameters(timeout_min=opts.timeout, tasks_per_node=tasks_per_node,
                                   signal_delay_s=opts.signal_delay)
        return executor
    executor = submitit.SlurmExecutor(folder=folder, max_num_timeout=100)
    # Site settings (modules, venv, interfaces) at the start of every run of the job, as slurm/train.sh does.
    setup = [f"export PYTHONPATH={REPO_ROOT}${{PYTHONPATH:+:$PYTHONPATH}}"]
    if SITE_ENV.exists():
        setup += [f"set -a; source {SITE_ENV}; set +a",
                  '[[ -n "${MODULES:-}" ]] && module load $MODULES',
                  '[[ -n "${VENV:-}" ]] && source "$VENV/bin/activate"']
    params: dict[str, Any] = dict(
        job_name=opts.job_name, nodes=opts.nodes, ntasks_per_node=tasks_per_node, time=opts.timeout,
        signal_delay_s=opts.signal_delay, setup=setup, additional_parameters={"requeue": True})
    if opts.gpus_per_node:
        params["gpus_per_node"] = opts.gpus_per_node
    if opts.cpus_per_task:
        params["cpus_per_task"] = opts.cpus_per_task
    if opts.mem_gb:
        params["mem"] = f"{opts.mem_gb}GB"
    if opts.partition:
        params["partition"] = opts.partition
    if opts.account:
        params["account"] = opts.account
    executor.update_parameters(**params)
    return executor


# ----------------------------------------------------------------------------------------------------- waiting
def slurm_state(job_id: str) -> tuple[str | None, int | None]:
    """(JobState, exit code) from scontrol (no accounting needed), or (None, None) once the record is gone."""
    out = subprocess.run(["scontrol", "show", "job", "-o", job_id], capture_output=True, text=True, timeout=60)
    if out.returncode != 0:
        return None, None
    fields = dict(f.split("=", 1) for f in out.stdout.split() if "=" in f)
    code = fields.get("ExitCode", "0:0").split(":")
    return fields.get("JobState"), int(code[0]) if code[0].isdigit() else None


def wait_slurm(job: submitit.Job, poll_s: float = 2.0) -> int:
    last = None
    while True:
        state, code = slurm_state(job.job_id)
        if state != last:
            print(f"job {job.job_id}: {state or 'gone from the queue'}", flush=True)
            last = state
        if state is None or state in TERMINAL_STATES:
            break
        time.sleep(poll_s)
    if state == "COMPLETED" or (state is None and job.task(0).paths.result_pickle.exists()):
        return report_result(job)
    return report_failure(job, f"ended {state or 'and left the queue'} (exit code {code})", code or 1)


def wait_local(job: submitit.Job) -> int:
    job.wait()
    if not job.task(0).paths.result_pickle.exists():
        return report_failure(job, f"ended without a result ({job.state})", 1)
    return report_result(job)


def report_result(job: submitit.Job) -> int:
    try:
        result = job.task(0).result()
    except (submitit.core.utils.UncompletedJobError, submitit.core.utils.FailedJobError) as exc:
        return report_failure(job, f"failed: {exc}", 1)
    print(json.dumps(result, indent=1, sort_keys=True))
    return 0


def report_failure(job: submitit.Job, what: str, code: int) -> int:
    task0 = job.task(0)
    print(f"job {job.job_id} {what}; log: {task0.paths.stderr}", file=sys.stderr)
    tail = task0.stderr() or ""
    if tail:
        print("\n".join(tail.splitlines()[-20:]), file=sys.stderr)
    return code


# -------------------------------------------------------------------------------------------------------- main
def main(argv: list[str] | None = None) -> int:
    opts, job_argv, job_args = parse(argv)
    if opts.nodes < 1 or opts.gpus_per_node < 0 or (opts.tasks_per_node is not None and opts.tasks_per_node < 1):
        print("submit: error: --nodes and --tasks-per-node must be >= 1, --gpus-per-node >= 0", file=sys.stderr)
        return EXIT_BAD_INPUT
    tasks_per_node = opts.tasks_per_node or opts.gpus_per_node or 1
    if opts.local and opts.nodes != 1:
        print("submit: error: --local runs one node: use --nodes 1 (and --tasks-per-node for several processes)",
              file=sys.stderr)
        return EXIT_BAD_INPUT
    partition = opts.partition or os.environ.get("SBATCH_PARTITION")
    try:
        launch = check_job_input(opts, job_args, opts.nodes * tasks_per_node)
        if not launch.trains:  # finished, and this command plans no more steps: nothing to submit
            print(launch.note, flush=True)
            return 0
        if not opts.local:
            check_partition(partition)
        # The job unpickles launch.submit.TrainTask: the repository must be importable there (env is exported).
        os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO_ROOT), os.environ.get("PYTHONPATH")) if p)
        executor = make_executor(opts, Path(job_args.out), tasks_per_node)
        try:
            job = executor.submit(TrainTask(job_argv, job_args.out))
        except Exception as exc:  # submitit wraps sbatch's refusal; its text is what the user needs
            raise SubmitError(f"submission refused: {str(exc).strip()}") from None
    except SubmitError as exc:
        print(f"submit: error: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    where = "locally" if opts.local else "to SLURM"
    print(f"submitted job {job.job_id} {where}: {opts.nodes} node(s) x {tasks_per_node} task(s), "
          f"run dir {job_args.out}", flush=True)
    task0 = job.task(0).paths
    print(f"logs: {task0.stdout} {task0.stderr} (task 0; other tasks alike in {task0.folder})", flush=True)
    if not opts.wait:
        return 0
    return wait_local(job) if opts.local else wait_slurm(job)
