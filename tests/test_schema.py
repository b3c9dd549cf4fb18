"""PNG codecs of shards.schema: every writer setting is lossless and decodes to the strict PIL mode."""
from __future__ import annotations

import io
import re

import cv2
import numpy as np
import pytest
from PIL import Image

from shards.schema import PNG_COMPRESSION, decode_mask, decode_png, encode_mask, encode_png


@pytest.mark.parametrize("compression", sorted(PNG_COMPRESSION))
def test_every_setting_round_trips_l_and_rgb_exactly(compression):
    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 256, (37, 53, 3), dtype=np.uint8)  # odd sizes: no row-stride luck
    rgb[:, :20] = 7  # a flat run, which RLE deflate encodes differently from noise
    gray = rgb[..., 1].copy()
    assert np.array_equal(decode_png(encode_png(rgb, "RGB", compression), "RGB"), rgb)
    assert np.array_equal(decode_png(encode_png(gray, "L", compression), "L"), gray)
    # the other decoder the project uses (the training loader's), and PIL's chunk-CRC check
    data = encode_png(rgb, "RGB", compression)
    assert np.array_equal(cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED)[..., ::-1], rgb)
    Image.open(io.BytesIO(data)).verify()


@pytest.mark.parametrize("shape", [(1, 1), (1, 300), (300, 1), (2, 2, 3), (1, 1, 3)])
def test_degenerate_shapes_round_trip(shape):
    array = np.arange(np.prod(shape), dtype=np.int64).reshape(shape).astype(np.uint8)
    mode = "RGB" if len(shape) == 3 else "L"
    assert np.array_equal(decode_png(encode_png(array, mode), mode), array)


def test_non_contiguous_views_are_encoded_as_their_values():
    rgb = np.random.default_rng(2).integers(0, 256, (16, 24, 3), dtype=np.uint8)
    view = rgb[::2, ::-1]
    assert np.array_equal(decode_png(encode_png(view, "RGB"), "RGB"), view)


def test_channel_order_is_rgb_not_opencvs_bgr():
    red = np.zeros((4, 4, 3), np.uint8)
    red[..., 0] = 255
    assert decode_png(encode_png(red, "RGB"), "RGB")[0, 0].tolist() == [255, 0, 0]


def test_deflated_settings_are_smaller_than_stored_rows():
    import cv2
    from skimage import data

    photo = cv2.resize(data.astronaut(), (256, 256), interpolation=cv2.INTER_AREA)
    sizes = {name: len(encode_png(photo, "RGB", name)) for name in PNG_COMPRESSION}
    assert sizes["none"] > photo.nbytes  # stored rows: every pixel byte plus a filter byte per row
    assert max(sizes["fast"], sizes["small"]) < sizes["none"] * 0.8


def test_mask_round_trip_and_masks_of_older_shards_still_decode():
    from shards.schema import _decode_own_png

    mask = np.zeros((9, 11), bool)
    mask[2:5, 3:8] = True
    data = encode_mask(mask)
    assert np.array_equal(decode_mask(data), mask)
    assert np.array_equal(_decode_own_png(data, "L"), np.asarray(Image.open(io.BytesIO(data))))  # the fast path
    older = encode_png(np.where(mask, 255, 0).astype(np.uint8), "L")  # masks were filtered Up before
    assert np.array_equal(decode_mask(older), mask)
    with pytest.raises(ValueError, match=r"expected a non-empty \(H,W\) mask, got shape \(2, 2, 3\)"):
        encode_mask(np.zeros((2, 2, 3), bool))


@pytest.mark.parametrize("array, mode, problem", [
    (np.zeros((4, 4), np.float32), "L", "expected uint8, got float32"),
    (np.zeros((4, 4, 3), np.uint8), "L", "mode L: expected shape (H,W), got (4, 4, 3)"),
    (np.zeros((4, 4), np.uint8), "RGB", "mode RGB: expected shape (H,W,3), got (4, 4)"),
    (np.zeros((4, 4, 4), np.uint8), "RGB", "mode RGB: expected shape (H,W,3), got (4, 4, 4)"),
    (np.zeros((4, 4), np.uint8), "P", "mode 'P': expected one of ['L', 'RGB']"),
    (np.zeros((0, 4), np.uint8), "L", "expected a non-empty image, got shape (0, 4)"),
])
def test_bad_arrays_are_refused_with_the_problem(array, mode, problem):
    with pytest.raises(ValueError) as err:
        encode_png(array, mode)
    assert problem in str(err.value)


def test_unknown_setting_is_refused():
    with pytest.raises(ValueError, match=r"compression 'max': expected one of \['fast', 'none', 'small'\]"):
        encode_png(np.zeros((4, 4), np.uint8), "L", "max")


