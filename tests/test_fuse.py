"""Inference rewrites that must keep the model's function: TF-'same' padding moved into the convs (every model) and
BatchNorm folded into convs (the inference Engine's models)."""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from restore import fuse
from restore.fuse import fuse_batchnorm, restorer_probe
from restore.model import ModelSpec, build_model, fold_same_padding, unfold_same_padding

TINY = ModelSpec(encoder="tu-test_efficientnet", decoder_channels=(16, 8, 8, 8, 8))


def _randomize_batchnorms(model: nn.Module, seed: int = 0) -> nn.Module:
    """Trained-looking statistics: a fold of the init values (mean 0, var 1, weight 1, bias 0) would prove little."""
    gen = torch.Generator().manual_seed(seed)
    for bn in model.modules():
        if isinstance(bn, nn.BatchNorm2d):
            n = bn.num_features
            bn.running_mean.copy_(torch.rand(n, generator=gen) - 0.5)
            bn.running_var.copy_(torch.rand(n, generator=gen) * 1.5 + 0.5)
            bn.weight.data.copy_(torch.rand(n, generator=gen) + 0.5)
            bn.bias.data.copy_(torch.rand(n, generator=gen) * 0.4 - 0.2)
    return model


def _inputs(seed: int = 1, size: int = 96):
    gen = torch.Generator().manual_seed(seed)
    return torch.rand(2, 1, size, size, generator=gen), (torch.rand(2, 1, size, size, generator=gen) > 0.9).float()


def test_same_padding_is_moved_into_the_convs_without_changing_the_function():
    torch.manual_seed(0)
    model = _randomize_batchnorms(build_model(ModelSpec(encoder="efficientnet-b0", decoder_channels=(32, 16, 16, 8, 8))))
    model.eval()
    # The model as smp builds it: the ZeroPad2d modules back in front of the folded convs.
    unfolded = copy.deepcopy(model)
    assert unfold_same_padding(unfolded) == 2 * 12  # b0's stride-1 depthwise convs (16 blocks, 4 strided), 2 stages
    assert sum(isinstance(m, nn.ZeroPad2d) for m in unfolded.modules()) == 2 * 17  # + 4 strided blocks and the stem
    remaining = [m.padding for m in model.modules() if isinstance(m, nn.ZeroPad2d)]
    assert remaining and all(left != right for left, right, _, _ in remaining)  # only the strided convs' padding
    gray, mask = _inputs()
    with torch.no_grad():
        for got, want in zip(model(gray, mask), unfolded(gray, mask)):
            assert torch.equal(got, want)
    assert fold_same_padding(model) == 0  # idempotent
    assert set(model.state_dict()) == set(unfolded.state_dict())  # checkpoints load either way


def test_batchnorms_fold_into_their_convs_and_the_outputs_stay():
    torch.manual_seed(0)
    model = _randomize_batchnorms(build_model(TINY)).eval()
    gray, mask = _inputs()
    with torch.no_grad():
        want = model(gray, mask)
    fused, report = fuse_batchnorm(model, *restorer_probe())
    assert report.batchnorms == 68 and report.pairs == 68 and report.max_abs_diff < 1e-4
    assert not any(isinstance(m, nn.BatchNorm2d) for m in fused.modules())
    # timm's BatchNormAct2d keeps its activation after the fold
    assert any(isinstance(m, nn.Sequential) and any(isinstance(c, nn.SiLU) for c in m) for m in fused.modules())
    with torch.no_grad():
        got = fused(gray, mask)  # another input and size than the probe's
        assert all(float((g - w).abs().max()) < 1e-4 for g, w in zip(got, want))
        again = model(gray, mask)  # the original is left as it was
    assert all(torch.equal(a, w) for a, w in zip(again, want))
    assert sum(isinstance(m, nn.BatchNorm2d) for m in model.modules()) == 68


class _Branchy(nn.Module):
    """conv_a -> bn_a (foldable); conv_b's output read by bn_b and by the sum (not foldable); bn_c applied twice."""

    def __init__(self) -> None:
        super().__init__()
        self.conv_a, self.bn_a = nn.Conv2d(2, 4, 3, padding=1), nn.BatchNorm2d(4)
        self.conv_b, self.bn_b = nn.Conv2d(4, 4, 1), nn.BatchNorm2d(4)
        self.conv_c, self.bn_c = nn.Conv2d(4, 4, 1), nn.BatchNorm2d(4)

    def forward(self, x):
        a = self.bn_a(self.conv_a(x))
        b = self.conv_b(a)
        c = self.bn_b(b) + b
        return self.bn_c(self.bn_c(self.conv_c(c)))


def test_only_a_conv_whose_output_goes_to_one_batchnorm_only_is_folded():
    torch.manual_seed(0)
    model = _randomize_batchnorms(_Branchy()).eval()
    x = torch.rand(2, 2, 8, 8)
    assert fuse.find_conv_bn_pairs(model, x) == [("conv_a", "bn_a")]
    fused, report = fuse_batchnorm(model, x)
    assert report.pairs == 1 and isinstance(fused.bn_a, nn.Identity) and isinstance(fused.bn_b, nn.BatchNorm2d)
    with torch.no_grad():
        assert float((fused(x) - model(x)).abs().max()) < 1e-5


def test_a_fold_that_changes_the_outputs_is_refused(monkeypatch):
    torch.manual_seed(0)
    model = _randomize_batchnorms(build_model(TINY)).eval()
    # A broken fold that drops the BatchNorm instead of folding it: the probe check must catch it.
    monkeypatch.setattr(fuse, "fuse_conv_bn_eval", lambda conv, bn: copy.deepcopy(conv))
    with pytest.warns(UserWarning, match="BatchNorm folding changed the outputs"):
        kept, report = fuse_batchnorm(model, *restorer_probe())
    assert kept is model and report.pairs == 0 and report.max_abs_diff > 1e-3


def test_an_unknown_batchnorm_subclass_is_left_alone():
    class OddNorm(nn.BatchNorm2d):
        def forward(self, x):
            return super().forward(x) * 2

    model = nn.Sequential(nn.Conv2d(1, 3, 3), OddNorm(3)).eval()
    x = torch.rand(1, 1, 8, 8)
    assert fuse.find_conv_bn_pairs(model, x) == []
    with pytest.raises(TypeError, match="cannot fold OddNorm"):
        fuse._after_norm(model[1])
