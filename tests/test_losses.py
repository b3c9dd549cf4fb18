"""Losses of both stages, the hue-histogram proxy of the score, the PatchGAN and the adversarial losses."""
from __future__ import annotations

import cv2
import numpy as np
import pytest
import torch
from skimage import data as skdata

from restore.gan import PatchDiscriminator, adversarial_losses
from restore.losses import Stage1Loss, Stage2Loss, _soft_hue_histogram, hole_ssim_loss, hue_histogram_loss
from restore.model import ModelSpec, build_model, rgb_to_luma

TINY = ModelSpec(encoder="tu-test_efficientnet", decoder_channels=(32, 16, 16, 8, 8))


def _photo(name="astronaut", size=64, y=100, x=180):
    img = getattr(skdata, name)()[y : y + 4 * size : 4, x : x + 4 * size : 4, :3]
    return torch.from_numpy(np.ascontiguousarray(img)).permute(2, 0, 1)[None].float() / 255.0


def _hole(h=64, w=64, top=20, left=16, size=20):
    mask = torch.zeros(1, 1, h, w)
    mask[..., top : top + size, left : left + size] = 1.0
    return mask


def test_stage1_loss_is_zero_for_identical_and_grows_with_the_error():
    target = rgb_to_luma(_photo())
    mask = _hole()
    noise = torch.rand(target.shape, generator=torch.Generator().manual_seed(0))
    loss = Stage1Loss(l1=1.0, ssim=1.0)
    total, terms = loss(target, target, mask)
    assert total.item() == 0.0 and terms["s1_l1"].item() == 0.0 and terms["s1_ssim"].item() == 0.0
    values = []
    for t in (0.0, 0.5, 0.9):  # the prediction moves toward the target
        pred = torch.where(mask > 0, (1 - t) * noise + t * target, target)
        values.append(loss(pred, target, mask)[1])
    for key in ("s1_l1", "s1_ssim", "s1_total"):
        assert values[0][key] > values[1][key] > values[2][key] > 0, key
    assert set(values[0]) == {"s1_l1", "s1_ssim", "s1_total"}
    assert all(not v.requires_grad and v.ndim == 0 for v in values[0].values())


def test_stage1_loss_ignores_pixels_outside_the_hole():
    target = rgb_to_luma(_photo())
    mask = _hole()
    pred = torch.where(mask > 0, torch.full_like(target, 0.5), target)
    wrong_outside = torch.where(mask > 0, pred, 1.0 - target)
    a, _ = Stage1Loss()(pred, target, mask)
    b, _ = Stage1Loss()(wrong_outside, target, mask)
    assert torch.equal(a, b)


def test_hole_ssim_is_not_diluted_by_image_size():
    """The same hole in the same context on a small and on a large canvas: plain SSIM would differ by the area."""
    patch = rgb_to_luma(_photo(size=40))
    pred_patch = patch.clone()
    pred_patch[..., 12:28, 12:28] = 0.4
    mask_patch = torch.zeros_like(patch)
    mask_patch[..., 12:28, 12:28] = 1.0

    def on_canvas(side):
        canvas = torch.linspace(0, 1, side).view(1, 1, 1, side).expand(1, 1, side, side).clone()
        out = []
        for img in (pred_patch, patch, mask_patch):
            c = canvas.clone() if img is not mask_patch else torch.zeros_like(canvas)
            c[..., 5:45, 5:45] = img
            out.append(c)
        return out

    small = hole_ssim_loss(*on_canvas(50))
    large = hole_ssim_loss(*on_canvas(160))
    assert small > 0.1
    assert torch.allclose(small, large, rtol=1e-4)


def test_soft_hue_histogram_matches_opencv_histogram():
    for name in ("astronaut", "coffee", "chelsea"):
        img = getattr(skdata, name)()
        hue = cv2.cvtColor(img, cv2.COLOR_RGB2HSV)[..., 0]
        ref = cv2.calcHist([hue], [0], None, [180], [0, 180]).ravel()
        mine = _soft_hue_histogram(torch.from_numpy(img).permute(2, 0, 1)[None].float() / 255, smooth_sigma=0)[0]
        assert mine.sum().item() == pytest.approx(ref.sum(), rel=1e-4)
        assert np.corrcoef(ref, mine.numpy())[0, 1] > 0.98, name


