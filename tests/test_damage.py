"""The damage generator and the mask detector (shards.damage)."""
from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image
from scipy import ndimage

from conftest import _photo_crops
from shards import damage
from shards.detector import Detection, detect_damage

FOUR = ndimage.generate_binary_structure(2, 1)


@pytest.fixture(scope="module")
def backgrounds() -> list[np.ndarray]:
    """Gray 128x128 photo crops (noisy like real photos): no flat area that could pass for damage."""
    return [damage.to_gray(rgb) for _, rgb in _photo_crops(8, 128, seed=0)]


@pytest.mark.parametrize("size", [(64, 64), (64, 200), (512, 512)])
@pytest.mark.parametrize("shape", damage.SHAPES)
def test_random_mask_is_one_region_in_the_area_range(shape, size):
    rng = np.random.default_rng(7)
    drawn = []
    for _ in range(25):
        mask, kind = damage.random_mask(rng, *size, shapes=(shape,))
        assert mask.shape == size and mask.dtype == bool
        assert 0.01 <= mask.mean() <= 0.15, (kind, mask.mean())
        _, n = ndimage.label(mask, structure=FOUR)
        assert n == 1, f"{kind}: {n} 4-connected pieces"
        drawn.append(kind)
    # The rectangle fallback is for rare misses only: the requested shape is what gets drawn.
    assert drawn.count(shape) >= 23, drawn


def test_random_mask_honours_area_range_and_spreads_over_it():
    rng = np.random.default_rng(0)
    fractions = [damage.random_mask(rng, 96, 96, area_range=(0.05, 0.10))[0].mean() for _ in range(200)]
    assert min(fractions) >= 0.05 and max(fractions) <= 0.10
    assert min(fractions) < 0.055 and max(fractions) > 0.095  # the whole range is used
    # A one-value range is met exactly (by the rectangle fallback when no other shape lands on it).
    assert {int(damage.random_mask(rng, 100, 100, area_range=(0.05, 0.05))[0].sum()) for _ in range(20)} == {500}


def test_random_mask_draws_every_shape_and_is_deterministic():
    a = [damage.random_mask(np.random.default_rng(3), 64, 64) for _ in range(2)]
    assert np.array_equal(a[0][0], a[1][0]) and a[0][1] == a[1][1]
    rng = np.random.default_rng(1)
    kinds = {damage.random_mask(rng, 64, 64)[1] for _ in range(100)}
    assert kinds == set(damage.SHAPES)
    other = damage.random_mask(np.random.default_rng(4), 64, 64)[0]
    assert not np.array_equal(a[0][0], other)


def test_polygons_can_leave_unfilled_islands():
    """Self-crossing outlines are filled even-odd like the real damage: some masks enclose unfilled pixels."""
    rng = np.random.default_rng(0)
    with_islands = 0
    for _ in range(60):
        mask, _ = damage.random_mask(rng, 256, 256, shapes=("polygon",))
        with_islands += int((ndimage.binary_fill_holes(mask) & ~mask).any())
    assert with_islands >= 3


def test_bad_arguments_are_rejected():
    rng = np.random.default_rng(0)
    with pytest.raises(ValueError, match="shapes"):
        damage.random_mask(rng, 64, 64, shapes=("hexagon",))
    with pytest.raises(ValueError, match="area_range"):
        damage.random_mask(rng, 64, 64, area_range=(0.2, 0.1))
    with pytest.raises(ValueError, match="fill_range"):
        damage.random_fill(rng, (10, 300))


def test_random_fill_covers_the_inclusive_range():
    rng = np.random.default_rng(0)
    fills = [damage.random_fill(rng) for _ in range(3000)]
    assert min(fills) == 0 and max(fills) == 100
    assert all(isinstance(f, int) for f in fills)
    assert {damage.random_fill(rng, (42, 42)) for _ in range(5)} == {42}


def test_apply_damage_sets_only_the_hole():
    rng = np.random.default_rng(0)
    gray = rng.integers(0, 256, (64, 64), dtype=np.uint8)
    before = gray.copy()
    mask, _ = damage.random_mask(rng, 64, 64)
    out = damage.apply_damage(gray, mask, 37)
    assert np.array_equal(gray, before)  # input untouched
    assert (out[mask] == 37).all()
    assert np.array_equal(out[~mask], gray[~mask])
    with pytest.raises(ValueError, match="mask shape"):
        damage.apply_damage(gray, mask[:10], 3)


