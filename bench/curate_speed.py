"""How long shards.curate takes per 1,000 images on CPU, and (``--quality``) how well the thumb embedder groups.

    python bench/curate_speed.py [--n 1000] [--size 512] [--workers 1] [--quality] [--keep DIR]

Speed: N near-duplicate photos (variants of the 16 scikit-image photos below) are packed by the real packer at SIZE px,
then the stages of ``shards.curate`` are timed separately: embed (shard reading + PNG decoding + descriptor),
UMAP (after a warm-up run, so numba's one-off JIT compile is reported on its own) and HDBSCAN; "grouping" says how
the default settings group these large families (about N/16 variants per photo).

Quality: families of 8 variants (crop 75-95 % per side, 50 % flip, brightness x0.9-1.1, per-channel shift +-12,
JPEG q40-90) of 16 distinct photos, plus 4 photos cut into halves (hard negatives: same photo, different part),
clustered with the default settings for 3 UMAP seeds; prints pair recall and the share of cross-photo pairs merged.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

import cv2
import numpy as np
from PIL import Image
from skimage import data as skdata

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from shards import curate  # noqa: E402

PHOTOS = ("astronaut", "coffee", "chelsea", "rocket", "hubble_deep_field", "immunohistochemistry", "retina",
          "colorwheel", "camera", "brick", "coins", "moon", "grass", "gravel", "clock", "page")
HALVED = ("retina", "hubble_deep_field", "astronaut", "coffee")


def photo(name: str) -> np.ndarray:
    img = getattr(skdata, name)()
    return np.repeat(img[:, :, None], 3, axis=2) if img.ndim == 2 else img[:, :, :3]


def variant(img: np.ndarray, rng: np.random.Generator, size: int) -> np.ndarray:
    h, w = img.shape[:2]
    f = rng.uniform(0.75, 0.95)
    ch, cw = int(h * f), int(w * f)
    y, x = rng.integers(0, h - ch + 1), rng.integers(0, w - cw + 1)
    out = img[y:y + ch, x:x + cw]
    if rng.random() < 0.5:
        out = out[:, ::-1]
    out = np.clip(out.astype(np.float32) * rng.uniform(0.9, 1.1) + rng.uniform(-12, 12, 3), 0, 255).astype(np.uint8)
    _, jpeg = cv2.imencode(".jpg", out[:, :, ::-1], [cv2.IMWRITE_JPEG_QUALITY, int(rng.integers(40, 90))])
    out = cv2.imdecode(jpeg, cv2.IMREAD_COLOR)[:, :, ::-1]
    return cv2.resize(out, (size, size), interpolation=cv2.INTER_AREA)


def pair_rates(labels: np.ndarray, truth: np.ndarray) -> dict:
    iu = np.triu_indices(len(labels), 1)
    together = ((labels[:, None] == labels[None]) & (labels[:, None] >= 0))[iu]
    same = (truth[:, None] == truth[None])[iu]
    return {"pair_recall": round(float(together[same].mean()), 4),
            "cross_pairs_merged": round(float(together[~same].mean()), 4),
            "groups": int(labels.max() + 1), "noise": int((labels < 0).sum())}


def quality(seeds=(0, 1, 2)) -> list[dict]:
    rng = np.random.default_rng(0)
    sources = [photo(n) for n in PHOTOS]
    for n in HALVED:
        p = photo(n)
        sources += [p[:, : p.shape[1] // 2], p[:, p.shape[1] // 2:]]
    images, truth = [], []
    for i, src in enumerate(sources):
        for _ in range(8):
            images.append(variant(src, rng, 256))
            truth.append(i)
    truth = np.array(truth)
    emb = np.stack([curate.thumb_embedding(im) for im in images])
    sim = emb @ emb.T
    np.fill_diagonal(sim, -np.inf)
    distinct = truth < len(PHOTOS)
    out = [{"set": "all", "nn_same_photo": round(float((truth[sim.argmax(1)] == truth).mean()), 4)}]
    for seed in seeds:
        for name, sel in (("distinct", distinct), ("with_halves", np.ones_like(distinct))):
            labels = curate.cluster_embeddings(emb[sel], seed=seed)
            out.append({"set": name, "seed": seed, "photos": int(len(set(truth[sel]))), "images": int(sel.sum()),
                        **pair_rates(labels, truth[sel])})
    return out


def speed(n: int, size: int, workers: int, keep: Path | None, min_cluster_size: int = 5) -> dict:
    if keep is None:
        with tempfile.TemporaryDirectory(prefix="curate_speed_") as tmp:
            result = speed(n, size, workers, Path(tmp), min_cluster_size)
        return {**result, "data": "(deleted; --keep DIR keeps it)"}
    root = Path(keep)
    photos, out = root / "photos", root / "shards"
    if not (out / "train" / "manifest.json").is_file():
        photos.mkdir(parents=True, exist_ok=True)
        rng = np.random.default_rng(0)
        sources = [photo(p) for p in PHOTOS]
        for i in range(n):
            Image.fromarray(variant(sources[i % len(sources)], rng, size)).save(photos / f"img_{i:05d}.jpg", quality=95)
        subprocess.run([sys.executable, "-m", "shards.pack", "photos", str(photos), str(out), "--size", str(size),
                        "--seed", "0", "--shard-size", "250"], check=True, cwd=Path(__file__).resolve().parents[1])
    split = out / "train"

    t0, c0 = time.perf_counter(), time.process_time()
    keys, emb = curate.embed_split(split, curate.ThumbEmbedder(), workers=workers, progress=False)
    t_embed, c_embed = time.perf_counter() - t0, time.process_time() - c0
    import umap
    from sklearn.cluster import HDBSCAN

    t0 = time.perf_counter()
    curate.cluster_embeddings(np.random.default_rng(0).normal(size=(50, 8)).astype(np.float32))  # numba JIT
    t_jit = time.perf_counter() - t0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        t0, c0 = time.perf_counter(), time.process_time()
        reduced = umap.UMAP(n_neighbors=5, n_components=2, min_dist=0.0, metric="cosine",
                            random_state=0).fit_transform(emb)
        t_umap, c_umap = time.perf_counter() - t0, time.process_time() - c0
        t0, c0 = time.perf_counter(), time.process_time()
        labels = HDBSCAN(min_cluster_size=min_cluster_size, copy=True).fit_predict(reduced)
        t_hdbscan, c_hdbscan = time.perf_counter() - t0, time.process_time() - c0
    per_k = 1000.0 / len(keys)
    truth = np.array([int(k.rsplit("_", 1)[1]) % len(PHOTOS) for k in keys])  # img_{i}: variant of PHOTOS[i % 16]
    return {"images": len(keys), "size": size, "workers": workers, "min_cluster_size": min_cluster_size, "dim": int(emb.shape[1]),
            "sec_per_1000": {"embed": round(t_embed * per_k, 2), "umap": round(t_umap * per_k, 2),
                             "hdbscan": round(t_hdbscan * per_k, 3),
                             "total": round((t_embed + t_umap + t_hdbscan) * per_k, 2)},
            # CPU seconds of this process: less sensitive to other load on the machine (workers=1 only for embed)
            "cpu_sec_per_1000": {"embed": round(c_embed * per_k, 2), "umap": round(c_umap * per_k, 2),
                                 "hdbscan": round(c_hdbscan * per_k, 3)},
            "load_avg_1min": round(os.getloadavg()[0], 2),
            "umap_jit_once_sec": round(t_jit, 2), "grouping": pair_rates(labels, truth),
            "data": str(root)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--n", type=int, default=1000)
    p.add_argument("--size", type=int, default=512)
    p.add_argument("--workers", type=int, default=1)
    p.add_argument("--keep", type=Path, default=None, help="reuse/keep the packed data in this folder")
    p.add_argument("--min-cluster-size", type=int, default=5)
    p.add_argument("--quality", action="store_true", help="also measure grouping quality")
    args = p.parse_args()
    print(json.dumps({"speed": speed(args.n, args.size, args.workers, args.keep, args.min_cluster_size)}))
    if args.quality:
        for row in quality():
            print(json.dumps({"quality": row}))


if __name__ == "__main__":
    main()
