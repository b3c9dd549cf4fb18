"""The classical fill stage 1 starts from: the hole filled by a harmonic (membrane) interpolation of its border.

Stage 1 learns a correction on top of this fill instead of painting the hole from a constant gray, so an untrained or
briefly trained inpainter is already as good as classical inpainting, and training only has to add what diffusion
cannot (texture, edges that cross the hole). The fill is a pure function of (gray, mask) that runs inside the model
(``GrayInpainter``) on whatever device the model runs on, so training and inference apply exactly the same fill.

How: pull-push (Gortler et al. 1996, the Lumigraph's hole filling) builds a mask-weighted image pyramid down to one
pixel, then pushes back up, filling each level's unknown pixels from the coarser level; a few Jacobi sweeps of the
Laplace equation at every level on the way up (the known pixels held fixed) turn that into a good approximation of
the harmonic fill (the solution of Laplace's equation with the border as boundary condition). Measured on 36 holes
in 512x512 crops of real photos (masked SSIM of the DACON score, gray): the damaged input 0.405, OpenCV Telea
(radius 5) 0.630, Navier-Stokes 0.625, pull-push alone 0.642, with 5 sweeps per level 0.657, fully converged
harmonic fill 0.660. Five sweeps per level cost about 25 ms for a 512x512 image on one CPU core.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

PREFILLS = ("none", "harmonic")
SWEEPS_PER_LEVEL = 5
_EPS = 1e-8


@torch.no_grad()
def harmonic_fill(gray: torch.Tensor, mask: torch.Tensor, sweeps: int = SWEEPS_PER_LEVEL) -> torch.Tensor:
    """``gray`` B,1,H,W in [0, 1] with its hole (``mask`` B,1,H,W, nonzero = hole) filled from the hole's border.

    Pixels outside the hole are returned unchanged (bit for bit). Computed in fp32 whatever the input dtype (and with
    autocast off); returned in ``gray``'s dtype. An image without a hole comes back as it is; a hole covering the
    whole image becomes mid-gray (there is no border to interpolate from).
    """
    hole = mask > 0.5
    with torch.autocast(gray.device.type, enabled=False):
        x = gray.float()
        known = (~hole).float()
        values, weights = [x * known], [known]
        # Pull: mask-weighted sums down to a 1x1 level (ceil so odd sizes keep their last row and column).
        while max(values[-1].shape[-2:]) > 1:
            values.append(F.avg_pool2d(values[-1], 2, ceil_mode=True) * 4)
            weights.append(F.avg_pool2d(weights[-1], 2, ceil_mode=True) * 4)
        top_w = weights[-1]
        filled = torch.where(top_w > _EPS, values[-1] / top_w.clamp_min(_EPS), torch.full_like(top_w, 0.5))
        laplace = x.new_tensor([[0.0, 0.25, 0.0], [0.25, 0.0, 0.25], [0.0, 0.25, 0.0]]).view(1, 1, 3, 3)
        # Push: at each finer level keep what is known there, take the rest from the coarser level, then relax.
        for value, weight in zip(reversed(values[:-1]), reversed(weights[:-1])):
            coarse = F.interpolate(filled, size=value.shape[-2:], mode="bilinear", align_corners=False)
            alpha = weight.clamp(max=1.0)
            filled = alpha * (value / weight.clamp_min(_EPS)) + (1.0 - alpha) * coarse
            fixed = alpha >= 1.0  # fully known cells are the boundary condition
            for _ in range(sweeps):
                relaxed = F.conv2d(F.pad(filled, (1, 1, 1, 1), mode="replicate"), laplace)
                filled = torch.where(fixed, filled, relaxed)
        out = torch.where(hole, filled.clamp(0.0, 1.0), x)
    return out.to(gray.dtype)


def prefill(kind: str, gray: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Stage 1's starting image: ``gray`` as it is (``none``, the constant fill left in the hole) or harmonic."""
    if kind == "none":
        return gray
    if kind == "harmonic":
        return harmonic_fill(gray, mask)
    raise ValueError(f"prefill={kind!r}: must be one of {', '.join(PREFILLS)}")
