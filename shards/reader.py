"""Reading packed shards: the manifest, the shard list, and samples decoded from webdataset's raw dicts.

Torch-free: ``webdataset`` imports torch when it is installed, so it is imported only inside ``iter_samples``;
the manifest helpers and ``decode_sample`` stay cheap for numpy-only users such as ``restore.score``.
"""
from __future__ import annotations

import json
import os
import tarfile
from pathlib import Path
from typing import Any, Iterable, Iterator, Mapping

from .schema import (
    GT_EXT,
    INPUT_EXT,
    MANIFEST_NAME,
    MASK_EXT,
    META_EXT,
    SCHEMA_VERSION,
    Sample,
    SampleMeta,
    decode_mask,
    decode_png,
)


def read_manifest(split_dir: str | os.PathLike) -> dict:
    """``SPLIT_DIR/manifest.json`` as a dict; ``FileNotFoundError``/``ValueError`` naming the path otherwise."""
    split_dir = Path(split_dir)
    if not split_dir.is_dir():
        raise FileNotFoundError(f"shard directory {split_dir} does not exist")
    path = split_dir / MANIFEST_NAME
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no manifest (not a packed split, or packing did not finish)")
    try:
        manifest = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"{path}: unreadable manifest ({exc})") from exc
    if not isinstance(manifest, dict) or manifest.get("schema_version") != SCHEMA_VERSION:
        version = manifest.get("schema_version") if isinstance(manifest, dict) else None
        raise ValueError(f"{path}: schema_version {version!r}, this code reads {SCHEMA_VERSION}")
    if not isinstance(manifest.get("shards"), list):
        raise ValueError(f"{path}: manifest has no 'shards' list")
    return manifest


def shard_paths(split_dir: str | os.PathLike, manifest: dict | None = None) -> list[Path]:
    """The split's tar files in manifest order (``manifest``: the split's, when already read); every listed file
    must exist and the list must not be empty."""
    split_dir = Path(split_dir)
    manifest = read_manifest(split_dir) if manifest is None else manifest
    paths = [split_dir / entry["name"] for entry in manifest["shards"]]
    if not paths:
        raise ValueError(f"{split_dir / MANIFEST_NAME}: the manifest lists no shards (empty split)")
    missing = [str(p) for p in paths if not p.is_file()]
    if missing:
        raise FileNotFoundError(f"{split_dir}: shards listed in the manifest are missing: {', '.join(missing)}")
    return paths


def decode_sample(raw: Mapping[str, Any], *, with_gt: bool = True) -> Sample:
    """A ``Sample`` from webdataset's raw dict (bytes per extension plus ``__key__``/``__url__``).

    Any missing member, corrupt image or inconsistent shape raises ``ValueError`` naming the key and the shard.
    ``with_gt=False`` leaves ``gt`` None without decoding it (inference: the 512x512 RGB PNG is most of the work).
    """
    key = raw.get("__key__", "?")
    where = f"sample {key!r} in {raw.get('__url__', '?')}"
    for ext in (INPUT_EXT, MASK_EXT, META_EXT):
        if ext not in raw:
            present = sorted(k for k in raw if not k.startswith("__"))
            raise ValueError(f"{where}: missing member {key}.{ext} (has {present})")
    try:
        meta = SampleMeta.from_json_bytes(raw[META_EXT])
    except (ValueError, TypeError) as exc:  # JSONDecodeError is a ValueError; wrong fields are TypeErrors
        raise ValueError(f"{where}: bad {META_EXT} ({exc})") from exc
    gray = decode_png(raw[INPUT_EXT], "L", f"{where}: {INPUT_EXT}")
    mask = decode_mask(raw[MASK_EXT], f"{where}: {MASK_EXT}")
    gt = decode_png(raw[GT_EXT], "RGB", f"{where}: {GT_EXT}") if with_gt and GT_EXT in raw else None
    if mask.shape != gray.shape or (gt is not None and gt.shape[:2] != gray.shape):
        shapes = f"input {gray.shape}, mask {mask.shape}" + (f", gt {gt.shape}" if gt is not None else "")
        raise ValueError(f"{where}: image sizes disagree ({shapes})")
    return Sample(key=key, input=gray, mask=mask, gt=gt, meta=meta)


def iter_samples(paths: Iterable[str | os.PathLike], *, with_gt: bool = True) -> Iterator[Sample]:
    """Every sample of ``paths`` in shard order and tar order, read by the stock ``webdataset`` reader."""
    import webdataset as wds  # imports torch when present: keep it out of module import

    # One reader per shard, so that a damaged tar is reported by name.
    for url in (str(p) for p in paths):
        dataset = wds.WebDataset(url, shardshuffle=False, nodesplitter=None, workersplitter=None, empty_check=False)
        try:
            for raw in dataset:
                yield decode_sample(raw, with_gt=with_gt)
        except (tarfile.TarError, OSError, EOFError) as exc:
            raise ValueError(f"{url}: unreadable shard ({type(exc).__name__}: {exc})") from exc