def test_to_gray_is_exactly_pil_luma():
    rgb = np.random.default_rng(0).integers(0, 256, (80, 90, 3), dtype=np.uint8)
    expected_pil = np.asarray(Image.fromarray(rgb, "RGB").convert("L"))
    r, g, b = (rgb[..., i].astype(np.uint32) for i in range(3))
    expected_formula = ((19595 * r + 38470 * g + 7471 * b + 0x8000) >> 16).astype(np.uint8)
    out = damage.to_gray(rgb)
    assert out.dtype == np.uint8 and out.shape == (80, 90)
    assert np.array_equal(out, expected_pil)
    assert np.array_equal(out, expected_formula)


def test_exact_mask_is_input_differing_from_luma():
    rng = np.random.default_rng(5)
    rgb = rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)
    gray = damage.to_gray(rgb)
    mask, _ = damage.random_mask(rng, 64, 64, area_range=(0.1, 0.15))
    fill = int(np.bincount(gray[mask]).argmax())  # some hole pixels already have the fill value
    damaged = damage.apply_damage(gray, mask, fill)
    exact = damage.exact_mask(damaged, rgb)
    assert np.array_equal(exact, mask & (gray != fill))
    assert exact.sum() < mask.sum()  # the rule cannot see hole pixels whose luma equals the fill
    with pytest.raises(ValueError, match="shape"):
        damage.exact_mask(damaged[:, :10], rgb)


def test_detector_recovers_generated_damage_for_all_shapes_and_fills(backgrounds):
    """All 5 shapes x fill values 0..100 on photo backgrounds (128x128, hole 1-15%).

    Measured: 499 of 505 found, mean IoU 0.998, worst 0.91. The six not found lie on a background of the fill's own
    tone along much of the outline (a hard step on 15-59% of it, median step 1-3 levels): the detector says "no damage"
    there rather than guess, as it must for a photo's own dark areas (the old detector returned the largest flat
    region anyway).
    Every detection is the fill's value and contains the whole hole.
    """
    rng = np.random.default_rng(0)
    ious, missed = [], []
    for shape in damage.SHAPES:
        for fill in range(0, 101):
            gray = backgrounds[fill % len(backgrounds)]
            mask, _ = damage.random_mask(rng, 128, 128, shapes=(shape,))
            try:
                found, value = damage.detect_mask(damage.apply_damage(gray, mask, fill))
            except damage.NoDamageFound as exc:
                assert "soft-edged" in str(exc), exc
                missed.append((shape, fill))
                continue
            assert value == fill
            assert not (mask & ~found).any(), f"{shape} fill {fill}: detection misses hole pixels"
            ious.append((found & mask).sum() / (found | mask).sum())
    assert len(missed) <= 8, missed  # 1.6% of 505
    ious = np.array(ious)
    assert ious.mean() >= 0.99, ious.mean()
    assert np.percentile(ious, 5) >= 0.97
    assert ious.min() >= 0.7, ious.min()


def test_detector_rejects_undamaged_tiny_and_flat_images(backgrounds):
    clean = backgrounds[0]
    with pytest.raises(damage.NoDamageFound, match="no region of one constant gray"):
        damage.detect_mask(clean)
    tiny = np.zeros(clean.shape, dtype=bool)
    tiny[10:15, 10:18] = True  # 40 px, below the 50 px floor
    with pytest.raises(damage.NoDamageFound, match=r"largest has 40 px \(value 3\)"):
        damage.detect_mask(damage.apply_damage(clean, tiny, 3))
    with pytest.raises(damage.NoDamageFound, match="flat image"):
        damage.detect_mask(np.full((64, 64), 128, dtype=np.uint8))
    assert issubclass(damage.NoDamageFound, ValueError)


