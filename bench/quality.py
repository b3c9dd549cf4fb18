"""What the restored photos are worth on real photos no model here trained on: the model vs gray copy vs classical
inpainting, per DACON score term, side by side in one run.

    python bench/quality.py                                   # the demo and the quality recipe (~12 min, 2 cores)
    python bench/quality.py --recipes demo --variant noprefill=demo:prefill=none     # what one design choice adds
    python bench/quality.py --tiny --held-dir DIR             # CPU smoke (tests): a tiny model, 2 steps, 64 px
    python bench/quality.py --gpus 1 --recipes demo --cache C # the demo's GPU recipe (EfficientNet-B4, 512 px)

Held-out photos: real photographs from Debian's wallpaper packages ``lomiri-wallpapers-16.04`` (13 photos by Ubuntu
contest photographers; two abstract renders left out) and ``lomiri-wallpapers-20.04`` (one photo), fetched by this
script with ``apt-get download`` + ``dpkg-deb -x`` into ``--cache`` (default ``~/.cache/restore-bench``) the first
time; ``--held-dir`` takes any folder of photos instead. Each photo gives two 512x512 crops (the whole short side,
and a 60% window), packed with DACON-style damage (``shards.pack photos``, seed 11): different photos from every
training photo, not other crops of them.

Recipes (each trains with the real job under torchrun, 2 gloo ranks, the demo's CPU recipe ``launch.demo.CPU_RECIPE``):
  demo     exactly ``python -m launch.demo``'s training: the bundled photos (``launch.demo.TRAIN_PHOTOS``),
           ``launch.demo.CPU_STEPS`` steps
  quality  the same recipe on the bundled photos plus the 11 photographs among Debian's
           ``plasma-workspace-wallpapers`` (sky, forest, water, dusk, leaves, cups; also fetched, gathered into
           ``WORK/quality_photos``; ``--extra-photos DIR`` takes any folder instead), 8 crops each, 1600 steps
           (~6 min on 2 idle cores)
  --variant NAME=RECIPE:key=value,...  a recipe with job overrides (e.g. ``prefill=none``), to measure one choice
With ``--gpus N`` both recipes train ``python -m launch.demo --gpus N``'s recipe instead (``launch.demo.GPU_STEPS``
steps, the quality recipe differing by its photos) and restore on the GPU. A GPU machine that cannot reach Debian's
archive gets the photos through ``--cache``: ``--copy-photos DIR`` copies the ~31 MB of photos this script uses out
of a cache into DIR, to carry there.

Second held-out set, for the models that did not train on it (all of them unless ``--extra-photos`` names these
photos): the 12 nature photos of ``mate-backgrounds``: meadows, leaves, water, flowers, a hue mix the lomiri photos
(warm light, many sunsets) lack. Packed and scored the same way; its own
table (``scores_nature`` in the JSON) and picture (``quality_grid_nature.png``). Skipped with ``--held-dir`` or
``--tiny`` unless ``--nature-dir`` names a folder.

Every model restores the held-out inputs through the inference engine (``Engine``: both stages, the known luminance
re-imposed outside the hole), scored by ``restore.score`` beside three baselines: the gray input copied to RGB, OpenCV
Telea inpainting (gray), and the harmonic fill stage 1 starts from (``restore.prefill``, gray). Prints a table, writes
``WORK/quality.json`` and a picture (``WORK/quality_grid.png``: damaged | harmonic fill | each model | truth).
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from report import emit  # noqa: E402  (bench/report.py, beside this script)
from shards.schema import atomic_write_json  # noqa: E402

# Debian packages and the photos in them (paths inside the package). Two of lomiri-16.04's files are renders.
HELD_PACKAGES = {
    "lomiri-wallpapers-16.04": [
        "usr/share/backgrounds/" + n for n in (
            "Bridge_by_Sander_Klootwijk.jpg", "Dragonfly_by_Bolly.jpg", "Picture_0B_by_freespace.jpg",
            "Picture_1A_by_freespace.jpg", "Wine_by_Jakkub_Mede.jpg", "aitzgorri_by_Aitzol_Berasategi.jpg",
            "free_by_Peter_Nerlich.jpg", "friends_by_Aitzol_Berasategi.jpg", "greentock_by_Peter_Nerlich.jpg",
            "life_by_Aitzol_Berasategi.jpg", "picosdeeuropa_by_Aitzol_Berasategi.jpg",
            "seeding_by_Clements_Engelhardt.jpg", "sunset_by_Aitzol_Berasategi.jpg")],
    "lomiri-wallpapers-20.04": ["usr/share/backgrounds/Kleiber_by_Lukas_Baubkus.jpg"],
}
# The second held-out set: mate's nature photos (meadows, leaves, water, flowers).
NATURE_PACKAGES = {"mate-backgrounds": ["usr/share/backgrounds/mate/nature/"]}
# The quality recipe's extra training photos: the 11 photographs among Plasma's 30 wallpapers (the rest are renders
# and paintings), each at its largest size; Plasma names a wallpaper by its folder (<Name>/contents/images/WxH.jpg).
TRAIN_PACKAGES = {"plasma-workspace-wallpapers": [f"usr/share/wallpapers/{n}/contents/images/2560x1600.jpg" for n in (
    "BytheWater", "ColdRipple", "ColorfulCups", "DarkestHour", "EveningGlow", "FallenLeaf", "Grey", "Kite",
    "OneStandsOut", "Path", "summer_1am")]}
QUALITY_STEPS = 1600
HELD_SEED = 11


# ------------------------------------------------------------------------------------------------------ photos
def fetch_packages(packages: dict[str, list[str]], cache: Path) -> list[Path]:
    """The listed files (or every photo under a listed folder) of Debian packages, downloaded and unpacked once."""
    found = []
    for package, members in packages.items():
        unpacked = cache / package
        if not unpacked.is_dir():
            debs = cache / "debs"
            debs.mkdir(parents=True, exist_ok=True)
            print(f"quality: fetching Debian package {package} (apt-get download) into {debs}", flush=True)
            got = subprocess.run(["apt-get", "download", package], cwd=debs, capture_output=True, text=True)
            deb = sorted(debs.glob(f"{package}_*.deb"))
            if got.returncode != 0 or not deb:
                raise SystemExit(f"quality: cannot download {package} with apt-get ({got.stderr.strip()[-300:]}); "
                                 f"on a machine without Debian's archive give --held-dir / --extra-photos folders")
            tmp = cache / f".{package}.unpacking"
            shutil.rmtree(tmp, ignore_errors=True)
            subprocess.run(["dpkg-deb", "-x", str(deb[-1]), str(tmp)], check=True)
            os.replace(tmp, unpacked)
        for member in members:
            path = unpacked / member
            if member.endswith("/"):
                found += sorted(p for p in path.iterdir() if p.suffix.lower() in (".jpg", ".jpeg", ".png"))
            elif path.is_file():
                found.append(path)
            else:
                raise SystemExit(f"quality: {package} has no {member} (another version of the package?)")
    return found


def copy_photos(cache: Path, dest: Path) -> int:
    """Copy the photos this script uses (held-out and training packages) from ``cache`` to ``dest`` in the same
    layout, so ``--cache dest`` works on a machine without Debian's archive (a GPU machine); returns how many."""
    photos = fetch_packages({**HELD_PACKAGES, **NATURE_PACKAGES, **TRAIN_PACKAGES}, cache)
    for photo in photos:
        target = dest / photo.relative_to(cache)
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(photo, target)
    return len(photos)


