"""What to restore and how it is read: planning (driver) and the read stage (Ray read tasks, no Ray import here).

``plan_shards`` / ``plan_images`` turn ``--shards DIR`` / ``--images DIR`` into a ``Plan``: the keys the output must
hold and the read tasks' items. ``read_item`` turns one item (a shard, or a chunk of image files) into rows: each
row is one key with its status (``todo``, ``done`` or ``bad`` with the error naming the file and the problem), its
gray input and hole mask.

Reading goes through ``shards.reader.decode_sample`` on webdataset's raw per-key dicts rather than
``ray.data.read_webdataset``: the project's decoder is the one place that checks a sample (mode L input, mask, sizes)
and names the key and the shard in its errors, and decoding per sample lets one corrupt member become one bad key
(``--skip-bad``) instead of a failed read task.
"""
from __future__ import annotations

import hashlib
import io
import os
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
from PIL import Image, ImageOps

from shards import schema
from shards.detector import NoDamageFound, detect_damage
from shards.reader import decode_sample, read_manifest, shard_paths

IMAGES_PER_READ_TASK = 64  # --images mode: files per read task (one task per shard in --shards mode)
TODO, DONE, BAD = "todo", "done", "bad"
# schema.atomic_write_bytes names its temp files ".KEY.png.<random>.tmp" (and the records' ".restore_records.jsonl.*")
_TEMP_PNG = re.compile(r"^\.(.+\.png|restore_records\.jsonl)\..+\.tmp$")

_EMPTY_GRAY = np.zeros((0, 0), np.uint8)
_EMPTY_RGB = np.zeros((0, 0, 3), np.uint8)


class BadInput(Exception):
    """A problem with the user's input; the message names the file and the problem (exit 2)."""


# ---------------------------------------------------------------------------------------------- planning (driver)
@dataclass
class Plan:
    """What to restore: the expected keys (the zip must hold exactly these) and the read tasks' items."""

    kind: str  # "shards" | "images"
    source: Path
    keys: list[str]
    items: list[dict] = field(default_factory=list)
    ignored: list[str] = field(default_factory=list)  # files in an image folder that are not images (not read)
    unsearched_dirs: int = 0  # subfolders of an image folder not searched (no --recursive)
    masked: set[str] = field(default_factory=set)  # keys with a user mask (--masks)
    unused_masks: list[str] = field(default_factory=list)  # masks whose image is not in the folder


def plan_shards(split_dir: str | os.PathLike) -> Plan:
    split_dir = Path(split_dir)
    try:
        manifest = read_manifest(split_dir)
        paths = shard_paths(split_dir)
    except (FileNotFoundError, ValueError) as exc:
        raise BadInput(str(exc)) from exc
    items, keys = [], []
    for entry, path in zip(manifest["shards"], paths):
        shard_keys = list(entry.get("keys") or [])
        if not shard_keys and entry.get("count"):
            raise BadInput(f"{split_dir / schema.MANIFEST_NAME}: shard {entry['name']} lists no keys")
        items.append({"kind": "shard", "path": str(path), "keys": shard_keys})
        keys.extend(shard_keys)
    duplicates = sorted(k for k, n in Counter(keys).items() if n > 1)
    if duplicates:
        raise BadInput(f"{split_dir / schema.MANIFEST_NAME}: keys listed twice: {', '.join(duplicates[:10])}")
    if not keys:
        raise BadInput(f"{split_dir / schema.MANIFEST_NAME}: the manifest lists no samples (empty split)")
    return Plan("shards", split_dir, keys, items)


def image_suffixes() -> frozenset[str]:
    """The file name endings ``--images`` restores: every raster format Pillow opens (PNG, JPEG, TIFF, WebP, BMP, GIF,
    JPEG 2000, PNM, TGA, ...), without the ones Pillow only names (stub plugins: HDF5, GRIB, BUFR), draws through an
    outside program (EPS, PostScript), or that are vector or video (WMF, EMF, MPEG)."""
    Image.init()
    readable = {ext for ext, fmt in Image.registered_extensions().items() if fmt in Image.OPEN}
    return frozenset(readable - _NOT_PHOTOS)


