"""Training checkpoints: the file format, atomic writes, the ``latest`` pointer, keep-last-k, ``best.pt``, resume.

Layout (docs/architecture.md, "Run dir")::

    RUN/checkpoints/step_00000100.pt   full state (model, EMA, optimizer, scheduler, scaler, step, RNG, data position)
    RUN/checkpoints/latest             text: the file name of the newest complete step checkpoint
    RUN/checkpoints/best.pt            the best validation score so far, without optimizer state

Only rank 0 writes. Every file is written to a temp name in the same folder, fsynced, then renamed, so a reader (or
a resumed job) never sees half a file; ``latest`` is updated only after its target is complete. Files hold plain
tensors and primitives, so ``torch.load(path, weights_only=True)`` reads them.
"""
from __future__ import annotations

import os
import re
import zipfile
from pathlib import Path
from typing import Any

import torch

from restore.model import CHECKPOINT_FORMAT
from shards.schema import atomic_write, atomic_write_bytes

CKPT_DIR = "checkpoints"
LATEST = "latest"
BEST = "best.pt"
_STEP_RE = re.compile(r"^step_(\d{8,})\.pt$")
# Keys of a full training checkpoint; best.pt drops the training-only ones.
TRAINING_ONLY = ("optimizer", "scheduler", "scaler", "disc_optimizer", "rng")  # best.pt keeps "discriminator"


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used to resume (missing, unreadable, wrong format)."""


def checkpoint_dir(run_dir: str | os.PathLike) -> Path:
    return Path(run_dir) / CKPT_DIR


def step_file_name(step: int) -> str:
    return f"step_{step:08d}.pt"


def atomic_torch_save(obj: Any, path: str | os.PathLike) -> None:
    """``torch.save`` to a temp file next to ``path``, fsync, rename: the file is complete or absent."""
    atomic_write(path, lambda f: torch.save(obj, f))


def step_checkpoints(run_dir: str | os.PathLike) -> list[tuple[int, Path]]:
    """Complete step checkpoints in the run dir, oldest first."""
    d = checkpoint_dir(run_dir)
    if not d.is_dir():
        return []
    found = []
    for p in d.iterdir():
        m = _STEP_RE.match(p.name)
        if m:
            found.append((int(m.group(1)), p))
    return sorted(found)


def save_checkpoint(run_dir: str | os.PathLike, state: dict, *, keep_last: int) -> Path:
    """Write ``state`` as ``step_<step>.pt``, point ``latest`` at it, then drop step files older than the last
    ``keep_last``."""
    if state.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(f"state must have format {CHECKPOINT_FORMAT!r}")
    d = checkpoint_dir(run_dir)
    path = d / step_file_name(int(state["step"]))
    atomic_torch_save(state, path)
    atomic_write_bytes(d / LATEST, (path.name + "\n").encode())
    for _, old in step_checkpoints(run_dir)[:-keep_last]:
        if old != path:
            old.unlink(missing_ok=True)
    for stale in d.glob(".*.tmp"):  # temp files of a writer that was killed mid-write
        stale.unlink(missing_ok=True)
    return path


def save_best(run_dir: str | os.PathLike, state: dict) -> Path:
    """``best.pt``: the state without optimizer/scheduler/scaler/RNG (inference and fine-tuning only)."""
    path = checkpoint_dir(run_dir) / BEST
    atomic_torch_save({k: v for k, v in state.items() if k not in TRAINING_ONLY}, path)
    return path


def latest_checkpoint(run_dir: str | os.PathLike) -> Path | None:
    """The file ``RUN/checkpoints/latest`` names, or None when the run has no checkpoint yet."""
    pointer = checkpoint_dir(run_dir) / LATEST
    if not pointer.is_file():
        return None
    name = pointer.read_text().strip()
    path = pointer.parent / name
    if not _STEP_RE.match(name) or not path.is_file():
        raise CheckpointError(f"{pointer} names {name!r}, which is not a step checkpoint in {pointer.parent}")
    return path


def resolve_resume(resume: str, run_dir: str | os.PathLike) -> Path | None:
    """What to resume from: ``auto`` = this run's latest (None if none), ``never`` = None, else a file or run dir."""
    if resume == "never":
        return None
    if resume == "auto":
        return latest_checkpoint(run_dir)
    path = Path(resume)
    if path.is_dir():
        found = latest_checkpoint(path)
        if found is None:
            raise CheckpointError(f"resume={resume}: {path} has no {CKPT_DIR}/{LATEST} checkpoint")
        return found
    if not path.is_file():
        raise CheckpointError(f"resume={resume}: no such checkpoint file or run dir")
    return path


def load_checkpoint(path: str | os.PathLike, map_location: str | torch.device = "cpu", mmap: bool = False) -> dict:
    """A training checkpoint read with ``weights_only=True``; ``CheckpointError`` naming the file otherwise.
    ``mmap=True`` maps the tensors instead of reading them (a cheap check of a large file)."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such checkpoint file")
    if not zipfile.is_zipfile(path):  # torch.save writes zip archives; pickle's error on other files says nothing
        raise CheckpointError(f"{path}: cannot read checkpoint: not a file written by torch.save")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True, mmap=mmap)
    except Exception as exc:  # unpickling raises many types; the first line says why
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise CheckpointError(f"{path}: cannot read checkpoint ({reason})") from exc
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
        got = state.get("format") if isinstance(state, dict) else type(state).__name__
        raise CheckpointError(f"{path}: format {got!r}, expected {CHECKPOINT_FORMAT!r}")
    missing = [k for k in ("model_spec", "model", "step", "optimizer", "data_pos") if k not in state]
    if missing:
        raise CheckpointError(f"{path}: not a training checkpoint (missing {', '.join(missing)}); "
                              "best.pt and inference checkpoints cannot be resumed")
    return state


def rng_state() -> dict[str, Any]:
    """This process's torch RNG states (CPU and, when present, every CUDA device) as tensors."""
    state: dict[str, Any] = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