def test_hue_loss_ranks_like_the_metric():
    rgb = _photo()
    assert hue_histogram_loss(rgb, rgb).item() < 1e-6
    swapped = rgb[:, [2, 1, 0]]  # R and B swapped: the metric's hist_sim collapses
    gray = rgb_to_luma(rgb).expand(-1, 3, -1, -1)
    desaturated = 0.5 * rgb + 0.5 * gray  # hue kept: the metric barely moves
    same = hue_histogram_loss(rgb, rgb)
    assert same < hue_histogram_loss(desaturated, rgb) < hue_histogram_loss(swapped, rgb)
    assert hue_histogram_loss(gray, rgb) > 0.5


def test_stage2_loss_terms_and_gradients_are_finite_even_on_gray_predictions():
    target = _photo()
    loss = Stage2Loss(l1=1.0, ssim=0.5, hue=0.1, chroma=0.2)
    total, terms = loss(target, target)
    assert set(terms) == {"s2_l1", "s2_ssim", "s2_hue", "s2_chroma", "s2_total"}
    assert total.item() < 1e-5
    gray = rgb_to_luma(target).expand(-1, 3, -1, -1).clone().requires_grad_(True)  # R=G=B everywhere
    total, terms = loss(gray, target)
    total.backward()
    assert torch.isfinite(gray.grad).all() and gray.grad.abs().sum() > 0
    assert terms["s2_hue"] > 0.5


def test_losses_run_in_fp32_under_autocast():
    target = _photo()
    pred = (0.8 * target + 0.1).to(torch.bfloat16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        total2, _ = Stage2Loss()(pred, target)
        total1, _ = Stage1Loss()(pred[:, :1], target[:, :1], _hole())
    assert total1.dtype == torch.float32 and total2.dtype == torch.float32


def test_ssim_losses_reject_too_small_images():
    with pytest.raises(ValueError, match="at least 11x11"):
        Stage2Loss()(torch.rand(1, 3, 8, 30), torch.rand(1, 3, 8, 30))


def test_a_few_optimizer_steps_reduce_both_losses():
    torch.manual_seed(0)
    model = build_model(TINY)
    target = _photo()
    gt_gray = rgb_to_luma(target)
    mask = _hole()
    damaged = torch.where(mask > 0, torch.full_like(gt_gray, 0.2), gt_gray)
    s1, s2 = Stage1Loss(), Stage2Loss()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    history = []
    for _ in range(12):
        restored, rgb = model(damaged, mask)
        l1_total, _ = s1(restored, gt_gray, mask)
        l2_total, _ = s2(rgb, target)
        opt.zero_grad()
        (l1_total + l2_total).backward()
        opt.step()
        history.append((l1_total.item(), l2_total.item()))
    assert history[-1][0] < history[0][0] and history[-1][1] < history[0][1]


def test_patch_discriminator_shapes_and_adversarial_losses():
    disc = PatchDiscriminator(in_channels=4, base=8, n_layers=3)
    assert disc(torch.rand(2, 4, 64, 64)).shape == (2, 1, 6, 6)
    assert PatchDiscriminator(in_channels=4, base=8, n_layers=3)(torch.rand(1, 4, 256, 256)).shape == (1, 1, 30, 30)
    assert PatchDiscriminator(4, base=8, spectral_norm=False)(torch.rand(1, 4, 70, 45)).shape == (1, 1, 6, 3)
    real, fake = torch.full((2, 1, 6, 6), 2.0), torch.full((2, 1, 6, 6), -2.0)
    hinge = adversarial_losses("hinge")
    assert hinge.discriminator(real, fake).item() == 0.0 and hinge.generator(fake).item() == 2.0
    ls = adversarial_losses("lsgan")
    assert ls.discriminator(torch.ones(3), torch.zeros(3)).item() == 0.0 and ls.generator(torch.zeros(3)).item() == 0.5
    with pytest.raises(ValueError, match="unknown adversarial loss kind 'wgan'"):
        adversarial_losses("wgan")
    # Gradients reach both players.
    pair = torch.rand(2, 4, 64, 64, requires_grad=True)
    hinge.generator(disc(pair)).backward()
    assert torch.isfinite(pair.grad).all() and pair.grad.abs().sum() > 0