_NOT_PHOTOS = {".h5", ".hdf", ".grib", ".bufr", ".eps", ".ps", ".emf", ".wmf", ".mpeg", ".mpg"}


def _image_files(folder: Path, recursive: bool, exclude: Sequence[Path]) -> tuple[list[Path], list[Path], int]:
    """(image files, other files, subfolders not searched) under ``folder``, sorted; hidden files and folders (a
    leading dot) count as other files / are not searched; ``exclude``: folders never searched (the outputs)."""
    suffixes = image_suffixes()
    excluded = {p.resolve() for p in exclude}
    images, others, skipped_dirs = [], [], 0
    for dirpath, dirnames, filenames in os.walk(folder, followlinks=True):
        here = Path(dirpath)
        keep = []
        for d in sorted(dirnames):
            if (here / d).resolve() in excluded:
                continue
            if recursive and not d.startswith("."):
                keep.append(d)
            else:
                skipped_dirs += 1
        dirnames[:] = keep
        for name in sorted(filenames):
            path = here / name
            if not name.startswith(".") and path.suffix.lower() in suffixes:
                images.append(path)
            else:
                others.append(path)
    return sorted(images), sorted(others), skipped_dirs


def image_key(path: Path, root: Path) -> str:
    """The key (and output name, without ``.png``) of an image file: its path under ``root`` without the suffix, with
    ``/`` between folders (``box1/scan_0001``)."""
    return path.relative_to(root).with_suffix("").as_posix()


def _keyed(files: list[Path], root: Path, what: str) -> dict[str, Path]:
    by_key: dict[str, Path] = {}
    for p in files:
        key = image_key(p, root)
        if key in by_key:
            raise BadInput(f"{what} {root}: {by_key[key].relative_to(root)} and {p.relative_to(root)} have the same "
                           f"name {key!r} (one output {key}.png): rename one")
        by_key[key] = p
    return by_key


def plan_images(image_dir: str | os.PathLike, *, recursive: bool = False, masks_dir: str | os.PathLike | None = None,
                mask_dilate: int = 0, exclude: Sequence[Path] = ()) -> Plan:
    """Every image file in ``image_dir`` (``image_suffixes``; with ``recursive`` in its subfolders too); the key is
    the path under ``image_dir`` without the suffix. ``masks_dir``: user masks, found by the same key (any image
    suffix); images without one get the detector. ``exclude``: output folders inside ``image_dir``, never read.
    Files that are not images are not read; ``Plan.ignored`` lists them (the run says how many)."""
    image_dir = Path(image_dir)
    if not image_dir.is_dir():
        raise BadInput(f"image directory {image_dir} does not exist" if not image_dir.exists()
                       else f"--images {image_dir} is a file, not a folder of images")
    if masks_dir is not None:  # a masks folder inside the image folder holds no images to restore
        exclude = [*exclude, Path(masks_dir)]
    files, others, skipped_dirs = _image_files(image_dir, recursive, exclude)
    if not files:
        raise BadInput(f"image directory {image_dir} holds no image files ({', '.join(sorted(image_suffixes()))})"
                       + (f"; {len(others)} other files ignored" if others else "")
                       + (f"; {skipped_dirs} subfolders not searched (--recursive searches them)"
                          if skipped_dirs and not recursive else ""))
    if masks_dir is not None:
        masks_dir = Path(masks_dir)
        if not masks_dir.is_dir():
            raise BadInput(f"--masks {masks_dir}: no such folder")
        if masks_dir.resolve() == image_dir.resolve():
            raise BadInput(f"--masks {masks_dir} is the image folder: each image would be its own mask")
    by_key = _keyed(files, image_dir, "image directory")
    masks: dict[str, Path] = {}
    unused_masks: list[str] = []
    if masks_dir is not None:
        mask_files, _, _ = _image_files(masks_dir, recursive, exclude)
        masks = _keyed(mask_files, masks_dir, "mask directory")
        unused_masks = sorted(set(masks) - set(by_key))
    keys = sorted(by_key)
    items = []
    for i in range(0, len(keys), IMAGES_PER_READ_TASK):
        chunk = keys[i:i + IMAGES_PER_READ_TASK]
        items.append({"kind": "images", "keys": chunk, "paths": [str(by_key[k]) for k in chunk],
                      "masks": [str(masks[k]) if k in masks else "" for k in chunk], "mask_dilate": int(mask_dilate)})
    plan = Plan("images", image_dir, keys, items)
    plan.ignored = [p.relative_to(image_dir).as_posix() for p in others]
    plan.unsearched_dirs = skipped_dirs if not recursive else 0
    plan.masked = {k for k in keys if k in masks}
    plan.unused_masks = unused_masks
    return plan


