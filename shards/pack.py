"""Pack DACON-layout data or any folder of color photos into webdataset tar shards with precomputed masks.

    python -m shards.pack dacon DATA_ROOT OUT_DIR [--shard-size N] [--workers W] [--skip-bad] [--splits train,test]
    python -m shards.pack photos PHOTO_DIR OUT_DIR --seed S [--size 512] [--resize-mode crop|resize]
                                 [--val-fraction F | --val-dir VAL_PHOTO_DIR] [--fill-range 0,100]
                                 [--area-range 0.01,0.15]

Output: ``OUT_DIR/<split>/<split>-000000.tar`` ... and ``OUT_DIR/<split>/manifest.json`` (docs/architecture.md).

Why it is built this way (so DDP readers never hang or diverge later):
- samples are written in sorted KEY order, a sample's members adjacent, tar headers normalized (mtime, owner,
  mode), and every random draw comes from (seed, KEY): a re-run, with any worker count, gives identical bytes;
- everything is built in a staging folder next to OUT_DIR (each shard under a temp name, renamed when complete,
  the manifest written last) and moved into OUT_DIR only when every split succeeded: a failure leaves nothing.
Exit codes: 0 done, 2 bad input (the message names the file); ``--skip-bad`` lists bad files in the manifest instead.
"""
from __future__ import annotations

import argparse
import contextlib
import csv
import hashlib
import io
import multiprocessing
import os
import shutil
import sys
import tarfile
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator, Sequence

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from . import damage
from .schema import (
    GT_EXT,
    INPUT_EXT,
    MANIFEST_NAME,
    MASK_EXT,
    MEMBER_ORDER,
    META_EXT,
    SCHEMA_VERSION,
    SampleMeta,
    atomic_write_json,
    encode_mask,
    encode_png,
    file_sha256,
    tar_safe_key,
)

EXIT_BAD_INPUT = 2
PHOTO_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp")
DACON_CSV = {"train": ("train.csv", ("input_image_path", "gt_image_path")), "test": ("test.csv", ("input_image_path",))}


class BadInput(Exception):
    """A problem with the user's data; the message starts with the file it is about."""

    def __init__(self, path: str | os.PathLike, problem: str):
        self.path, self.problem = str(path), problem
        super().__init__(f"{path}: {problem}")


# ------------------------------------------------------------------------------------------------------ work items
@dataclass(frozen=True)
class Item:
    """One sample to build; picklable, handed to a worker process."""

    split: str
    key: str
    kind: str  # "dacon-train" | "dacon-test" | "photo"
    input_path: str
    gt_path: str | None = None
    source_input: str | None = None  # as recorded in the sample's JSON (relative to the data root)
    source_gt: str | None = None
    params: tuple = ()  # photo options, hashable


@dataclass
class Built:
    key: str
    members: dict[str, bytes]
    meta: SampleMeta


@dataclass
class Failed:
    key: str
    path: str
    problem: str
    error: str  # path and problem, as printed


def sample_rng(seed: int, key: str) -> np.random.Generator:
    """The RNG of one sample: a function of (seed, KEY) only, so worker count and order never matter."""
    digest = hashlib.sha256(key.encode()).digest()
    words = [int.from_bytes(digest[i : i + 4], "little") for i in range(0, 16, 4)]
    return np.random.default_rng(np.random.SeedSequence([int(seed), *words]))


def unique_keys(stems: Sequence[str]) -> list[str]:
    """Tar-safe KEYs for ``stems`` (in the given, deterministic order); collisions get ``_2``, ``_3``, ..."""
    safe = [tar_safe_key(s) for s in stems]
    taken = set(safe)
    seen: set[str] = set()
    keys = []
    for key in safe:
        if key in seen:
            n = 2
            while f"{key}_{n}" in taken:
                n += 1
            key = f"{key}_{n}"
            taken.add(key)
        seen.add(key)
        keys.append(key)
    return keys


# ---------------------------------------------------------------------------------------------------- image loading
def _load(path: str, what: str) -> tuple[bytes, Image.Image]:
    try:
        data = Path(path).read_bytes()
    except FileNotFoundError:
        raise BadInput(path, f"{what} file not found") from None
    except OSError as exc:
        raise BadInput(path, f"cannot read {what} ({exc.strerror or exc})") from None
    try:
        img = Image.open(io.BytesIO(data))
        img.load()
    except (UnidentifiedImageError, Image.DecompressionBombError, OSError, ValueError, SyntaxError) as exc:
        raise BadInput(path, f"{what} is not a readable image ({exc})") from None
    return data, img


