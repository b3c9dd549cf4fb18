"""The plan check: what a training command would do on N ranks, from the manifests alone (no process group).

    python -m job.plan --shards DIR --world-size 256 [--out RUN_DIR] [key=value ...]

Prints how the training and validation samples are shared (every rank's share, consecutive ranks with the same
share on one line), the steps per epoch, the effective batch and the total steps; with ``--out``, also what the run
dir holds (a new run, a resume, an extension of a finished run, or a finished run). It refuses, with one line and
exit 2, exactly what the job would refuse before training (bad overrides, missing or empty splits, a resume target
that is not a training checkpoint, ...); the number of ranks is never refused: any world size works with any number
of shards. ``--check-device`` also checks the settings against this machine's devices (``precision=fp16`` needs a
GPU), as ``slurm/train.sh`` does on the first node of its allocation. Exit 0 when the command would run (or is
finished).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from job import train
from job.data_plan import InputError, summary_lines, table_lines, world_plan


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m job.plan", description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shards", required=True, type=Path, help="folder with train/ (and optionally val/) shards")
    ap.add_argument("--world-size", type=int, default=1, help="ranks (GPUs) the job would run on (default 1)")
    ap.add_argument("--out", type=Path, default=None, help="the run dir, to say whether it resumes or is finished")
    ap.add_argument("--check-device", action="store_true", help="also check precision against this machine")
    ap.add_argument("--quiet", action="store_true", help="only the summary, not every rank's share")
    ap.add_argument("overrides", nargs="*", help="key=value training options, as for python -m job.train")
    return ap.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    device = train.launcher_device() if args.check_device else None
    try:
        if args.world_size < 1:
            raise InputError(f"--world-size {args.world_size}: must be >= 1")
        launch = train.check(args.shards, args.out, args.overrides, args.world_size, device, load_state=False)
        wp = world_plan(launch.split, launch.cfg, args.world_size)
    except train.LaunchError as exc:
        print(f"job.plan: error: {exc}", file=sys.stderr, flush=True)
        return train.EXIT_BAD_INPUT
    print(f"plan: {args.world_size} rank(s) on {args.shards}")
    for line in summary_lines(wp):
        print(line)
    if not args.quiet:
        for line in table_lines(wp):
            print("  " + line)
    if args.out is not None:
        print(f"run dir {args.out}: {launch.note}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
