"""Training losses of the two stages. Weights come from the caller (the job config).

Each loss returns (total, terms): `total` a scalar tensor with grad, `terms` a dict of detached scalar tensors
(unweighted term values and the total) so the caller decides when to synchronize (no .item() here).
Everything is computed in fp32, autocast disabled, whatever dtype the predictions come in.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from pytorch_msssim import ssim
from torch import nn

from restore.color_classes import chroma_classes, class_cross_entropy
from restore.model import rgb_to_chroma

SSIM_WIN = 11  # pytorch_msssim's default Gaussian window; its filter is a 'valid' convolution


def _fp32(*xs: torch.Tensor) -> list[torch.Tensor]:
    return [x.float() for x in xs]


def _check_ssim_size(x: torch.Tensor) -> None:
    if min(x.shape[-2:]) < SSIM_WIN:
        raise ValueError(f"SSIM losses need images of at least {SSIM_WIN}x{SSIM_WIN} pixels, got {tuple(x.shape[-2:])}")


def hole_ssim_loss(pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of (1 - SSIM) over the SSIM windows that touch the hole, per image, averaged over the batch.

    pytorch_msssim exposes only the image mean of its SSIM map. So the prediction is composited onto the target
    outside the hole: every window that does not touch the hole then compares identical pixels and scores exactly
    1, and (1 - mean SSIM) * windows / hole_windows is the mean of (1 - SSIM) over the hole windows, whatever the
    hole's size (a plain image SSIM would dilute small holes). Windows straddling the border compare the inpainted
    pixels in their true context, which is what a seamless fill needs. An image without a hole contributes 0.
    """
    _check_ssim_size(pred)
    composite = torch.where(mask > 0.5, pred, target)
    per_image = ssim(composite, target, data_range=1.0, size_average=False)  # [B]
    # Valid-convolution window positions and those whose window overlaps the hole.
    touched = F.max_pool2d((mask > 0.5).float(), SSIM_WIN, stride=1)  # B,1,H-10,W-10
    n_windows = touched.shape[-1] * touched.shape[-2]
    n_hole = touched.flatten(1).sum(1)
    return ((1.0 - per_image) * n_windows / n_hole.clamp_min(1.0)).mean()


def _soft_hue_histogram(rgb: torch.Tensor, bins: int = 180, smooth_sigma: float = 2.0) -> torch.Tensor:
    """Differentiable version of the metric's histogram: OpenCV 8-bit HSV hue (0..179), 180 bins, gray -> bin 0.

    Hue follows OpenCV's piecewise formula; each pixel's mass is split linearly between the two nearest bins (OpenCV
    rounds), and a pixel blends into bin 0 as its max-min spread goes to 0 (OpenCV puts R=G=B in bin 0). The
    histograms are then blurred circularly (sigma in bins) so a wrong hue still gets a gradient toward the right one.
    Returns B, bins.
    """
    r, g, b = rgb.unbind(1)
    vmax, argmax = rgb.max(dim=1)
    spread = vmax - rgb.amin(dim=1)
    safe = spread.clamp_min(1e-6)
    h = torch.where(
        argmax == 0,
        60.0 * (g - b) / safe,
        torch.where(argmax == 1, 120.0 + 60.0 * (b - r) / safe, 240.0 + 60.0 * (r - g) / safe),
    )
    pos = torch.remainder(h, 360.0) / 360.0 * bins  # in [0, bins)
    lo = torch.floor(pos)
    frac = pos - lo
    lo = lo.long() % bins
    hi = (lo + 1) % bins
    colored = (spread * 255.0).clamp(0.0, 1.0)  # 0 for a gray pixel, 1 from one 8-bit level of spread on
    bsz = rgb.shape[0]
    hist = rgb.new_zeros(bsz, bins)
    hist = hist.scatter_add(1, lo.flatten(1), ((1.0 - frac) * colored).flatten(1))
    hist = hist.scatter_add(1, hi.flatten(1), (frac * colored).flatten(1))
    gray_mass = (1.0 - colored).flatten(1).sum(1)
    hist = hist + F.one_hot(torch.zeros(bsz, dtype=torch.long, device=rgb.device), bins).to(hist) * gray_mass[:, None]
    if smooth_sigma > 0:
        radius = int(math.ceil(3 * smooth_sigma))
        x = torch.arange(-radius, radius + 1, dtype=hist.dtype, device=hist.device)
        kernel = torch.exp(-0.5 * (x / smooth_sigma) ** 2)
        kernel = (kernel / kernel.sum()).view(1, 1, -1)
        hist = F.conv1d(F.pad(hist[:, None], (radius, radius), mode="circular"), kernel)[:, 0]
    return hist


