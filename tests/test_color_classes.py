"""color_mode "classes": the chroma quantization, its soft targets and cross-entropy, the model's decode, the
training forward and the checkpoint round trip."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from restore import color_classes
from restore.losses import Stage1Loss, Stage2Loss
from restore.model import ModelSpec, build_model, inference_checkpoint, load_restorer, rgb_to_chroma, rgb_to_luma

SPEC = ModelSpec(encoder="tu-test_efficientnet", decoder_channels=(16, 8, 8, 8, 8), color_mode="classes")
TABLE, CENTERS = color_classes.chroma_classes()


def _class_of(cb: float, cr: float) -> int:
    """The class whose center is (cb, cr) as offsets from neutral."""
    hits = np.flatnonzero(np.all(np.isclose(CENTERS, (cb, cr)), axis=1))
    assert len(hits) == 1, (cb, cr)
    return int(hits[0])


def test_classes_are_the_in_gamut_cells_of_the_grid():
    n = int(round(1 / color_classes.CELL)) + 1
    assert TABLE.shape == (n, n) and len(CENTERS) == (TABLE >= 0).sum() == 179
    assert sorted(TABLE[TABLE >= 0].tolist()) == list(range(len(CENTERS)))
    _class_of(0.0, 0.0)  # neutral is a class
    # Pure Cb = +0.5 with Cr = +0.5 needs R - B = 1.402 * 0.5 - 1.772 * 0.5 < 1 but G far below both: out of gamut.
    assert TABLE[n - 1, n - 1] == -1 and TABLE[0, 0] == -1
    for cb, cr in CENTERS:  # every center is a valid color at some luma
        offsets = (1.402 * cr, -0.344136 * cb - 0.714136 * cr, 1.772 * cb)
        assert max(offsets) - min(offsets) <= 1.0


def test_soft_targets_weigh_the_nearest_cell_most_and_sum_to_one():
    k = _class_of(0.125, -0.0625)
    chroma = torch.tensor([0.125, -0.0625]).view(1, 2, 1, 1) + 0.5
    idx, weight = color_classes.soft_targets(chroma, torch.from_numpy(TABLE))
    assert idx.shape == weight.shape == (1, 9, 1, 1)
    assert torch.isclose(weight.sum(1), torch.ones(1, 1, 1)).all()
    assert int(idx[0, weight[0, :, 0, 0].argmax(), 0, 0]) == k
    # On a center: the center gets 1 / (1 + 4 e^-2 + 4 e^-4) (sigma half a cell, all 8 neighbours in gamut).
    assert float(weight.max()) == pytest.approx(1 / (1 + 4 * math.exp(-2) + 4 * math.exp(-4)), rel=1e-5)


def test_cross_entropy_is_log_q_for_uniform_logits_and_lowest_on_the_true_class():
    q = len(CENTERS)
    table = torch.from_numpy(TABLE)
    target = (torch.tensor([0.1875, 0.0]).view(1, 2, 1, 1) + 0.5).expand(2, 2, 8, 8)  # pools to 2 x 2
    uniform = torch.zeros(2, q, 2, 2)
    assert float(color_classes.class_cross_entropy(uniform, target, table)) == pytest.approx(math.log(q), rel=1e-6)
    right, wrong = uniform.clone(), uniform.clone()
    right[:, _class_of(0.1875, 0.0)] = 8.0
    wrong[:, _class_of(-0.1875, 0.0)] = 8.0
    ce_right = float(color_classes.class_cross_entropy(right, target, table))
    ce_wrong = float(color_classes.class_cross_entropy(wrong, target, table))
    assert ce_right < math.log(q) < ce_wrong
    # The minimum: logits equal to the log of the soft target itself give the target's entropy.
    idx, weight = color_classes.soft_targets(target[:1, :, :1, :1], table)
    best = torch.full((2, q, 2, 2), -1e4)
    best.scatter_(1, idx.expand(2, 9, 2, 2), weight.clamp_min(1e-12).log().expand(2, 9, 2, 2))
    entropy = float(-(weight * weight.clamp_min(1e-12).log()).sum())
    ce_best = float(color_classes.class_cross_entropy(best, target, table))
    assert ce_best == pytest.approx(entropy, rel=1e-4) and ce_best < ce_right
    with pytest.raises(ValueError, match="pool"):
        color_classes.class_cross_entropy(torch.zeros(2, q, 3, 3), target, table)


def test_confident_logits_decode_to_their_class_chroma_with_the_gray_as_luma():
    torch.manual_seed(0)
    colorizer = build_model(SPEC).colorizer.eval()
    k = _class_of(-0.125, 0.1875)  # a warm red, in gamut at mid gray
    logits = torch.zeros(1, len(CENTERS), 4, 5)
    logits[:, k] = 20.0
    gray = torch.full((1, 1, 16, 20), 0.5)
    rgb = colorizer.decode(logits, gray)
    assert rgb.shape == (1, 3, 16, 20)
    assert torch.allclose(rgb_to_chroma(rgb) - 0.5, torch.tensor([-0.125, 0.1875]).view(1, 2, 1, 1), atol=1e-4)
    assert (rgb_to_luma(rgb) - gray).abs().max() < 1e-5
    # Temperature 1 averages more than the annealed mean: two equal modes give their midpoint either way, a weaker
    # second mode pulls the T = 1 mean further toward it.
    logits[:, _class_of(0.125, -0.1875)] = 19.0
    cr_annealed = float(rgb_to_chroma(colorizer.decode(logits, gray))[0, 1].mean()) - 0.5
    cr_mean = float(rgb_to_chroma(colorizer.decode(logits, gray, temperature=1.0))[0, 1].mean()) - 0.5
    assert 0 < cr_mean < cr_annealed < 0.1875


def test_classes_model_keeps_luma_and_round_trips_through_a_checkpoint(tmp_path):
    torch.manual_seed(0)
    model = build_model(SPEC).eval()
    gray = torch.rand(2, 1, 40, 70)
    mask = torch.zeros(2, 1, 40, 70)
    mask[:, :, 10:20, 20:40] = 1
    with torch.no_grad():
        restored, rgb = model(gray, mask)
        assert model.colorizer.logits(restored).shape == (2, len(CENTERS), 10, 18)
    assert rgb.shape == (2, 3, 40, 70) and (rgb_to_luma(rgb) - restored).abs().max() < 1e-5
    ckpt = inference_checkpoint(model)
    assert not any("class_table" in k or "class_centers" in k for k in ckpt["model"])  # constants, not weights
    torch.save(ckpt, tmp_path / "m.pt")
    loaded, info = load_restorer(tmp_path / "m.pt")
    assert info["model_spec"]["color_mode"] == "classes"
    with torch.no_grad():
        assert torch.equal(loaded(gray, mask)[1], rgb)


@pytest.mark.parametrize("phase", ["stage2", "joint"])
def test_training_forward_uses_the_cross_entropy_and_trains_the_class_head(phase):
    from job.step import StageLoss

    torch.manual_seed(0)
    model = build_model(SPEC)
    gt = torch.rand(2, 3, 32, 32)
    gt_gray = rgb_to_luma(gt)
    mask = torch.zeros(2, 1, 32, 32)
    mask[:, :, 8:20, 8:20] = 1
    gray = torch.where(mask > 0, torch.full_like(gt_gray, 0.2), gt_gray)
    loss2 = Stage2Loss(l1=0.0, ssim=0.0, hue=0.1, classes=1.0)
    total, terms, _ = StageLoss(model, Stage1Loss(), loss2, phase)(gray, mask, gt_gray, gt)
    total.backward()
    assert {"s2_classes", "s2_hue"} <= set(terms)
    expected = terms["s2_classes"] + 0.1 * terms["s2_hue"] + (terms["s1_total"] if phase == "joint" else 0.0)
    assert float(total.detach()) == pytest.approx(float(expected), rel=1e-5)
    assert 3.0 < float(terms["s2_classes"]) < 2 * math.log(len(CENTERS))  # untrained: near log Q
    assert all(p.grad is not None for p in model.colorizer.class_head.parameters())


def test_job_config_accepts_classes_and_builds_its_loss():
    from job.config import COLOR_MODES, parse_overrides
    from job.step import model_spec
    from restore.model import COLOR_MODES as MODEL_COLOR_MODES

    assert COLOR_MODES == MODEL_COLOR_MODES  # job/config.py keeps its own copy to stay light to import
    cfg = parse_overrides(["color_mode=classes", "color_classes=2", "encoder=tu-test_efficientnet",
                           "decoder_channels=16,8,8,8,8"])
    assert model_spec(cfg).color_mode == "classes" and cfg.loss.color_classes == 2.0
    from job.config import ConfigError

    with pytest.raises(ConfigError, match="color_classes"):
        parse_overrides(["color_classes=-1"])
