"""Which checkpoints a batch-inference job restores with, checked in the driver before any Ray work starts.

A missing, empty, not-a-checkpoint or mismatched file fails here as ``BadInput`` naming the file (exit 2), and each
checkpoint's sha256 becomes its identity in the records (``restore.records``): a rerun with another checkpoint redoes
the PNGs it made.
"""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

from restore.inputs import BadInput


def newest_run(runs_dir: Path) -> Path:
    """The run dir under ``runs_dir`` whose checkpoints changed last (its best.pt is then used)."""
    candidates = []
    if runs_dir.is_dir():
        for run in runs_dir.iterdir():
            ckpt_dir = run / "checkpoints"
            if ckpt_dir.is_dir():
                files = [p for p in ckpt_dir.iterdir() if p.suffix == ".pt" or p.name == "latest"]
                if files:
                    candidates.append((max(p.stat().st_mtime for p in files), run))
    if not candidates:
        raise BadInput(f"no --checkpoint given and no run with checkpoints under {runs_dir.resolve()}")
    return max(candidates)[1]


def resolve_checkpoints(given: Sequence[str] | None, runs_dir: Path) -> list[Path]:
    from restore.model import resolve_checkpoint

    if not given:
        run = newest_run(runs_dir)
        given = [str(run)]
        print(f"checkpoint: none given, using the newest run {run} (its best.pt, else its latest)")
    resolved = []
    for value in given:
        try:
            resolved.append(resolve_checkpoint(value).resolve())
        except (FileNotFoundError, ValueError) as exc:
            raise BadInput(f"--checkpoint {value}: {exc}") from exc
    return resolved


def inference_cache_dir(setting: str, checkpoints: Sequence[Path]) -> Path | None:
    """``--compile-cache``: ``auto`` = ``RUN/compile_cache/inference`` of the first checkpoint's run (beside the
    training graphs, in a folder of its own so neither loads the other's), ``off`` = none, else the folder given."""
    from restore.compile_cache import folder_for, setting_error

    error = setting_error(setting, option="--compile-cache ")
    if error:
        raise BadInput(error)
    first = Path(checkpoints[0])
    run_dir = first.parent.parent if first.parent.name == "checkpoints" else first.parent
    return folder_for(setting, run_dir / "compile_cache" / "inference")


def not_a_checkpoint(path: Path) -> str | None:
    """Why ``path`` cannot be a checkpoint, from its first bytes (None: it may be one). ``torch.save`` writes a zip
    (``PK``) or, in its legacy format, a pickle (``0x80``)."""
    with open(path, "rb") as f:
        head = f.read(32)
    if not head:
        return "is empty (0 bytes), not a checkpoint"
    if head.startswith(b"PK") or head[:1] == b"\x80":
        return None
    text = all(32 <= b < 127 or b in b"\t\r\n" for b in head)
    return (f"is not a checkpoint (torch.save writes a zip or a pickle): it is {'a text file' if text else 'data'} "
            f"starting with {head[:20]!r}")


def check_checkpoints(paths: Sequence[Path]) -> list[dict]:
    """Load each checkpoint once in the driver so a missing or mismatched one fails before any Ray work starts, and
    hash its bytes (the records' checkpoint identity)."""
    from restore.model import load_restorer
    from shards.schema import file_sha256

    specs = []
    for path in paths:
        problem = not_a_checkpoint(path)
        if problem:
            raise BadInput(f"checkpoint {path} {problem}")
        try:
            model, info = load_restorer(path, map_location="cpu")
        except (FileNotFoundError, ValueError, RuntimeError, KeyError) as exc:
            raise BadInput(f"checkpoint {path}: {exc}") from exc
        specs.append({"path": str(path), "spec": model.spec.to_dict(), "weights": info.get("weights_used"),
                      "sha256": file_sha256(path)})
        del model
    return specs
