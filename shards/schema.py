"""The sample schema shared by every floor: file names inside a shard, the per-sample JSON, PNG codecs.

A sample in a tar shard is four adjacent members with one KEY (the input file's stem, e.g. ``TRAIN_00000``):

    KEY.input.png   8-bit L, the damaged gray image, pixels byte-for-byte those of the source input
    KEY.mask.png    8-bit L, 255 = damaged (hole), 0 = known
    KEY.gt.png      8-bit RGB, the undamaged original (absent on test data)
    KEY.json        SampleMeta as JSON

Only numpy, OpenCV, Pillow and the deflate libraries are imported here so that every floor can use it cheaply.
"""
from __future__ import annotations

import io
import json
import os
import re
import struct
import tempfile
import zlib
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, BinaryIO, Callable

import cv2
import numpy as np
from isal import isal_zlib
from PIL import Image

INPUT_EXT = "input.png"
MASK_EXT = "mask.png"
GT_EXT = "gt.png"
META_EXT = "json"
# Order of a sample's members inside the tar; the writer keeps them adjacent in this order.
MEMBER_ORDER = (INPUT_EXT, MASK_EXT, GT_EXT, META_EXT)

MASK_ORIGINS = ("exact", "detected", "synthetic")
MANIFEST_NAME = "manifest.json"
SCHEMA_VERSION = 1

_UNSAFE_KEY_CHARS = re.compile(r"[^A-Za-z0-9_-]+")


@dataclass(frozen=True)
class SampleMeta:
    key: str
    mask_origin: str  # one of MASK_ORIGINS
    fill: int | None  # the constant gray value of the damage, None when unknown
    hole_fraction: float  # damaged pixels / all pixels
    source_input: str | None = None
    source_gt: str | None = None
    shape: str | None = None  # damage shape kind for synthetic masks
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.mask_origin not in MASK_ORIGINS:
            raise ValueError(f"mask_origin must be one of {MASK_ORIGINS}, got {self.mask_origin!r}")

    def to_json_bytes(self) -> bytes:
        return json.dumps(asdict(self), sort_keys=True).encode()

    @classmethod
    def from_json_bytes(cls, data: bytes) -> "SampleMeta":
        return cls(**json.loads(data))


@dataclass
class Sample:
    """A decoded sample: ``input`` (H,W) uint8, ``mask`` (H,W) bool, ``gt`` (H,W,3) uint8 or None."""

    key: str
    input: np.ndarray
    mask: np.ndarray
    gt: np.ndarray | None
    meta: SampleMeta


def tar_safe_key(stem: str) -> str:
    """A KEY webdataset can split unambiguously: no dots (they start the extension), no path separators."""
    key = _UNSAFE_KEY_CHARS.sub("_", stem).strip("_")
    return key or "sample"


# PNG writer settings by name. Measured per 512x512 RGB image on one core (bench/png_codec.py): PIL or OpenCV at zlib
# level 1 spend 14-28 ms, most of it in libpng's per-row filter search and zlib; "fast" (the UP filter, one numpy
# subtraction, then ISA-L's level-1 deflate) takes ~3 ms for about the same size (-2% on smooth photos, +14% on
# DACON's noisier ones); "none" stores the raw rows (~1.5 ms, 2.2x larger than PIL level 1); "small" is libpng's
# adaptive filters at level 6 through OpenCV (75-82 ms, 3-10% smaller than PIL level 1), for when bytes matter most.
PNG_COMPRESSION = ("fast", "none", "small")
_FILTER_NONE, _FILTER_UP = 0, 2
_OWN_WRITER: dict[str, tuple[int, Callable[[Any], bytes]]] = {
    "fast": (_FILTER_UP, lambda rows: isal_zlib.compress(rows, 1)),
    "none": (_FILTER_NONE, lambda rows: zlib.compress(rows, 0)),
}
_LIBPNG_SMALL = [cv2.IMWRITE_PNG_COMPRESSION, 6, cv2.IMWRITE_PNG_FILTER, cv2.IMWRITE_PNG_ALL_FILTERS]
_PNG_COLOR_TYPE = {"L": 0, "RGB": 2}  # PNG's color types for 8-bit gray and 8-bit truecolor
_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _has_mode_shape(array: np.ndarray, mode: str) -> bool:
    """(H,W) for 'L', (H,W,3) for 'RGB': the arrays the PNG codecs write and return."""
    return array.ndim == 2 if mode == "L" else array.ndim == 3 and array.shape[2] == 3


def _png_chunk(tag: bytes, payload: bytes) -> bytes:
    return struct.pack(">I", len(payload)) + tag + payload + struct.pack(">I", zlib.crc32(tag + payload))


