"""Session fixtures shared by the whole suite: tiny photos, tiny DACON-layout data, and shards packed by the real CLI.

Everything is generated here (scikit-image's bundled photos + synthetic images); nothing outside the repo is read.
"""
from __future__ import annotations

import os

# Tiny models on 2 shared cores run 5-10x slower with torch's default threads (they fight each other and the
# torchrun/Ray/SLURM processes the suite starts); one thread per process, inherited by every subprocess.
os.environ.setdefault("OMP_NUM_THREADS", "1")

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from skimage import data as skdata

from shards import damage

REPO_ROOT = Path(__file__).resolve().parents[1]

# (name, image factory); photos are RGB crops so that the tiny images still have texture, never large flat areas.
_PHOTO_SOURCES = ("astronaut", "coffee", "chelsea", "rocket", "immunohistochemistry")
TINY_SIZE = 64


def run_cli(args, cwd=None, check=False, timeout=300) -> subprocess.CompletedProcess:
    """Run ``python -m <args>`` with this interpreter (the real CLI, a real process), capturing text output."""
    return subprocess.run(
        [sys.executable, "-m", *map(str, args)],
        cwd=cwd or REPO_ROOT,
        capture_output=True,
        text=True,
        check=check,
        timeout=timeout,
    )


def _photo_crops(n: int, side: int, seed: int = 0) -> list[tuple[str, np.ndarray]]:
    """``n`` distinct RGB crops: pieces of scikit-image photos, then smooth random color fields."""
    rng = np.random.default_rng(seed)
    crops: list[tuple[str, np.ndarray]] = []
    for name in _PHOTO_SOURCES:
        img = getattr(skdata, name)()
        if img.ndim != 3:
            continue
        img = img[..., :3]
        h, w = img.shape[:2]
        # The middle of each photo (astronaut's borders are flat black: flat areas confuse the detector).
        for dy, dx in ((0.3, 0.3), (0.55, 0.5)):
            y, x = min(int(h * dy), h - 2 * side), min(int(w * dx), w - 2 * side)
            crop = img[y : y + 2 * side : 2, x : x + 2 * side : 2].astype(np.float64)
            # Sensor-like noise, as in real photos: no large areas of one exact gray that could pass for damage.
            crop = (crop + rng.normal(0, 2.0, crop.shape)).round().clip(0, 255).astype(np.uint8)
            crops.append((f"{name}_{len(crops)}", crop))
            if len(crops) == n:
                return crops
    while len(crops) < n:
        yy, xx = np.mgrid[0:side, 0:side] / side
        phase = rng.uniform(0, 2 * np.pi, 3)
        freq = rng.uniform(2, 6, 3)
        img = np.stack([np.sin(freq[c] * (xx + yy * (c + 1)) * np.pi + phase[c]) for c in range(3)], axis=-1)
        img = (127.5 + 100 * img + rng.normal(0, 12, img.shape)).clip(0, 255).astype(np.uint8)
        crops.append((f"generated_{len(crops)}", img))
    return crops


# Modules whose module fixtures are worth building once (a local Ray; a UMAP-curated split, ~25 s of numba JIT).
ONE_WORKER_MODULES = {"test_batch_infer", "test_curate"}
# Tests that start processes or compile run first: a worker queues its next tests ahead, and the run should end on
# short ones that fill every worker, not on a long test queued behind another.
LONG_MARKS = ("slurm", "dist", "ray", "compile")


@pytest.hookimpl(tryfirst=True)  # before xdist reads the groups
def pytest_collection_modifyitems(config, items):
    """Work units for ``pytest -n 2 --dist loadgroup`` (setup.cfg). Every test that uses the local SLURM cluster, a
    machine-wide service that a module stops when it is done, runs on one worker so that none overlap; the modules of
    ``ONE_WORKER_MODULES`` run whole on one worker; every other test is a unit of its own."""
    items.sort(key=lambda item: not any(item.get_closest_marker(m) for m in LONG_MARKS))  # stable
    for item in items:
        if item.get_closest_marker("slurm"):
            item.add_marker(pytest.mark.xdist_group("slurm"))
        elif item.module.__name__ in ONE_WORKER_MODULES:
            item.add_marker(pytest.mark.xdist_group(item.module.__name__))


@pytest.fixture(scope="session")
def repo_root() -> Path:
    return REPO_ROOT


