"""How well ``shards.damage.detect_mask`` recovers generated damage (and, optionally, real DACON damage).

    python bench/detector_iou.py [--n 500] [--size 512] [--seed 0] [DACON_SAMPLES_DIR]

Backgrounds are scikit-image's bundled photos, fitted to SIZE x SIZE. Prints mean / p1 / worst IoU, per shape and
per background, and the failures (NoDamageFound). With DACON_SAMPLES_DIR (train_input/, train_gt/, test_input/),
also compares the detector with the exact masks of the real train pairs and lists what it finds on the test inputs.
"""
from __future__ import annotations

import argparse
import time
from collections import defaultdict
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps
from skimage import data as skdata

from shards import damage

BACKGROUNDS = ("astronaut", "coffee", "chelsea", "rocket", "immunohistochemistry", "hubble_deep_field")


def backgrounds(size: int) -> dict[str, np.ndarray]:
    out = {}
    for name in BACKGROUNDS:
        img = Image.fromarray(getattr(skdata, name)()[..., :3])
        out[name] = damage.to_gray(np.asarray(ImageOps.fit(img, (size, size), Image.Resampling.LANCZOS)))
    return out


def iou(a: np.ndarray, b: np.ndarray) -> float:
    return float((a & b).sum() / max(1, (a | b).sum()))


def summary(values: list[float]) -> str:
    v = np.asarray(values)
    if v.size == 0:  # a shape or background that a small --n never drew
        return "n=   0"
    return f"n={v.size:4d} mean={v.mean():.5f} p1={np.percentile(v, 1):.5f} worst={v.min():.5f}"


def generated(n: int, size: int, seed: int) -> None:
    rng = np.random.default_rng(seed)
    bgs = backgrounds(size)
    by_shape, by_bg, all_ious, failures = defaultdict(list), defaultdict(list), [], []
    start = time.perf_counter()
    detect_s = damage_s = 0.0
    for i in range(n):
        name = BACKGROUNDS[i % len(BACKGROUNDS)]
        t = time.perf_counter()
        mask, shape = damage.random_mask(rng, size, size)
        fill = damage.random_fill(rng)
        gray = damage.apply_damage(bgs[name], mask, fill)
        damage_s += time.perf_counter() - t
        t = time.perf_counter()
        try:
            found, value = damage.detect_mask(gray)
            score = iou(found, mask)
        except damage.NoDamageFound as exc:
            failures.append(f"{name} {shape} fill={fill} frac={mask.mean():.4f}: {exc}")
            score = 0.0
        detect_s += time.perf_counter() - t
        by_shape[shape].append(score)
        by_bg[name].append(score)
        all_ious.append(score)
    total = time.perf_counter() - start
    print(f"generated damage, {n} images {size}x{size}, fills 0-100, hole 1-15%  (seed {seed})")
    print(f"  all          {summary(all_ious)}  failures={len(failures)}")
    for shape in damage.SHAPES:
        print(f"  {shape:12s} {summary(by_shape[shape])}")
    for name in BACKGROUNDS:
        print(f"  bg {name:22s} {summary(by_bg[name])}")
    clean = [v for k, vs in by_bg.items() if k not in ("astronaut", "hubble_deep_field") for v in vs]
    print(f"  without the photos with large flat black areas (astronaut, hubble): {summary(clean)}")
    print(f"  random_mask+random_fill+apply_damage: {1e3 * damage_s / n:.2f} ms/image; "
          f"detect_mask: {1e3 * detect_s / n:.2f} ms/image; whole loop {1e3 * total / n:.2f} ms/image")
    for line in failures[:10]:
        print("  FAIL", line)


def real(root: Path) -> None:
    print(f"real DACON samples in {root}")
    for path in sorted((root / "train_input").glob("*.png")):
        gray = np.asarray(Image.open(path))
        gt = Image.open(root / "train_gt" / path.name)
        exact = gray != np.asarray(gt.convert("L"))
        found, value = damage.detect_mask(gray)
        print(f"  {path.stem}: exact {exact.sum():6d} px, detected {found.sum():6d} px (value {value}), "
              f"IoU {iou(found, exact):.5f}, extra {(found & ~exact).sum()}, missed {(exact & ~found).sum()}")
    for path in sorted((root / "test_input").glob("*.png")):
        gray = np.asarray(Image.open(path))
        try:
            found, value = damage.detect_mask(gray)
        except damage.NoDamageFound as exc:
            print(f"  {path.stem}: NOT FOUND ({exc})")
            continue
        ys, xs = np.nonzero(found)
        print(f"  {path.stem}: {found.sum():6d} px ({found.mean():.4f}), value {value}, "
              f"bbox {xs.min()},{ys.min()},{xs.max()},{ys.max()}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("dacon_samples", nargs="?", type=Path)
    parser.add_argument("--n", type=int, default=500)
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    generated(args.n, args.size, args.seed)
    if args.dacon_samples:
        real(args.dacon_samples)


if __name__ == "__main__":
    main()