def held_out_photos(held_dir: Path | None, nature_dir: Path | None, tiny: bool, cache: Path) -> tuple[list, list]:
    """The held-out photos and the second (nature) held-out set: the given folders, else the Debian packages; no
    second set when the first is given or for a smoke run, unless ``nature_dir`` names one."""
    from shards.pack import BadInput, list_photos

    try:
        held = list_photos(held_dir) if held_dir else fetch_packages(HELD_PACKAGES, cache)
        if nature_dir:
            return held, list_photos(nature_dir)
    except BadInput as exc:
        raise SystemExit(f"quality: {exc}") from None
    return held, [] if held_dir or tiny else fetch_packages(NATURE_PACKAGES, cache)


def photo_name(path: Path) -> str:
    """A photo's name: its file name, or for a Plasma wallpaper (``<Name>/contents/images/2560x1600.jpg``) its folder's."""
    return path.parents[2].name if re.fullmatch(r"\d+x\d+", path.stem) and len(path.parents) > 2 else path.stem


def gather_photos(photos: list[Path], folder: Path) -> Path:
    """Copies of ``photos`` under their names in ``folder`` (emptied first): one folder for the job's packer. Two
    photos of the same name get ``_2``, ... (``shards.pack.unique_keys``) rather than one overwriting the other."""
    from shards.pack import unique_keys

    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    for photo, name in zip(photos, unique_keys([photo_name(p) for p in photos])):
        shutil.copy2(photo, folder / f"{name}{photo.suffix.lower()}")
    return folder


