"""How much of the hue term a colorizer gets without knowing what is in the photo: each held-out crop's hue
histogram (the DACON score's: 180 OpenCV hue bins) correlated with ONE fixed histogram, the training photos' mean,
beside the hue term the models of a ``bench/quality.py`` run reached on the same crops.

    python bench/quality.py --work W ...            # first: the held-out shards, the photos and quality.json
    python bench/hue_prior.py --work W              # then this (seconds)

The score correlates histograms, not pixels: a prediction whose hues are distributed like a typical photo's scores
that correlation whatever pixel each hue lands on. The best such fixed histogram for an unknown photo is the mean of
the photos' centered, normalized histograms (the correlation is a dot product of those), estimated here from the
training photos of each recipe: the demo's bundled photos, the quality recipe's (its models' ``train_photos`` in
``quality.json``), and both.
No restoration can output "a histogram" (its pixels carry the hues), so this is a yardstick for the models' hue term,
not a baseline to submit. ``--within`` adds the same prior estimated from the held-out set itself, leaving out the
photo scored (its two crops): a bound for photos of that kind.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from launch.demo import TRAIN_PHOTOS  # noqa: E402
from restore.score import hue_histogram  # noqa: E402
from shards.reader import iter_samples, shard_paths  # noqa: E402
from shards.sample_photos import load_photo  # noqa: E402

SETS = {"lomiri": ("held_shards", "scores"), "nature": ("nature_shards", "scores_nature")}


def centered(hist: np.ndarray) -> np.ndarray:
    """A histogram as the correlation sees it: mean removed, unit length (Pearson correlation = dot product)."""
    h = hist.ravel().astype(np.float64)
    h = h - h.mean()
    norm = np.linalg.norm(h)
    return h / norm if norm > 0 else h


def prior(images: list[np.ndarray]) -> np.ndarray:
    """The fixed histogram that best correlates, on average, with histograms like these: their centered mean."""
    return centered(np.mean([centered(hue_histogram(img)) for img in images], axis=0))


def read_photo(path: Path) -> np.ndarray:
    from PIL import Image

    with Image.open(path) as img:
        return np.asarray(img.convert("RGB"))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--work", type=Path, required=True, help="a bench/quality.py work folder (--work)")
    p.add_argument("--within", action="store_true", help="also the held-out set's own leave-one-photo-out prior")
    p.add_argument("--json", type=Path, help="write the table here too")
    args = p.parse_args(argv)

    report_path = args.work / "quality.json"
    report = json.loads(report_path.read_text()) if report_path.is_file() else {}
    bundled = [load_photo(n) for n in TRAIN_PHOTOS]
    priors = {"demo's bundled photos": prior(bundled)}
    extra_paths = sorted({p for m in report.get("models", []) for p in m.get("train_photos", [])})
    if extra_paths:  # the quality recipe's photos, as its models recorded them
        extra = [read_photo(Path(p)) for p in extra_paths]
        priors[f"the quality recipe's {len(extra)} extra photos"] = prior(extra)
        priors["both"] = prior(bundled + extra)
    table: dict[str, dict[str, float]] = {}
    for set_name, (folder, key) in SETS.items():
        split = args.work / folder / "train"
        if not split.is_dir():
            continue
        truths = [centered(hue_histogram(s.gt)) for s in iter_samples(shard_paths(split))]
        rows = {f"prior: {name}": float(np.mean([t @ pr for t in truths])) for name, pr in priors.items()}
        if args.within and len(truths) > 2:  # crops 2i, 2i+1 are photo i (bench/quality.py's order)
            rows["prior: the set itself, leave one photo out"] = float(np.mean(
                [t @ centered(np.mean([u for j, u in enumerate(truths) if j // 2 != i // 2], axis=0))
                 for i, t in enumerate(truths)]))
        for model, terms in report.get(key, {}).items():
            rows[f"restored: {model}"] = float(terms["hist_sim"])
        table[f"{set_name} ({len(truths)} crops)"] = rows
    if not table:
        print(f"error: {args.work}: no held_shards/ or nature_shards/ (run bench/quality.py --work there first)",
              file=sys.stderr)
        return 2
    names = list(dict.fromkeys(r for rows in table.values() for r in rows))
    print("| hue term (correlation of hue histograms) | " + " | ".join(table) + " |")
    print("|---|" + "---|" * len(table))
    for r in names:
        print(f"| {r} | " + " | ".join(f"{rows[r]:.3f}" if r in rows else "" for rows in table.values()) + " |")
    if args.json:
        args.json.write_text(json.dumps(table, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