def output_png(png_dir: Path, key: str) -> Path:
    """Where ``key``'s restoration is written: ``PNG_DIR/KEY.png`` (``KEY`` may hold subfolders)."""
    return png_dir / f"{key}.png"


def remove_temp_files(png_dir: Path) -> int:
    """Delete the temp PNGs a crashed run left behind (in subfolders too); returns how many."""
    if not png_dir.is_dir():
        return 0
    removed = 0
    for dirpath, _, filenames in os.walk(png_dir):
        for name in filenames:
            if _TEMP_PNG.match(name):
                (Path(dirpath) / name).unlink(missing_ok=True)
                removed += 1
    return removed


# ---------------------------------------------------------------------------------------------- reading one image
class UnreadableImage(ValueError):
    """An image or mask file that cannot be restored; the message names the file and the problem."""


# Formats whose pixels are lossy: the detector then looks for a fill smeared by compression (None: unknown, both).
_LOSSY = {"JPEG": True, "MPO": True, "WEBP": None, "JPEG2000": None, "AVIF": None}
_SIXTEEN_BIT = ("I;16", "I;16L", "I;16B", "I;16N")
_ALPHA_MODES = ("LA", "La", "PA", "RGBA", "RGBa")


def open_oriented(path: str, data: bytes | None = None) -> tuple[Image.Image, list[str]]:
    """The first frame of ``path`` (decoded from ``data``, its bytes, when the caller has read them already), loaded,
    turned upright by its EXIF orientation; with the notes that say so."""
    notes: list[str] = []
    try:
        with Image.open(io.BytesIO(data) if data is not None else path) as img:
            frames = getattr(img, "n_frames", 1)
            img.load()
            orientation = img.getexif().get(0x0112, 1)
            fmt, info = img.format, dict(img.info)
            upright = ImageOps.exif_transpose(img)
            upright.load()
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as exc:
        raise UnreadableImage(f"{path}: cannot read as an image ({type(exc).__name__}: {exc})") from exc
    upright.format, upright.info = fmt, info
    if orientation not in (1, None):
        notes.append(f"EXIF orientation {orientation} applied")
    if frames > 1:
        notes.append(f"first of {frames} frames")
    return upright, notes


def lossy_format(img: Image.Image) -> bool | None:
    """Whether ``img``'s file format compressed its pixels lossily: True (JPEG), False (PNG, BMP, most TIFFs), None
    (unknown: WebP and JPEG 2000 can be either), as ``shards.detector.detect_damage(lossy=...)`` takes it."""
    if img.format == "TIFF":
        return "jpeg" in str(img.info.get("compression", "")).lower()
    return _LOSSY.get(img.format, False)


