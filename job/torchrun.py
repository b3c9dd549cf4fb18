"""torchrun for the training job, with the job's checks first and the job's exit codes.

    python -m job.torchrun [torchrun options] --shards DIR --out RUN_DIR [key=value ...]
    python -m job.torchrun --nproc-per-node 8 --shards data/shards --out runs/exp1 epochs=50

The torchrun options (``--nproc-per-node``, ``--nnodes``, ``--rdzv-*``, ``--max-restarts``, ...) are torchrun's own
and come first; the job's command line starts at ``--shards``, ``--out`` or ``--`` and is ``python -m job.train``'s.
Plain ``torchrun -m job.train`` works too, but torchrun exits 1 whenever a rank fails and prints a 40-line report.
This launcher instead:

- checks the command as the job would (``job.train.check``: overrides, device, shards, run dir, resume target)
  before starting any process: a bad one is one line on stderr and exit 2, and nothing is started or written;
  a finished run says so and exits 0;
- runs torchrun's elastic agent in this process (the same agent, options and signal forwarding as ``torchrun``);
- ends with the job's exit code: 0 finished, 2 bad config or input, 75 preempted (a checkpoint and
  ``RUN/preempted.json`` were written; rerun the same command to continue), otherwise the first failed rank's own
  code (1 for a Python exception, 128+N for a rank killed by signal N), named in one line (its traceback is above).
"""
from __future__ import annotations

import sys
import time
from pathlib import Path

JOB_START = ("--shards", "--out")


class UsageError(Exception):
    pass


def split_argv(argv: list[str]) -> tuple[list[str], list[str]]:
    """(torchrun's options, the job's command line): the job's starts at ``--``, ``--shards`` or ``--out``."""
    for i, a in enumerate(argv):
        if a == "--":
            return argv[:i], argv[i + 1:]
        if a in JOB_START or a.startswith(tuple(f"{o}=" for o in JOB_START)):
            return argv[:i], argv[i:]
    raise UsageError("the job's --shards DIR --out RUN_DIR are missing (usage: python -m job.torchrun "
                     "[torchrun options] --shards DIR --out RUN_DIR [key=value ...])")


def _error(msg: str, code: int) -> int:
    print(f"job.torchrun: error: {msg}", file=sys.stderr, flush=True)
    return code


def _fresh(path: Path, since: float) -> bool:
    try:
        return path.stat().st_mtime >= since
    except OSError:
        return False


def _message(failure) -> str:
    msg = failure.message
    if isinstance(msg, dict):  # an error file written by the job (its one line) or by torch's @record
        msg = msg.get("message", "")
    msg = str(msg or "").strip()
    return "" if msg.startswith("To enable traceback") else msg.splitlines()[-1] if msg else ""


def failure_exit(exc, run_dir: Path, started: float) -> int:
    """The exit code and one line for torchrun's ChildFailedError (every failed rank, with its exit code)."""
    from job.run_log import DONE, PREEMPTED
    from job.train import EXIT_BAD_INPUT, EXIT_PREEMPTED

    codes = {f.exitcode for f in exc.failures.values()}
    if _fresh(run_dir / PREEMPTED, started):
        print(f"job.torchrun: preempted: a checkpoint and {run_dir / PREEMPTED} were written; rerun the same "
              f"command to continue (exit {EXIT_PREEMPTED})", file=sys.stderr, flush=True)
        return EXIT_PREEMPTED
    if _fresh(run_dir / DONE, started):
        print(f"job.torchrun: warning: {run_dir / DONE} was written, then a rank exited with code(s) "
              f"{sorted(codes)}", file=sys.stderr, flush=True)
        return 0
    if codes == {EXIT_BAD_INPUT}:
        return EXIT_BAD_INPUT  # every rank refused the input; the job's line says why
    rank, first = exc.get_first_failure()
    code = first.exitcode if first.exitcode > 0 else 128 - first.exitcode
    how = (f"was killed by {first.signal_name()}" if first.exitcode < 0 else f"exited with code {first.exitcode}")
    detail = _message(first)
    others = len(exc.failures) - 1
    return _error(f"rank {rank} (local rank {first.local_rank}, pid {first.pid}) {how} first"
                  + (f" ({others} more rank(s) stopped)" if others else "")
                  + (f": {detail}" if detail else "; its output is above"), code)


def world_size(nnodes: str, nproc_per_node: str) -> int:
    from torch.distributed.run import determine_local_world_size, parse_min_max_nnodes

    low, _ = parse_min_max_nnodes(nnodes)
    return max(1, low) * determine_local_world_size(nproc_per_node)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv in (["-h"], ["--help"]):
        print(__doc__)
        return 0
    try:
        torchrun_argv, job_argv = split_argv(argv)
    except UsageError as exc:
        return _error(str(exc), 2)
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import get_args_parser, run

    from job import train
    from job.run_log import PREEMPTED

    parser = get_args_parser()
    parser.prog = "python -m job.torchrun"
    targs = parser.parse_args([*torchrun_argv, "-m", "job.train", *job_argv])  # bad torchrun options: exit 2
    job_args = train.parse_args(job_argv)  # bad job options: exit 2 with the job's usage
    try:
        world = world_size(targs.nnodes, targs.nproc_per_node)
        launch = train.check(job_args.shards, job_args.out, job_args.overrides, world, train.launcher_device(),
                             load_state=False)
    except train.LaunchError as exc:
        return _error(str(exc), train.EXIT_BAD_INPUT)
    except (ValueError, RuntimeError) as exc:  # torchrun's own refusals (e.g. --nproc-per-node gpu without GPUs)
        return _error(str(exc), train.EXIT_BAD_INPUT)
    if not launch.trains:
        print(launch.note, flush=True)
        return 0
    started = time.time() - 1.0  # file times may be rounded down to the second
    try:
        run(targs)
    except ChildFailedError as exc:
        return failure_exit(exc, job_args.out, started)
    except SignalException as exc:  # torchrun itself was signalled: it stopped the ranks (they checkpoint first)
        if _fresh(job_args.out / PREEMPTED, started):
            print(f"job.torchrun: stopped by {exc.sigval.name} after a checkpoint; rerun the same command to "
                  f"continue (exit {train.EXIT_PREEMPTED})", file=sys.stderr, flush=True)
            return train.EXIT_PREEMPTED
        return _error(f"stopped by {exc.sigval.name}", 128 + int(exc.sigval))
    except Exception as exc:  # rendezvous and agent errors: torchrun's message, without its traceback
        return _error(f"torchrun: {type(exc).__name__}: {exc}", 1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
