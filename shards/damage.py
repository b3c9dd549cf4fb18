"""DACON-style damage: one region of one constant gray value; the generator (the detector: ``shards.detector``).

Everything here is a pure function of its arguments (randomness only from an explicit ``numpy.random.Generator``),
so the packer and the training loader (on-the-fly re-masking) draw identical damage from identical seeds.
Sizes are derived from the image size, so the same code serves 64x64 test images and 512x512 photos.
The detector's names are re-exported here (``damage.detect_mask``, ``damage.NoDamageFound``) for existing callers.
"""
from __future__ import annotations

import math
from typing import Sequence

import numpy as np
from PIL import Image, ImageDraw
from scipy import ndimage
from skimage import draw

from shards.detector import Detection, NoDamageFound, detect_damage, detect_mask  # noqa: F401  (re-exported)

SHAPES = ("rectangle", "circle", "triangle", "polygon", "star")

# 4-connectivity: the real holes are one 4-connected region (see docs), and the detector searches for one.
_FOUR_CONNECTED = ndimage.generate_binary_structure(2, 1)
_MAX_ATTEMPTS = 12


# ----------------------------------------------------------------------------------------------------------- generator
def random_fill(rng: np.random.Generator, fill_range: tuple[int, int] = (0, 100)) -> int:
    """A fill gray value, uniform over ``fill_range`` (both ends included)."""
    lo, hi = int(fill_range[0]), int(fill_range[1])
    if not 0 <= lo <= hi <= 255:
        raise ValueError(f"fill_range must satisfy 0 <= lo <= hi <= 255, got {fill_range}")
    return int(rng.integers(lo, hi + 1))


def random_mask(
    rng: np.random.Generator,
    height: int,
    width: int,
    *,
    shapes: Sequence[str] = SHAPES,
    area_range: tuple[float, float] = (0.01, 0.15),
) -> tuple[np.ndarray, str]:
    """One 4-connected damage region covering a fraction of the image within ``area_range``.

    The target fraction is log-uniform (real holes: many small, few large). Returns ``(mask bool[H,W], shape)``.
    A shape whose rasterization misses the range is redrawn; after a few misses a rectangle fitted to it is used.
    """
    lo, hi = float(area_range[0]), float(area_range[1])
    if not 0 < lo <= hi < 1:
        raise ValueError(f"area_range must satisfy 0 < lo <= hi < 1, got {area_range}")
    if height < 8 or width < 8:
        raise ValueError(f"image too small for damage: {height}x{width}")
    unknown = [s for s in shapes if s not in SHAPES]
    if not shapes or unknown:
        raise ValueError(f"shapes must be a non-empty subset of {SHAPES}, got {tuple(shapes)}")
    total = height * width
    # Whole pixels: the range in pixels, at least one pixel wide.
    lo_px, hi_px = max(1, math.ceil(lo * total - 1e-6)), max(1, math.floor(hi * total + 1e-6))
    if lo_px > hi_px:
        hi_px = lo_px

    shape = str(shapes[int(rng.integers(len(shapes)))])
    for _ in range(_MAX_ATTEMPTS):
        target = math.exp(rng.uniform(math.log(lo_px), math.log(hi_px + 1)))
        mask = _DRAW[shape](rng, height, width, target)
        if mask is not None and lo_px <= int(mask.sum()) <= hi_px:
            return mask, shape
    target = math.exp(rng.uniform(math.log(lo_px), math.log(hi_px + 1)))
    return _fitted_rectangle(rng, height, width, lo_px, hi_px, target), "rectangle"