def to_luma(img: Image.Image, path: str) -> tuple[np.ndarray, list[str]]:
    """uint8 [H,W] luma of any image mode, and notes for what was converted.

    Gray (L) as it is; 1-bit as 0/255; 16-bit gray (I;16*) scaled to 8 bits with rounding, ``round(v * 255 / 65535)``;
    32-bit integer gray (I) read as 16-bit values (clipped to 0-65535) and scaled the same way; palette, gray+alpha
    and color through RGB: R == G == B is gray as it is, anything else (sepia, faded or color prints) becomes PIL's
    ``convert('L')`` luma (ITU-R 601: L = R * 299/1000 + G * 587/1000 + B * 114/1000). Alpha is ignored (noted when
    not opaque). 32-bit float images are refused (``UnreadableImage``): their range is unknown.
    """
    notes: list[str] = []
    mode = img.mode
    if mode == "L":
        return np.asarray(img), notes
    if mode == "1":
        return np.asarray(img.convert("L")), ["1-bit image read as 0/255"]
    if mode in _SIXTEEN_BIT or mode == "I":
        values = np.asarray(img)
        if mode == "I":
            values = np.clip(values, 0, 65535)
            notes.append("32-bit integer gray read as 16-bit (0-65535) and scaled to 8-bit")
        else:
            notes.append("16-bit gray scaled to 8-bit")
        return ((values.astype(np.uint32) * 255 + 32767) // 65535).astype(np.uint8), notes
    if mode == "F":
        raise UnreadableImage(f"{path}: 32-bit float image (mode F): its value range is unknown; save it as 8- or "
                              f"16-bit")
    if mode in _ALPHA_MODES or (mode == "P" and "transparency" in img.info):
        rgba = np.asarray(img.convert("RGBA"))
        if (rgba[..., 3] < 255).any():
            notes.append("alpha channel ignored")
    try:
        rgb = np.asarray(img.convert("RGB"))
    except (ValueError, OSError) as exc:
        raise UnreadableImage(f"{path}: cannot convert mode {mode} to luma ({exc})") from exc
    if (rgb[..., 0] == rgb[..., 1]).all() and (rgb[..., 1] == rgb[..., 2]).all():
        return np.ascontiguousarray(rgb[..., 0]), notes
    notes.append(f"color image (mode {mode}) converted to luma, PIL convert('L')")
    return np.asarray(Image.fromarray(rgb).convert("L")), notes


def load_gray(path: str, data: bytes | None = None) -> tuple[np.ndarray, list[str], bool | None]:
    """An input file (or its bytes, ``data``) as uint8 [H,W] luma (``to_luma``, upright: ``open_oriented``), its
    notes, and whether its format is lossy (``lossy_format``). ``UnreadableImage`` naming the file otherwise."""
    img, notes = open_oriented(path, data)
    gray, more = to_luma(img, path)
    return np.ascontiguousarray(gray), notes + more, lossy_format(img)


def load_mask(path: str, shape: tuple[int, int], image_path: str, dilate: int = 0, data: bytes | None = None,
              ) -> np.ndarray:
    """A user mask as bool [H,W]: white = damaged (the LaMa / IOPaint convention): luma above 127 (16-bit masks
    scaled first), and where the mask has alpha, only where it is opaque too (alpha above 127). Turned upright by its
    EXIF orientation as the image is. ``dilate``: grow it by that many pixels (a disk), so the edge of a scratch
    does not stay as a seam. ``UnreadableImage`` for an unreadable mask or one whose size differs from its image's."""
    img, _ = open_oriented(path, data)
    if (img.height, img.width) != tuple(shape):
        raise UnreadableImage(f"mask {path} is {img.width}x{img.height} but its image {image_path} is "
                              f"{shape[1]}x{shape[0]}: a mask must have its image's size")
    alpha = None
    if img.mode in _ALPHA_MODES or (img.mode == "P" and "transparency" in img.info):
        rgba = img.convert("RGBA")
        alpha = np.asarray(rgba)[..., 3]
        img = rgba.convert("RGB")
    luma, _ = to_luma(img, path)
    mask = luma > 127
    if alpha is not None:
        mask &= alpha > 127
    if dilate > 0 and mask.any():
        import cv2

        kernel = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * dilate + 1, 2 * dilate + 1))
        mask = cv2.dilate(mask.astype(np.uint8), kernel) > 0
    return mask


def output_size(data: bytes) -> tuple[int, int]:
    """(H, W) of the restoration of an input file's bytes, from its header: its size, turned by EXIF orientation."""
    with Image.open(io.BytesIO(data)) as img:  # reads the header (and EXIF) only
        h, w = img.height, img.width
        if img.getexif().get(0x0112, 1) in (5, 6, 7, 8):  # a quarter turn
            h, w = w, h
    return h, w


