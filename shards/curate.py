"""Near-duplicate groups and outliers of a shard split: embed every image, UMAP to 2-D, HDBSCAN.

    python -m shards.curate SHARDS_DIR [--split train] [--embedder thumb|clip] [--clip-model ViT-B-32]
                            [--clip-weights PATH] [--n-neighbors 5] [--min-cluster-size 5] [--seed 0] ...

SHARDS_DIR is the packer's output folder (its ``--split`` sub-folder is curated) or a split folder itself.
The result goes into the split's ``manifest.json`` (rewritten atomically; the tars are never touched):
``groups`` (KEY -> cluster id, -1 = noise), ``outliers`` (the noise keys) and ``curation`` (embedder, parameters,
counts). ``shards.folds.assign_folds`` keeps each group inside one fold; the job can drop the outliers.

Embedders (the gt image is embedded; the damaged input where a split has no gt):
- ``thumb`` (default, offline, CPU): a hand-made descriptor of the luma image at 128 px: uniform-LBP texture
  histograms at three scales (global + 2x2 cells), a contrast-normalized 8x8 luma thumbnail, a 16-bin luma histogram
  and a 4x4-cell HOG, each flip-symmetrized and L2-normalized. It ignores chroma on purpose (robust to color shifts).
  Measured by bench/curate_speed.py --quality (16 distinct photos x 8 variants: crop to 75-95 % per side, 50 %
  horizontal flip, brightness x0.9-1.1, per-channel shift +-12, JPEG q40-90; 3 UMAP seeds): each image's nearest
  neighbour is a variant of its own photo 99.5 % of the time; 98-100 % of same-photo pairs share a group and
  0.1-0.8 % of cross-photo pairs do (HDBSCAN's excess-of-mass selection now and then joins two whole families).
- ``clip``: an open_clip image tower (batched, on the GPU when there is one). ``--clip-model`` is an open_clip model
  name or a model config .json; ``--clip-weights`` a local weights file, or an open_clip pretrained tag (e.g.
  ``openai``), which open_clip downloads when online. open_clip is an optional dependency
  (``pip install open_clip_torch``), imported only here.

Group size: HDBSCAN splits a family much larger than ``--min-cluster-size`` into several pure sub-groups. On 1,000
images that are 62-63 variants of each of 16 photos, the seed's setting (5) gave 95 groups (every group one photo's,
16 % of same-photo pairs together); ``--min-cluster-size 20`` gave exactly the 16 photos (100 %, no cross-photo
pair). Group K-fold only separates what one group holds: raise it when families are large.

UMAP needs more images than ``--n-neighbors`` and HDBSCAN at least ``--min-cluster-size``: smaller splits are refused
(exit 2) rather than clustered into noise. Exit codes: 0 done, 2 bad input or options.
"""
from __future__ import annotations

import argparse
import multiprocessing
import os
import sys
import time
import warnings
from pathlib import Path
from typing import Callable, Iterable, Sequence

import cv2
import numpy as np

from .reader import iter_samples, read_manifest, shard_paths
from .schema import MANIFEST_NAME, atomic_write_json

EXIT_BAD_INPUT = 2
CURATION_VERSION = 1
NOISE = -1


class CurationError(Exception):
    """Bad input or options; the message names the file or option."""


# --------------------------------------------------------------------------------------------- the thumb embedder
THUMB_SIZE = 128
LBP_SCALES = (128, 64, 32)
LBP_POINTS, LBP_RADIUS = 8, 1
LBP_BINS = LBP_POINTS + 2  # "uniform" codes: P + 1 uniform patterns + one bin for the rest
HOG_ORIENTATIONS = 12
# Relative weights of the descriptor parts (each part is L2-normalized first); texture is the most crop-robust.
THUMB_WEIGHTS = {"lbp": 3.0, "luma8": 1.0, "luma_hist": 1.0, "hog": 1.0}


def _l2(v: np.ndarray) -> np.ndarray:
    v = np.asarray(v, np.float32).ravel()
    return v / (np.linalg.norm(v) + 1e-8)


def _mirror_sum(grid: np.ndarray) -> np.ndarray:
    """grid (rows, cols, ...) plus its left-right mirror: unchanged by a horizontal flip of the image."""
    return grid + grid[:, ::-1]


