"""Inference-only rewrite of a restorer: each BatchNorm folded into the convolution that feeds it.

In eval mode a BatchNorm is a per-channel affine map, so it can live in the preceding convolution's weight and bias
(``torch.nn.utils.fusion.fuse_conv_bn_eval``). Eager inference then skips one kernel and one full read and write of
the activation per conv: the 234 BatchNorms of the EfficientNet-B4 restorer move 21% of the bytes of an inference
pass at 512 px (bench/roofline.py).
The model that comes out can no longer be trained (its BatchNorms are gone); the Engine uses it, training never does.

Which BatchNorm follows which conv is found by running the model once on a small probe and watching tensors: a
pair is a conv whose output goes into a BatchNorm and nowhere else, each module called exactly once. The fused model
is checked against the original on that probe; if they disagree the original is kept.
"""
from __future__ import annotations

import copy
import warnings
from collections import Counter
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_eval
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten


@dataclass(frozen=True)
class FuseReport:
    pairs: int  # conv + BatchNorm pairs folded
    batchnorms: int  # BatchNorm modules in the model
    max_abs_diff: float  # fused vs original on the probe


def restorer_probe() -> tuple[torch.Tensor, torch.Tensor]:
    """A small fixed (gray, mask) pair for a two-stage restorer, on the CPU: where folding is found and checked."""
    gen = torch.Generator().manual_seed(0)
    gray = torch.rand(1, 1, 64, 64, generator=gen)
    return gray, (torch.rand(1, 1, 64, 64, generator=gen) > 0.9).float()


def find_conv_bn_pairs(model: nn.Module, *probe: torch.Tensor) -> list[tuple[str, str]]:
    """(conv name, BatchNorm name) for every BatchNorm applied directly to a conv's output in one forward pass."""
    calls: Counter = Counter()
    produced: dict[int, tuple[str, torch.Tensor]] = {}  # keeps each output alive, so ids stay unique in the pass
    consumed: list[tuple[str, str]] = []
    hooks = []
    for name, module in model.named_modules():
        if isinstance(module, nn.Conv2d):
            def after_conv(mod, args, out, name=name):
                calls[name] += 1
                produced[id(out)] = (name, out)
            hooks.append(module.register_forward_hook(after_conv))
        elif isinstance(module, nn.BatchNorm2d):
            def before_bn(mod, args, name=name):
                calls[name] += 1
                hit = produced.get(id(args[0]))
                if hit is not None and hit[1] is args[0]:
                    consumed.append((hit[0], name))
            hooks.append(module.register_forward_pre_hook(before_bn))
    readers = _ReadCounter(produced)
    try:
        with torch.no_grad(), readers:
            model(*probe)
    finally:
        for h in hooks:
            h.remove()
    # A module shared between call sites, or a conv output read by anything besides its BatchNorm, would make the
    # fold change another path.
    return [(c, b) for c, b in consumed if calls[c] == 1 and calls[b] == 1 and readers.reads[c] == 1
            and _foldable(model.get_submodule(b))]


class _ReadCounter(TorchDispatchMode):
    """How many ops read each conv's output, by conv name (``produced`` keeps the outputs alive: ids stay unique)."""

    def __init__(self, produced: dict[int, tuple[str, torch.Tensor]]) -> None:
        super().__init__()
        self.produced, self.reads = produced, Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        for t in tree_flatten((args, kwargs or {}))[0]:
            hit = self.produced.get(id(t)) if isinstance(t, torch.Tensor) else None
            if hit is not None and hit[1] is t:
                self.reads[hit[0]] += 1
        return func(*args, **(kwargs or {}))


def _foldable(bn: nn.Module) -> bool:
    return type(bn) is nn.BatchNorm2d or (hasattr(bn, "act") and hasattr(bn, "drop"))


def fuse_batchnorm(model: nn.Module, *probe: torch.Tensor, atol: float = 1e-4) -> tuple[nn.Module, FuseReport]:
    """A copy of ``model`` (eval mode) with BatchNorms folded into their convs, checked on ``probe``.

    Returns the original model (and ``pairs=0``) when the fused copy's outputs differ by more than ``atol``."""
    model = model.eval()
    pairs = find_conv_bn_pairs(model, *probe)
    batchnorms = sum(isinstance(m, nn.BatchNorm2d) for m in model.modules())
    fused = copy.deepcopy(model)
    for conv_name, bn_name in pairs:
        conv, bn = fused.get_submodule(conv_name), fused.get_submodule(bn_name)
        _replace(fused, conv_name, fuse_conv_bn_eval(conv, bn))
        _replace(fused, bn_name, _after_norm(bn))
    with torch.no_grad():
        want, got = model(*probe), fused(*probe)
    want = want if isinstance(want, (tuple, list)) else (want,)
    got = got if isinstance(got, (tuple, list)) else (got,)
    diff = max(float((a.float() - b.float()).abs().max()) for a, b in zip(want, got))
    if diff > atol:
        # Correct but slower: say so, or a refused fold would pass for a slow GPU.
        warnings.warn(f"BatchNorm folding changed the outputs by {diff:.3g} (more than {atol:g}) on the probe; "
                      f"running the model with its {batchnorms} BatchNorms as they are")
        return model, FuseReport(0, batchnorms, diff)
    return fused, FuseReport(len(pairs), batchnorms, diff)


def _after_norm(bn: nn.BatchNorm2d) -> nn.Module:
    """What stays of a BatchNorm once its affine map is in the conv: nothing, or timm's BatchNormAct2d's dropout
    and activation (identity in eval mode, and e.g. SiLU), which it applies after normalising."""
    if not _foldable(bn):
        raise TypeError(f"cannot fold {type(bn).__name__}: not a BatchNorm2d nor timm's BatchNormAct2d")
    return nn.Identity() if type(bn) is nn.BatchNorm2d else nn.Sequential(bn.drop, bn.act)


def _replace(root: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(root.get_submodule(parent_name) if parent_name else root, child, new)