def write_held_crops(photos: list[Path], out_dir: Path, size: int) -> int:
    """Two square crops of each photo (the whole short side, centred; a 60% window at a seeded place) at ``size``."""
    import cv2
    from PIL import Image

    out_dir.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(HELD_SEED)
    n = 0
    for path in photos:
        with Image.open(path) as img:
            img.draft("RGB", (size * 3, size * 3))  # JPEG: decode at a reduced scale, still well above ``size``
            image = np.asarray(img.convert("RGB"))
        h, w = image.shape[:2]
        side = min(h, w)
        windows = [((h - side) // 2, (w - side) // 2, side)]
        small = int(side * 0.6)
        windows.append((int(rng.integers(0, h - small + 1)), int(rng.integers(0, w - small + 1)), small))
        for i, (top, left, s) in enumerate(windows):
            crop = cv2.resize(np.ascontiguousarray(image[top:top + s, left:left + s]), (size, size),
                              interpolation=cv2.INTER_AREA)
            Image.fromarray(crop).save(out_dir / f"{path.stem}_{i}.png")
            n += 1
    return n


def pack_held(photos: list[Path], work: Path, name: str, size: int) -> tuple[Path, int]:
    """Two crops of each photo in ``WORK/NAME_photos``, packed with DACON-style damage into ``WORK/NAME_shards``."""
    crops = work / f"{name}_photos"
    shutil.rmtree(crops, ignore_errors=True)
    n = write_held_crops(photos, crops, size)
    shards = work / f"{name}_shards"
    subprocess.run([sys.executable, "-m", "shards.pack", "photos", str(crops), str(shards), "--seed",
                    str(HELD_SEED), "--size", str(size), "--shard-size", "64"], cwd=ROOT, check=True,
                   capture_output=True)
    print(f"quality: {n} held-out crops of {len(photos)} photos packed with DACON-style damage in "
          f"{shards / 'train'}", flush=True)
    return shards, n


# ------------------------------------------------------------------------------------------------------ training
def train_recipe(name: str, recipe: str, overrides: list[str], work: Path, *, tiny: bool, extra_dirs: list[Path],
                 extra_photos: list[str] = (), reuse: bool = False, gpus: int = 0) -> dict:
    """Train one recipe with the real job: the demo's data and training (``launch.demo.training_recipe``: its CPU
    recipe, or its GPU recipe with ``gpus``), plus the recipe's photos, steps and ``overrides``. Returns the run dir
    and the wall time. With ``reuse``, a finished run of the same command on the same photos (its
    ``WORK/NAME/trained.json`` and ``run/done.json``) is scored again instead of retrained. ``extra_photos`` are the
    files in ``extra_dirs`` (their sources), recorded so a held-out set is never scored by a model that trained on it."""
    from launch.demo import training_recipe, write_demo_shards

    out = work / name
    extra = list(extra_dirs) if recipe == "quality" else []
    # On a GPU both recipes train the demo's GPU steps: the quality recipe differs by its photos only.
    steps = 2 if tiny else QUALITY_STEPS if recipe == "quality" and not gpus else None
    nproc, steps, _, job = training_recipe(gpus, steps, "tu-test_efficientnet" if tiny else None)
    # a max_steps override wins over the recipe's (the job takes the last value): report that one
    steps = next((int(o.split("=", 1)[1]) for o in reversed(overrides) if o.startswith("max_steps=")), steps)
    crops = 8
    if tiny:
        crops, nproc = 1, 1
        job = [o for o in job if not o.startswith(("crop_size=", "decoder_channels=", "num_workers="))]
        job += ["crop_size=64", "decoder_channels=16,8,8,8,8", "num_workers=0"]
    shards, run_dir = out / "shards", out / "run"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}", "-m",
           "job.train", "--shards", str(shards), "--out", str(run_dir), *job, "seed=0", "resume=never", *overrides]
    info = {"name": name, "recipe": recipe, "overrides": overrides, "steps": steps, "run": str(run_dir),
            "photos": "bundled" + (f" + {len(extra_photos)} photos in " + ", ".join(map(str, extra)) if extra else ""),
            "train_photos": list(extra_photos) if extra else [], "command": cmd[1:]}
    record = out / "trained.json"
    if reuse and (run_dir / "done.json").exists() and record.exists():
        done = json.loads(record.read_text())
        # the photos too: --extra-photos is not in the command
        if all(done.get(k) == info[k] for k in ("command", "photos", "train_photos")):
            print(f"quality: reusing {name}: {run_dir} finished the same command", flush=True)
            return done
    shutil.rmtree(out, ignore_errors=True)
    t0 = time.time()
    write_demo_shards(out, crops, seed=0, extra_photos=extra)
    print(f"quality: training {name} ({recipe}, {steps} steps)\n$ {' '.join(cmd)}", flush=True)
    with open(out / "train.log", "w") as log:
        code = subprocess.run(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT,
                              env=dict(os.environ, OMP_NUM_THREADS="1")).returncode
    if code != 0:
        raise SystemExit(f"quality: training {name} failed (exit {code}); log: {out / 'train.log'}")
    info["train_s"] = round(time.time() - t0, 1)
    atomic_write_json(record, info)
    return info


