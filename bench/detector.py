"""The damage detector, old vs new in one run: false holes on clean photos, recall and IoU on DACON-style damage.

    python bench/detector.py [--photos bundled|wallpapers|both] [--damaged 300] [--seed 0] [--limit N] [--dacon DIR]
                             [--json FILE]

Photos (real, no download):
- ``bundled`` (the held-out set): the photos that ship with scikit-image (astronaut, camera, coffee, chelsea, rocket,
  moon, coins, clock, page, text, brick, grass, gravel, immunohistochemistry, hubble_deep_field, retina,
  stereo_motorcycle, cell), scikit-learn (china, flower) and matplotlib (grace_hopper).
- ``wallpapers`` (the set the thresholds in ``shards/detector.py`` were tuned on): the 36 photographs among Debian's
  wallpaper packages (lomiri-wallpapers-16.04/-20.04, mate-backgrounds, plasma-workspace-wallpapers), fetched once with
  ``apt-get download`` + ``dpkg-deb -x`` into ``--cache`` (default ``~/.cache/restore-bench``, shared with
  ``bench/quality.py``); never needed by the tests. Each is shrunk to at most 1024 px on its long side first.

(a) Clean photos: every photo whole, and as 512x512 crops (center and two seeded ones; small photos fitted to
512x512), each as PNG and as JPEG quality 90 and 75. Any detection is a false hole.
(b) DACON-style damage: ``--damaged`` 512x512 crops of the photos, each with ``shards.damage.random_mask`` (1-15%,
all shapes) filled with ``random_fill`` (0-100), as PNG and JPEG q90/q75. Recall: detections with IoU >= 0.5 against
the drawn mask; mean IoU counts a miss as 0.
Detectors: ``old`` (the algorithm before issue 25, kept below), ``new exact`` (``detect_damage(gray)``: the lossless
search only, the packer's default), ``new hinted`` (``lossy=False`` for PNG, ``True`` for JPEG: what a caller that
knows the file type gets) and ``new auto`` (``lossy=None``: exact, then lossy when nothing exact qualifies).
With ``--dacon DIR`` (train_input/, train_gt/, test_input/), also the real competition samples.
"""
from __future__ import annotations

import argparse
import io
import math
import sys
import time
from collections import defaultdict
from pathlib import Path
from typing import Callable

import numpy as np
from PIL import Image, ImageOps
from scipy import ndimage

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from report import emit  # noqa: E402  (bench/report.py, beside this script)
from shards import damage  # noqa: E402
from shards.detector import NoDamageFound, detect_damage  # noqa: E402

SKIMAGE = ("astronaut", "camera", "coffee", "chelsea", "rocket", "moon", "coins", "clock", "page", "text", "brick",
           "grass", "gravel", "immunohistochemistry", "hubble_deep_field", "retina", "stereo_motorcycle", "cell")
# The photographs among Debian's wallpaper packages (the rest are drawings and renders): paths inside each package,
# a folder for all its photos.
WALLPAPERS = {
    "lomiri-wallpapers-16.04": ["usr/share/backgrounds/" + n for n in (
        "Bridge_by_Sander_Klootwijk.jpg", "Dragonfly_by_Bolly.jpg", "Picture_0B_by_freespace.jpg",
        "Picture_1A_by_freespace.jpg", "Wine_by_Jakkub_Mede.jpg", "aitzgorri_by_Aitzol_Berasategi.jpg",
        "free_by_Peter_Nerlich.jpg", "friends_by_Aitzol_Berasategi.jpg", "life_by_Aitzol_Berasategi.jpg",
        "picosdeeuropa_by_Aitzol_Berasategi.jpg", "seeding_by_Clements_Engelhardt.jpg",
        "sunset_by_Aitzol_Berasategi.jpg")],
    "lomiri-wallpapers-20.04": ["usr/share/backgrounds/Kleiber_by_Lukas_Baubkus.jpg"],
    "mate-backgrounds": ["usr/share/backgrounds/mate/nature/"],
    "plasma-workspace-wallpapers": [f"usr/share/wallpapers/{n}/contents/images/2560x1600.jpg" for n in (
        "BytheWater", "ColdRipple", "ColorfulCups", "DarkestHour", "EveningGlow", "FallenLeaf", "Grey", "Kite",
        "OneStandsOut", "Path", "summer_1am")],
}
FORMATS = ("png", "q90", "q75")


