"""The sample schema shared by every floor: file names inside a shard, the per-sample JSON, PNG codecs.

A sample in a tar shard is four adjacent members with one KEY (the input file's stem, e.g. ``TRAIN_00000``):

    KEY.input.png   8-bit L, the damaged gray image, pixels byte-for-byte those of the source input
    KEY.mask.png    8-bit L, 255 = damaged (hole), 0 = known
    KEY.gt.png      8-bit RGB, the undamaged original (absent on test data)
    KEY.json        SampleMeta as JSON

Only numpy, OpenCV, Pillow and the deflate libraries are imported here so that every floor can use it cheaply.
"""
from __future__ import annotations

import hashlib
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
    return _own_png(array, mode, *_OWN_WRITER[compression])


def _own_png(array: np.ndarray, mode: str, scan_filter: int, deflate: Callable[[Any], bytes]) -> bytes:
    """A minimal 8-bit PNG (IHDR, one IDAT, IEND), every scanline filtered with ``scan_filter``."""
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


def _decode_own_png(data: bytes, mode: str) -> np.ndarray | None:
    """Pixels of a PNG laid out as ``encode_png``'s "fast" and "none" write it, else None (the caller falls back).

    Such a PNG is IHDR, IDAT..., IEND with every scanline filtered Up (RGB) or every one None: ISA-L inflates it twice
    as fast as zlib, and undoing Up is one wrapping uint8 add per row, where libpng (OpenCV) inflates with zlib and
    unfilters byte by byte (bench/png_codec.py has the figures). Gray images filtered Up are left to libpng: at one
    byte per pixel the per-row adds cost as much as they save. Every chunk's CRC and the zlib stream's Adler-32 are
    checked as libpng does; any other layout (ancillary chunks, interlacing, other filters) returns None, so what
    this accepts decodes to exactly what libpng and PIL give.
    """
    view = memoryview(data)
    height = width = None
    chunks: list[tuple[int, int]] = []  # (start of the tag, end of the payload) of each chunk
    idat: list[memoryview] = []
    pos, end = len(_PNG_SIGNATURE), len(data)
    while pos + 12 <= end:
        (length,) = struct.unpack_from(">I", data, pos)
        tag, payload_end = data[pos + 4 : pos + 8], pos + 8 + length
        if payload_end + 4 > end:
            return None
        chunks.append((pos + 4, payload_end))
        if tag == b"IHDR" and pos == len(_PNG_SIGNATURE) and length == 13:
            width, height, depth, color, method, filter_method, interlace = struct.unpack_from(
                ">IIBBBBB", data, pos + 8)
            if (depth, color, method, filter_method, interlace) != (8, _PNG_COLOR_TYPE[mode], 0, 0, 0):
                return None
        elif tag == b"IDAT" and height is not None:
            idat.append(view[pos + 8 : payload_end])
        elif tag == b"IEND" and height and width and idat:
            break
        else:
            return None
        pos = payload_end + 4
    else:
        return None
    channels = 3 if mode == "RGB" else 1
    row_bytes = 1 + width * channels
    # Which filters: the first two scanlines' filter bytes, from a partial inflate (~20 us), so that a PNG this path
    # would not take (libpng's adaptive filters) costs next to nothing before the fallback.
    try:
        peek = 2 * row_bytes + 1024  # compressed bytes that hold two scanlines, even stored ones
        source = idat[0] if len(idat) == 1 or len(idat[0]) >= peek else b"".join(idat)
        head = isal_zlib.decompressobj().decompress(source[:peek], row_bytes + 1)
    except Exception:
        return None
    first = {head[0], head[row_bytes]} if len(head) > row_bytes else set(head[:1])
    if first != {_FILTER_NONE} and (first != {_FILTER_UP} or mode != "RGB"):
        return None  # gray rows filtered Up: the per-row add below costs more than libpng's unfiltering of them
    for tag_start, payload_end in chunks:
        if isal_zlib.crc32(view[tag_start:payload_end]) != struct.unpack_from(">I", data, payload_end)[0]:
            return None
    try:
        raw = isal_zlib.decompress(b"".join(idat))
    except Exception:
        return None
    if len(raw) != height * row_bytes:
        return None
    scanlines = np.frombuffer(raw, np.uint8).reshape(height, row_bytes)
    filters = scanlines[:, 0]
    pixels = scanlines[:, 1:].copy()
    if (filters == _FILTER_UP).all():  # row i = its bytes + row i-1's, mod 256 (uint8 wraps)
        for i in range(1, height):
            np.add(pixels[i], pixels[i - 1], out=pixels[i])
    elif not (filters == _FILTER_NONE).all():
        return None
    return pixels.reshape(height, width, 3) if mode == "RGB" else pixels.reshape(height, width)


def decode_png(data: bytes, mode: str, what: str = "image") -> np.ndarray:
    """Decode PNG bytes, requiring PIL ``mode`` exactly (no silent conversion); ``what`` names it in errors.

    The project's own PNGs (``encode_png`` "fast"/"none") are decoded by ``_decode_own_png``; other 8-bit gray or RGB
    PNGs (e.g. DACON's originals, kept byte for byte) by OpenCV, 25-50% less CPU than PIL at 512x512
    (bench/png_codec.py); anything else, or anything OpenCV cannot read, goes through PIL, which names what it is.
    PNG is lossless: all three give the same pixels.
    """
    if _is_8bit_png_of(data, mode):
        own = _decode_own_png(data, mode)
        if own is not None:
            return own
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
    """Unfiltered rows + ISA-L deflate: a hole's runs of 0 and 255 need no Up filter, and unfiltered gray rows take
    the fast decode path (a 512x512 mask: ~1.7 KB and 0.24 ms to read, against 2.9 KB and 0.48 ms filtered Up)."""
    if mask.ndim != 2 or mask.size == 0:
        raise ValueError(f"expected a non-empty (H,W) mask, got shape {mask.shape}")
    return _own_png(np.where(mask, 255, 0).astype(np.uint8), "L", _FILTER_NONE, _OWN_WRITER["fast"][1])


def decode_mask(data: bytes, what: str = "mask") -> np.ndarray:
    return decode_png(data, "L", what) > 127


def file_sha256(path: str | os.PathLike) -> str:
    """The hex SHA-256 of a file's bytes, read in 1 MiB blocks (shard manifests, checkpoints, reuse records)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            digest.update(block)
    return digest.hexdigest()


def atomic_write(path: str | os.PathLike, write: Callable[[BinaryIO], None],
                 check: Callable[[Path], None] | None = None) -> None:
    """Call ``write(file)`` on a temp file beside ``path``, fsync, ``check(temp path)`` if given (raise to keep
    ``path`` as it was), rename: ``path`` is complete or absent."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        if check is not None:
            check(Path(tmp))
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
