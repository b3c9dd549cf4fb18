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


def test_mask_round_trip():
    mask = np.zeros((9, 11), bool)
    mask[2:5, 3:8] = True
    assert np.array_equal(decode_mask(encode_mask(mask)), mask)


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