# ------------------------------------------------------------------------------------------------------------- photos
def bundled_photos() -> dict[str, np.ndarray]:
    from skimage import data as skdata

    photos = {}
    for name in SKIMAGE:
        image = getattr(skdata, name)()
        photos[name] = image[0] if isinstance(image, tuple) else image  # stereo_motorcycle: (left, right, disparity)
    try:
        from sklearn.datasets import load_sample_image

        for name in ("china", "flower"):
            photos[name] = load_sample_image(f"{name}.jpg")
    except ImportError:
        print("scikit-learn not installed: no china/flower")
    try:
        from matplotlib.cbook import get_sample_data

        with get_sample_data("grace_hopper.jpg") as f, Image.open(f) as img:
            photos["grace_hopper"] = np.asarray(img.convert("RGB"))
    except (ImportError, OSError, ValueError):
        print("matplotlib sample data not found: no grace_hopper")
    return {name: _gray(image) for name, image in photos.items()}


def wallpaper_photos(cache: Path) -> dict[str, np.ndarray]:
    from quality import fetch_packages  # bench/quality.py: apt-get download + dpkg-deb -x, once, into ``cache``

    Image.MAX_IMAGE_PIXELS = None
    photos = {}
    for path in fetch_packages(WALLPAPERS, cache):
        with Image.open(path) as img:
            img.draft("RGB", (1024, 1024))
            img = img.convert("RGB")
            img.thumbnail((1024, 1024), Image.Resampling.LANCZOS)
        name = path.parts[-4] if path.parent.name == "images" else path.stem  # plasma: the wallpaper's folder
        photos[name] = _gray(np.asarray(img))
    return photos


def _gray(image: np.ndarray) -> np.ndarray:
    if image.dtype != np.uint8:
        image = (np.clip(image, 0, 1) * 255).round().astype(np.uint8) if image.dtype.kind == "f" else image.astype(
            np.uint8)
    if image.ndim == 3:
        return damage.to_gray(np.ascontiguousarray(image[..., :3]))
    return image


