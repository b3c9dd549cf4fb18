"""Large scans in bounded memory (restore.large_image): crops around the holes, colorized at a working size.

The memory test restores a 3000x2000 scan in a fresh process and reads its peak RSS: the full-image path needs
~2.1 GB more than its start for that scan with this tiny model (this script with the full-image call in place of
the large one, 2026-11-27), the crop path ~0.08 GB; the bound is 0.6 GB.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from restore.large_image import (LargeImageRestorer, area_downscale, fit_long_side, is_large, plan_crops,
                                 upsampled_rows)
from restore.model import ModelSpec, build_model

TINY_SPEC = ModelSpec(encoder="tu-test_efficientnet", decoder_channels=(16, 8, 8, 8, 8), cbam=False)
FILL = 40


@pytest.fixture(scope="module")
def tiny_model():
    torch.manual_seed(0)
    return build_model(TINY_SPEC).eval()


def _photo(height: int, width: int) -> np.ndarray:
    """scikit-image's camera, stretched to ``height`` x ``width`` (a real photo's texture at any size)."""
    from skimage import data

    return np.array(Image.fromarray(data.camera()).resize((width, height), Image.BILINEAR))


def _owned(crops, labels, hole):
    """How many crops write each pixel (the paste rule of LargeImageRestorer._inpaint)."""
    writes = np.zeros(hole.shape, np.int32)
    for c in crops:
        y0, y1, x0, x1 = c.core
        owner = labels[np.ix_(np.arange(y0, y1) // 8, np.arange(x0, x1) // 8)] == c.group
        writes[y0:y1, x0:x1] += hole[y0:y1, x0:x1] & owner
    return writes


def test_plan_crops_covers_every_hole_pixel_once_at_the_finest_scale():
    hole = np.zeros((900, 1500), bool)
    hole[100:130, 100:140] = True  # small: one full-resolution crop of the working size around it
    hole[105:125, 150:160] = True  # 10 px away: the same group
    hole[400:800, 300:800] = True  # thick (200 px deep): one crop shrunk to the working size
    rows = np.arange(50, 850)
    hole[rows, 1000 + rows // 2] = True  # a 1-px scratch 800 px long: full-resolution tiles
    crops, labels = plan_crops(hole, work_size=128)

    assert (_owned(crops, labels, hole) == hole).all()  # every hole pixel written exactly once, nothing else
    for c in crops:
        y0, y1, x0, x1 = c.box
        cy0, cy1, cx0, cx1 = c.core
        assert y0 <= cy0 < cy1 <= y1 and x0 <= cx0 < cx1 <= x1
        assert max(y1 - y0, x1 - x0) * c.scale <= 128 + 1e-6  # the model never sees more than the working size
    small = [c for c in crops if c.core[0] <= 100 and c.core[2] <= 100]
    assert len(small) == 1 and small[0].scale == 1.0 and small[0].core[3] >= 160
    assert small[0].box[1] - small[0].box[0] == 128 and small[0].box[3] - small[0].box[2] == 128
    thick = [c for c in crops if c.core[0] <= 400 < c.core[1] and c.core[2] <= 300 < c.core[3]]
    assert len(thick) == 1 and thick[0].scale < 1.0
    scratch = [c for c in crops if c.core[2] >= 1000]
    assert len(scratch) >= 4 and all(c.scale == 1.0 for c in scratch)
    assert plan_crops(np.zeros((300, 300), bool), 128)[0] == []


def test_a_scratch_running_into_a_stain_keeps_full_resolution():
    hole = np.zeros((1000, 1000), bool)
    hole[300:700, 300:700] = True
    hole[np.arange(1000), np.arange(1000)] = True  # crosses the stain
    crops, labels = plan_crops(hole, work_size=128)
    assert (_owned(crops, labels, hole) == hole).all()
    far = [c for c in crops if c.core[1] <= 150]  # scratch tiles far from the stain
    assert far and all(c.scale == 1.0 for c in far)


def test_area_downscale_and_strip_upsampling_match_interpolate():
    gray = _photo(301, 517)
    x = torch.from_numpy(gray.copy())[None, None].float() / 255
    small = area_downscale(gray, (61, 97), strip_pixels=4000)  # strips of 7 rows
    torch.testing.assert_close(small, F.interpolate(x, size=(61, 97), mode="area"), atol=1e-6, rtol=0)
    chroma = torch.rand(1, 2, 61, 97)
    strips = list(upsampled_rows(chroma, 301, 517, rows=10))
    assert [r0 for r0, _, _ in strips] == list(range(0, 301, 10))
    full = torch.cat([s for _, _, s in strips], dim=2)
    # The same source rows and weights; only the order of the float operations differs (~1e-6).
    torch.testing.assert_close(full, F.interpolate(chroma, size=(301, 517), mode="bilinear", align_corners=False),
                               atol=1e-5, rtol=0)
    middle = torch.cat([s for _, _, s in upsampled_rows(chroma, 301, 517, rows=7, start=100, stop=151)], dim=2)
    torch.testing.assert_close(middle, full[:, :, 100:151], atol=1e-5, rtol=0)


def test_large_image_keeps_the_luma_and_fills_the_holes(tiny_model):
    height, width = 900, 1200
    gray = _photo(height, width)
    mask = np.zeros((height, width), np.uint8)
    mask[400:480, 500:620] = 1
    gray[mask != 0] = FILL
    restorer = LargeImageRestorer(tiny_model, work_size=256, strip_pixels=50_000)
    rgb = restorer.restore(gray, mask)

    assert rgb.shape == (height, width, 3) and rgb.dtype == np.uint8
    luma = np.asarray(Image.fromarray(rgb).convert("L"))
    known = mask == 0
    assert (luma[known] == gray[known]).all()
    # The hole's luma is stage 1's fill on its full-resolution crop, bit for bit.
    (crop,), _ = plan_crops(mask != 0, 256)
    assert crop.scale == 1.0
    y0, y1, x0, x1 = crop.box
    with torch.inference_mode():
        g = torch.from_numpy(gray[y0:y1, x0:x1].copy())[None, None].float() / 255
        m = torch.from_numpy(mask[y0:y1, x0:x1].copy())[None, None].float()
        fill = (tiny_model.inpaint(g, m).clamp(0, 1) * 255).round().to(torch.uint8)[0, 0].numpy()
    hole_in_crop = mask[y0:y1, x0:x1] != 0
    assert (luma[y0:y1, x0:x1][hole_in_crop] == fill[hole_in_crop]).all()
    assert (luma[~known] != FILL).mean() > 0.9
    # The colors are the colorizer's at the working size, laid on the full image: the mean chroma agrees.
    with torch.inference_mode():
        small = tiny_model.colorize(area_downscale(luma, fit_long_side(height, width, 256)))
    small_mean = small.mean(dim=(0, 2, 3)).numpy() * 255
    assert np.abs(rgb.reshape(-1, 3).mean(0) - small_mean).max() < 3
    assert np.abs(rgb[..., 0].astype(int) - rgb[..., 2]).mean() > 1  # not gray
    assert restorer.last["groups"] == 1 and restorer.last["crops"] == 1
    assert restorer.last["color_size"] == (192, 256)


def test_clean_large_image_is_only_colorized(tiny_model):
    gray = _photo(700, 1000)
    batch = np.zeros((2, 700, 1000, 3), np.uint8)
    rgb = LargeImageRestorer(tiny_model, work_size=128).restore(gray, np.zeros_like(gray), out=batch[1])
    assert rgb.base is batch and (batch[0] == 0).all()
    assert (np.asarray(Image.fromarray(rgb).convert("L")) == gray).all()


def test_is_large():
    assert not is_large(512, 512)
    assert is_large(3000, 2000)
    assert is_large(1000, 1000, large_above=0.5) and not is_large(1000, 1000, large_above=None)


_MEASURE = textwrap.dedent("""
    import json, resource, sys
    import numpy as np, torch
    from PIL import Image
    from skimage import data
    from restore.large_image import LargeImageRestorer
    from restore.model import ModelSpec, build_model

    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = build_model(ModelSpec(encoder="tu-test_efficientnet", decoder_channels=(16, 8, 8, 8, 8),
                                  cbam=False)).eval()
    height, width = 2000, 3000
    gray = np.asarray(Image.fromarray(data.camera()).resize((width, height), Image.BILINEAR))
    mask = np.zeros((height, width), np.uint8)
    mask[300:460, 400:700] = 1
    mask[1300:1700, 2000:2500] = 1
    gray = np.where(mask != 0, 40, gray).astype(np.uint8)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    rgb = LargeImageRestorer(model, work_size=256).restore(gray, mask)
    grew = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before
    luma = np.asarray(Image.fromarray(rgb).convert("L"))
    known = mask == 0
    print(json.dumps({"shape": list(rgb.shape), "grew_mb": grew / 1024,
                      "known_exact": bool((luma[known] == gray[known]).all()),
                      "hole_changed": float((luma[~known] != 40).mean())}))