def encode_png(array: np.ndarray, mode: str, compression: str = "fast") -> bytes:
    """PNG bytes of a uint8 array: (H,W) for mode 'L', (H,W,3) for 'RGB'; ``compression`` is one of PNG_COMPRESSION.

    "fast" and "none" write a minimal 8-bit PNG (IHDR, one IDAT, IEND) here, because the libraries' writers cannot
    use a faster deflate or skip their filter search; every decoder reads it (the tests check PIL and OpenCV give back
    the exact pixels and PIL's CRC check passes).
    """
    if array.dtype != np.uint8:
        raise ValueError(f"expected uint8, got {array.dtype}")
    if mode not in _PNG_COLOR_TYPE:
        raise ValueError(f"mode {mode!r}: expected one of {sorted(_PNG_COLOR_TYPE)}")
    if not _has_mode_shape(array, mode):
        raise ValueError(f"mode {mode}: expected shape {'(H,W)' if mode == 'L' else '(H,W,3)'}, got {array.shape}")
    if array.size == 0:
        raise ValueError(f"expected a non-empty image, got shape {array.shape}")
    if compression not in PNG_COMPRESSION:
        raise ValueError(f"compression {compression!r}: expected one of {sorted(PNG_COMPRESSION)}")
    if compression == "small":
        ok, buf = cv2.imencode(".png", array[:, :, ::-1] if mode == "RGB" else array, _LIBPNG_SMALL)
        if not ok:
            raise ValueError(f"OpenCV could not encode a {array.shape} array as PNG")
        return buf.tobytes()
    scan_filter, deflate = _OWN_WRITER[compression]
    height, width = array.shape[:2]
    rows = np.ascontiguousarray(array).reshape(height, -1)
    filtered = np.empty((height, rows.shape[1] + 1), np.uint8)  # each scanline: its filter byte, then the bytes
    filtered[:, 0] = scan_filter
    if scan_filter == _FILTER_UP:  # byte minus the byte above it, mod 256; above the first row PNG reads zeros
        filtered[0, 1:] = rows[0]
        np.subtract(rows[1:], rows[:-1], out=filtered[1:, 1:])
    else:
        filtered[:, 1:] = rows
    header = struct.pack(">IIBBBBB", width, height, 8, _PNG_COLOR_TYPE[mode], 0, 0, 0)
    return (_PNG_SIGNATURE + _png_chunk(b"IHDR", header) + _png_chunk(b"IDAT", deflate(filtered))
            + _png_chunk(b"IEND", b""))


def _is_8bit_png_of(data: bytes, mode: str) -> bool:
    """The IHDR says 8-bit ``mode`` (bytes 24/25 of a PNG are its bit depth and color type); header only."""
    return (data[:8] == _PNG_SIGNATURE and data[12:16] == b"IHDR" and len(data) > 25 and data[24] == 8
            and data[25] == _PNG_COLOR_TYPE.get(mode))


def decode_png(data: bytes, mode: str, what: str = "image") -> np.ndarray:
    """Decode PNG bytes, requiring PIL ``mode`` exactly (no silent conversion); ``what`` names it in errors.

    A PNG whose header says 8-bit gray or RGB (all the project writes) is decoded by OpenCV, 25-50% less CPU than PIL
    at 512x512 (bench/png_codec.py); anything else, or anything OpenCV cannot read, goes through PIL, which names
    what it is. PNG is lossless: both give the same pixels.
    """
    if _is_8bit_png_of(data, mode):
        img = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED)
        if img is not None and img.dtype == np.uint8 and _has_mode_shape(img, mode):
            return img if mode == "L" else cv2.cvtColor(img, cv2.COLOR_BGR2RGB)
    try:
        with Image.open(io.BytesIO(data)) as img:
            img.load()
            if img.mode != mode:
                raise ValueError(f"{what}: expected PIL mode {mode}, got {img.mode}")
            return np.asarray(img).copy()
    except ValueError:
        raise
    except Exception as exc:  # PIL raises several types for corrupt data
        raise ValueError(f"{what}: cannot decode PNG ({exc})") from exc


def encode_mask(mask: np.ndarray) -> bytes:
    return encode_png(np.where(mask, 255, 0).astype(np.uint8), "L")


def decode_mask(data: bytes, what: str = "mask") -> np.ndarray:
    return decode_png(data, "L", what) > 127


def atomic_write(path: str | os.PathLike, write: Callable[[BinaryIO], None]) -> None:
    """Call ``write(file)`` on a temp file beside ``path``, fsync, rename: ``path`` is complete or absent."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)  # the rename itself survives a crash
    finally:
        os.close(dir_fd)


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    atomic_write(path, lambda f: f.write(data))


def atomic_write_json(path: str | os.PathLike, obj: Any) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode())
