"""The DACON 236420 score, reproducing the official evaluation code, plus a CLI to score predictions against shards.

Per image (all arrays RGB uint8, H x W x 3; ``mask`` bool H x W, True = hole):

    score = 0.2 * ssim + 0.4 * masked_ssim + 0.4 * hist_sim

- ``ssim``: ``skimage.metrics.structural_similarity(gt, pred, channel_axis=-1, data_range=pred.max() - pred.min())``
  (7x7 uniform window, K1 0.01, K2 0.03, sample covariance, mean of the three channels). The data range is the
  prediction's own range, not 255.
- ``masked_ssim``: the same call on ``gt[mask]`` and ``pred[mask]``: (N, 3) arrays of the hole pixels in row-major
  order, i.e. a 1-D SSIM along the flattened hole per channel, with the data range of the whole predicted image.
- ``hist_sim``: OpenCV ``COLOR_RGB2HSV``, H channel only, ``calcHist`` with 180 bins over [0, 180), ``normalize``
  (L2), ``compareHist(..., HISTCMP_CORREL)``.

The official code leaves two cases undefined; here they are defined, never raise, and are reported:

- ``small_hole``: fewer than 7 hole pixels (an empty mask included). skimage raises (the window does not fit);
  ``masked_ssim`` is 0.0.
- ``constant_prediction``: ``pred.max() == pred.min()``, so the data range is 0, C1 = C2 = 0 and SSIM is 0/0 = NaN
  on flat windows (and float noise elsewhere); ``ssim`` and ``masked_ssim`` are 0.0.

Each image's flags are listed in its ``degenerate`` list and images with any flag are counted in ``n_degenerate``.

CLI: ``python -m restore.score PRED GT_SPLIT_DIR [--json] [--per-image]``; PRED is a folder or a flat zip of
``KEY.png`` files, GT_SPLIT_DIR a shard split directory holding gt and masks. Exit 2 on bad input.
"""
from __future__ import annotations

import argparse
import io
import json
import sys
import zipfile
from pathlib import Path
from typing import Iterable, Iterator, Sequence

import cv2
import numpy as np
from PIL import Image
from skimage.metrics import structural_similarity

from shards.reader import iter_samples, read_manifest, shard_paths

WEIGHTS = {"ssim": 0.2, "masked_ssim": 0.4, "hist_sim": 0.4}
TERMS = ("score", "ssim", "masked_ssim", "hist_sim")
# Layout of score_sums(): a flat float vector that DDP ranks can all-reduce with one SUM.
SCORE_FIELDS = ("n", "score", "ssim", "masked_ssim", "hist_sim", "n_degenerate")
SSIM_WIN = 7  # skimage's default uniform window; also the fewest hole pixels the masked term can use
HUE_BINS = 180

SMALL_HOLE = "small_hole"
CONSTANT_PREDICTION = "constant_prediction"


# ----------------------------------------------------------------------------------------------- validation
def _check_rgb(img: np.ndarray, name: str) -> None:
    if not isinstance(img, np.ndarray):
        raise TypeError(f"{name}: expected a numpy array, got {type(img).__name__}")
    if img.dtype != np.uint8:
        raise ValueError(f"{name}: expected dtype uint8, got {img.dtype}")
    if img.ndim != 3 or img.shape[2] != 3:
        raise ValueError(f"{name}: expected an RGB array of shape (H, W, 3), got {img.shape}")
    if img.shape[0] < SSIM_WIN or img.shape[1] < SSIM_WIN:
        raise ValueError(f"{name}: image {img.shape[:2]} is smaller than the {SSIM_WIN}x{SSIM_WIN} SSIM window")


def _check_pair(gt: np.ndarray, pred: np.ndarray) -> None:
    _check_rgb(gt, "gt")
    _check_rgb(pred, "pred")
    if gt.shape != pred.shape:
        raise ValueError(f"shape mismatch: gt {gt.shape} vs pred {pred.shape}")