""")


def test_3000x2000_scan_restores_at_full_size_in_bounded_memory(repo_root):
    """Peak RSS growth of a fresh process while it restores the scan: the full-image path grows by ~2.1 GB here
    (the tiny model's decoder at 6 MP), the crop path by ~0.08 GB."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-c", _MEASURE], cwd=repo_root, env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["shape"] == [2000, 3000, 3]
    assert result["known_exact"]
    assert result["hole_changed"] > 0.9
    assert result["grew_mb"] < 600, result


# ------------------------------------------------------------------------------- the engine and the actor route
@pytest.fixture(scope="module")
def ckpt(tmp_path_factory, tiny_model):
    from restore.model import inference_checkpoint

    path = tmp_path_factory.mktemp("large_ckpt") / "tiny.pt"
    torch.save(inference_checkpoint(tiny_model), path)
    return path


def test_engine_keeps_the_full_image_path_for_small_images(ckpt):
    from restore.engine import Engine

    rng = np.random.default_rng(0)
    gray = rng.integers(0, 256, (3, 96, 128), dtype=np.uint8)
    mask = np.zeros_like(gray)
    mask[:, 20:50, 30:70] = 1
    engine = Engine([ckpt], device="cpu")
    out = engine.restore(gray, mask)
    assert engine.large.last == {}  # never took the large path
    assert np.array_equal(out, Engine([ckpt], device="cpu", large_above=float("inf")).restore(gray, mask))


def test_engine_restores_each_large_image_alone_as_large_image_does(ckpt):
    from restore.engine import Engine
    from restore.model import load_restorer

    gray = np.stack([_photo(600, 800), _photo(600, 800)[:, ::-1]])
    mask = np.zeros_like(gray)
    mask[0, 100:160, 200:300] = 1
    mask[1, 300:330, 500:700] = 1
    gray[mask != 0] = FILL
    lines = []
    engine = Engine([ckpt], device="cpu", large_above=0.4, work_size=128, large_log=lines.append)
    out = engine.restore(gray, mask)
    assert out.shape == (2, 600, 800, 3)
    model = load_restorer(ckpt)[0].to(memory_format=torch.channels_last)
    reference = LargeImageRestorer(model, work_size=128, channels_last=True)
    for i in range(2):
        assert np.array_equal(out[i], reference.restore(gray[i], mask[i]))
    assert len(lines) == 2 and all(line.startswith("large image 800x600: 1 hole region(s)") for line in lines)
    assert engine.forward_passes == 2
    assert engine.is_large(600, 800) and not engine.is_large(500, 700)  # 0.48 and 0.35 MP around 0.4


def test_actor_never_stacks_large_images_into_one_call(ckpt, capsys):
    from restore import inputs, ray_pipeline

    worker = ray_pipeline.RestoreWorker([str(ckpt)], tta=False, composite=True, keep_gt=False, batch_size=4,
                                        work_size=128, large_above=0.01)
    calls = []
    restore = worker.engine.restore
    worker.engine.restore = lambda gray, mask, names: calls.append(gray.shape) or restore(gray, mask, names)
    shapes = [(120, 100), (120, 100), (40, 40), (40, 40)]  # two large (0.012 MP), two small
    rows = [inputs._row(f"k{i}", "s", inputs.TODO, size=s, gray=np.full(s, 128, np.uint8),
                        mask=np.zeros(s, np.uint8)) for i, s in enumerate(shapes)]
    batch = {}
    for column in rows[0]:  # as Ray hands the rows over: images of several sizes in an object column
        values = [r[column] for r in rows]
        batch[column] = np.empty(len(values), dtype=object)
        batch[column][:] = values
        if not isinstance(values[0], (str, np.ndarray)):
            batch[column] = np.array(values)
    result = worker(batch)
    assert sorted(calls) == [(1, 120, 100), (1, 120, 100), (2, 40, 40)]
    assert [r.shape for r in result["rgb"]] == [(*s, 3) for s in shapes]
    logged = capsys.readouterr().out  # each large image's line names its key
    assert "large image k0 100x120:" in logged and "large image k1 100x120:" in logged
