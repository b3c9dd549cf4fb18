"""Stage 1's classical prefill: what it fills, what it leaves alone, and that the untrained inpainter returns it."""
from __future__ import annotations

import dataclasses

import cv2
import numpy as np
import pytest
import torch
from skimage import data as skdata

from restore.model import ModelSpec, build_model
from restore.prefill import harmonic_fill, prefill
from restore.score import score_image
from shards import damage

TINY = ModelSpec(encoder="tu-test_efficientnet", decoder_channels=(16, 8, 8, 8, 8), cbam=False)


def _ramp_with_hole(h=64, w=80):
    yy, xx = torch.meshgrid(torch.arange(h).float(), torch.arange(w).float(), indexing="ij")
    ramp = (0.2 + 0.5 * xx / w + 0.2 * yy / h)[None, None]
    mask = torch.zeros_like(ramp)
    mask[..., 20:44, 30:60] = 1
    return ramp, mask, torch.where(mask > 0, torch.full_like(ramp, 0.05), ramp)


def test_harmonic_fill_recovers_a_linear_ramp_and_keeps_known_pixels():
    ramp, mask, damaged = _ramp_with_hole()
    out = harmonic_fill(damaged, mask)
    # A linear function solves Laplace's equation: the harmonic fill of its border is the function itself.
    assert (out - ramp)[mask > 0].abs().max() < 0.005
    assert torch.equal(out[mask == 0], damaged[mask == 0])
    # More sweeps converge further (the default trades a little accuracy for speed).
    assert (harmonic_fill(damaged, mask, sweeps=50) - ramp).abs().max() < (out - ramp).abs().max()


def test_harmonic_fill_edge_cases_and_dtypes():
    ramp, mask, damaged = _ramp_with_hole(33, 17)  # odd sizes: the pyramid keeps the last row and column
    assert torch.equal(harmonic_fill(damaged, torch.zeros_like(mask)), damaged)  # no hole: untouched
    full = harmonic_fill(damaged, torch.ones_like(mask))
    assert torch.allclose(full, torch.full_like(full, 0.5))  # nothing to interpolate from
    half = harmonic_fill(damaged.to(torch.bfloat16), mask)
    assert half.dtype == torch.bfloat16 and torch.equal(half[mask == 0], damaged.to(torch.bfloat16)[mask == 0])
    assert torch.equal(prefill("none", damaged, mask), damaged)
    with pytest.raises(ValueError, match="prefill='telea': must be one of none, harmonic"):
        prefill("telea", damaged, mask)


def test_harmonic_fill_is_at_least_as_good_as_telea_on_real_photo_holes():
    rng = np.random.default_rng(3)
    ours, telea = [], []
    for name in ("astronaut", "coffee", "chelsea"):
        gt = damage.to_gray(np.ascontiguousarray(getattr(skdata, name)()[:256, :256, :3]))
        for _ in range(3):
            mask, _ = damage.random_mask(rng, 256, 256, area_range=(0.02, 0.1))
            damaged = damage.apply_damage(gt, mask, damage.random_fill(rng))
            gt3 = np.repeat(gt[..., None], 3, -1)
            g = torch.from_numpy(damaged).float()[None, None] / 255
            fill = (harmonic_fill(g, torch.from_numpy(mask).float()[None, None])[0, 0] * 255).round().byte().numpy()
            ours.append(score_image(gt3, np.repeat(fill[..., None], 3, -1), mask)["masked_ssim"])
            t = cv2.inpaint(damaged, mask.astype(np.uint8) * 255, 5, cv2.INPAINT_TELEA)
            telea.append(score_image(gt3, np.repeat(t[..., None], 3, -1), mask)["masked_ssim"])
    assert np.mean(ours) >= np.mean(telea)


def test_untrained_inpainter_returns_the_prefill_and_old_specs_keep_no_prefill():
    ramp, mask, damaged = _ramp_with_hole()
    torch.manual_seed(0)
    model = build_model(TINY).eval()
    with torch.no_grad():
        out = model.inpaint(damaged, mask)
    assert torch.equal(out, harmonic_fill(damaged, mask))  # the residual head starts at zero
    # A checkpoint's spec written before the prefill existed rebuilds the model it was: no prefill.
    old = {k: v for k, v in TINY.to_dict().items() if k != "prefill"}
    assert ModelSpec.from_dict(old).prefill == "none"
    assert ModelSpec.from_dict(TINY.to_dict()).prefill == "harmonic"
    torch.manual_seed(0)
    legacy = build_model(dataclasses.replace(TINY, prefill="none")).eval()
    with torch.no_grad():
        assert not torch.equal(legacy.inpaint(damaged, mask), harmonic_fill(damaged, mask))
    with pytest.raises(ValueError, match="prefill must be one of"):
        ModelSpec(prefill="telea")


def test_training_and_inference_feed_stage_1_the_same_prefilled_image(tmp_path):
    """The job's training forward and the inference engine give the inpainting network the same input for the same
    damaged image: the harmonic fill of its hole (the prefill lives in the model, not in either pipeline)."""
    from job.step import StageLoss, batch_to_device
    from restore.engine import Engine
    from restore.losses import Stage1Loss, Stage2Loss
    from restore.model import inference_checkpoint

    gt = np.ascontiguousarray(skdata.astronaut()[100:164, 200:264])
    mask = np.zeros((64, 64), bool)
    mask[20:40, 12:44] = True  # the known hole
    gray = damage.apply_damage(damage.to_gray(gt), mask, 37)
    torch.manual_seed(0)
    model = build_model(TINY)
    torch.save(inference_checkpoint(model), tmp_path / "ckpt.pt")

    seen = {}

    def capture(name):
        return lambda module, args: seen.__setitem__(name, args[0].detach().float().contiguous().clone())

    model.inpainter.net.register_forward_pre_hook(capture("training"))
    batch = {"input": torch.from_numpy(gray)[None, None], "mask": torch.from_numpy(mask.astype(np.uint8))[None, None],
             "gt_gray": torch.from_numpy(np.array(damage.to_gray(gt)))[None, None], "gt": torch.from_numpy(gt)[None]}
    b = batch_to_device(batch, torch.device("cpu"), channels_last=True)
    StageLoss(model, Stage1Loss(), Stage2Loss(), "joint")(b["input"], b["mask"], b["gt_gray"], b["gt"])

    engine = Engine([tmp_path / "ckpt.pt"], device="cpu")
    engine.models[0].inpainter.net.register_forward_pre_hook(capture("inference"))
    engine.restore(gray[None], mask[None])

    assert torch.equal(seen["training"], seen["inference"])
    # what both saw: the prefilled image (normalized as the model does) and the mask
    start = harmonic_fill(torch.from_numpy(gray).float()[None, None] / 255, torch.from_numpy(mask).float()[None, None])
    assert torch.allclose(seen["training"][:, :1] * 0.225 + 0.5, start, atol=1e-6)
    assert not torch.allclose(start[0, 0][torch.from_numpy(mask)], torch.tensor(37 / 255))  # the fill is gone
    assert torch.allclose(seen["training"][:, 1:] * 0.225 + 0.5, torch.from_numpy(mask).float()[None, None])
