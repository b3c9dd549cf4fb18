"""The training job: ``torchrun --nproc-per-node N -m job.train --shards DIR --out RUN_DIR [key=value ...]``.

``DIR`` holds ``train/`` and optionally ``val/`` (packed by ``shards.pack``). Without ``val/``, fold ``fold`` of
``num_folds`` of train is held out (by the manifest's groups when present; recorded in ``RUN/folds.json``).
Also runs as plain ``python -m job.train`` (one process) and as one SLURM task per GPU (see ``job.dist``).

Exit codes: 0 finished (including early stop, and "already finished" on a requeue), 2 bad config or input
(nothing trained), 75 preempted: SIGTERM or SIGUSR1 was received, every rank stopped at the same step boundary,
rank 0 wrote a checkpoint and ``RUN/preempted.json``; rerun the same command (``resume=auto``) to continue exactly.
Under torchrun the workers exit 75 but torchrun itself exits 1: launchers should look for ``RUN/preempted.json``
(and ``RUN/done.json`` for a finished run). torchrun forwards SIGTERM to the workers; to have it forward SIGUSR1
too, export ``TORCHELASTIC_SIGNALS_TO_HANDLE=SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1``.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from job import checkpoint as ckpt
from job import dist
from job.config import ConfigError, parse_overrides
from job.data_plan import InputError, plan_data
from job.run_log import CONFIG, DONE, FOLDS, PREEMPTED  # noqa: F401  (launchers read the run dir by these names)
from job.step import model_spec, resolve_precision
from job.trainer import EXIT_OK, EXIT_PREEMPTED, Trainer  # noqa: F401  (the exit codes launchers read)
from shards.schema import atomic_write_json

EXIT_BAD_INPUT = 2


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m job.train", description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog="overrides: key=value (see job/config.py); exit codes 0 done, 2 bad input, "
                                        "75 preempted (requeue)")
    ap.add_argument("--shards", required=True, type=Path, help="folder with train/ (and optionally val/) shards")
    ap.add_argument("--out", required=True, type=Path, help="the run dir (created; resume=auto continues it)")
    ap.add_argument("overrides", nargs="*", help="key=value config overrides")
    return ap.parse_args(argv)


def _error(msg: str) -> int:
    print(f"job.train: error: {msg}", file=sys.stderr, flush=True)
    return EXIT_BAD_INPUT


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        cfg = parse_overrides(args.overrides)
        spec = model_spec(cfg)
    except (ConfigError, ValueError) as exc:
        return _error(str(exc))
    try:
        env = dist.detect()
    except dist.DistEnvError as exc:
        return _error(str(exc))
    device = dist.device_for(env)
    run_dir = args.out
    # Everything that can be wrong with the input is checked before joining the process group, identically on
    # every rank, so a bad path makes every rank exit 2 instead of leaving the others waiting.
    try:
        precision = resolve_precision(cfg.run.precision, device)
        weights = spec.encoder_weights
        if weights not in (None, "imagenet") and not Path(weights).is_file():
            raise ConfigError(f"encoder_weights={weights}: no such file")
        if (run_dir / DONE).exists() and cfg.run.resume == "auto":
            if env.is_main:
                print(f"{run_dir / DONE} exists: this run already finished", flush=True)
            return EXIT_OK
        resume_from = ckpt.resolve_resume(cfg.run.resume, run_dir)
        if cfg.run.resume == "never" and ckpt.step_checkpoints(run_dir):
            raise InputError(f"{run_dir} already has checkpoints; use resume=auto or a new --out")
        plan = plan_data(args.shards, cfg, env.rank, env.world_size)
    except (ConfigError, InputError, ckpt.CheckpointError) as exc:
        return _error(str(exc))

    dist.init(env, device)
    try:
        if env.is_main:
            run_dir.mkdir(parents=True, exist_ok=True)
            resolved = cfg.to_dict()
            resolved["resolved"] = {"precision": precision, "device": str(device), "world_size": env.world_size,
                                    "dist_source": env.source, "shards": str(args.shards.resolve()),
                                    "model_spec": spec.to_dict()}
            atomic_write_json(run_dir / CONFIG, resolved)
            if plan.folds is not None:
                atomic_write_json(run_dir / FOLDS, plan.folds)
        dist.barrier()
        if device.type == "cuda":
            torch.backends.cudnn.benchmark = True
        try:
            trainer = Trainer(cfg, spec, plan, run_dir, env, device, precision, resume_from)
        except InputError as exc:
            return _error(str(exc))
        return trainer.run()
    finally:
        dist.shutdown()


if __name__ == "__main__":
    sys.exit(main())
