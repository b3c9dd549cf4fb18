"""The README's first command, shrunk: the real demo (pack -> torchrun DDP training -> Ray inference -> zip -> score ->
picture) with 16 photo crops and 4 training steps."""
from __future__ import annotations

import json
import zipfile

import pytest
from PIL import Image

from conftest import run_cli


@pytest.mark.dist
@pytest.mark.ray
def test_demo_runs_end_to_end_and_reports_scores_and_a_picture(tmp_path):
    out = tmp_path / "demo"
    proc = run_cli(["launch.demo", "--out", out, "--steps", "4", "--crops-per-photo", "2"], timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]

    val_keys = json.loads((out / "shards" / "val" / "manifest.json").read_text())
    keys = sorted(k for shard in val_keys["shards"] for k in shard["keys"])
    assert len(keys) >= 2

    with zipfile.ZipFile(out / "submission.zip") as zf:
        names = sorted(zf.namelist())
        assert names == sorted(f"{k}.png" for k in keys)  # flat, exactly the held-out keys
        with zf.open(names[0]) as f, Image.open(f) as img:
            assert (img.mode, img.size) == ("RGB", (512, 512))

    report = json.loads((out / "report.json").read_text())
    assert set(report["scores"]) == {"model", "gray_copy", "opencv_inpaint"}
    for scores in report["scores"].values():
        assert scores["n"] == len(keys)
        assert 0.0 <= scores["score"] <= 1.0
    assert report["margin_over_gray_copy"] == pytest.approx(
        report["scores"]["model"]["score"] - report["scores"]["gray_copy"]["score"])

    with Image.open(out / "grid.png") as grid:
        assert grid.size == (4 * 512, min(4, len(keys)) * 512)
    assert "model - gray_copy" in proc.stdout
    assert (out / "run" / "checkpoints" / "best.pt").is_file()


def test_demo_asking_for_more_gpus_than_there_are_says_so_before_any_work(tmp_path):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    proc = run_cli(["launch.demo", "--out", tmp_path / "out", "--gpus", "1"], timeout=120)
    assert proc.returncode == 1
    assert "--gpus 1: this machine has 0 CUDA GPU(s); use --gpus 0" in proc.stderr
    assert not (tmp_path / "out" / "shards").exists()


def test_demo_picks_a_gpu_batch_that_fits_the_card_eagerly():
    from launch.demo import gpu_batch

    assert gpu_batch(79.2) == (16, 2e-4)  # H100 80GB: batch 16 eager peaks at 28 GiB
    assert gpu_batch(40.0) == (16, 2e-4)
    assert gpu_batch(23.6) == (8, 1e-4)  # a 24 GB card: the job's default batch and lr


def test_extra_photos_with_the_same_file_name_in_different_folders_all_become_crops(tmp_path):
    """Wallpaper packages store every photo as ``<Name>/contents/images/2560x1600.jpg``: each must give its own crops
    (a name from the file's stem alone overwrote all but the last photo's)."""
    import numpy as np

    from launch.demo import write_extra_photos

    folder = tmp_path / "wallpapers"
    colors = {"Kite": (30, 90, 200), "Path": (40, 160, 50), "Autumn": (200, 120, 30)}
    for name, color in colors.items():
        (folder / name / "images").mkdir(parents=True)
        Image.new("RGB", (96, 64), color).save(folder / name / "images" / "2560x1600.jpg", quality=95)
    written = write_extra_photos(tmp_path / "crops", [folder], crops_per_photo=2, seed=0)
    assert len(written) == len(set(written)) == 6
    assert sorted(p.name for p in (tmp_path / "crops").iterdir()) == sorted(p.name for p in written)
    # every photo is there twice (its two crops), none overwritten by another folder's file of the same name
    nearest = [min(colors, key=lambda n: np.abs(np.asarray(Image.open(p)).reshape(-1, 3).mean(0) - colors[n]).sum())
               for p in written]
    assert sorted(nearest) == sorted(list(colors) * 2)