def crops(gray: np.ndarray, rng: np.random.Generator, n_random: int, size: int = 512) -> list[np.ndarray]:
    """The center crop and ``n_random`` seeded ones; a photo smaller than ``size`` is fitted (cropped and resized)."""
    h, w = gray.shape
    if h < size or w < size:
        return [np.asarray(ImageOps.fit(Image.fromarray(gray), (size, size), Image.Resampling.LANCZOS))]
    spots = [((h - size) // 2, (w - size) // 2)]
    spots += [(int(rng.integers(0, h - size + 1)), int(rng.integers(0, w - size + 1))) for _ in range(n_random)]
    return [gray[y : y + size, x : x + size] for y, x in spots]


def encode(gray: np.ndarray, fmt: str) -> np.ndarray:
    if fmt == "png":
        return gray
    buf = io.BytesIO()
    Image.fromarray(gray, "L").save(buf, "JPEG", quality=int(fmt[1:]))
    return np.asarray(Image.open(buf))


# --------------------------------------------------------------------------------------------------------- detectors
def new_exact(gray: np.ndarray, fmt: str) -> tuple[np.ndarray, int]:
    found = detect_damage(gray)
    return found.mask, found.fill


def new_auto(gray: np.ndarray, fmt: str) -> tuple[np.ndarray, int]:
    found = detect_damage(gray, lossy=None)
    return found.mask, found.fill


def new_hinted(gray: np.ndarray, fmt: str) -> tuple[np.ndarray, int]:
    found = detect_damage(gray, lossy=fmt != "png")
    return found.mask, found.fill


def old(gray: np.ndarray, fmt: str) -> tuple[np.ndarray, int]:
    return old_detect_mask(gray)


DETECTORS: dict[str, Callable[[np.ndarray, str], tuple[np.ndarray, int]]] = {
    "old": old, "new exact": new_exact, "new hinted": new_hinted, "new auto": new_auto}


def run(detector, gray: np.ndarray, fmt: str) -> tuple[np.ndarray | None, float]:
    """The mask (None: no damage) and the CPU seconds it took (process time: steady on a shared machine)."""
    start = time.process_time()
    try:
        mask, _ = detector(gray, fmt)
    except NoDamageFound:
        mask = None
    return mask, time.process_time() - start


def iou(a: np.ndarray, b: np.ndarray) -> float:
    return float((a & b).sum() / max(1, (a | b).sum()))


# ------------------------------------------------------------------------------------------------------------ benches
def clean(photos: dict[str, np.ndarray], seed: int, timings: dict) -> dict:
    """False holes per detector and format, over every photo whole and its 512x512 crops."""
    rng = np.random.default_rng(seed)
    holes: dict = defaultdict(list)
    count: dict = defaultdict(int)
    for name, gray in photos.items():
        views = [("whole", gray)] + [(f"crop{i}", c) for i, c in enumerate(crops(gray, rng, 2))]
        for view, image in views:
            for fmt in FORMATS:
                x = encode(image, fmt)
                count[fmt] += 1
                for det, fn in DETECTORS.items():
                    mask, seconds = run(fn, x, fmt)
                    if image.shape == (512, 512):
                        timings[det, fmt].append(seconds)
                    if mask is not None:
                        holes[det, fmt].append(f"{name} {view} {fmt}: {mask.mean():.2%}")
    return {"holes": holes, "count": count}


def damaged(photos: dict[str, np.ndarray], n: int, seed: int, timings: dict) -> dict:
    """Recall and IoU per detector and format on DACON-style damage over 512x512 crops of the photos."""
    rng = np.random.default_rng(seed + 1)
    names = sorted(photos)
    scores: dict = defaultdict(list)
    misses: dict = defaultdict(list)
    for i in range(n):
        name = names[i % len(names)]
        image = crops(photos[name], rng, 1)[-1]
        mask, shape = damage.random_mask(rng, 512, 512)
        fill = damage.random_fill(rng)
        hurt = damage.apply_damage(image, mask, fill)
        for fmt in FORMATS:
            x = encode(hurt, fmt)
            for det, fn in DETECTORS.items():
                found, seconds = run(fn, x, fmt)
                timings[det, fmt].append(seconds)
                score = 0.0 if found is None else iou(found, mask)
                scores[det, fmt].append(score)
                if score < 0.5:
                    what = "none" if found is None else f"IoU {score:.2f}"
                    misses[det, fmt].append(f"{name} {shape} fill {fill} {mask.mean():.1%}: {what}")
    return {"scores": scores, "misses": misses}


def report(label: str, photos: dict, clean_out: dict, damaged_out: dict, timings: dict) -> dict:
    """The set's numbers per detector and format (returned for ``--json``), printed as a table."""
    dets = list(DETECTORS)
    numbers: dict = {"photos": len(photos), "detectors": {}}
    for d in dets:
        per = numbers["detectors"][d] = {}
        for fmt in FORMATS:
            s = np.asarray(damaged_out["scores"][d, fmt])
            found = s[s >= 0.5] if (s >= 0.5).any() else np.zeros(1)
            per[fmt] = {"clean_views": clean_out["count"][fmt], "false_holes": len(clean_out["holes"][d, fmt]),
                        "damaged": int(s.size), "recall": float((s >= 0.5).mean()), "mean_iou": float(s.mean()),
                        "found_iou_median": float(np.median(found)), "found_iou_p5": float(np.percentile(found, 5)),
                        "cpu_ms": 1e3 * float(np.mean(timings[d, fmt]))}
    print(f"\n== {label}: {len(photos)} photos ==")
    print(f"{'':34s}" + "".join(f"{d:>22s}" for d in dets))

    def row(title: str, cell) -> None:
        for fmt in FORMATS:
            print(f"{title + fmt:34s}" + "".join(cell(numbers["detectors"][d][fmt]).rjust(22) for d in dets))

    row("clean, false holes  ", lambda n: f"{n['false_holes']:>10d} / {n['clean_views']:<9d}")
    row("damaged, recall / mean IoU  ", lambda n: f"{n['recall']:.3f} / {n['mean_iou']:.3f} ")
    row("found: IoU median / p5  ", lambda n: f"{n['found_iou_median']:.3f} / {n['found_iou_p5']:.3f} ")
    row("CPU ms/image 512x512  ", lambda n: f"{n['cpu_ms']:.1f} ")
    for d in dets:
        for fmt in FORMATS:
            for line in clean_out["holes"][d, fmt]:
                print(f"  false hole [{d}] {line}")
    for d in dets[1:]:
        for fmt in FORMATS:
            for line in damaged_out["misses"][d, fmt][:12]:
                print(f"  miss [{d}] {fmt} {line}")
    return numbers


def dacon(root: Path) -> None:
    """The real competition samples: train inputs against their exact masks, test inputs: a hole found."""
    print(f"\n== real DACON samples in {root} ==")
    for path in sorted((root / "train_input").glob("*.png")):
        gray = np.asarray(Image.open(path))
        exact = gray != np.asarray(Image.open(root / "train_gt" / path.name).convert("L"))
        for det, fn in DETECTORS.items():
            found, _ = run(fn, gray, "png")
            print(f"  {path.stem} [{det}]: " + ("NOT FOUND" if found is None else
                  f"IoU {iou(found, exact):.5f} (extra {(found & ~exact).sum()}, missed {(exact & ~found).sum()})"))
    for path in sorted((root / "test_input").glob("*.png")):
        gray = np.asarray(Image.open(path))
        try:
            found = detect_damage(gray)
            print(f"  {path.stem}: {found.note}")
        except NoDamageFound as exc:
            print(f"  {path.stem}: NOT FOUND ({exc})")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--photos", choices=("bundled", "wallpapers", "both"), default="bundled")
    parser.add_argument("--damaged", type=int, default=300, help="damaged images per photo set")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--cache", type=Path, default=Path.home() / ".cache" / "restore-bench",
                        help="where the wallpaper packages are fetched once (shared with bench/quality.py)")
    parser.add_argument("--limit", type=int, help="only the first N photos of a set (a smoke run)")
    parser.add_argument("--dacon", type=Path, help="a DACON samples folder (train_input/, train_gt/, test_input/)")
    parser.add_argument("--json", type=Path, help="also write the numbers here (they end stdout as one JSON line)")
    args = parser.parse_args()
    result = {}
    sets = {"bundled": ("bundled photos (held out)", bundled_photos),
            "wallpapers": ("Debian wallpaper photos (tuning set)", lambda: wallpaper_photos(args.cache))}
    for key in (("wallpapers", "bundled") if args.photos == "both" else (args.photos,)):
        label, load = sets[key]
        photos = load()
        if args.limit:
            photos = dict(list(photos.items())[: args.limit])
        timings: dict = defaultdict(list)
        start = time.perf_counter()
        clean_out = clean(photos, args.seed, timings)
        damaged_out = damaged(photos, args.damaged, args.seed, timings)
        result[key] = report(label, photos, clean_out, damaged_out, timings)
        print(f"  ({time.perf_counter() - start:.0f} s)")
    if args.dacon:
        dacon(args.dacon)
    emit(result, args.json)


# ------------------------------------------------------------------------------------------------- the old detector
# shards.damage.detect_mask as it was before issue 25 (commit d70f4ed), for the side-by-side comparison: the largest
# hard-edged region of one exact value, else (the bug) the largest soft-edged one.
_FOUR = ndimage.generate_binary_structure(2, 1)


def old_detect_mask(gray, *, min_fraction=0.003, min_pixels=50, max_fraction=0.5):
    total = gray.size
    need = max(int(min_pixels), math.ceil(min_fraction * total))
    flat = np.zeros(gray.shape, dtype=bool)
    flat[:, :-1] |= gray[:, :-1] == gray[:, 1:]
    flat[:-1, :] |= gray[:-1, :] == gray[1:, :]
    flat[:, 1:] |= gray[:, 1:] == gray[:, :-1]
    flat[1:, :] |= gray[1:, :] == gray[:-1, :]
    flat_counts = np.bincount(gray[flat], minlength=256)
    candidates = [int(v) for v in np.argsort(-flat_counts, kind="stable") if flat_counts[v] >= need]
    is_candidate = np.zeros(256, dtype=bool)
    is_candidate[candidates] = True
    other_flat = flat & is_candidate[gray]
    found, best_hard = [], 0
    for value in candidates[:48]:
        if flat_counts[value] <= best_hard:
            break
        labels, _ = ndimage.label(gray == value, structure=_FOUR)
        sizes = np.bincount(labels.ravel())
        sizes[0] = 0
        for label in np.argsort(-sizes, kind="stable")[:4]:
            area = int(sizes[label])
            if area < need or area <= best_hard:
                break
            region = labels == label
            soft = _old_soft_edged(gray, region, value, other_flat)
            found.append((area, value, region, soft))
            if not soft:
                best_hard = area
    if not found:
        raise NoDamageFound("old: no region")
    hard = [f for f in found if not f[3]]
    area, value, region, _ = max(hard or found, key=lambda f: f[0])
    if area > max_fraction * total:
        raise NoDamageFound("old: flat image")
    return region, value


def _old_soft_edged(gray, region, value, ignore):
    rows, cols = ndimage.find_objects(region.view(np.uint8))[0]
    rows = slice(max(rows.start - 1, 0), rows.stop + 1)
    cols = slice(max(cols.start - 1, 0), cols.stop + 1)
    inside = region[rows, cols]
    ring = ndimage.binary_dilation(inside, structure=_FOUR) & ~inside
    steps = np.abs(gray[rows, cols][ring].astype(np.int16) - value)
    soft = steps <= 2
    counted = soft | ~ignore[rows, cols][ring]
    if not counted.any():
        return True
    return bool(soft.sum() >= 0.5 * counted.sum())


if __name__ == "__main__":
    main()