def test_detector_picks_the_largest_region_and_uses_4_connectivity(backgrounds):
    gray = backgrounds[1].copy()
    small = np.zeros(gray.shape, dtype=bool)
    small[5:15, 5:15] = True  # 100 px of value 10
    big = np.zeros(gray.shape, dtype=bool)
    big[40:60, 40:70] = True  # 600 px of value 90
    gray = damage.apply_damage(damage.apply_damage(gray, small, 10), big, 90)
    found, value = damage.detect_mask(gray)
    assert value == 90 and np.array_equal(found, big)
    # Two squares of one value touching only at a corner are two regions under 4-connectivity.
    first, second = np.zeros(gray.shape, dtype=bool), np.zeros(gray.shape, dtype=bool)
    first[80:100, 80:100] = True  # 400 px
    second[100:115, 100:115] = True  # 225 px, diagonal neighbour
    found, value = damage.detect_mask(damage.apply_damage(backgrounds[1], first | second, 50))
    assert value == 50 and found[first].all() and not found[second].any()


def test_detector_prefers_pasted_damage_over_a_larger_natural_flat_area():
    """A clipped shadow (flat 0 fading smoothly into its surroundings) is larger than the hole, but soft-edged."""
    rng = np.random.default_rng(2)
    yy, xx = np.mgrid[0:128, 0:128]
    distance = np.hypot(yy - 30, xx - 30)
    shadow = np.clip(distance - 25, 0, 255)  # 0 inside radius 25 (~2000 px), +1 per pixel outward
    gray = np.where(distance < 45, shadow, rng.integers(100, 200, (128, 128))).astype(np.uint8)
    hole = np.zeros(gray.shape, dtype=bool)
    hole[80:110, 70:110] = True  # 1200 px, pasted onto texture
    found, value = damage.detect_mask(damage.apply_damage(gray, hole, 90))
    assert value == 90 and np.array_equal(found, hole)
    # Without the hole the shadow alone is no damage (the old detector returned it: a phantom hole).
    with pytest.raises(damage.NoDamageFound, match=r"constant gray 0 over 12\.\d% of the image, is not damage: soft-edged"):
        damage.detect_mask(gray)


def test_detector_finds_a_hole_sharing_its_value_with_a_larger_flat_area():
    """Fill 0 on a photo with a large black (clipped, soft-edged) background that the hole does not touch."""
    rng = np.random.default_rng(3)
    yy, xx = np.mgrid[0:128, 0:128]
    distance = np.hypot(yy - 30, xx - 30)
    gray = np.where(distance < 45, np.clip(distance - 25, 0, 255), rng.integers(100, 200, (128, 128)))
    hole = np.zeros((128, 128), dtype=bool)
    hole[90:120, 80:120] = True  # 1200 px of 0, far from the ~2000 px black disc
    found, value = damage.detect_mask(damage.apply_damage(gray.astype(np.uint8), hole, 0))
    assert value == 0 and np.array_equal(found, hole)


def test_detector_finds_a_hole_cut_into_a_larger_flat_area():
    """A C-shaped hole along the rim of a clipped black disc: most of the disc's edge is now the hole's hard edge,
    but hard steps onto another flat region do not count, so the disc stays natural and the hole wins."""
    rng = np.random.default_rng(4)
    yy, xx = np.mgrid[0:128, 0:128]
    distance = np.hypot(yy - 64, xx - 64)
    gray = np.where(distance < 60, np.clip(distance - 45, 0, 255), rng.integers(100, 200, (128, 128)))
    angle = np.arctan2(yy - 64, xx - 64)
    hole = (distance >= 40) & (distance < 45) & (angle > -2.5)  # ~80% of the rim, ~1000 px; the disc keeps ~5000
    damaged = damage.apply_damage(gray.astype(np.uint8), hole, 46)
    assert (damaged == 0).sum() > 4 * hole.sum()
    found, value = damage.detect_mask(damaged)
    assert value == 46 and np.array_equal(found, hole)


# ------------------------------------------------------------------------------------ detection with a conscience
def _photo_gray(name: str) -> np.ndarray:
    from skimage import data as skdata

    image = getattr(skdata, name)()
    return damage.to_gray(image[..., :3]) if image.ndim == 3 else image


def _jpeg(gray: np.ndarray, quality: int) -> np.ndarray:
    buf = io.BytesIO()
    Image.fromarray(gray, "L").save(buf, "JPEG", quality=quality)
    return np.asarray(Image.open(buf))


def _iou(a: np.ndarray, b: np.ndarray) -> float:
    return float((a & b).sum() / (a | b).sum())


