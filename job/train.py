"""The training job: ``torchrun --nproc-per-node N -m job.train --shards DIR --out RUN_DIR [key=value ...]``.

``DIR`` holds ``train/`` and optionally ``val/`` (packed by ``shards.pack``). Without ``val/``, fold ``fold`` of
``num_folds`` of train is held out (by the manifest's groups when present; recorded in ``RUN/folds.json``).
Also runs as plain ``python -m job.train`` (one process), under ``python -m job.torchrun`` (torchrun with the job's
checks first and its exit codes), and as one SLURM task per GPU (see ``job.dist``). Any number of ranks works with
any number of shards (``job.data_plan``; ``python -m job.plan`` shows each rank's share without starting anything).

Exit codes: 0 finished (including early stop, and "already finished" on a requeue), 2 bad config or input
(one line on stderr; nothing is written), 75 preempted: SIGTERM or SIGUSR1 was received, every rank stopped at the
same step boundary, rank 0 wrote a checkpoint and ``RUN/preempted.json``; rerun the same command (``resume=auto``)
to continue exactly. Rerunning a finished run with a larger ``max_steps`` or ``epochs`` extends it: it continues
from its last checkpoint, the added steps being a new phase with its own warmup and cosine (``job.trainer``); every
launch that trains appends its config to ``RUN/config_history.jsonl``.
Plain torchrun exits 1 whenever a rank fails, whatever the rank's code, and prints its own failure report after
the job's line (whose message it repeats as the root cause); ``python -m job.torchrun`` exits with the job's codes.
torchrun forwards SIGTERM to the workers; to have it forward SIGUSR1 too, export
``TORCHELASTIC_SIGNALS_TO_HANDLE=SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1``.
"""
from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from job import checkpoint as ckpt
from job import dist
from job.config import Config, ConfigError, parse_overrides
from job.data_plan import InputError, Split, rank_plan, read_split, schedule_steps, summary_lines, world_plan
from job.run_log import CONFIG, CONFIG_HISTORY, DONE, FOLDS, PREEMPTED  # noqa: F401  (launchers read these)
from job.step import model_spec, resolve_precision
from job.trainer import EXIT_OK, EXIT_PREEMPTED, Trainer  # noqa: F401  (the exit codes launchers read)
from restore.model import ModelSpec
from shards.schema import atomic_write_json

EXIT_BAD_INPUT = 2
LaunchError = (ConfigError, InputError, ckpt.CheckpointError)  # what ``check`` raises: exit 2 with the message


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m job.train", description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog="overrides: key=value (see job/config.py); exit codes 0 done, 2 bad input, "
                                        "75 preempted (requeue)")
    ap.add_argument("--shards", required=True, type=Path, help="folder with train/ (and optionally val/) shards")
    ap.add_argument("--out", required=True, type=Path, help="the run dir (created; resume=auto continues it)")
    ap.add_argument("overrides", nargs="*", help="key=value config overrides")
    return ap.parse_args(argv)


# ---------------------------------------------------------------------------------------------------- the checks
@dataclass
class Launch:
    """What a command would do, found before anything starts (``check``)."""

    cfg: Config
    spec: ModelSpec
    split: Split
    world: int
    total_steps: int
    precision: str | None  # None when the device was not checked
    resume_from: Path | None
    resume_state: dict | None  # the checkpoint's contents (None unless asked to load it)
    start_step: int
    kind: str  # "new", "resume", "extend" or "finished" (nothing to train)
    note: str  # one line saying which, for people

    @property
    def trains(self) -> bool:
        return self.kind != "finished"


def check(shards: Path, out: Path | None, overrides: list[str], world: int, device: torch.device | None = None,
          load_state: bool = True) -> Launch:
    """Everything that can be wrong with a command, checked without a process group and without writing anything:
    the overrides, the device (when given), the shards, the run dir and the resume target (read: a file that is not
    a training checkpoint, or one of another model, is refused here). Raises one of ``LaunchError``.

    ``load_state=False`` only maps the checkpoint (cheap: for launchers and the plan check)."""
    cfg = parse_overrides(overrides)
    try:
        spec = model_spec(cfg)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    precision = resolve_precision(cfg.run.precision, device) if device is not None else None
    weights = spec.encoder_weights
    if weights not in (None, "imagenet") and not Path(weights).is_file():
        raise ConfigError(f"encoder_weights={weights}: no such file")
    if out is not None and out.exists() and not out.is_dir():
        raise InputError(f"--out {out}: exists and is not a directory")
    split = read_split(shards, cfg)
    total = schedule_steps(cfg, split.num_train, world)[1]
    launch = Launch(cfg, spec, split, world, total, precision, None, None, 0, "new", "a new run")
    if out is None:
        launch.note = "no run dir given"
        return launch
    r = cfg.run
    if r.resume == "never" and ckpt.step_checkpoints(out):
        raise InputError(f"{out} already has checkpoints; use resume=auto or a new --out")
    resume_from = ckpt.resolve_resume(r.resume, out)
    done = _read_done(out) if r.resume == "auto" else None
    if done is not None and total <= int(done.get("total_steps", 0)):
        launch.kind = "finished"
        launch.note = (f"{out / DONE}: this run already finished at step {done.get('step')} ({done.get('reason')}) "
                       f"of {done.get('total_steps')}; to train longer, rerun with a larger max_steps or epochs "
                       f"(this command plans {total} steps)")
        return launch
    if resume_from is None:
        if done is not None:
            raise InputError(f"{out / DONE} exists but {out} has no checkpoint to continue from")
        return launch
    state = ckpt.load_checkpoint(resume_from, map_location="cpu", mmap=not load_state)
    if state["model_spec"] != spec.to_dict():
        saved, mine = state["model_spec"], spec.to_dict()
        diff = ", ".join(f"{k} {saved.get(k)!r} there, {mine.get(k)!r} here" for k in sorted(set(saved) | set(mine))
                         if saved.get(k) != mine.get(k))
        raise InputError(f"{resume_from}: a checkpoint of another model ({diff}); give the same model options, "
                         f"or a new --out")
    step = int(state["step"])
    launch.resume_from, launch.resume_state, launch.start_step = resume_from, state if load_state else None, step
    if done is not None:
        launch.kind = "extend"
        launch.note = (f"extends the finished run ({done.get('reason')} at step {done.get('step')} of "
                       f"{done.get('total_steps')}) from {resume_from} at step {step} to {total} steps; the added "
                       f"steps are a new phase with its own warmup and cosine")
    else:
        launch.kind = "resume"
        launch.note = f"resumes from {resume_from} at step {step} of {total}"
    return launch


