"""Validation: this rank's share of the exact DACON score, summed for one all-reduce, and the picture of a few
samples that every validation draws (damaged | stage 1 | color | truth), as BasicSR and MMagic log theirs.

Each rank scores only its own samples (``job.data_plan``: every validation sample is scored once in the world); the
per-rank sums of the score terms are all-reduced, so the world's score is the single-process score of the same
weights on the same samples. The picture shows the world's first ``val_images`` samples in manifest order: rank 0
holds the first ones, and when it holds fewer the next ranks' rows are gathered to it (``job.trainer``); rank 0
writes it to ``RUN/val/step_<step>.png`` and TensorBoard's ``val/pictures``.
"""
from __future__ import annotations

from typing import Sequence

import cv2
import numpy as np
import torch
import torch.nn as nn

from job.step import batch_to_device
from restore.score import score_image, score_sums

PICTURE_COLUMNS = ("damaged", "stage 1", "color", "truth")
PICTURE_TILE = 256  # the longest side of a tile, pixels (smaller images keep their size)
PICTURE_HEADER = 18  # pixels of the column titles' strip


def _uint8(t: torch.Tensor) -> np.ndarray:
    return (t.float().clamp(0, 1) * 255).round().to(torch.uint8).cpu().numpy()


@torch.no_grad()
def validate(model: nn.Module, loader, device: torch.device, autocast_dtype, channels_last: bool,
             picture_keys: Sequence[str] = ()) -> tuple[list[float], list[tuple[np.ndarray, ...]]]:
    """This rank's ``score_sums`` of the exact DACON score over its share of the validation split, and the picture
    rows (damaged gray, stage-1 gray, color, truth; uint8) of the samples named in ``picture_keys``, in that order."""
    was_training = model.training
    model.eval()
    per_image = []
    wanted = set(picture_keys)
    rows: dict[str, tuple[np.ndarray, ...]] = {}
    for batch in loader:
        b = batch_to_device(batch, device, channels_last)
        with torch.autocast(device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
            gray, rgb = model(b["input"], b["mask"])
        pred = _uint8(rgb.permute(0, 2, 3, 1))
        gt, mask = batch["gt"].numpy(), batch["mask"].numpy()[:, 0] > 0
        per_image.extend(score_image(gt[i], pred[i], mask[i]) for i in range(len(pred)))
        for i, key in enumerate(batch["key"]):
            if key in wanted:
                rows[key] = (batch["input"][i, 0].numpy(), _uint8(gray[i, 0]), pred[i], gt[i])
    model.train(was_training)
    return score_sums(per_image), [rows[k] for k in picture_keys if k in rows]


def _tile(image: np.ndarray, side: int) -> np.ndarray:
    """``image`` (gray or RGB) fitted into a black ``side`` x ``side`` RGB square, aspect kept."""
    rgb = np.repeat(image[..., None], 3, axis=-1) if image.ndim == 2 else image
    h, w = rgb.shape[:2]
    scale = side / max(h, w)
    if scale != 1:
        rgb = cv2.resize(rgb, (max(1, round(w * scale)), max(1, round(h * scale))), interpolation=cv2.INTER_AREA)
    out = np.zeros((side, side, 3), np.uint8)
    y, x = (side - rgb.shape[0]) // 2, (side - rgb.shape[1]) // 2
    out[y:y + rgb.shape[0], x:x + rgb.shape[1]] = rgb
    return out


def picture_grid(rows: Sequence[tuple[np.ndarray, ...]], tile: int = PICTURE_TILE) -> np.ndarray:
    """One row per sample, the columns of ``PICTURE_COLUMNS`` under a strip of their titles: uint8 [H, W, 3] with
    H = PICTURE_HEADER + rows x side and W = 4 x side, side = the largest image side, at most ``tile``."""
    if not rows:
        raise ValueError("picture_grid needs at least one row")
    side = min(tile, max(max(a.shape[:2]) for row in rows for a in row))
    header = np.full((PICTURE_HEADER, side * len(PICTURE_COLUMNS), 3), 32, np.uint8)
    scale = min(0.4, 0.4 * side / 64)
    for c, title in enumerate(PICTURE_COLUMNS):
        cv2.putText(header, title, (c * side + 3, PICTURE_HEADER - 5), cv2.FONT_HERSHEY_SIMPLEX, scale,
                    (255, 255, 255), 1, cv2.LINE_AA)
    body = [np.concatenate([_tile(a, side) for a in row], axis=1) for row in rows]
    return np.ascontiguousarray(np.concatenate([header, *body], axis=0))
