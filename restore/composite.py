"""Re-impose the known luminance outside the hole on a predicted RGB image.

Outside the hole the damaged input is exactly ``PIL.Image.convert('L')`` of the original photo, so the only thing a
prediction can add there is chroma. PIL computes ``L = (19595 R + 38470 G + 7471 B + 0x8000) >> 16`` and the three
weights sum to exactly 65536, so adding the same integer ``d`` to R, G and B raises L by exactly ``d``: that is the
YCbCr "replace Y, keep Cb/Cr" operation done in integers, and it makes ``L(out) == input`` bit-exactly wherever no
channel clips. Where a channel clips at 0 or 255 the rest of the shift goes to the channels that can still move,
scaled by their share of the weights (a few rounds); pixels that still miss fall back to the neutral gray
``(v, v, v)``, whose L is ``v`` exactly (they sit at the ends of the range, where chroma is negligible anyway).
Everything stays on the tensor's device so a GPU worker never round-trips through the host.
"""
from __future__ import annotations

import torch

# PIL's fixed-point ITU-R 601 weights (libImaging/Convert.c); they sum to 1 << 16.
_WR, _WG, _WB = 19595, 38470, 7471


def pil_luma(rgb: torch.Tensor) -> torch.Tensor:
    """``PIL.Image.convert('L')`` of integer RGB ``[B, 3, H, W]`` (values 0..255) as int32 ``[B, H, W]``."""
    rgb = rgb.to(torch.int32)
    return (rgb[:, 0] * _WR + rgb[:, 1] * _WG + rgb[:, 2] * _WB + 0x8000) >> 16


def composite_luma(rgb: torch.Tensor, gray: torch.Tensor, known: torch.Tensor, rounds: int = 4) -> torch.Tensor:
    """Return uint8 ``[B, 3, H, W]``: ``rgb`` (integer 0..255) with ``L == gray`` wherever ``known`` is true.

    ``gray``: ``[B, H, W]`` integer, the damaged input; ``known``: ``[B, H, W]`` bool, True outside the hole.
    Inside the hole the prediction is returned unchanged.
    """
    out = rgb.to(torch.int32)
    target = gray.to(torch.int32)
    known = known.to(torch.bool)
    weights = torch.tensor([_WR, _WG, _WB], dtype=torch.int32, device=out.device).view(1, 3, 1, 1)
    for _ in range(rounds):
        delta = torch.where(known, target - pil_luma(out), 0)[:, None]
        free = torch.where(delta > 0, out < 255, out > 0)  # channels that can still move towards the target
        share = (weights * free).sum(1, keepdim=True).clamp_(min=1)
        step = torch.round(delta.float() * (1 << 16) / share).to(torch.int32)
        out = torch.where(free, out + step, out).clamp_(0, 255)
    miss = known & (pil_luma(out) != target)
    out = torch.where(miss[:, None], target[:, None].expand_as(out), out)
    return out.to(torch.uint8)
