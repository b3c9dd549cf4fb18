"""What one training step is made of: the model spec, precision and compile settings, the phases and their LR
schedule, the training forward (``StageLoss``) and the discriminator's (``DiscLoss``), batches on the device, EMA."""
from __future__ import annotations

import copy
import inspect
import math
from pathlib import Path

import torch
import torch.nn as nn
from torch.nn.parallel import DistributedDataParallel as DDP

from job.config import Config, ConfigError
from job.run_log import COMPILE_CACHE
from restore import precision as precision_rule
from restore.compile_cache import folder_for
from restore.losses import Stage1Loss, Stage2Loss
from restore.model import ModelSpec


def model_spec(cfg: Config) -> ModelSpec:
    m = cfg.model
    decoder = tuple(m.decoder_channels)
    return ModelSpec(encoder=m.encoder, encoder_weights=m.encoder_weights, decoder_channels=decoder,
                     encoder_depth=len(decoder), cbam=m.cbam, color_mode=m.color_mode,
                     prefill=m.prefill, color_size=m.color_size)


def resolve_precision(name: str, device: torch.device) -> str:
    """The job's precision: ``restore.precision``'s rule, shared with inference (``auto``: bf16 on GPUs with native
    bf16, else fp16 with a GradScaler; fp32 on CPU)."""
    try:
        return precision_rule.resolve_for(name, device)
    except precision_rule.PrecisionError as exc:
        raise ConfigError(str(exc)) from None


def resolve_compile(setting: str, device: torch.device, total_steps: int, min_steps: int) -> bool:
    """``auto``: compile on CUDA when the run is long enough to pay the compile time back (``min_steps``)."""
    if setting == "auto":
        return device.type == "cuda" and total_steps >= min_steps
    return setting == "on"


def compile_cache_dir(setting: str, run_dir: Path) -> Path | None:
    """``compile_cache``: ``auto`` = RUN/compile_cache, ``off`` = none, anything else is a folder."""
    return folder_for(setting, run_dir / COMPILE_CACHE)


# BatchNorm statistics are not broadcast at every forward (validation syncs them from rank 0 instead, see
# dist.broadcast_buffers); torch >= 2.14 renamed the option.
NO_FORWARD_BUFFER_SYNC = ({"forward_sync_buffers": False}
                          if "forward_sync_buffers" in inspect.signature(DDP.__init__).parameters
                          else {"broadcast_buffers": False})
AUTOCAST_DTYPE = {name: precision_rule.autocast_dtype(name) for name in ("bf16", "fp16", "fp32")}


def phases(cfg: Config, total_steps: int) -> list[tuple[str, int, int]]:
    """(phase, first step, end step): ``joint`` trains both stages end to end; ``staged`` trains stage 1 alone
    (stage_split[0] of the steps), then stage 2 alone on the true gray image (stage_split[1]), then both jointly."""
    if cfg.run.stages == "joint":
        return [("joint", 0, total_steps)]
    a = max(1, round(total_steps * cfg.run.stage_split[0]))
    b = min(total_steps, a + max(1, round(total_steps * cfg.run.stage_split[1])))
    out = [("stage1", 0, a), ("stage2", a, b), ("joint", b, total_steps)]
    return [p for p in out if p[2] > p[1]]


def phase_at(plan: list[tuple[str, int, int]], step: int) -> tuple[str, int, int]:
    for p in plan:
        if p[1] <= step < p[2]:
            return p
    return plan[-1]