def _as_mask(mask: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    if not isinstance(mask, np.ndarray):
        raise TypeError(f"mask: expected a numpy array, got {type(mask).__name__}")
    if mask.shape != shape[:2]:
        raise ValueError(f"mask: expected shape {shape[:2]}, got {mask.shape}")
    if mask.dtype == np.bool_:
        return mask
    if mask.dtype == np.uint8 and np.isin(mask, (0, 255)).all():
        return mask == 255
    raise ValueError(f"mask: expected a bool array (or uint8 with values 0/255), got {mask.dtype}")


def _data_range(pred: np.ndarray) -> int:
    return int(pred.max()) - int(pred.min())


# ----------------------------------------------------------------------------------------------- the three terms
def ssim(gt: np.ndarray, pred: np.ndarray) -> float:
    """Whole-image SSIM as the official code computes it; 0.0 for a constant prediction."""
    _check_pair(gt, pred)
    rng = _data_range(pred)
    if rng == 0:
        return 0.0
    return float(structural_similarity(gt, pred, channel_axis=-1, data_range=rng))


def masked_ssim(gt: np.ndarray, pred: np.ndarray, mask: np.ndarray) -> float:
    """1-D SSIM over the hole pixels in row-major order; 0.0 for < 7 hole pixels or a constant prediction."""
    _check_pair(gt, pred)
    mask = _as_mask(mask, gt.shape)
    rng = _data_range(pred)
    if rng == 0 or int(mask.sum()) < SSIM_WIN:
        return 0.0
    return float(structural_similarity(gt[mask], pred[mask], channel_axis=-1, data_range=rng))


def hue_histogram(img: np.ndarray) -> np.ndarray:
    """The score's hue histogram of an RGB uint8 image: 180 bins of OpenCV's H, L2-normalized, float32 (180, 1)."""
    hue = cv2.cvtColor(img, cv2.COLOR_RGB2HSV)[:, :, 0]
    hist = cv2.calcHist([hue], [0], None, [HUE_BINS], [0, HUE_BINS])
    return cv2.normalize(hist, hist)


def hist_sim(gt: np.ndarray, pred: np.ndarray) -> float:
    """Correlation of the L2-normalized 180-bin hue histograms (OpenCV HSV)."""
    _check_pair(gt, pred)
    return float(cv2.compareHist(hue_histogram(gt), hue_histogram(pred), cv2.HISTCMP_CORREL))


def score_image(gt: np.ndarray, pred: np.ndarray, mask: np.ndarray) -> dict:
    """All terms of one image: ``score``, ``ssim``, ``masked_ssim``, ``hist_sim`` and the ``degenerate`` flags."""
    _check_pair(gt, pred)
    mask = _as_mask(mask, gt.shape)
    degenerate = []
    if int(mask.sum()) < SSIM_WIN:
        degenerate.append(SMALL_HOLE)
    if _data_range(pred) == 0:
        degenerate.append(CONSTANT_PREDICTION)
    terms = {"ssim": ssim(gt, pred), "masked_ssim": masked_ssim(gt, pred, mask), "hist_sim": hist_sim(gt, pred)}
    total = sum(WEIGHTS[k] * v for k, v in terms.items())
    return {"score": total, **terms, "degenerate": degenerate}


# ----------------------------------------------------------------------------------------------- aggregation
def score_sums(per_image: Iterable[dict]) -> list[float]:
    """``[n, sum score, sum ssim, sum masked_ssim, sum hist_sim, n_degenerate]`` (order of ``SCORE_FIELDS``)."""
    sums = [0.0] * len(SCORE_FIELDS)
    for item in per_image:
        sums[0] += 1
        for i, name in enumerate(TERMS, start=1):
            sums[i] += float(item[name])
        sums[5] += 1 if item.get("degenerate") else 0
    return sums


def summarize_sums(sums: Sequence[float]) -> dict:
    """Means from (possibly all-reduced) ``score_sums``; raises for zero images rather than returning NaN."""
    if len(sums) != len(SCORE_FIELDS):
        raise ValueError(f"expected {len(SCORE_FIELDS)} sums ({', '.join(SCORE_FIELDS)}), got {len(sums)}")
    n = int(round(float(sums[0])))
    if n <= 0:
        raise ValueError("no images were scored")
    out = {name: float(sums[i]) / n for i, name in enumerate(TERMS, start=1)}
    out["n"] = n
    out["n_degenerate"] = int(round(float(sums[5])))
    return out


def summarize(per_image: Iterable[dict]) -> dict:
    """Mean ``score``, ``ssim``, ``masked_ssim``, ``hist_sim`` over images, with ``n`` and ``n_degenerate``."""
    return summarize_sums(score_sums(per_image))


# ----------------------------------------------------------------------------------------------- CLI
class ScoreInputError(ValueError):
    """Bad CLI input: the message names the file and the problem."""


def _prediction_sources(pred: Path) -> dict[str, tuple[str, object]]:
    """KEY -> (display name, loader handle) for a folder or a flat zip of KEY.png files."""
    found: dict[str, tuple[str, object]] = {}
    bad: list[str] = []
    if pred.is_dir():
        for path in sorted(pred.iterdir()):
            if path.is_dir():
                bad.append(f"{path}: a folder (predictions must be flat KEY.png files)")
            elif path.suffix.lower() != ".png":
                bad.append(f"{path}: not a .png file")
            else:
                found[path.stem] = (str(path), path)
    elif pred.is_file() and zipfile.is_zipfile(pred):
        with zipfile.ZipFile(pred) as zf:
            for info in zf.infolist():
                name = info.filename
                where = f"{pred}:{name}"
                if info.is_dir() or "/" in name.rstrip("/"):
                    bad.append(f"{where}: inside a folder (the zip must be flat)")
                elif not name.lower().endswith(".png"):
                    bad.append(f"{where}: not a .png file")
                else:
                    found[name[: -len(".png")]] = (where, name)
    elif pred.exists():
        raise ScoreInputError(f"{pred}: neither a folder nor a zip file")
    else:
        raise ScoreInputError(f"{pred}: no such file or folder")
    if bad:
        raise ScoreInputError("bad prediction files:\n  " + "\n  ".join(bad))
    return found


def _decode_prediction(data: bytes, where: str, shape: tuple[int, ...]) -> np.ndarray:
    try:
        with Image.open(io.BytesIO(data)) as img:
            img.load()
            if img.format != "PNG":
                raise ScoreInputError(f"{where}: not a PNG image (format {img.format})")
            if img.mode != "RGB":
                raise ScoreInputError(f"{where}: expected an RGB PNG, got PIL mode {img.mode}")
            arr = np.asarray(img)
    except ScoreInputError:
        raise
    except Exception as exc:  # PIL raises several types for unreadable data
        raise ScoreInputError(f"{where}: cannot read as PNG ({exc})") from exc
    if arr.shape != shape:
        raise ScoreInputError(f"{where}: size {arr.shape[1]}x{arr.shape[0]}, expected {shape[1]}x{shape[0]} like gt")
    return arr


def _list_keys(keys: Sequence[str], limit: int = 10) -> str:
    shown = ", ".join(keys[:limit])
    return shown + (f", ... ({len(keys)} in all)" if len(keys) > limit else "")


def score_predictions(pred: str | Path, gt_split_dir: str | Path) -> Iterator[tuple[str, dict]]:
    """Yield ``(key, score_image dict)`` for every sample of the split, in shard order; raises ScoreInputError."""
    pred, gt_split_dir = Path(pred), Path(gt_split_dir)
    try:
        manifest = read_manifest(gt_split_dir)
        paths = shard_paths(gt_split_dir)
    except (OSError, ValueError) as exc:
        raise ScoreInputError(f"{gt_split_dir}: {exc}") from exc
    expected = [k for shard in manifest["shards"] for k in shard["keys"]]
    sources = _prediction_sources(pred)
    missing = sorted(set(expected) - set(sources))
    extra = sorted(set(sources) - set(expected))
    problems = []
    if missing:
        problems.append(f"{pred}: missing predictions for {len(missing)} key(s): {_list_keys(missing)}")
    if extra:
        names = [sources[k][0] for k in extra]
        problems.append(f"{pred}: {len(extra)} prediction(s) with no gt in {gt_split_dir}: {_list_keys(names)}")
    if problems:
        raise ScoreInputError("\n".join(problems))

    zf = zipfile.ZipFile(pred) if pred.is_file() else None
    try:
        for sample in iter_samples(paths):
            if sample.gt is None:
                raise ScoreInputError(f"{gt_split_dir}: sample {sample.key} has no gt (a test split cannot be scored)")
            where, handle = sources[sample.key]
            data = zf.read(handle) if zf is not None else Path(handle).read_bytes()
            arr = _decode_prediction(data, where, sample.gt.shape)
            yield sample.key, score_image(sample.gt, arr, sample.mask)
    finally:
        if zf is not None:
            zf.close()


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m restore.score", description=__doc__.split("\n\n")[0])
    parser.add_argument("pred", type=Path, help="folder or flat zip of KEY.png predictions")
    parser.add_argument("gt_shards", type=Path, help="shard split dir (holds manifest.json and tars with gt + mask)")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument("--per-image", action="store_true", help="include per-key values")
    args = parser.parse_args(argv)

    try:
        per_image = dict(score_predictions(args.pred, args.gt_shards))
        summary = summarize(per_image.values())
    except ScoreInputError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except ValueError as exc:  # a corrupt shard (the reader names key and shard) or an empty split
        print(f"error: {exc}", file=sys.stderr)
        return 2

    if args.json:
        out = dict(summary)
        if args.per_image:
            out["per_image"] = per_image
        print(json.dumps(out, sort_keys=True))
        return 0
    if args.per_image:
        for key, item in per_image.items():
            flags = f"  [{', '.join(item['degenerate'])}]" if item["degenerate"] else ""
            print(f"{key}\tscore {item['score']:.6f}\tssim {item['ssim']:.6f}\t"
                  f"masked_ssim {item['masked_ssim']:.6f}\thist_sim {item['hist_sim']:.6f}{flags}")
    for name in ("ssim", "masked_ssim", "hist_sim", "score"):
        print(f"{name:<12} {summary[name]:.6f}")
    print(f"{'n':<12} {summary['n']}")
    if summary["n_degenerate"]:
        print(f"{'degenerate':<12} {summary['n_degenerate']} (see restore.score docstring)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