# ------------------------------------------------------------------------------------------------------ scoring
def score_all(held_split: Path, models: list[dict], grid_path: Path, grid_rows: int = 4,
              device: str = "cpu") -> dict[str, dict]:
    """Every model and baseline on every held-out sample; the per-term means, and a picture of the first rows."""
    import torch
    from PIL import Image

    from restore import baselines
    from restore.engine import Engine
    from restore.prefill import harmonic_fill
    from restore.score import score_image, summarize
    from shards.reader import iter_samples, shard_paths

    def harmonic(gray: np.ndarray, mask: np.ndarray) -> np.ndarray:
        g = torch.from_numpy(gray).float()[None, None] / 255
        filled = harmonic_fill(g, torch.from_numpy(mask).float()[None, None])[0, 0]
        return np.repeat((filled * 255).round().byte().numpy()[..., None], 3, axis=-1)

    predictors = {"gray copy": lambda g, m: baselines.gray_copy(g, m),
                  "OpenCV Telea fill, gray": lambda g, m: baselines.opencv_inpaint(g, m),
                  "harmonic fill (stage 1's start), gray": harmonic}
    for model in models:
        engine = Engine([model["run"]], device=device, batch_size=1)
        predictors[model["name"]] = lambda g, m, e=engine: e.restore(g[None], m[None])[0]
    per: dict[str, list] = {name: [] for name in predictors}
    rows = []
    for sample in iter_samples(shard_paths(held_split)):
        preds = {name: fn(sample.input, sample.mask) for name, fn in predictors.items()}
        for name, pred in preds.items():
            per[name].append(score_image(sample.gt, pred, sample.mask))
        if len(rows) < grid_rows:
            columns = [np.repeat(sample.input[..., None], 3, -1), preds["harmonic fill (stage 1's start), gray"]]
            columns += [preds[m["name"]] for m in models] + [sample.gt]
            rows.append(np.concatenate(columns, axis=1))
    if rows:
        Image.fromarray(np.concatenate(rows, axis=0)).save(grid_path)
    return {name: summarize(scores) for name, scores in per.items()}