def _to_rgb(image: np.ndarray) -> np.ndarray:
    if image.ndim == 2:
        return np.repeat(image[:, :, None], 3, axis=2)
    if image.ndim == 3 and image.shape[2] == 3 and image.dtype == np.uint8:
        return image
    raise ValueError(f"expected a uint8 RGB (H, W, 3) or gray (H, W) image, got {image.dtype} {image.shape}")


def _orientation_cells(img: np.ndarray, cells: int = 4) -> np.ndarray:
    """HOG-like (cells, cells, HOG_ORIENTATIONS) gradient-magnitude histograms of unsigned orientation.

    Bins are centred on 0, 15, ... degrees so that a mirror image (angle t -> -t) maps bin k exactly to bin -k;
    skimage's hog bins start at 0 degrees, which breaks that symmetry for the common pure horizontal/vertical edges.
    """
    gx = cv2.Sobel(img, cv2.CV_32F, 1, 0, ksize=3)
    gy = cv2.Sobel(img, cv2.CV_32F, 0, 1, ksize=3)
    width = 180.0 / HOG_ORIENTATIONS
    angle = np.rad2deg(np.arctan2(gy, gx)) % 180.0
    bins = np.floor(angle / width + 0.5).astype(np.int64) % HOG_ORIENTATIONS
    h, w = img.shape
    cell = (np.arange(h)[:, None] * cells // h) * cells + (np.arange(w)[None, :] * cells // w)
    hist = np.bincount((cell * HOG_ORIENTATIONS + bins).ravel(), weights=np.hypot(gx, gy).ravel(),
                       minlength=cells * cells * HOG_ORIENTATIONS)
    return hist.reshape(cells, cells, HOG_ORIENTATIONS).astype(np.float32)


def thumb_embedding(image: np.ndarray) -> np.ndarray:
    """The offline descriptor of one uint8 RGB (or gray) image: float32, L2-normalized, flip-invariant."""
    from skimage.feature import local_binary_pattern

    rgb = _to_rgb(image)
    small = cv2.resize(rgb, (THUMB_SIZE, THUMB_SIZE), interpolation=cv2.INTER_AREA)
    luma = cv2.cvtColor(small, cv2.COLOR_RGB2GRAY)
    lf = luma.astype(np.float32)
    normed = (lf - lf.mean()) / (lf.std() + 1e-3)  # brightness/contrast changes cancel

    lbp_parts = []
    for scale in LBP_SCALES:
        g = luma if scale == THUMB_SIZE else cv2.resize(luma, (scale, scale), interpolation=cv2.INTER_AREA)
        codes = local_binary_pattern(g, LBP_POINTS, LBP_RADIUS, "uniform").astype(np.int64)
        h = scale // 2
        cells = np.stack([np.stack([np.bincount(codes[i * h:(i + 1) * h, j * h:(j + 1) * h].ravel(),
                                                minlength=LBP_BINS) for j in range(2)]) for i in range(2)])
        # sqrt (Hellinger) keeps the dominant flat-region code from swamping the rest
        lbp_parts.append(_l2(np.sqrt(cells.sum(axis=(0, 1)))))
        lbp_parts.append(_l2(np.sqrt(_mirror_sum(cells))))

    hog_cells = _orientation_cells(normed)
    # a flip mirrors the cell grid and maps the angle t to -t, i.e. orientation bin k to -k
    flipped = hog_cells[:, ::-1, :][..., (-np.arange(HOG_ORIENTATIONS)) % HOG_ORIENTATIONS]

    parts = {
        "lbp": _l2(np.concatenate(lbp_parts)),
        "luma8": _l2(_mirror_sum(cv2.resize(normed, (8, 8), interpolation=cv2.INTER_AREA))),
        "luma_hist": _l2(np.sqrt(np.bincount(luma.ravel() >> 4, minlength=16))),
        "hog": _l2(hog_cells + flipped),
    }
    return _l2(np.concatenate([parts[k] * w for k, w in THUMB_WEIGHTS.items()]))


class ThumbEmbedder:
    name = "thumb"

    def __init__(self) -> None:
        self.params = {"size": THUMB_SIZE, "lbp_scales": list(LBP_SCALES), "lbp": [LBP_POINTS, LBP_RADIUS, "uniform"],
                       "hog_orientations": HOG_ORIENTATIONS, "weights": dict(THUMB_WEIGHTS), "flip_invariant": True}

    def embed(self, images: Sequence[np.ndarray]) -> np.ndarray:
        return np.stack([thumb_embedding(img) for img in images])


# --------------------------------------------------------------------------------------------- the CLIP embedder
def _looks_like_path(weights: str) -> bool:
    return os.sep in weights or weights.startswith(".") or weights.endswith((".pt", ".pth", ".bin", ".safetensors"))


class ClipEmbedder:
    """An open_clip image tower. ``weights``: a local file, or a pretrained tag open_clip may download."""

    name = "clip"

    def __init__(self, model: str, weights: str | None, device: str | None = None) -> None:
        if not weights:
            raise CurationError("--embedder clip needs --clip-weights (a local weights file or an open_clip "
                                "pretrained tag such as 'openai' when online)")
        if _looks_like_path(weights) and not Path(weights).is_file():
            raise CurationError(f"{weights}: CLIP weights file does not exist")
        try:
            import open_clip
        except ImportError as exc:
            raise CurationError("--embedder clip needs open_clip, which is not installed "
                                "(pip install open_clip_torch), or use the offline --embedder thumb") from exc
        import torch

        self.torch = torch
        self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        model_name = model
        if model.endswith(".json"):  # a local model config: open_clip registers it under the file's stem
            if not Path(model).is_file():
                raise CurationError(f"{model}: open_clip model config does not exist")
            open_clip.add_model_config(model)
            model_name = Path(model).stem
        try:
            net, _, preprocess = open_clip.create_model_and_transforms(model_name, pretrained=weights,
                                                                       device=self.device)
        except Exception as exc:  # unknown model name, weights that do not match it, a failed download
            raise CurationError(f"cannot load open_clip model {model!r} with weights {weights!r}: {exc}") from exc
        self.model = net.eval()
        self.preprocess = preprocess
        shown = Path(weights).name if _looks_like_path(weights) else weights  # no local paths in the manifest
        self.params = {"model": model_name, "weights": shown, "device": self.device}

    def embed(self, images: Sequence[np.ndarray]) -> np.ndarray:
        from PIL import Image

        torch = self.torch
        batch = torch.stack([self.preprocess(Image.fromarray(_to_rgb(img))) for img in images]).to(self.device)
        with torch.no_grad(), torch.autocast(self.device.split(":")[0], enabled=self.device.startswith("cuda")):
            feats = self.model.encode_image(batch).float()
        feats = torch.nn.functional.normalize(feats, dim=-1)
        return feats.cpu().numpy().astype(np.float32)


def make_embedder(name: str, clip_model: str = "ViT-B-32", clip_weights: str | None = None):
    if name == "thumb":
        return ThumbEmbedder()
    if name == "clip":
        return ClipEmbedder(clip_model, clip_weights)
    raise CurationError(f"unknown embedder {name!r} (thumb or clip)")


# --------------------------------------------------------------------------------------------- embedding a split
def _image_of(sample) -> np.ndarray:
    return sample.gt if sample.gt is not None else sample.input


def _batched(items: Iterable, size: int) -> Iterable[list]:
    batch = []
    for item in items:
        batch.append(item)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


def _embed_shard_thumb(path: str) -> tuple[list[str], np.ndarray]:
    """Worker: every sample of one shard with the thumb embedder."""
    keys, vecs = [], []
    for sample in iter_samples([path]):
        keys.append(sample.key)
        vecs.append(thumb_embedding(_image_of(sample)))
    return keys, np.stack(vecs) if vecs else np.zeros((0, 0), np.float32)


def embed_split(split_dir: str | os.PathLike, embedder, *, batch_size: int = 64, workers: int = 1,
                progress: bool = True) -> tuple[list[str], np.ndarray]:
    """``(keys, embeddings[n, d])`` for every sample of the split, in shard order."""
    from tqdm import tqdm

    paths = shard_paths(split_dir)
    total = int(read_manifest(split_dir).get("count", 0)) or None
    keys: list[str] = []
    chunks: list[np.ndarray] = []
    with tqdm(total=total, desc=f"embed ({embedder.name})", unit="img", disable=not progress, file=sys.stderr) as bar:
        if isinstance(embedder, ThumbEmbedder) and workers > 1 and len(paths) > 1:
            # CPU descriptor: one shard per process; spawn keeps torch (imported by webdataset) out of fork trouble
            ctx = multiprocessing.get_context("spawn")
            with ctx.Pool(min(workers, len(paths))) as pool:
                for k, e in pool.imap(_embed_shard_thumb, [str(p) for p in paths]):
                    keys += k
                    if len(k):
                        chunks.append(e)
                    bar.update(len(k))
        else:
            for batch in _batched(iter_samples(paths), batch_size):
                chunks.append(embedder.embed([_image_of(s) for s in batch]))
                keys += [s.key for s in batch]
                bar.update(len(batch))
    if not keys:
        raise CurationError(f"{split_dir}: the split holds no samples")
    return keys, np.concatenate(chunks).astype(np.float32)


# --------------------------------------------------------------------------------------------- UMAP + HDBSCAN
def check_size(n: int, n_neighbors: int, min_cluster_size: int, where: str = "the split") -> None:
    if n <= n_neighbors:
        raise CurationError(f"{where} has {n} image(s); UMAP needs more than --n-neighbors ({n_neighbors})")
    if n < min_cluster_size:
        raise CurationError(f"{where} has {n} image(s), fewer than --min-cluster-size ({min_cluster_size})")


def cluster_embeddings(embeddings: np.ndarray, *, n_neighbors: int = 5, min_cluster_size: int = 5,
                       n_components: int = 2, min_dist: float = 0.0, metric: str = "cosine",
                       seed: int = 0) -> np.ndarray:
    """HDBSCAN labels (``-1`` = noise) of the UMAP reduction; deterministic for a given seed."""
    import umap
    from sklearn.cluster import HDBSCAN

    check_size(len(embeddings), n_neighbors, min_cluster_size)
    with warnings.catch_warnings():
        # a fixed random_state makes UMAP single-threaded, which it announces; that is the price of determinism
        warnings.filterwarnings("ignore", message=".*n_jobs value.*", category=UserWarning)
        reduced = umap.UMAP(n_neighbors=n_neighbors, n_components=n_components, min_dist=min_dist, metric=metric,
                            random_state=seed).fit_transform(embeddings)
    return HDBSCAN(min_cluster_size=min_cluster_size, copy=True).fit_predict(reduced).astype(int)


# --------------------------------------------------------------------------------------------- manifest
def write_curation(split_dir: str | os.PathLike, keys: Sequence[str], labels: Sequence[int],
                   curation: dict) -> dict:
    """Add ``groups``, ``outliers`` and ``curation`` to the split's manifest (atomic rename); returns it."""
    split_dir = Path(split_dir)
    manifest = read_manifest(split_dir)  # fresh: keep everything else exactly as the packer wrote it
    listed = [k for shard in manifest["shards"] for k in shard.get("keys", [])]
    if sorted(listed) != sorted(keys):
        missing = sorted(set(listed) - set(keys))[:5]
        unknown = sorted(set(keys) - set(listed))[:5]
        raise CurationError(f"{split_dir / MANIFEST_NAME}: the shards' keys disagree with the manifest "
                            f"(not read: {missing}, not listed: {unknown})")
    groups = {k: int(g) for k, g in sorted(zip(keys, labels))}
    manifest["groups"] = groups
    manifest["outliers"] = sorted(k for k, g in groups.items() if g == NOISE)
    manifest["curation"] = curation
    atomic_write_json(split_dir / MANIFEST_NAME, manifest)
    return manifest


def _group_counts(labels: np.ndarray) -> dict:
    clustered = labels[labels != NOISE]
    sizes = np.bincount(clustered) if len(clustered) else np.zeros(0, int)
    return {"images": int(len(labels)), "groups": int((sizes > 0).sum()), "outliers": int((labels == NOISE).sum()),
            "largest_group": int(sizes.max()) if len(sizes) else 0}


def curate(split_dir: str | os.PathLike, *, embedder: str = "thumb", clip_model: str = "ViT-B-32",
           clip_weights: str | None = None, n_neighbors: int = 5, min_cluster_size: int = 5, n_components: int = 2,
           min_dist: float = 0.0, metric: str = "cosine", seed: int = 0, batch_size: int = 64, workers: int = 1,
           progress: bool = True, log: Callable[[str], None] = lambda s: None) -> dict:
    """Embed, reduce, cluster and record in the manifest; returns the ``curation`` entry."""
    split_dir = Path(split_dir)
    count = int(read_manifest(split_dir).get("count", 0))
    check_size(count, n_neighbors, min_cluster_size, where=str(split_dir))  # fail before the slow part
    model = make_embedder(embedder, clip_model, clip_weights)

    t0 = time.perf_counter()
    keys, embeddings = embed_split(split_dir, model, batch_size=batch_size, workers=workers, progress=progress)
    t1 = time.perf_counter()
    labels = cluster_embeddings(embeddings, n_neighbors=n_neighbors, min_cluster_size=min_cluster_size,
                                n_components=n_components, min_dist=min_dist, metric=metric, seed=seed)
    t2 = time.perf_counter()
    curation = {
        "version": CURATION_VERSION,
        "embedder": model.name,
        "params": {"embedder": model.params, "dim": int(embeddings.shape[1]), "source": "gt (input where no gt)",
                   "umap": {"n_neighbors": n_neighbors, "n_components": n_components, "min_dist": min_dist,
                            "metric": metric, "random_state": seed},
                   "hdbscan": {"min_cluster_size": min_cluster_size, "impl": "sklearn.cluster.HDBSCAN"}},
        "counts": _group_counts(labels),
        "seconds": {"embed": round(t1 - t0, 3), "cluster": round(t2 - t1, 3)},
    }
    write_curation(split_dir, keys, labels, curation)
    log(f"{split_dir / MANIFEST_NAME}: {curation['counts']['images']} images, {curation['counts']['groups']} groups "
        f"(largest {curation['counts']['largest_group']}), {curation['counts']['outliers']} outliers; "
        f"embed {t1 - t0:.1f}s, UMAP+HDBSCAN {t2 - t1:.1f}s")
    return curation


# --------------------------------------------------------------------------------------------- CLI
def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def resolve_split_dir(shards_dir: Path, split: str) -> Path:
    """SHARDS_DIR/<split> when SHARDS_DIR is a packer output; SHARDS_DIR itself when it is a split folder."""
    if (shards_dir / MANIFEST_NAME).is_file():
        return shards_dir
    if not shards_dir.is_dir():
        raise CurationError(f"{shards_dir}: no such folder")
    split_dir = shards_dir / split
    if not (split_dir / MANIFEST_NAME).is_file():
        raise CurationError(f"{split_dir / MANIFEST_NAME}: not found (is {shards_dir} a packed shard folder?)")
    return split_dir


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m shards.curate", description=__doc__.split("\n\n")[0])
    p.add_argument("shards_dir", type=Path, help="packer output folder, or one split folder")
    p.add_argument("--split", default="train", help="split sub-folder to curate (default train)")
    p.add_argument("--embedder", choices=("thumb", "clip"), default="thumb")
    p.add_argument("--clip-model", default="ViT-B-32",
                   help="open_clip model name, or a model config .json (default ViT-B-32)")
    p.add_argument("--clip-weights", default=None, help="local weights file or open_clip pretrained tag")
    p.add_argument("--n-neighbors", type=_positive, default=5)
    p.add_argument("--min-cluster-size", type=_positive, default=5)
    p.add_argument("--n-components", type=_positive, default=2)
    p.add_argument("--min-dist", type=float, default=0.0)
    p.add_argument("--metric", default="cosine", help="UMAP metric (default cosine)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=_positive, default=64, help="images per embedder batch (default 64)")
    p.add_argument("--workers", type=_positive, default=1, help="processes for the thumb embedder (one per shard)")
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args(argv)
    if args.min_cluster_size < 2:
        p.error("--min-cluster-size must be >= 2")
    try:
        split_dir = resolve_split_dir(args.shards_dir, args.split)
        curate(split_dir, embedder=args.embedder, clip_model=args.clip_model, clip_weights=args.clip_weights,
               n_neighbors=args.n_neighbors, min_cluster_size=args.min_cluster_size, n_components=args.n_components,
               min_dist=args.min_dist, metric=args.metric, seed=args.seed, batch_size=args.batch_size,
               workers=args.workers, progress=not args.no_progress, log=lambda s: print(s, file=sys.stderr))
    except (CurationError, FileNotFoundError, ValueError) as exc:  # reader errors name the shard and key
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    return 0


if __name__ == "__main__":
    sys.exit(main())