class StageLoss(nn.Module):
    """The training forward of one phase, returning ``(total, terms, fake)``; wrapped by DDP (and torch.compile).

    With a discriminator (``gan=true``) stage 2's output also gets the adversarial generator term; the
    discriminator is held outside this module's parameters (its own DDP and optimizer, see ``DiscLoss``) and frozen
    here, so the generator's backward only flows through it. ``fake`` is (colorizer input, rgb) detached, for the
    discriminator's step, or None.
    """

    def __init__(self, model: nn.Module, loss1: Stage1Loss, loss2: Stage2Loss, phase: str,
                 disc: nn.Module | None = None, adv_g=None, gan_weight: float = 0.0) -> None:
        super().__init__()
        self.model, self.loss1, self.loss2, self.phase = model, loss1, loss2, phase
        self._disc = (disc,)  # a tuple: not a submodule, so not in this module's DDP
        self.adv_g, self.gan_weight = adv_g, gan_weight

    def forward(self, gray, mask, gt_gray, gt_rgb):
        terms: dict[str, torch.Tensor] = {}
        total, fake = None, None
        if self.phase in ("stage1", "joint"):
            restored = self.model.inpaint(gray, mask)
            total, terms1 = self.loss1(restored, gt_gray, mask)
            terms.update(terms1)
        if self.phase == "stage2":
            restored = gt_gray  # stage 2 alone learns from the true gray image
        if self.phase in ("stage2", "joint"):
            rgb, logits = self.model.colorizer.training_outputs(restored)  # logits: color_mode classes only
            t2, terms2 = self.loss2(rgb, gt_rgb, class_logits=logits)
            terms.update(terms2)
            total = t2 if total is None else total + t2
            disc = self._disc[0]
            if disc is not None:
                g_adv = self.adv_g(disc(torch.cat([restored, rgb], 1)))
                terms["gan_g"] = g_adv.detach()
                total = total + self.gan_weight * g_adv
                fake = (restored.detach(), rgb.detach())
        return total, terms, fake


class DiscLoss(nn.Module):
    """The discriminator's step: real (true gray, true rgb) vs fake (colorizer input, its rgb), conditional."""

    def __init__(self, disc: nn.Module, adv_d) -> None:
        super().__init__()
        self.disc, self.adv_d = disc, adv_d

    def forward(self, real_gray, real_rgb, fake_gray, fake_rgb):
        real = self.disc(torch.cat([real_gray, real_rgb], 1))
        fake = self.disc(torch.cat([fake_gray, fake_rgb], 1))
        return self.adv_d(real, fake)


def stage_params(model: nn.Module, phase: str) -> list[nn.Parameter]:
    if phase == "stage1":
        return list(model.inpainter.parameters())
    if phase == "stage2":
        return list(model.colorizer.parameters())
    return list(model.parameters())


def batch_to_device(batch: dict, device: torch.device, channels_last: bool) -> dict[str, torch.Tensor]:
    """uint8 batch (pinned) -> float [0,1] on the device; the copies are asynchronous, the conversion on the GPU."""
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    out = {}
    for name in ("input", "mask", "gt_gray", "gt"):
        if name not in batch:
            continue
        t = batch[name].to(device, non_blocking=True)
        if name == "gt":
            t = t.permute(0, 3, 1, 2)  # NHWC memory viewed as NCHW: already channels_last
        out[name] = t.float().div_(255.0).contiguous(memory_format=fmt) if name != "mask" else \
            t.float().contiguous(memory_format=fmt)
    return out


def lr_lambda_for(plan: list[tuple[str, int, int]], warmup: int, min_ratio: float):
    """Linear warmup then cosine decay to ``min_ratio``, restarted in each phase of ``plan``."""
    def factor(step: int) -> float:
        _, start, end = phase_at(plan, step)
        local, length = step - start, max(1, end - start)
        w = min(warmup, max(0, length // 5)) if length < 5 * warmup else warmup  # short phases: shorter warmup
        if w and local < w:
            return (local + 1) / w
        progress = min(1.0, (local - w) / max(1, length - w))
        return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))
    return factor


class EMA:
    """Exponential moving average of the weights (buffers copied), kept as a frozen copy of the model."""

    def __init__(self, model: nn.Module, decay: float) -> None:
        self.decay = decay
        self.module = copy.deepcopy(model).eval()
        for p in self.module.parameters():
            p.requires_grad_(False)

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        ema_p = list(self.module.parameters())
        torch._foreach_lerp_(ema_p, [p.detach() for p in model.parameters()], 1.0 - self.decay)
        for b_ema, b in zip(self.module.buffers(), model.buffers()):
            b_ema.copy_(b)