def _member_png(data: bytes, img: Image.Image, array: np.ndarray, mode: str) -> bytes:
    """The source file itself when it is already a PNG in ``mode`` (the exact bytes), else a fresh PNG."""
    return data if img.format == "PNG" and img.mode == mode else encode_png(array, mode)


def _hole_stats(mask: np.ndarray) -> float:
    return float(np.count_nonzero(mask)) / mask.size


def build_dacon_train(item: Item) -> Built:
    in_data, in_img = _load(item.input_path, "input")
    if in_img.mode != "L":
        raise BadInput(item.input_path, f"input is not 8-bit gray (PIL mode {in_img.mode}, expected L)")
    gt_data, gt_img = _load(item.gt_path, "gt")
    if gt_img.mode != "RGB":
        raise BadInput(item.gt_path, f"gt is not 8-bit RGB (PIL mode {gt_img.mode}, expected RGB)")
    if in_img.size != gt_img.size:
        raise BadInput(
            item.input_path, f"input size {in_img.size[0]}x{in_img.size[1]} differs from "
            f"gt {item.gt_path} size {gt_img.size[0]}x{gt_img.size[1]}"
        )
    gray, gt = np.asarray(in_img), np.asarray(gt_img)
    mask = damage.exact_mask(gray, gt)
    if not mask.any():
        raise BadInput(item.input_path, f"no damage (input equals the gray of gt {item.gt_path} everywhere)")
    values, counts = np.unique(gray[mask], return_counts=True)
    extra: dict[str, Any] = {}
    if len(values) > 1:  # real DACON holes have one value; keep the evidence when one does not
        extra["mask_values"] = int(len(values))
    meta = SampleMeta(
        key=item.key, mask_origin="exact", fill=int(values[counts.argmax()]), hole_fraction=_hole_stats(mask),
        source_input=item.source_input, source_gt=item.source_gt, extra=extra,
    )
    members = {
        INPUT_EXT: _member_png(in_data, in_img, gray, "L"),
        MASK_EXT: encode_mask(mask),
        GT_EXT: _member_png(gt_data, gt_img, gt, "RGB"),
    }
    return Built(item.key, members, meta)


def build_dacon_test(item: Item) -> Built:
    in_data, in_img = _load(item.input_path, "input")
    if in_img.mode != "L":
        raise BadInput(item.input_path, f"input is not 8-bit gray (PIL mode {in_img.mode}, expected L)")
    gray = np.asarray(in_img)
    try:
        mask, fill = damage.detect_mask(gray)
    except damage.NoDamageFound as exc:
        raise BadInput(item.input_path, f"no detectable damage: {exc}") from None
    meta = SampleMeta(
        key=item.key, mask_origin="detected", fill=int(fill), hole_fraction=_hole_stats(mask),
        source_input=item.source_input,
    )
    return Built(item.key, {INPUT_EXT: _member_png(in_data, in_img, gray, "L"), MASK_EXT: encode_mask(mask)}, meta)


def load_photo(path: str, size: int, resize_mode: str) -> np.ndarray:
    """RGB uint8 [size,size]: EXIF-rotated, center-cropped to a square then resized (or resized directly)."""
    _, img = _load(path, "photo")
    try:
        img = ImageOps.exif_transpose(img).convert("RGB")
    except (OSError, ValueError) as exc:
        raise BadInput(path, f"cannot convert photo to RGB ({exc})") from None
    if resize_mode == "crop":
        img = ImageOps.fit(img, (size, size), method=Image.Resampling.LANCZOS)
    else:
        img = img.resize((size, size), Image.Resampling.LANCZOS)
    return np.asarray(img)


def build_photo(item: Item) -> Built:
    seed, size, resize_mode, fill_range, area_range = item.params
    gt = load_photo(item.input_path, size, resize_mode)
    rng = sample_rng(seed, item.key)
    mask, shape = damage.random_mask(rng, size, size, area_range=area_range)
    fill = damage.random_fill(rng, fill_range)
    gray = damage.apply_damage(damage.to_gray(gt), mask, fill)
    meta = SampleMeta(
        key=item.key, mask_origin="synthetic", fill=fill, hole_fraction=_hole_stats(mask),
        source_input=item.source_input, source_gt=item.source_gt, shape=shape,
    )
    members = {INPUT_EXT: encode_png(gray, "L"), MASK_EXT: encode_mask(mask), GT_EXT: encode_png(gt, "RGB")}
    return Built(item.key, members, meta)