@pytest.mark.parametrize("name", ["astronaut", "camera", "rocket", "coffee", "retina"])
def test_clean_photos_have_no_damage_as_png_or_jpeg(name):
    """The old detector's phantom holes: astronaut's black helmet (5.7%), camera's coat (0.7%), rocket's sky (0.4%),
    retina's black surround (10%). As PNG, as JPEG searched for a lossy fill, and with the format unknown."""
    gray = _photo_gray(name)
    with pytest.raises(damage.NoDamageFound) as exc:
        detect_damage(gray)
    assert "not damage" in str(exc.value) or "no region of one constant gray" in str(exc.value)
    for quality in (90, 75):
        for lossy in (True, None):
            with pytest.raises(damage.NoDamageFound):
                detect_damage(_jpeg(gray, quality), lossy=lossy)


def test_no_damage_says_what_was_examined():
    with pytest.raises(damage.NoDamageFound) as exc:
        detect_damage(_photo_gray("astronaut"))
    message = str(exc.value)
    assert "constant gray 0 over 5.7% of the image, is not damage: soft-edged" in message, message
    assert exc.value.evidence["fill"] == 0 and exc.value.evidence["hard_edge_share"] < 0.5
    assert exc.value.evidence["area_fraction"] == pytest.approx(0.057, abs=0.001)


def _damaged_photo(seed: int, shape: str) -> tuple[np.ndarray, np.ndarray, int]:
    rng = np.random.default_rng(seed)
    crop = _photo_gray(("coffee", "chelsea", "astronaut", "rocket", "coffee")[seed % 5])[:256, :256]
    gray = np.asarray(Image.fromarray(crop).resize((512, 512), Image.Resampling.BICUBIC))
    mask, _ = damage.random_mask(rng, 512, 512, shapes=(shape,), area_range=(0.02, 0.12))
    fill = damage.random_fill(rng, (10, 100))
    return damage.apply_damage(gray, mask, fill), mask, fill


@pytest.mark.parametrize("seed,shape", list(enumerate(damage.SHAPES)))
def test_damaged_png_gives_the_exact_mask(seed, shape):
    hurt, mask, fill = _damaged_photo(seed, shape)
    found = detect_damage(hurt)
    assert isinstance(found, Detection) and not found.lossy and found.fill == fill
    # The region of the fill's value: the hole, plus any neighbour that happens to have that gray.
    assert not (mask & ~found.mask).any() and _iou(found.mask, mask) >= 0.999
    assert found.note.startswith(f"damage: constant fill {fill} over ") and "hard edge on" in found.note
    assert found.evidence["hard_edge_share"] >= 0.5 and found.evidence["border_share"] == 0
    assert np.array_equal(damage.detect_mask(hurt)[0], found.mask)  # the old interface, same answer


@pytest.mark.parametrize("seed,shape", list(enumerate(damage.SHAPES)))
def test_damaged_jpeg_is_found_and_grown_to_its_edge(seed, shape):
    """JPEG q75 rings within ~6 px of the edge: the mask is grown through that band to the hole's edge."""
    hurt, mask, fill = _damaged_photo(seed, shape)
    smeared = _jpeg(hurt, 75)
    assert (smeared[mask] != fill).mean() > 0.03  # the fill is no longer constant
    for lossy in (True, None):
        found = detect_damage(smeared, lossy=lossy)
        assert found.lossy and found.fill == fill, (lossy, found.note)
        assert _iou(found.mask, mask) >= 0.88, (shape, _iou(found.mask, mask))
        assert found.note.startswith(f"damage: JPEG-smeared fill {fill} over ")
    grown = _iou(detect_damage(smeared, lossy=True).mask, mask)
    assert grown > _iou((smeared == fill) & mask, mask) + 0.02  # better than the exactly-equal pixels alone


def test_small_images_are_still_searched_at_their_own_scale():
    """64x64 inputs (the packer's tests): a 3% hole is found exactly; sizes follow the image."""
    rng = np.random.default_rng(3)
    for i, (_, rgb) in enumerate(_photo_crops(5, 64, seed=1)):
        mask, _ = damage.random_mask(rng, 64, 64, shapes=(damage.SHAPES[i],), area_range=(0.03, 0.15))
        fill = damage.random_fill(rng)
        found = detect_damage(damage.apply_damage(damage.to_gray(rgb), mask, fill))
        assert found.fill == fill and not (mask & ~found.mask).any() and _iou(found.mask, mask) >= 0.9