def sha256(*parts: bytes) -> str:
    digest = hashlib.sha256()
    for part in parts:
        digest.update(part)
    return digest.hexdigest()


# ---------------------------------------------------------------------------------------------- read stage (tasks)
# Every row carries these (besides the images): the driver's records and summary read them, the actor and the writer
# pass them on.
ROW_COLUMNS = ("key", "where", "status", "error", "note", "height", "width", "input_sha", "mask_sha", "mask_source",
               "hole_frac", "redo")


def _row(key: str, where: str, status: str, *, error: str = "", note: str = "", size: tuple[int, int] = (0, 0),
         gray: np.ndarray = _EMPTY_GRAY, mask: np.ndarray = _EMPTY_GRAY, gt: np.ndarray | None = None,
         with_gt: bool = False, input_sha: str = "", mask_sha: str = "", mask_source: str = "",
         redo: str = "") -> dict:
    """One key's row. ``mask_source``: ``shard`` (the shard's mask member), ``user`` (``--masks``), ``detected`` or
    ``none`` (nothing found: colorized only); ``redo``: why a finished output is redone (its input changed)."""
    hole_frac = float(np.count_nonzero(mask)) / mask.size if mask.size else 0.0
    row = {"key": key, "where": where, "status": status, "error": error, "note": note,
           "height": int(size[0]), "width": int(size[1]), "input": gray, "mask": mask,
           "input_sha": input_sha, "mask_sha": mask_sha, "mask_source": mask_source, "hole_frac": hole_frac,
           "redo": redo}
    if with_gt:
        row["gt"] = gt if gt is not None else _EMPTY_RGB
    return row


def _redo_reason(expect: dict | None, input_sha: str, mask_sha: str) -> str | None:
    """None when the finished output's recorded input matches (reuse it), else why it is redone."""
    if expect is None:
        return ""
    if expect.get("input") != input_sha:
        return "input changed"
    if (expect.get("mask") or "") != mask_sha:
        return "mask changed"
    return None


def read_item(item: dict, *, with_gt: bool, load_done: bool = False) -> Iterator[dict]:
    """Rows of one read item (a shard or a chunk of image files); never raises for bad data, emits ``bad`` rows.

    ``item["expect"]``: for keys with a finished output made the same way (``restore.records``), the sha256 of the
    input (and mask) it was made from: when this read finds the same bytes the row is ``done`` (only its size read,
    or everything with ``load_done``: the gallery needs the input and mask), else ``todo`` with ``redo`` saying why.
    """
    if item["kind"] == "shard":
        yield from _read_shard(item, with_gt=with_gt, load_done=load_done)
    else:
        yield from _read_images(item, load_done=load_done)