def print_table(scores: dict[str, dict], models: list[dict], describe: bool = True) -> None:
    gray = scores["gray copy"]["score"]
    print(f"\n{'on ' + str(scores['gray copy']['n']) + ' held-out images':44s} {'score':>7s} {'- gray':>7s} "
          f"{'ssim':>7s} {'masked':>7s} {'hist':>7s}")
    for name, s in scores.items():
        print(f"{name:44s} {s['score']:7.4f} {s['score'] - gray:+7.4f} {s['ssim']:7.4f} {s['masked_ssim']:7.4f} "
              f"{s['hist_sim']:7.4f}")
    for m in models if describe else []:
        print(f"  {m['name']}: recipe {m['recipe']}, {m['steps']} steps, photos {m['photos']}, "
              f"overrides {' '.join(m['overrides']) or '-'}, trained in {m['train_s']:.0f} s")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--recipes", default="demo,quality", help="comma-separated: demo, quality (default both)")
    ap.add_argument("--variant", action="append", default=[], metavar="NAME=RECIPE:key=value,...",
                    help="also train RECIPE with these job overrides (repeatable)")
    ap.add_argument("--cache", type=Path, default=Path.home() / ".cache" / "restore-bench",
                    help="where the Debian packages are downloaded and unpacked")
    ap.add_argument("--held-dir", type=Path, help="held-out photos (default: the lomiri wallpaper photos)")
    ap.add_argument("--nature-dir", type=Path,
                    help="second held-out set (default: mate-backgrounds' nature photos; none with --held-dir/--tiny)")
    ap.add_argument("--extra-photos", type=Path, action="append", default=[],
                    help="folder of the quality recipe's extra training photos (default: the 11 photographs among "
                    "plasma-workspace-wallpapers, gathered into WORK/quality_photos)")
    ap.add_argument("--work", type=Path, default=Path("bench_quality"), help="shards, runs and results go here")
    ap.add_argument("--tiny", action="store_true", help="CPU smoke: tiny model, 2 steps, 64 px, the demo recipe")
    ap.add_argument("--gpus", type=int, default=0,
                    help="train with the demo's GPU recipe on this many GPUs (EfficientNet-B4, 512 px crops, "
                    "launch.demo.GPU_STEPS steps for both recipes) and restore on the GPU; 0: the CPU recipe")
    ap.add_argument("--json", type=Path, help="also write the results here")
    ap.add_argument("--reuse", action="store_true",
                    help="score a run that already finished the same command in WORK again instead of retraining")
    ap.add_argument("--copy-photos", type=Path, metavar="DIR",
                    help="only copy the photos from --cache to DIR (a cache for a machine without the archive), exit")
    args = ap.parse_args(argv)
    if args.copy_photos:
        n = copy_photos(args.cache, args.copy_photos)
        print(f"quality: {n} photos copied to {args.copy_photos}; use --cache {args.copy_photos}")
        return 0

    if args.gpus:
        from launch.demo import check_gpus

        check_gpus(args.gpus)  # before any packing or training
    work = args.work.resolve()
    work.mkdir(parents=True, exist_ok=True)
    size = 64 if args.tiny else 512
    held_photos, nature_photos = held_out_photos(args.held_dir, args.nature_dir, args.tiny, args.cache)
    held_shards, n = pack_held(held_photos, work, "held", size)
    nature_shards, n_nature = pack_held(nature_photos, work, "nature", size) if nature_photos else (None, 0)

    recipes = [r.strip() for r in args.recipes.split(",") if r.strip()]
    plans = [(r, r, []) for r in recipes]
    for text in args.variant:
        name, _, rest = text.partition("=")
        recipe, _, over = rest.partition(":")
        if not name or recipe not in ("demo", "quality"):
            ap.error(f"--variant {text!r}: expected NAME=demo|quality:key=value,...")
        # a comma starts the next override only before "key=" (values such as stage_split=0.1,0.8 keep theirs)
        plans.append((name, recipe, [o for o in re.split(r",(?=[A-Za-z_]+=)", over) if o]))
    extra, extra_photos = list(args.extra_photos), []
    if any(r == "quality" for _, r, _ in plans):
        from shards.pack import BadInput, list_photos

        if extra:
            try:
                extra_photos = [p for folder in extra for p in list_photos(folder)]
            except BadInput as exc:
                raise SystemExit(f"quality: {exc}") from None
        elif not args.tiny:
            extra_photos = fetch_packages(TRAIN_PACKAGES, args.cache)
            extra = [gather_photos(extra_photos, work / "quality_photos")]
    sources = [str(p.resolve()) for p in extra_photos]
    models = [train_recipe(name, recipe, over, work, tiny=args.tiny, extra_dirs=extra, extra_photos=sources,
                           reuse=args.reuse, gpus=args.gpus)
              for name, recipe, over in plans]
    device = "cuda" if args.gpus else "cpu"
    scores = score_all(held_shards / "train", models, work / "quality_grid.png", device=device)
    print_table(scores, models)
    result = {"held": {"photos": [str(p) for p in held_photos], "crops": n, "size": size}, "models": models,
              "scores": scores}
    if nature_shards is not None:
        # only the models that never saw these photos (e.g. a quality recipe given --extra-photos of mate's)
        nature_set = {str(p.resolve()) for p in nature_photos}
        unseen = [m for m in models if not nature_set & set(m.get("train_photos", []))]
        nature = score_all(nature_shards / "train", unseen, work / "quality_grid_nature.png", device=device)
        print(f"\nsecond held-out set: {n_nature} crops of {len(nature_photos)} nature photos, models that did not "
              f"train on them")
        print_table(nature, unseen, describe=False)
        result["held_nature"] = {"photos": [str(p) for p in nature_photos], "crops": n_nature, "size": size}
        result["scores_nature"] = nature
    (work / "quality.json").write_text(json.dumps(result, indent=2) + "\n")
    print(f"\npicture: {work / 'quality_grid.png'} (damaged | harmonic fill | {' | '.join(m['name'] for m in models)}"
          f" | truth)")
    emit(result, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