def test_lossy_search_rejects_blown_highlights_and_shadows_off_the_frame():
    """In a JPEG a clipped highlight or a crushed shadow running off the frame is one exact value with a hard edge:
    not called damage, with the reason given (the lossy search looks for DACON's fills, 0-100, only)."""
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:256, 0:256]
    photo = (90 + 40 * np.sin(xx / 9.0) * np.cos(yy / 13.0) + rng.normal(0, 3, (256, 256))).clip(0, 255)
    lamp = np.hypot(yy - 120, xx - 130) < 40  # a white globe against a mid-gray room
    with pytest.raises(damage.NoDamageFound, match="no gray value of 0-100"):
        detect_damage(_jpeg(np.where(lamp, 255, photo).astype(np.uint8), 90), lossy=True)
    with pytest.raises(damage.NoDamageFound, match="blown highlight"):  # the same lamp in a PNG: its own rule
        detect_damage(np.where(lamp, 255, photo).astype(np.uint8))
    shadow = (xx < 60) & (yy > 100)  # black, running off the left edge
    with pytest.raises(damage.NoDamageFound, match="runs off the frame"):
        detect_damage(_jpeg(np.where(shadow, 0, photo + 30).astype(np.uint8), 90), lossy=True)
    # The same black inside the frame is a fill like any other.
    hole = (np.abs(xx - 150) < 35) & (np.abs(yy - 120) < 30)
    found = detect_damage(_jpeg(np.where(hole, 0, photo + 30).astype(np.uint8), 90), lossy=True)
    assert found.fill == 0 and _iou(found.mask, hole) > 0.95


@pytest.mark.parametrize("name,seed,shape", [("camera", 0, "star"), ("chelsea", 7, "polygon")])
def test_small_thin_jpeg_holes_are_found(name, seed, shape):
    """Holes of 1-3% whose thin parts ring were missed in JPEG (before issue 25's item 4 work: the star's unfollowed
    spikes softened its outline, the polygon's slivers rang 6 px in). Found at q90 and q75, also off the JPEG grid (a
    decoded image cropped by a few pixels)."""
    rng = np.random.default_rng(seed)
    gray = np.asarray(Image.fromarray(_photo_gray(name)[:256, :256]).resize((512, 512), Image.Resampling.BICUBIC))
    mask, _ = damage.random_mask(rng, 512, 512, shapes=(shape,), area_range=(0.01, 0.03))
    fill = damage.random_fill(rng, (10, 100))
    hurt = damage.apply_damage(gray, mask, fill)
    for quality in (90, 75):
        found = detect_damage(_jpeg(hurt, quality), lossy=True)
        assert found.fill == fill and _iou(found.mask, mask) >= 0.6, (quality, found.note, _iou(found.mask, mask))
    off_grid = np.ascontiguousarray(_jpeg(hurt, 90)[3:, 5:])
    assert _iou(detect_damage(off_grid, lossy=True).mask, mask[3:, 5:]) >= 0.6


def test_lossy_search_takes_a_value_the_photo_repeats_for_the_photos_own():
    """DACON damage is ONE region: in a JPEG one flat patch of a gray is a fill, three far apart are the photo's own
    value (crushed shadows, a flat backdrop), with the reason given."""
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:256, 0:256]
    photo = (120 + 40 * np.sin(xx / 9.0) * np.cos(yy / 13.0) + rng.normal(0, 3, (256, 256))).clip(0, 255)
    patches = [(np.abs(yy - cy) < 13) & (np.abs(xx - cx) < 13) for cy, cx in ((40, 40), (40, 200), (190, 120))]
    found = detect_damage(_jpeg(np.where(patches[0], 30, photo).astype(np.uint8), 90), lossy=True)
    assert found.fill == 30 and _iou(found.mask, patches[0]) > 0.95
    with pytest.raises(damage.NoDamageFound, match="JPEG blocks of exactly 30 elsewhere"):
        detect_damage(_jpeg(np.where(np.any(patches, axis=0), 30, photo).astype(np.uint8), 90), lossy=True)