@pytest.fixture(scope="session")
def photo_dir(tmp_path_factory) -> Path:
    """A folder of 12 small (96x96) distinct RGB photos in PNG and JPEG (the packer must accept both)."""
    root = tmp_path_factory.mktemp("photos")
    for i, (name, img) in enumerate(_photo_crops(12, 96)):
        if i % 4 == 3:
            Image.fromarray(img).save(root / f"{name}.jpg", quality=95)
        else:
            Image.fromarray(img).save(root / f"{name}.png")
    return root


@pytest.fixture(scope="session")
def tiny_shards(photo_dir, tmp_path_factory) -> Path:
    """``photo_dir`` packed by the real CLI at 64x64: the returned folder has ``train/`` (9) and ``val/`` (3)."""
    out = tmp_path_factory.mktemp("tiny_shards") / "shards"
    run_cli(["shards.pack", "photos", photo_dir, out, "--size", TINY_SIZE, "--seed", 0, "--val-fraction", 0.25,
             "--shard-size", 3], check=True)
    return out


@pytest.fixture(scope="session")
def one_shard_shards(photo_dir, tmp_path_factory) -> Path:
    """``photo_dir`` packed at 64x64 with the default shard size: ONE shard per split, ``train/`` (9) and ``val/``
    (3), fewer shards (and validation samples) than the ranks of the multi-rank tests."""
    out = tmp_path_factory.mktemp("one_shard") / "shards"
    run_cli(["shards.pack", "photos", photo_dir, out, "--size", TINY_SIZE, "--seed", 0, "--val-fraction", 0.25],
            check=True)
    return out


def make_dacon_root(root: Path, n_train: int = 6, n_test: int = 4, size: int = TINY_SIZE, seed: int = 1) -> dict:
    """Write a DACON-layout folder (train_input/, train_gt/, train.csv, test_input/, test.csv) with real damage.

    Returns the truth: ``{"masks": {stem: bool mask}, "fills": {stem: fill}}`` for every train and test input.
    Holes are at least 3% of the image so that they stay detectable at 64x64 (the detector needs >= 50 px).
    """
    rng = np.random.default_rng(seed)
    for sub in ("train_input", "train_gt", "test_input"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    truth: dict = {"masks": {}, "fills": {}}
    crops = _photo_crops(n_train + n_test, size, seed=seed)
    train_rows, test_rows = [], []
    for i, (_, rgb) in enumerate(crops):
        train = i < n_train
        stem = f"TRAIN_{i:05d}" if train else f"TEST_{i - n_train:03d}"
        mask, _ = damage.random_mask(rng, size, size, shapes=(damage.SHAPES[i % len(damage.SHAPES)],),
                                     area_range=(0.03, 0.15))
        fill = damage.random_fill(rng)
        gray = damage.apply_damage(damage.to_gray(rgb), mask, fill)
        truth["masks"][stem], truth["fills"][stem] = mask, fill
        if train:
            Image.fromarray(gray, mode="L").save(root / "train_input" / f"{stem}.png")
            Image.fromarray(rgb, mode="RGB").save(root / "train_gt" / f"{stem}.png")
            train_rows.append(f"{stem},./train_input/{stem}.png,./train_gt/{stem}.png")
        else:
            Image.fromarray(gray, mode="L").save(root / "test_input" / f"{stem}.png")
            test_rows.append(f"{stem},./test_input/{stem}.png")
    (root / "train.csv").write_text("id,input_image_path,gt_image_path\n" + "\n".join(train_rows) + "\n")
    (root / "test.csv").write_text("id,input_image_path\n" + "\n".join(test_rows) + "\n")
    return truth


@pytest.fixture(scope="session")
def tiny_dacon_truth(tmp_path_factory) -> tuple[Path, dict]:
    root = tmp_path_factory.mktemp("dacon") / "data"
    return root, make_dacon_root(root)


@pytest.fixture(scope="session")
def tiny_dacon_root(tiny_dacon_truth) -> Path:
    """A DACON-layout folder: 6 train pairs (TRAIN_00000..) and 4 test inputs (TEST_000..), 64x64, with an id column."""
    return tiny_dacon_truth[0]


@pytest.fixture(scope="session")
def tiny_dacon_shards(tiny_dacon_root, tmp_path_factory) -> Path:
    """``tiny_dacon_root`` packed by the real ``python -m shards.pack dacon``: ``train/`` (6) and ``test/`` (4)."""
    out = tmp_path_factory.mktemp("tiny_dacon_shards") / "shards"
    run_cli(["shards.pack", "dacon", tiny_dacon_root, out, "--shard-size", 4], check=True)
    return out


@pytest.fixture(scope="session")
def cli():
    """``run_cli`` as a fixture, for tests that prefer injection over import."""
    return run_cli
