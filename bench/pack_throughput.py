"""Packing throughput of ``python -m shards.pack`` on this machine, and shard bytes per sample.

    python bench/pack_throughput.py [--n 64] [--size 512] [--workers 1,2]

Makes N distinct color photos (random crops, flips and scales of scikit-image's bundled photos, saved as JPEG)
and a DACON layout of SIZE x SIZE pairs damaged with ``shards.damage``, then times the real CLI in both modes
(the whole command, process start included) for each worker count. CPU time per sample is printed too: on a
shared machine the wall-clock rate depends on the other load, the CPU time much less.
"""
from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps
from skimage import data as skdata

from shards import damage

SOURCES = ("astronaut", "coffee", "chelsea", "rocket", "immunohistochemistry")


def make_photos(folder: Path, n: int, rng: np.random.Generator) -> list[np.ndarray]:
    folder.mkdir(parents=True)
    bases = [getattr(skdata, name)()[..., :3] for name in SOURCES]
    photos = []
    for i in range(n):
        base = bases[i % len(bases)]
        h, w = base.shape[:2]
        ch, cw = int(h * rng.uniform(0.6, 1.0)), int(w * rng.uniform(0.6, 1.0))
        y, x = rng.integers(0, h - ch + 1), rng.integers(0, w - cw + 1)
        img = Image.fromarray(base[y : y + ch, x : x + cw])
        if rng.random() < 0.5:
            img = ImageOps.mirror(img)
        img = img.resize((int(cw * 1.3), int(ch * 1.3)), Image.Resampling.BICUBIC)
        img.save(folder / f"photo_{i:04d}.jpg", quality=90)
        photos.append(np.asarray(img))
    return photos


def make_dacon(root: Path, photos: list[np.ndarray], size: int, rng: np.random.Generator) -> None:
    for sub in ("train_input", "train_gt"):
        (root / sub).mkdir(parents=True)
    rows = ["input_image_path,gt_image_path"]
    for i, photo in enumerate(photos):
        gt = np.asarray(ImageOps.fit(Image.fromarray(photo), (size, size), Image.Resampling.LANCZOS))
        mask, _ = damage.random_mask(rng, size, size)
        gray = damage.apply_damage(damage.to_gray(gt), mask, damage.random_fill(rng))
        stem = f"TRAIN_{i:05d}"
        Image.fromarray(gray, "L").save(root / "train_input" / f"{stem}.png")
        Image.fromarray(gt, "RGB").save(root / "train_gt" / f"{stem}.png")
        rows.append(f"./train_input/{stem}.png,./train_gt/{stem}.png")
    (root / "train.csv").write_text("\n".join(rows) + "\n")


def _children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def timed_pack(args: list, out: Path) -> tuple[float, float, dict]:
    """Wall seconds and CPU seconds (all pack processes, workers included) of one CLI run, and its manifest."""
    start, cpu = time.perf_counter(), _children_cpu()
    subprocess.run([sys.executable, "-m", "shards.pack", *map(str, args), "--shard-size", "1000"],
                   check=True, capture_output=True)
    seconds, cpu = time.perf_counter() - start, _children_cpu() - cpu
    manifest = json.loads((out / "train" / "manifest.json").read_text())
    return seconds, cpu, manifest


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=64)
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--workers", default="1,2")
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        photos = make_photos(tmp / "photos", args.n, rng)
        make_dacon(tmp / "dacon", photos, args.size, rng)
        print(f"{args.n} samples at {args.size}x{args.size}")
        for workers in (int(w) for w in args.workers.split(",")):
            for mode, source in (("photos", tmp / "photos"), ("dacon", tmp / "dacon")):
                out = tmp / f"out_{mode}_{workers}"
                extra = ["--seed", 0, "--size", args.size] if mode == "photos" else []
                seconds, cpu, manifest = timed_pack([mode, source, out, "--workers", workers, *extra], out)
                size = sum(s["bytes"] for s in manifest["shards"])
                print(f"  {mode:6s} workers={workers}: {args.n / seconds:6.1f} samples/s wall ({seconds:.2f} s), "
                      f"{1e3 * cpu / args.n:5.1f} CPU-ms/sample (start-up included), "
                      f"{size / manifest['count'] / 1024:.0f} KiB/sample in the shards")


if __name__ == "__main__":
    main()