_BUILDERS = {"dacon-train": build_dacon_train, "dacon-test": build_dacon_test, "photo": build_photo}


def build(item: Item) -> Built | Failed:
    """Worker entry point: a built sample, or the bad file and why."""
    try:
        return _BUILDERS[item.kind](item)
    except BadInput as exc:
        return Failed(item.key, exc.path, exc.problem, str(exc))


# ----------------------------------------------------------------------------------------------------------- writing
def _tar_info(name: str, size: int) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.size = size
    info.mtime = 0  # normalized headers: the bytes depend on the samples only
    info.mode = 0o644
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    info.type = tarfile.REGTYPE
    return info


class ShardWriter:
    """Writes ``<split>-NNNNNN.tar`` files of ``shard_size`` samples, each under a temp name until complete."""

    def __init__(self, split_dir: Path, split: str, shard_size: int):
        self.split_dir, self.split, self.shard_size = split_dir, split, shard_size
        self.shards: list[dict] = []
        self._tar: tarfile.TarFile | None = None
        self._tmp: Path | None = None
        self._keys: list[str] = []

    def add(self, sample: Built) -> None:
        if self._tar is None:
            name = f"{self.split}-{len(self.shards):06d}.tar"
            self._tmp = self.split_dir / f".{name}.tmp"
            self._tar = tarfile.open(self._tmp, "w", format=tarfile.PAX_FORMAT)
            self._keys = []
        members = dict(sample.members)
        members[META_EXT] = sample.meta.to_json_bytes()
        for ext in MEMBER_ORDER:
            if ext in members:
                data = members[ext]
                self._tar.addfile(_tar_info(f"{sample.key}.{ext}", len(data)), io.BytesIO(data))
        self._keys.append(sample.key)
        if len(self._keys) >= self.shard_size:
            self._finish()

    def _finish(self) -> None:
        assert self._tar is not None and self._tmp is not None
        self._tar.close()
        with open(self._tmp, "rb+") as f:
            os.fsync(f.fileno())
        name = f"{self.split}-{len(self.shards):06d}.tar"
        final = self.split_dir / name
        os.replace(self._tmp, final)
        self.shards.append(
            {"name": name, "count": len(self._keys), "sha256": file_sha256(final), "bytes": final.stat().st_size,
             "keys": list(self._keys)}
        )
        self._tar, self._tmp = None, None

    def close(self) -> list[dict]:
        if self._tar is not None:
            self._finish()
        return self.shards