def _read_shard(item: dict, *, with_gt: bool, load_done: bool) -> Iterator[dict]:
    import webdataset as wds

    path, expected, expect = item["path"], set(item["keys"]), item.get("expect") or {}
    seen: set[str] = set()
    try:
        dataset = wds.WebDataset([path], shardshuffle=False, nodesplitter=None, workersplitter=None,
                                 empty_check=False)
        for raw in dataset:
            key = raw.get("__key__", "?")
            if key not in expected:
                yield _row(key, path, BAD, error=f"{path}: sample {key!r} is not in the manifest", with_gt=with_gt)
                continue
            if key in seen:
                yield _row(key, path, BAD, error=f"{path}: sample {key!r} appears twice", with_gt=with_gt)
                continue
            seen.add(key)
            input_bytes, mask_bytes = raw.get(schema.INPUT_EXT), raw.get(schema.MASK_EXT)
            hashes = {"input_sha": sha256(input_bytes) if isinstance(input_bytes, bytes) else "",
                      "mask_sha": sha256(mask_bytes) if isinstance(mask_bytes, bytes) else ""}
            redo = _redo_reason(expect.get(key), **hashes)
            if redo is None and not with_gt and not load_done:
                try:  # finished already, from these bytes: only the size is needed, for verifying the zip
                    yield _row(key, path, DONE, size=output_size(input_bytes), mask_source="shard", **hashes)
                except Exception as exc:  # a corrupt input member
                    yield _row(key, path, BAD, error=f"sample {key!r} in {path}: {schema.INPUT_EXT}: {exc}")
                continue
            try:
                sample = decode_sample(raw, with_gt=with_gt)
            except ValueError as exc:
                yield _row(key, path, BAD, error=str(exc), with_gt=with_gt)
                continue
            if with_gt and sample.gt is None:
                yield _row(key, path, BAD, error=f"sample {key!r} in {path} has no gt (--score needs it)",
                           with_gt=with_gt)
                continue
            yield _row(key, path, DONE if redo is None else TODO, size=sample.input.shape, gray=sample.input,
                       mask=sample.mask.astype(np.uint8), gt=sample.gt, with_gt=with_gt, mask_source="shard",
                       redo=redo or "", **hashes)
    except Exception as exc:  # the tar itself is unreadable (truncated, not a tar)
        for key in sorted(expected - seen):
            yield _row(key, path, BAD, error=f"{path}: unreadable shard ({type(exc).__name__}: {exc}); "
                                             f"sample {key!r} not read", with_gt=with_gt)
        return
    for key in sorted(expected - seen):
        yield _row(key, path, BAD, error=f"{path}: sample {key!r} is in the manifest but not in the shard",
                   with_gt=with_gt)


def _read_images(item: dict, *, load_done: bool) -> Iterator[dict]:
    expect = item.get("expect") or {}
    dilate = int(item.get("mask_dilate", 0))
    masks = item.get("masks") or [""] * len(item["keys"])
    for path, key, mask_path in zip(item["paths"], item["keys"], masks):
        try:
            data = Path(path).read_bytes()
            mask_data = Path(mask_path).read_bytes() if mask_path else b""
        except OSError as exc:
            yield _row(key, path, BAD, error=f"{exc.filename or path}: cannot read ({exc.strerror or exc})")
            continue
        hashes = {"input_sha": sha256(data), "mask_sha": sha256(mask_data) if mask_path else ""}
        redo = _redo_reason(expect.get(key), **hashes)
        if redo is None and not load_done:
            try:  # finished already, from these bytes: only the size is needed, for verifying the zip
                yield _row(key, path, DONE, size=output_size(data), mask_source="user" if mask_path else "",
                           **hashes)
            except Exception as exc:
                yield _row(key, path, BAD, error=f"{path}: cannot read as an image ({type(exc).__name__}: {exc})")
            continue
        try:
            gray, notes, lossy = load_gray(path, data)  # the bytes hashed above: the file is read once
            del data
            if mask_path:
                mask = load_mask(mask_path, gray.shape, path, dilate, mask_data)
                source = "user"
                notes.append(f"user mask {mask.mean():.1%} of the image" + (f" (grown {dilate} px)" if dilate else "")
                             if mask.any() else "user mask is empty: colorized only")
            else:
                mask, source, note = _detect(gray, lossy)
                notes.append(note)
        except UnreadableImage as exc:
            yield _row(key, path, BAD, error=str(exc))
            continue
        yield _row(key, path, DONE if redo is None else TODO, note="; ".join(notes), size=gray.shape, gray=gray,
                   mask=mask.astype(np.uint8), mask_source=source, redo=redo or "", **hashes)


def _detect(gray: np.ndarray, lossy: bool | None) -> tuple[np.ndarray, str, str]:
    """(mask, ``detected`` | ``none``, note): ``shards.detector``'s verdict on the image (lossy: its format's)."""
    try:
        found = detect_damage(gray, lossy=lossy)
    except NoDamageFound as exc:  # an undamaged photo still gets colorized, its luma untouched
        return np.zeros(gray.shape, bool), "none", f"no damage found ({exc}); colorized only"
    return found.mask, "detected", found.note