def test_opencv_fast_path_and_pil_give_the_same_pixels_and_errors(tmp_path):
    rgb = np.random.default_rng(0).integers(0, 256, (40, 56, 3), dtype=np.uint8)
    pil_written = io.BytesIO()
    Image.fromarray(rgb).save(pil_written, format="PNG", compress_level=6)  # another writer's adaptive filters
    for data in (encode_png(rgb, "RGB"), pil_written.getvalue()):
        assert np.array_equal(decode_png(data, "RGB", "x"), rgb)
        assert np.array_equal(decode_png(data, "RGB", "x"), np.asarray(Image.open(io.BytesIO(data))))
    with pytest.raises(ValueError, match="x: expected PIL mode RGB, got L"):
        decode_png(encode_png(rgb[..., 0], "L"), "RGB", "x")
    with pytest.raises(ValueError, match="x: expected PIL mode L, got RGB"):
        decode_png(encode_png(rgb, "RGB"), "L", "x")
    with pytest.raises(ValueError, match="x: cannot decode PNG"):
        decode_png(b"garbage", "RGB", "x")
    with pytest.raises(ValueError, match="x: cannot decode PNG"):
        decode_png(encode_png(rgb, "RGB")[:300], "RGB", "x")  # a valid header, truncated data
    others = {"RGBA": Image.fromarray(np.dstack([rgb, rgb[..., :1]])), "P": Image.fromarray(rgb).convert("P"),
              "16-bit": Image.fromarray(rgb[..., 0].astype(np.uint16) * 257)}
    for name, image in others.items():  # OpenCV would expand or convert these; the strict path names them
        path = tmp_path / f"{name}.png"
        image.save(path)
        with pytest.raises(ValueError, match=f"x: expected PIL mode RGB, got {re.escape(Image.open(path).mode)}"):
            decode_png(path.read_bytes(), "RGB", "x")


def _split_idat(data: bytes, parts: int) -> bytes:
    """The same PNG with its one IDAT split into ``parts`` chunks (what libpng-style writers emit)."""
    import struct
    import zlib

    start = data.index(b"IDAT") - 4
    (length,) = struct.unpack(">I", data[start:start + 4])
    payload = data[start + 8:start + 8 + length]
    step = -(-len(payload) // parts)
    chunks = b"".join(struct.pack(">I", len(p)) + b"IDAT" + p + struct.pack(">I", zlib.crc32(b"IDAT" + p))
                      for p in (payload[i:i + step] for i in range(0, len(payload), step)))
    return data[:start] + chunks + data[start + 12 + length:]


@pytest.mark.parametrize("shape", [(37, 53, 3), (1, 300, 3), (300, 1, 3), (1, 1, 3), (64, 64, 3)])
def test_own_decoder_reads_the_projects_rgb_pngs_exactly_as_pil(shape):
    from shards.schema import _decode_own_png

    rng = np.random.default_rng(3)
    rgb = rng.integers(0, 256, shape, dtype=np.uint8)
    rgb[: shape[0] // 2] = rgb[: shape[0] // 2] // 8  # a smooth half as well as noise
    for compression in ("fast", "none"):
        data = encode_png(rgb, "RGB", compression)
        for variant in (data, _split_idat(data, 3)):
            got = _decode_own_png(variant, "RGB")
            assert got is not None and got.dtype == np.uint8
            assert np.array_equal(got, np.asarray(Image.open(io.BytesIO(variant))))
            assert np.array_equal(got, rgb)
    gray = rgb[..., 0].copy()
    assert np.array_equal(_decode_own_png(encode_png(gray, "L", "none"), "L"), gray)


def test_own_decoder_leaves_other_layouts_and_corrupt_data_to_libpng_and_pil():
    import struct
    import zlib

    from shards.schema import _decode_own_png

    rgb = np.random.default_rng(4).integers(0, 256, (24, 40, 3), dtype=np.uint8)
    data = encode_png(rgb, "RGB")
    pil_written = io.BytesIO()
    Image.fromarray(rgb).save(pil_written, format="PNG")
    text = struct.pack(">I", 5) + b"tEXt" + b"a\0bcd" + struct.pack(">I", zlib.crc32(b"tEXta\0bcd"))
    with_text = data[:33] + text + data[33:]  # an ancillary chunk after IHDR
    declined = {"libpng's adaptive filters": pil_written.getvalue(), "an ancillary chunk": with_text,
                "gray filtered Up (libpng is as fast)": encode_png(rgb[..., 0], "L", "fast"),
                "16-bit": _png_bytes(Image.fromarray(rgb[..., 0].astype(np.uint16) * 257))}
    for name, png in declined.items():
        assert _decode_own_png(png, "L" if name.startswith(("gray", "16")) else "RGB") is None, name
    for png in (pil_written.getvalue(), with_text):  # the fallback still gives the exact pixels
        assert np.array_equal(decode_png(png, "RGB", "x"), rgb)

    idat = data.index(b"IDAT") + 4
    flipped = bytearray(data)
    flipped[idat + 10] ^= 0xFF  # a flipped byte inside the compressed pixels: the chunk CRC no longer matches
    assert _decode_own_png(bytes(flipped), "RGB") is None
    with pytest.raises(ValueError, match="x: cannot decode PNG"):
        decode_png(bytes(flipped), "RGB", "x")
    assert _decode_own_png(data[:-20], "RGB") is None  # truncated: no IEND


def _png_bytes(image: Image.Image) -> bytes:
    out = io.BytesIO()
    image.save(out, format="PNG")
    return out.getvalue()