def launcher_device() -> torch.device | None:
    """What a launcher process (``job.torchrun``, ``job.plan --check-device``) checks the settings against without
    creating a CUDA context of its own: the CPU on a machine without GPUs (``precision=fp16`` needs one), else
    None (every setting resolves on a GPU; the ranks resolve it for their own device)."""
    return None if torch.cuda.is_available() else torch.device("cpu")


def _read_done(run_dir: Path) -> dict | None:
    path = run_dir / DONE
    if not path.is_file():
        return None
    try:
        done = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise InputError(f"{path}: unreadable ({exc})") from exc
    if not isinstance(done, dict):
        raise InputError(f"{path}: not a JSON object")
    return done


# ----------------------------------------------------------------------------------------------------- errors
def _error(msg: str, env: dist.DistEnv | None = None) -> int:
    """One line on stderr (from rank 0 only when the ranks are known), exit 2.

    Under torchrun every rank also writes the message to its TORCHELASTIC_ERROR_FILE, so torchrun's own failure
    report names it as the root cause instead of "To enable traceback see ..."; ranks other than 0 wait a moment
    so that rank 0's line comes first and torchrun reports rank 0."""
    line = f"job.train: error: {msg}"
    error_file = os.environ.get("TORCHELASTIC_ERROR_FILE")
    if env is None or env.rank == 0:
        print(line, file=sys.stderr, flush=True)
    elif error_file:
        time.sleep(1.0)  # torchrun's root cause is the earliest error file: rank 0's
    if error_file:
        try:
            with open(error_file, "w") as f:
                json.dump({"message": {"message": line, "extraInfo": {"py_callstack": line,
                                                                      "timestamp": str(int(time.time()))}}}, f)
        except OSError:
            pass
    return EXIT_BAD_INPUT


# ------------------------------------------------------------------------------------------------------- main
def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        env = dist.detect()
    except dist.DistEnvError as exc:
        return _error(str(exc))
    device = dist.device_for(env)
    run_dir = args.out
    # Everything that can be wrong with the input is checked before joining the process group and before anything
    # is written, identically on every rank, so a bad setting makes every rank exit 2 instead of leaving the others
    # waiting, and leaves no run dir behind.
    try:
        launch = check(args.shards, run_dir, args.overrides, env.world_size, device)
    except LaunchError as exc:
        return _error(str(exc), env)
    if not launch.trains:
        if env.is_main:
            print(launch.note, flush=True)
        return EXIT_OK
    cfg, spec = launch.cfg, launch.spec
    plan = rank_plan(launch.split, cfg, env.rank, env.world_size)

    dist.init(env, device)
    try:
        if env.is_main:
            run_dir.mkdir(parents=True, exist_ok=True)
            resolved = cfg.to_dict()
            resolved["resolved"] = {"precision": launch.precision, "device": str(device),
                                    "world_size": env.world_size, "dist_source": env.source,
                                    "shards": str(args.shards.resolve()), "model_spec": spec.to_dict()}
            atomic_write_json(run_dir / CONFIG, resolved)
            with open(run_dir / CONFIG_HISTORY, "a") as f:
                f.write(json.dumps({"time": time.time(), "kind": launch.kind, "start_step": launch.start_step,
                                    "total_steps": launch.total_steps, "world_size": env.world_size,
                                    "overrides": list(args.overrides), "config": resolved}) + "\n")
            if plan.folds is not None:
                atomic_write_json(run_dir / FOLDS, plan.folds)
            for line in summary_lines(world_plan(launch.split, cfg, env.world_size)):
                print(line, flush=True)
        dist.barrier()
        if device.type == "cuda":
            torch.backends.cudnn.benchmark = True
        try:
            trainer = Trainer(cfg, spec, plan, run_dir, env, device, launch.precision, launch.resume_from,
                              launch.resume_state)
        except InputError as exc:
            return _error(str(exc), env)
        launch.resume_state = None  # the trainer holds what it needs
        try:
            return trainer.run()
        except BaseException:
            stop_loader_workers()
            raise
    finally:
        dist.shutdown()


def stop_loader_workers() -> None:
    """Kill this process's loader workers after a crash. They ignore SIGTERM (the stop notice is the trainer's to act
    on), and multiprocessing's exit handler only sends them SIGTERM before waiting for them: without this, a failed
    rank (e.g. a bad sample raised in a worker) would print its traceback and then hang until the time limit."""
    try:  # torch's SIGCHLD handler would report each killed worker as one more error
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
    except ValueError:  # not the main thread: leave it
        pass
    for child in multiprocessing.active_children():
        child.kill()
        child.join(10)


if __name__ == "__main__":
    sys.exit(main())