def apply_damage(gray: np.ndarray, mask: np.ndarray, fill: int) -> np.ndarray:
    """A copy of ``gray`` with the hole set to the constant ``fill``."""
    if gray.dtype != np.uint8 or gray.ndim != 2:
        raise ValueError(f"gray must be uint8 [H,W], got {gray.dtype} {gray.shape}")
    if mask.shape != gray.shape:
        raise ValueError(f"mask shape {mask.shape} != gray shape {gray.shape}")
    if not 0 <= int(fill) <= 255:
        raise ValueError(f"fill must be in 0..255, got {fill}")
    out = gray.copy()
    out[mask.astype(bool, copy=False)] = np.uint8(fill)
    return out


def to_gray(rgb: np.ndarray) -> np.ndarray:
    """Gray exactly as PIL ``convert('L')`` (the DACON inputs match it bit for bit; OpenCV's does not)."""
    if rgb.dtype != np.uint8 or rgb.ndim != 3 or rgb.shape[2] != 3:
        raise ValueError(f"rgb must be uint8 [H,W,3], got {rgb.dtype} {rgb.shape}")
    return np.asarray(Image.fromarray(rgb, mode="RGB").convert("L"))


def exact_mask(input_gray: np.ndarray, gt_rgb: np.ndarray) -> np.ndarray:
    """The training mask: pixels where the damaged input differs from the gray of the ground truth."""
    gray = to_gray(gt_rgb)
    if input_gray.shape != gray.shape:
        raise ValueError(f"input shape {input_gray.shape} != gt shape {gt_rgb.shape[:2]}")
    return input_gray != gray


# -------------------------------------------------------------------------------------------------------------- shapes
def _rectangle(rng: np.random.Generator, height: int, width: int, target: float) -> np.ndarray:
    aspect = math.exp(rng.uniform(math.log(1 / 3), math.log(3)))  # width / height
    h = min(height, max(1, round(math.sqrt(target / aspect))))
    w = min(width, max(1, round(target / h)))
    return _place_rectangle(rng, height, width, h, w)


def _fitted_rectangle(
    rng: np.random.Generator, height: int, width: int, lo_px: int, hi_px: int, target: float
) -> np.ndarray:
    """The fallback: a rectangle with a whole-pixel area inside [lo_px, hi_px] (when the image allows it at all),
    near ``target`` and as square as possible."""

    def miss(hw: tuple[int, int]) -> tuple[float, float, int]:
        area = hw[0] * hw[1]
        return max(lo_px - area, area - hi_px, 0), abs(area - target), abs(hw[0] - hw[1])

    sizes = [(h, min(width, max(1, round(target / h)))) for h in range(1, height + 1)]
    h, w = min(sizes, key=miss)
    return _place_rectangle(rng, height, width, h, w)


def _place_rectangle(rng: np.random.Generator, height: int, width: int, h: int, w: int) -> np.ndarray:
    top = int(rng.integers(0, height - h + 1))
    left = int(rng.integers(0, width - w + 1))
    mask = np.zeros((height, width), dtype=bool)
    mask[top : top + h, left : left + w] = True
    return mask


def _circle(rng: np.random.Generator, height: int, width: int, target: float) -> np.ndarray | None:
    radius = math.sqrt(target / math.pi)
    if 2 * radius + 1 > min(height, width):
        return None
    cy = rng.uniform(radius, height - 1 - radius)
    cx = rng.uniform(radius, width - 1 - radius)
    mask = np.zeros((height, width), dtype=bool)
    rr, cc = draw.disk((cy, cx), radius, shape=mask.shape)
    mask[rr, cc] = True
    return mask


def _triangle_vertices(rng: np.random.Generator) -> np.ndarray:
    # Three angles apart by at least 40 degrees keep the triangle from being a sliver.
    while True:
        angles = np.sort(rng.uniform(0, 2 * np.pi, 3))
        gaps = np.diff(np.concatenate([angles, angles[:1] + 2 * np.pi]))
        if gaps.min() > np.radians(40):
            break
    radii = rng.uniform(0.6, 1.0, 3)
    return np.stack([radii * np.sin(angles), radii * np.cos(angles)], axis=1)


