"""Optional adversarial training: a PatchGAN discriminator (pix2pix, 70x70 receptive field with n_layers=3) and
the generator/discriminator losses. Off by default in the job; the discriminator sees (gray, rgb) pairs.
"""
from __future__ import annotations

from typing import Callable, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.parametrizations import spectral_norm as _spectral_norm


class PatchDiscriminator(nn.Module):
    """Conditional PatchGAN: input B,in_channels,H,W in [0,1] (e.g. gray + RGB = 4), output B,1,h,w logits, one per
    overlapping patch. With spectral norm (default) there is no normalization layer, which also avoids BatchNorm
    statistics under DDP; without it InstanceNorm is used as in pix2pix.
    """

    def __init__(self, in_channels: int = 4, base: int = 64, n_layers: int = 3, spectral_norm: bool = True) -> None:
        super().__init__()
        if n_layers < 1:
            raise ValueError(f"n_layers must be >= 1, got {n_layers}")
        sn = _spectral_norm if spectral_norm else (lambda m: m)

        def norm(c: int) -> nn.Module:
            return nn.Identity() if spectral_norm else nn.InstanceNorm2d(c, affine=True)

        layers: list[nn.Module] = [sn(nn.Conv2d(in_channels, base, 4, stride=2, padding=1)), nn.LeakyReLU(0.2, True)]
        ch = base
        for i in range(1, n_layers + 1):
            out = base * min(2**i, 8)
            stride = 2 if i < n_layers else 1  # the last feature layer keeps the resolution (70x70 field at n=3)
            layers += [sn(nn.Conv2d(ch, out, 4, stride=stride, padding=1)), norm(out), nn.LeakyReLU(0.2, True)]
            ch = out
        layers.append(sn(nn.Conv2d(ch, 1, 4, stride=1, padding=1)))
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net((x - 0.5) / 0.5)


class AdversarialLosses(NamedTuple):
    """generator(fake_logits) -> loss; discriminator(real_logits, fake_logits) -> loss. Both fp32 scalars."""

    generator: Callable[[torch.Tensor], torch.Tensor]
    discriminator: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def _hinge_g(fake: torch.Tensor) -> torch.Tensor:
    return -fake.float().mean()


def _hinge_d(real: torch.Tensor, fake: torch.Tensor) -> torch.Tensor:
    return F.relu(1.0 - real.float()).mean() + F.relu(1.0 + fake.float()).mean()


def _lsgan_g(fake: torch.Tensor) -> torch.Tensor:
    return 0.5 * (fake.float() - 1.0).square().mean()


def _lsgan_d(real: torch.Tensor, fake: torch.Tensor) -> torch.Tensor:
    return 0.5 * ((real.float() - 1.0).square().mean() + fake.float().square().mean())


_KINDS = {"hinge": AdversarialLosses(_hinge_g, _hinge_d), "lsgan": AdversarialLosses(_lsgan_g, _lsgan_d)}


def adversarial_losses(kind: str = "hinge") -> AdversarialLosses:
    """The loss pair of a GAN objective: "hinge" or "lsgan". The caller detaches fakes for the discriminator step."""
    if kind not in _KINDS:
        raise ValueError(f"unknown adversarial loss kind {kind!r}; expected one of {sorted(_KINDS)}")
    return _KINDS[kind]
