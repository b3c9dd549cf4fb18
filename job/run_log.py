"""The run dir's files and rank 0's log of a run: stdout lines, ``RUN/metrics.jsonl``, TensorBoard (``RUN/tb``) and
the validation pictures (``RUN/val/step_<step>.png``, also in TensorBoard as ``val/pictures``)."""
from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import numpy as np

from shards.schema import atomic_write_bytes, encode_png

DONE, PREEMPTED, FOLDS, CONFIG, METRICS = "done.json", "preempted.json", "folds.json", "config.json", "metrics.jsonl"
CONFIG_HISTORY = "config_history.jsonl"  # one line per launch that trains: its config, start step and total steps
COMPILE_CACHE = "compile_cache"
VAL_PICTURES = "val"  # RUN/val/step_<step>.png


def picture_path(run_dir: Path, step: int) -> Path:
    return run_dir / VAL_PICTURES / f"step_{step:08d}.png"


class RunLog:
    """Rank 0's outputs: stdout lines, RUN/metrics.jsonl and TensorBoard (other ranks: no-ops)."""

    def __init__(self, run_dir: Path, enabled: bool, resume_step: int | None) -> None:
        self.enabled, self.run_dir, self.path, self.tb = enabled, run_dir, run_dir / METRICS, None
        if not enabled:
            return
        if resume_step is not None and self.path.exists():
            # Drop what was logged after the checkpoint we resume from (a hard kill can leave such lines).
            keep = [ln for ln in self.path.read_text().splitlines() if ln.strip()
                    and json.loads(ln).get("step", 0) <= resume_step]
            atomic_write_bytes(self.path, "".join(ln + "\n" for ln in keep).encode())
        from torch.utils.tensorboard import SummaryWriter
        self.tb = SummaryWriter(str(run_dir / "tb"))

    def print(self, msg: str) -> None:
        if self.enabled:
            print(msg, flush=True)

    def record(self, kind: str, step: int, values: dict[str, Any]) -> None:
        if not self.enabled:
            return
        with open(self.path, "a") as f:
            f.write(json.dumps({"kind": kind, "step": step, "time": time.time(), **values}) + "\n")
        for k, v in values.items():
            if isinstance(v, (int, float)) and not isinstance(v, bool):
                self.tb.add_scalar(f"{kind}/{k}", v, step)

    def picture(self, step: int, image: np.ndarray) -> None:
        """A validation picture (uint8 [H, W, 3]): TensorBoard's ``val/pictures`` and ``RUN/val/step_<step>.png``."""
        if not self.enabled:
            return
        self.tb.add_image("val/pictures", image, step, dataformats="HWC")
        atomic_write_bytes(picture_path(self.run_dir, step), encode_png(image, "RGB"))

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()