def _polygon_vertices(rng: np.random.Generator) -> np.ndarray:
    # Points in random order: the outline may cross itself, which leaves unfilled islands (even-odd fill),
    # as in real DACON damage.
    n = int(rng.integers(3, 21))
    return rng.uniform(-1, 1, size=(n, 2))


def _star_vertices(rng: np.random.Generator) -> np.ndarray:
    spikes = int(rng.integers(4, 13))
    inner = rng.uniform(0.25, 0.6)
    angles = np.linspace(0, 2 * np.pi, 2 * spikes, endpoint=False) + rng.uniform(0, 2 * np.pi)
    angles = angles + rng.uniform(-0.25, 0.25, angles.size) * (np.pi / spikes)
    radii = np.where(np.arange(2 * spikes) % 2 == 0, rng.uniform(0.7, 1.0, 2 * spikes), inner)
    return np.stack([radii * np.sin(angles), radii * np.cos(angles)], axis=1)


def _aspect_and_rotate(rng: np.random.Generator, verts: np.ndarray) -> np.ndarray:
    aspect = math.exp(rng.uniform(math.log(0.5), math.log(2.0)))
    verts = verts * np.array([1.0, aspect])
    theta = rng.uniform(0, 2 * np.pi)
    rot = np.array([[math.cos(theta), -math.sin(theta)], [math.sin(theta), math.cos(theta)]])
    return verts @ rot.T


def _rasterize(verts: np.ndarray, height: int, width: int, top: float, left: float) -> np.ndarray:
    # PIL's scanline fill (even-odd, like the real self-crossing holes) is ~50x faster than skimage.draw.polygon.
    canvas = Image.new("1", (width, height), 0)
    ImageDraw.Draw(canvas).polygon([(float(c) + left, float(r) + top) for r, c in verts], fill=1)
    return np.array(canvas, dtype=bool)


def _largest_component(mask: np.ndarray) -> np.ndarray:
    """Keep the largest 4-connected piece (a crossing outline can split into pieces touching at corners)."""
    if not mask.any():
        return mask
    rows, cols = np.nonzero(mask.any(axis=1))[0], np.nonzero(mask.any(axis=0))[0]
    r0, r1, c0, c1 = rows[0], rows[-1] + 1, cols[0], cols[-1] + 1
    labels, n = ndimage.label(mask[r0:r1, c0:c1], structure=_FOUR_CONNECTED)
    if n <= 1:
        return mask
    sizes = np.bincount(labels.ravel())
    sizes[0] = 0
    out = np.zeros_like(mask)
    out[r0:r1, c0:c1] = labels == int(sizes.argmax())
    return out


def _polygon_shape(vertices_fn):
    def draw_shape(rng: np.random.Generator, height: int, width: int, target: float) -> np.ndarray | None:
        verts = _aspect_and_rotate(rng, vertices_fn(rng))
        verts = verts - verts.min(axis=0)
        # Scale once from the outline's bbox, measure the rasterized area, rescale to the target area.
        span = verts.max(axis=0)
        if span.min() <= 1e-6:
            return None
        probe = _rasterize(verts * (min(height, width) / span.max()), height, width, 0.0, 0.0)
        probe_area = int(probe.sum())
        if probe_area == 0:
            return None
        scale = (min(height, width) / span.max()) * math.sqrt(target / probe_area)
        verts = verts * scale
        extent = verts.max(axis=0)
        if extent[0] > height - 1 or extent[1] > width - 1:
            return None
        top = rng.uniform(0, height - 1 - extent[0])
        left = rng.uniform(0, width - 1 - extent[1])
        return _largest_component(_rasterize(verts, height, width, top, left))

    return draw_shape


_DRAW = {
    "rectangle": _rectangle,
    "circle": _circle,
    "triangle": _polygon_shape(_triangle_vertices),
    "polygon": _polygon_shape(_polygon_vertices),
    "star": _polygon_shape(_star_vertices),
}
