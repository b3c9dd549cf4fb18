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

import io
import os
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import numpy as np
from PIL import Image

from shards import schema
from shards.damage import NoDamageFound, detect_mask
from shards.reader import decode_sample, read_manifest, shard_paths

IMAGES_PER_READ_TASK = 64  # --images mode: files per read task (one task per shard in --shards mode)
TODO, DONE, BAD = "todo", "done", "bad"
# schema.atomic_write_bytes names its temp files ".KEY.png.<random>.tmp"
_TEMP_PNG = re.compile(r"^\..+\.png\..+\.tmp$")

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


def plan_images(image_dir: str | os.PathLike) -> Plan:
    """Every ``*.png`` directly in ``image_dir``; the key (and output name) is the file's stem."""
    image_dir = Path(image_dir)
    if not image_dir.is_dir():
        raise BadInput(f"image directory {image_dir} does not exist")
    files = sorted(p for p in image_dir.iterdir() if p.is_file() and p.suffix.lower() == ".png")
    if not files:
        raise BadInput(f"image directory {image_dir} holds no .png files")
    stems: dict[str, Path] = {}
    for p in files:
        if p.stem in stems:
            raise BadInput(f"{image_dir}: {stems[p.stem].name} and {p.name} would both be written as {p.stem}.png")
        stems[p.stem] = p
    items = []
    for i in range(0, len(files), IMAGES_PER_READ_TASK):
        chunk = files[i : i + IMAGES_PER_READ_TASK]
        items.append({"kind": "images", "paths": [str(p) for p in chunk], "keys": [p.stem for p in chunk]})
    return Plan("images", image_dir, [p.stem for p in files], items)


def finished_keys(png_dir: Path) -> set[str]:
    """Keys whose ``KEY.png`` exists in ``png_dir`` (complete by construction: temp + rename)."""
    if not png_dir.is_dir():
        return set()
    return {p.stem for p in png_dir.iterdir() if p.suffix == ".png" and not p.name.startswith(".")}


def remove_temp_files(png_dir: Path) -> int:
    """Delete temp files a crashed run left behind; returns how many."""
    if not png_dir.is_dir():
        return 0
    leftovers = [p for p in png_dir.iterdir() if _TEMP_PNG.match(p.name)]
    for p in leftovers:
        p.unlink(missing_ok=True)
    return len(leftovers)



# ---------------------------------------------------------------------------------------------- read stage (tasks)
def _row(key: str, where: str, status: str, *, error: str = "", note: str = "", size: tuple[int, int] = (0, 0),
         gray: np.ndarray = _EMPTY_GRAY, mask: np.ndarray = _EMPTY_GRAY, gt: np.ndarray | None = None,
         with_gt: bool = False) -> dict:
    row = {"key": key, "where": where, "status": status, "error": error, "note": note,
           "height": int(size[0]), "width": int(size[1]), "input": gray, "mask": mask}
    if with_gt:
        row["gt"] = gt if gt is not None else _EMPTY_RGB
    return row


def _png_size(data: bytes) -> tuple[int, int]:
    with Image.open(io.BytesIO(data)) as img:  # reads the header only
        return img.height, img.width


def read_item(item: dict, *, with_gt: bool) -> Iterator[dict]:
    """Rows of one read item (a shard or a chunk of image files); never raises for bad data, emits ``bad`` rows."""
    if item["kind"] == "shard":
        yield from _read_shard(item, with_gt=with_gt)
    else:
        yield from _read_images(item)


def _read_shard(item: dict, *, with_gt: bool) -> Iterator[dict]:
    import webdataset as wds

    path, expected, done = item["path"], set(item["keys"]), set(item.get("done", ()))
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
            if key in done and not with_gt:
                try:  # finished already: only the size is needed, for verifying the zip
                    yield _row(key, path, DONE, size=_png_size(raw[schema.INPUT_EXT]))
                except Exception as exc:  # a missing or corrupt input member
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
            yield _row(key, path, DONE if key in done else TODO, size=sample.input.shape, gray=sample.input,
                       mask=sample.mask.astype(np.uint8), gt=sample.gt, with_gt=with_gt)
    except Exception as exc:  # the tar itself is unreadable (truncated, not a tar)
        for key in sorted(expected - seen):
            yield _row(key, path, BAD, error=f"{path}: unreadable shard ({type(exc).__name__}: {exc}); "
                                             f"sample {key!r} not read", with_gt=with_gt)
        return
    for key in sorted(expected - seen):
        yield _row(key, path, BAD, error=f"{path}: sample {key!r} is in the manifest but not in the shard",
                   with_gt=with_gt)


def load_gray_png(path: str) -> np.ndarray:
    """A damaged input file as uint8 [H,W]: mode L, or RGB with R == G == B; ``ValueError`` naming it otherwise."""
    try:
        with Image.open(path) as img:
            img.load()
            mode = img.mode
            array = np.asarray(img)
    except Exception as exc:
        raise ValueError(f"{path}: cannot read PNG ({exc})") from exc
    if mode == "L":
        return array
    if mode == "RGB" and (array[..., 0] == array[..., 1]).all() and (array[..., 1] == array[..., 2]).all():
        return np.ascontiguousarray(array[..., 0])
    raise ValueError(f"{path}: expected a gray PNG (mode L), got mode {mode}")


def _read_images(item: dict) -> Iterator[dict]:
    done = set(item.get("done", ()))
    for path, key in zip(item["paths"], item["keys"]):
        if key in done:
            try:
                with Image.open(path) as img:
                    yield _row(key, path, DONE, size=(img.height, img.width))
            except Exception as exc:
                yield _row(key, path, BAD, error=f"{path}: cannot read PNG ({exc})")
            continue
        try:
            gray = load_gray_png(path)
        except ValueError as exc:
            yield _row(key, path, BAD, error=str(exc))
            continue
        note = ""
        try:
            mask, _fill = detect_mask(gray)
        except NoDamageFound as exc:  # an undamaged photo still gets colorized
            mask, note = np.zeros(gray.shape, bool), f"no damage detected ({exc}); colorized only"
        yield _row(key, path, TODO, note=note, size=gray.shape, gray=gray, mask=mask.astype(np.uint8))