@contextlib.contextmanager
def _built(items: Sequence[Item], workers: int) -> Iterator[Iterator[Built | Failed]]:
    """``build`` over ``items`` in input order (imap keeps it) on ``workers`` processes; leaving stops them."""
    if workers <= 1 or len(items) <= 1:
        yield map(build, items)
        return
    chunk = max(1, min(16, len(items) // (workers * 8)))
    with multiprocessing.get_context("fork").Pool(min(workers, len(items))) as pool:  # exit terminates
        yield pool.imap(build, items, chunksize=chunk)


def _mask_stats(metas: list[SampleMeta]) -> dict:
    origins: dict[str, int] = {}
    for m in metas:
        origins[m.mask_origin] = origins.get(m.mask_origin, 0) + 1
    stats: dict[str, Any] = {"origin_counts": origins}
    fractions = [m.hole_fraction for m in metas]
    if fractions:
        stats["hole_fraction"] = {"min": min(fractions), "mean": float(np.mean(fractions)), "max": max(fractions)}
    fills = [m.fill for m in metas if m.fill is not None]
    if fills:
        stats["fill"] = {"min": min(fills), "max": max(fills)}
    return stats


@dataclass
class SplitPlan:
    split: str
    items: list[Item]
    skipped: list[dict] = field(default_factory=list)  # problems found while planning (e.g. CSV rows)


def write_split(plan: SplitPlan, split_dir: Path, *, shard_size: int, workers: int, skip_bad: bool,
                source: dict) -> dict:
    """Build and write one split into ``split_dir`` (a staging folder); the manifest is written last."""
    from tqdm import tqdm

    split_dir.mkdir(parents=True)
    writer = ShardWriter(split_dir, plan.split, shard_size)
    metas: list[SampleMeta] = []
    skipped = list(plan.skipped)
    # The pool starts before tqdm's monitor thread: fork a single-threaded process.
    with _built(plan.items, workers) as results, tqdm(
        total=len(plan.items), desc=f"pack {plan.split}", unit="img", file=sys.stderr, mininterval=1.0
    ) as progress:
        for result in results:
            progress.update(1)
            if isinstance(result, Failed):
                if not skip_bad:
                    raise BadInput(result.path, result.problem)
                skipped.append({"path": result.path, "error": result.error})
                continue
            writer.add(result)
            metas.append(result.meta)
    shards = writer.close()
    if not shards:
        raise BadInput(source["root"], f"split {plan.split!r} has no usable samples ({len(skipped)} skipped)")
    manifest = {
        "schema_version": SCHEMA_VERSION,
        "split": plan.split,
        "count": sum(s["count"] for s in shards),
        "shards": shards,
        "mask_stats": _mask_stats(metas),
        "skipped": skipped,
        "source": source,
    }
    atomic_write_json(split_dir / MANIFEST_NAME, manifest)
    os.chmod(split_dir / MANIFEST_NAME, 0o644)  # mkstemp made it private; shards are read by other users' jobs
    return manifest


def write_output(out_dir: Path, plans: list[SplitPlan], *, shard_size: int, workers: int, skip_bad: bool,
                 source: dict, owned: Iterable[str] = ()) -> dict[str, dict]:
    """Write every split into a staging folder beside ``out_dir``, then move the split folders into place.

    ``owned`` splits that this run did not produce are removed from ``out_dir`` (e.g. an old ``val/`` after a
    re-run with ``--val-fraction 0`` would overlap the new ``train/``).
    """
    out_dir = out_dir.absolute()
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.packing-", dir=out_dir.parent))
    try:
        manifests = {}
        for plan in plans:
            manifests[plan.split] = write_split(plan, staging / plan.split, shard_size=shard_size, workers=workers,
                                                skip_bad=skip_bad, source=source)
        out_dir.mkdir(exist_ok=True)
        for split in sorted(set(owned) | set(manifests)):
            target = out_dir / split
            if target.exists():  # a re-run replaces the split as a whole
                os.replace(target, staging / f"{split}.old")
            if split in manifests:
                os.replace(staging / split, target)
        return manifests
    finally:
        shutil.rmtree(staging, ignore_errors=True)


# ---------------------------------------------------------------------------------------------------------- planning
def _resolve(root: Path, value: str) -> Path:
    path = Path(value)
    return path if path.is_absolute() else root / path


def _relative(root: Path, path: Path) -> str:
    try:
        return path.relative_to(root).as_posix()
    except ValueError:
        return str(path)


def plan_dacon(root: Path, splits: Sequence[str], skip_bad: bool) -> list[SplitPlan]:
    plans = []
    for split in splits:
        csv_name, columns = DACON_CSV[split]
        csv_path = root / csv_name
        if not csv_path.is_file():
            raise BadInput(csv_path, f"{split} CSV not found")
        try:
            with open(csv_path, newline="", encoding="utf-8-sig") as f:
                reader = csv.DictReader(f)
                header = reader.fieldnames or []
                missing = [c for c in columns if c not in header]
                if missing:
                    raise BadInput(csv_path, f"missing column(s) {missing} (has {header})")
                rows = list(reader)
        except (OSError, UnicodeDecodeError, csv.Error) as exc:
            raise BadInput(csv_path, f"unreadable CSV ({exc})") from None
        entries, skipped = [], []
        for line, row in enumerate(rows, start=2):  # line 1 is the header
            values = [(row.get(c) or "").strip() for c in columns]
            empty = [c for c, v in zip(columns, values) if not v]
            if empty:
                problem = f"{csv_path} line {line}: empty {', '.join(empty)}"
                if not skip_bad:
                    raise BadInput(f"{csv_path} line {line}", f"empty {', '.join(empty)}")
                skipped.append({"path": f"{csv_path}:{line}", "error": problem})
                continue
            paths = [_resolve(root, v) for v in values]
            entries.append((paths[0].stem, paths))
        entries.sort(key=lambda e: (tar_safe_key(e[0]), str(e[1][0])))
        keys = unique_keys([stem for stem, _ in entries])
        kind = f"dacon-{split}"
        items = [
            Item(split=split, key=key, kind=kind, input_path=str(paths[0]),
                 gt_path=str(paths[1]) if len(paths) > 1 else None,
                 source_input=_relative(root, paths[0]),
                 source_gt=_relative(root, paths[1]) if len(paths) > 1 else None)
            for key, (_, paths) in zip(keys, entries)
        ]
        items.sort(key=lambda it: it.key)
        if not items:
            raise BadInput(csv_path, "no rows")
        plans.append(SplitPlan(split, items, skipped))
    return plans


def list_photos(photo_dir: Path) -> list[Path]:
    if not photo_dir.is_dir():
        raise BadInput(photo_dir, "photo folder not found")
    photos = sorted(
        (p for p in photo_dir.rglob("*")
         if p.is_file() and p.suffix.lower() in PHOTO_EXTENSIONS
         and not any(part.startswith(".") for part in p.relative_to(photo_dir).parts)),
        key=lambda p: p.relative_to(photo_dir).as_posix(),
    )
    if not photos:
        raise BadInput(photo_dir, f"no photos ({', '.join(PHOTO_EXTENSIONS)})")
    return photos


def choose_val(keys: Sequence[str], fraction: float, seed: int) -> set[str]:
    """A deterministic validation subset: a permutation of the sorted keys drawn from the seed."""
    if fraction <= 0 or len(keys) < 2:
        return set()
    n_val = min(len(keys) - 1, max(1, round(fraction * len(keys))))
    order = np.random.default_rng(np.random.SeedSequence([int(seed), 0x7A1])).permutation(len(keys))
    ordered = sorted(keys)
    return {ordered[i] for i in order[:n_val]}


def plan_photos(photo_dir: Path, *, seed: int, size: int, resize_mode: str, val_fraction: float,
                fill_range: tuple[int, int], area_range: tuple[float, float],
                val_dir: Path | None = None) -> list[SplitPlan]:
    """Items of ``photo_dir`` (train, and val by ``val_fraction``), or with ``val_dir`` every photo there as val: held
    out by photo, so validation never scores another crop of a photo it trained on."""
    sources = [(p, photo_dir, "train") for p in list_photos(photo_dir)]
    if val_dir is not None:
        sources += [(p, val_dir, "val") for p in list_photos(val_dir)]
    sources.sort(key=lambda s: (tar_safe_key(s[0].stem), s[2], s[0].relative_to(s[1]).as_posix()))
    keys = unique_keys([p.stem for p, _, _ in sources])
    val = choose_val(keys, val_fraction, seed) if val_dir is None else set()
    params = (int(seed), int(size), resize_mode, tuple(fill_range), tuple(area_range))
    by_split: dict[str, list[Item]] = {"train": [], "val": []}
    for key, (path, root, split) in zip(keys, sources):
        rel = path.relative_to(root).as_posix()
        split = "val" if key in val else split
        by_split[split].append(Item(split=split, key=key, kind="photo", input_path=str(path),
                                    source_input=rel, source_gt=rel, params=params))
    return [SplitPlan(s, sorted(items, key=lambda it: it.key)) for s, items in by_split.items() if items]


# --------------------------------------------------------------------------------------------------------------- CLI
def _pair(text: str, kind: type) -> tuple:
    try:
        lo, hi = (kind(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected two comma-separated numbers, got {text!r}") from None
    if lo > hi:
        raise argparse.ArgumentTypeError(f"range {text!r}: low end above high end")
    return lo, hi


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {text}")
    return value


def _usable_cpus() -> int:
    """Cores this process may run on (a SLURM allocation or cgroup, not the whole node)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m shards.pack", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="mode", required=True)

    def common(p: argparse.ArgumentParser) -> None:
        p.add_argument("out_dir", type=Path, help="output folder; gets one sub-folder per split")
        p.add_argument("--shard-size", type=_positive, default=1000, help="samples per tar shard (default 1000)")
        p.add_argument("--workers", type=_positive, default=_usable_cpus(), help="processes (default: usable cores)")
        p.add_argument("--skip-bad", action="store_true", help="skip bad files, listing them in the manifest")

    dacon = sub.add_parser("dacon", help="DACON layout: train.csv/test.csv with train_input/, train_gt/, test_input/")
    dacon.add_argument("data_root", type=Path, help="has train.csv and/or test.csv; their paths are relative to it")
    common(dacon)
    dacon.add_argument("--splits", default=None,
                       help="comma-separated subset of train,test (default: those whose CSV exists)")

    photos = sub.add_parser("photos", help="any folder of color photos, with synthetic DACON-style damage")
    photos.add_argument("photo_dir", type=Path, help="photos (png/jpg/jpeg/bmp/tif/webp), searched recursively")
    common(photos)
    photos.add_argument("--seed", type=int, required=True, help="damage and validation split depend on it only")
    photos.add_argument("--size", type=int, default=512, help="output side in pixels (default 512)")
    photos.add_argument("--resize-mode", choices=("crop", "resize"), default="crop",
                        help="crop: center square then resize (default); resize: squash the whole photo")
    photos.add_argument("--val-fraction", type=float, default=0.0, help="fraction of photos in val/ (default 0)")
    photos.add_argument("--val-dir", type=Path, default=None,
                        help="a folder of other photos that make up val/ (held out by photo; not with --val-fraction)")
    photos.add_argument("--fill-range", type=lambda t: _pair(t, int), default=(0, 100),
                        help="LO,HI gray value of the damage, inclusive (default 0,100)")
    photos.add_argument("--area-range", type=lambda t: _pair(t, float), default=(0.01, 0.15),
                        help="LO,HI hole fraction of the image (default 0.01,0.15)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        if args.mode == "dacon":
            root = args.data_root.absolute()
            if not root.is_dir():
                raise BadInput(root, "data root not found")
            if args.splits is None:
                splits = [s for s, (name, _) in DACON_CSV.items() if (root / name).is_file()]
                if not splits:
                    raise BadInput(root, "neither train.csv nor test.csv found")
            else:
                splits = [s.strip() for s in args.splits.split(",") if s.strip()]
                unknown = [s for s in splits if s not in DACON_CSV]
                if unknown or not splits:
                    parser.error(f"--splits: expected a subset of train,test, got {args.splits!r}")
            plans = plan_dacon(root, splits, args.skip_bad)
            source = {"kind": "dacon", "root": str(root), "seed": None}
        else:
            if args.size < 8:
                parser.error(f"--size must be >= 8, got {args.size}")
            if not 0 <= args.val_fraction < 1:
                parser.error(f"--val-fraction must be in [0, 1), got {args.val_fraction}")
            if args.val_dir is not None and args.val_fraction:
                parser.error("--val-dir and --val-fraction both choose val/: give one")
            if not 0 <= args.fill_range[0] <= args.fill_range[1] <= 255:
                parser.error(f"--fill-range must lie in 0..255, got {args.fill_range}")
            if not 0 < args.area_range[0] <= args.area_range[1] < 1:
                parser.error(f"--area-range must lie in (0, 1), got {args.area_range}")
            root = args.photo_dir.absolute()
            plans = plan_photos(root, seed=args.seed, size=args.size, resize_mode=args.resize_mode,
                                val_fraction=args.val_fraction, fill_range=args.fill_range,
                                area_range=args.area_range,
                                val_dir=args.val_dir.absolute() if args.val_dir is not None else None)
            source = {"kind": "photos", "root": str(root), "seed": args.seed, "size": args.size,
                      "resize_mode": args.resize_mode, "val_fraction": args.val_fraction,
                      "val_dir": str(args.val_dir.absolute()) if args.val_dir is not None else None,
                      "fill_range": list(args.fill_range), "area_range": list(args.area_range)}
        owned = splits if args.mode == "dacon" else ("train", "val")
        manifests = write_output(args.out_dir, plans, shard_size=args.shard_size, workers=args.workers,
                                 skip_bad=args.skip_bad, source=source, owned=owned)
    except BadInput as exc:
        print(f"error: {exc}", file=sys.stderr)
        print(f"nothing written to {args.out_dir}", file=sys.stderr)
        return EXIT_BAD_INPUT
    for split, manifest in manifests.items():
        skipped = f", {len(manifest['skipped'])} skipped" if manifest["skipped"] else ""
        print(f"{split}: {manifest['count']} samples in {len(manifest['shards'])} shard(s){skipped} "
              f"-> {args.out_dir.absolute() / split}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