def hue_histogram_loss(pred: torch.Tensor, target: torch.Tensor, smooth_sigma: float = 2.0) -> torch.Tensor:
    """1 - Pearson correlation of the soft hue histograms (the metric's HISTCMP_CORREL), averaged over the batch."""
    hp = _soft_hue_histogram(pred, smooth_sigma=smooth_sigma)
    with torch.no_grad():
        ht = _soft_hue_histogram(target, smooth_sigma=smooth_sigma)
    hp = hp - hp.mean(1, keepdim=True)
    ht = ht - ht.mean(1, keepdim=True)
    corr = (hp * ht).sum(1) / ((hp.square().sum(1) * ht.square().sum(1)).sqrt() + 1e-8)
    return (1.0 - corr).mean()


class Stage1Loss(nn.Module):
    """Gray inpainting: L1 over the hole + masked SSIM (`hole_ssim_loss`). Inputs B,1,H,W in [0,1], mask in {0,1}."""

    def __init__(self, l1: float = 1.0, ssim: float = 1.0) -> None:
        super().__init__()
        self.w_l1, self.w_ssim = float(l1), float(ssim)

    def forward(self, pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, dict]:
        with torch.autocast(device_type=pred.device.type, enabled=False):
            pred, target, mask = _fp32(pred, target, mask)
            hole = (mask > 0.5).float()
            terms = {"s1_l1": ((pred - target).abs() * hole).sum() / hole.sum().clamp_min(1.0)}
            total = self.w_l1 * terms["s1_l1"]
            if self.w_ssim:
                terms["s1_ssim"] = hole_ssim_loss(pred, target, hole)
                total = total + self.w_ssim * terms["s1_ssim"]
        terms["s1_total"] = total
        return total, {k: v.detach() for k, v in terms.items()}


class Stage2Loss(nn.Module):
    """Colorization over the whole image: L1 + (1 - SSIM) + hue-histogram term (+ optional chroma L1), and, for
    color_mode "classes", the soft-encoded cross-entropy of the chroma-class logits.

    `hue` weights 1 - correlation of soft hue histograms, a differentiable proxy of the score's hist_sim, which
    rewards the right hue distribution rather than per-pixel colors; `chroma` weights an L1 on YCbCr Cb/Cr
    (per-pixel, pulls toward mean colors; off by default); `classes` weights `color_classes.class_cross_entropy`,
    used when the forward is given ``class_logits``. Inputs B,3,H,W in [0,1].
    """

    def __init__(self, l1: float = 1.0, ssim: float = 0.5, hue: float = 0.1, chroma: float = 0.0,
                 classes: float = 0.0) -> None:
        super().__init__()
        self.w_l1, self.w_ssim, self.w_hue, self.w_chroma = float(l1), float(ssim), float(hue), float(chroma)
        self.w_classes = float(classes)
        self._class_tables: dict[torch.device, torch.Tensor] = {}  # the quantization table, one copy per device

    def forward(self, pred: torch.Tensor, target: torch.Tensor,
                class_logits: torch.Tensor | None = None) -> tuple[torch.Tensor, dict]:
        with torch.autocast(device_type=pred.device.type, enabled=False):
            pred, target = _fp32(pred, target)
            terms = {"s2_l1": (pred - target).abs().mean()}
            total = self.w_l1 * terms["s2_l1"]
            if self.w_ssim:
                _check_ssim_size(pred)
                terms["s2_ssim"] = 1.0 - ssim(pred, target, data_range=1.0)
                total = total + self.w_ssim * terms["s2_ssim"]
            if self.w_hue:
                terms["s2_hue"] = hue_histogram_loss(pred, target)
                total = total + self.w_hue * terms["s2_hue"]
            if self.w_chroma:
                terms["s2_chroma"] = (rgb_to_chroma(pred) - rgb_to_chroma(target)).abs().mean()
                total = total + self.w_chroma * terms["s2_chroma"]
            if self.w_classes and class_logits is not None:
                terms["s2_classes"] = class_cross_entropy(class_logits, rgb_to_chroma(target),
                                                          self._class_table(pred.device))
                total = total + self.w_classes * terms["s2_classes"]
        terms["s2_total"] = total
        return total, {k: v.detach() for k, v in terms.items()}

    def _class_table(self, device: torch.device) -> torch.Tensor:
        if device not in self._class_tables:
            self._class_tables[device] = torch.from_numpy(chroma_classes()[0]).to(device)
        return self._class_tables[device]
