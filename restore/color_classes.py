"""Colorization as classification over quantized chroma (Zhang, Isola, Efros 2016, "Colorful Image Colorization").

A per-pixel L1/L2 on color is minimized by the mean of the plausible colors, which for most objects is a dull
brown-gray. Predicting a distribution over chroma cells and training it with cross-entropy keeps the modes apart;
the color is then read out with the annealed mean (softmax at temperature T < 1: between the mean, T = 1, and the
mode, T -> 0). Chroma here is full-range BT.601 Cb/Cr in [0, 1] (0.5 = neutral), as ``restore.model`` composes it
with the known luma. Unlike the paper, the cross-entropy is not class-rebalanced: on held-out photos the plain one
scored better (``bench/color_study.py``, ``bench/RESULTS.md``).
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

CELL = 1 / 16  # width of a Cb/Cr cell: 17 x 17 grid points, the in-gamut ones are the classes
ANNEAL_T = 0.38  # the paper's annealed-mean temperature
POOL = 4  # class logits and targets live at 1/POOL of the image resolution (color varies slowly)
TARGET_SIGMA = 0.5  # soft encoding: Gaussian weight of the 3 x 3 cells around a target, sigma in cells


def chroma_classes() -> tuple[np.ndarray, np.ndarray]:
    """The in-gamut cells of the Cb/Cr grid: ([n, n] grid point -> class index or -1, [Q, 2] class centers as
    offsets from neutral). A chroma is in gamut when some luma makes it a valid RGB color."""
    values = np.linspace(-0.5, 0.5, int(round(1 / CELL)) + 1)
    table = -np.ones((len(values), len(values)), np.int64)
    centers = []
    for i, cb in enumerate(values):
        for j, cr in enumerate(values):
            offsets = (1.402 * cr, -0.344136 * cb - 0.714136 * cr, 1.772 * cb)  # RGB minus luma
            if max(offsets) - min(offsets) <= 1.0:
                table[i, j] = len(centers)
                centers.append((cb, cr))
    return table, np.asarray(centers, np.float32)


def annealed_mean(logits: torch.Tensor, centers: torch.Tensor, temperature: float = ANNEAL_T) -> torch.Tensor:
    """B,Q,h,w logits -> B,2,h,w chroma in [0, 1] (0.5 = neutral): the expectation of the class centers under
    softmax(logits / temperature). In fp32: the sum over ~200 classes would lose precision in half precision."""
    with torch.autocast(logits.device.type, enabled=False):
        p = torch.softmax(logits.float() / temperature, dim=1)
        return torch.einsum("bqhw,qk->bkhw", p, centers.float()) + 0.5


def soft_targets(chroma: torch.Tensor, table: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """B,2,h,w target chroma -> (class indices, weights), each B,9,h,w: the 3 x 3 grid cells around each target,
    Gaussian-weighted by distance, out-of-gamut cells weighted 0, weights summing to 1."""
    n = table.shape[0]
    grid = chroma.float() / CELL  # grid coordinates: 0.5 (neutral) -> n // 2
    nearest = grid.round().long()
    idx, weight = [], []
    for di in (-1, 0, 1):
        for dj in (-1, 0, 1):
            i = (nearest[:, 0] + di).clamp(0, n - 1)
            j = (nearest[:, 1] + dj).clamp(0, n - 1)
            cls = table[i, j]
            d2 = (grid[:, 0] - i.float()) ** 2 + (grid[:, 1] - j.float()) ** 2
            idx.append(cls.clamp_min(0))
            weight.append(torch.exp(-d2 / (2 * TARGET_SIGMA ** 2)) * (cls >= 0))
    idx, weight = torch.stack(idx, 1), torch.stack(weight, 1)
    return idx, weight / weight.sum(1, keepdim=True).clamp_min(1e-8)


def class_cross_entropy(logits: torch.Tensor, target_chroma: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy of B,Q,h,w logits against the soft-encoded B,2,H,W target chroma, which is average-pooled
    to the logits' resolution first (``POOL``, ceil mode, as the logits are made)."""
    pooled = F.avg_pool2d(target_chroma.float(), POOL, ceil_mode=True)
    if pooled.shape[-2:] != logits.shape[-2:]:
        raise ValueError(f"class logits are {tuple(logits.shape[-2:])}, targets pool to {tuple(pooled.shape[-2:])}")
    idx, weight = soft_targets(pooled, table)
    with torch.autocast(logits.device.type, enabled=False):
        log_p = F.log_softmax(logits.float(), dim=1)
        return -(log_p.gather(1, idx) * weight).sum(1).mean()
