"""Restore one large scan in bounded memory: stage 1 on crops around the holes, stage 2 at a working size.

The full-image path (``Engine.restore``) runs both U-Net++ stages on every pixel, so its memory grows with the
image: a 7000x5000 scan took 13.8 GB of RAM on a CPU and had produced nothing after 3 minutes. A large scan takes
this path instead, the way peers handle large photos:

- Stage 1, IOPaint's crop strategy (``plan_crops``): the holes are grouped (thick ones, like a stain or a DACON
  shape, apart from thin ones, like scratches and tears; holes closer than ``merge_gap`` pixels together) and each
  group is inpainted on a crop around it with context on every side (twice the group's extent, at least
  ``work_size`` square). A crop larger than ``work_size`` runs shrunk to it (area downscale, the mask grown to every
  cell a hole touches) and its fill is upsampled bilinearly; a long thin group is covered by full-resolution tiles
  instead, so a scratch keeps its detail. Only the group's own hole pixels are written back, at full resolution,
  thick groups first so the thin ones see their fill as context: outside the holes the scan is untouched, bit for
  bit.
- Stage 2, DeOldify's render factor (``LargeImageRestorer._colorize``): the restored gray is shrunk (area) to
  ``work_size`` on its long side, colorized there, and only its chroma (BT.601 Cb, Cr) is kept; the chroma is
  upsampled (bilinear) and laid on the full-resolution restored luma (``restore.model.compose_chroma``), row strip by
  row strip, and with compositing on, ``restore.composite.composite_luma`` makes the PNG's ``convert('L')`` equal the
  restored gray everywhere: the input outside the holes, stage 1's fill inside.

Memory beyond the model: the scan, its restored copy, the hole map and the holes still to fill (one byte per
pixel each), the RGB output (three) and one strip (``strip_pixels``: 64K pixels on a CPU) of float temporaries; the
model only ever sees images of ``work_size``. No float copy of the full-resolution image is made.

Which images take this path is the caller's choice (``is_large``: more than ``large_above`` megapixels); the
``Engine`` routes each image, and small images (the 512x512 competition set) keep the full-image path bit for bit.
"""
from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass
from typing import Callable, Iterator, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from restore.composite import composite_luma
from restore.model import compose_chroma, rgb_to_chroma, unwrap

# The working size: the inpainting crops' and the colorizer's long side. The model trains on 512 px windows (up to
# zoom_max x larger, shrunk); 768 gives the colorizer a whole photo at about that scale and the inpainter context.
DEFAULT_WORK_SIZE = 768
# Images with more pixels than this (megapixels) take the large path. The full-image path needs about 0.4 GB of
# RAM per megapixel on a CPU with the default EfficientNet-B4 model (bench/large_scan.py), so 2 MP stays under 1 GB.
DEFAULT_LARGE_ABOVE_MP = 2.0
# The hole map is planned on a grid of CELL x CELL pixel cells: 1/64 of the pixels, so grouping and the distance
# transform cost nothing next to the model even on a 60 MP scan.
CELL = 8
# Pixels per strip of the upsampling and compose step: small strips stay in the CPU's caches (12 MP composed in
# 2.0 s with 64K-pixel strips, 3.8 s with 1M, one core); a GPU wants fewer, larger kernels.
STRIP_PIXELS = {"cpu": 1 << 16, "cuda": 1 << 22}


def is_large(height: int, width: int, large_above: float | None = DEFAULT_LARGE_ABOVE_MP) -> bool:
    """Whether an image of ``height`` x ``width`` takes the large path: more than ``large_above`` megapixels
    (None: never)."""
    return large_above is not None and height * width > large_above * 1e6


@dataclass(frozen=True)
class Crop:
    """One stage-1 model call: the context ``box`` (y0, y1, x0, x1, full resolution) runs shrunk by ``scale`` (1.0:
    at full resolution); its fill is written to the hole pixels of group ``group`` inside ``core`` (y0, y1, x0, x1)."""

    box: tuple[int, int, int, int]
    core: tuple[int, int, int, int]
    group: int
    scale: float


def hole_grid(hole: np.ndarray, cell: int = CELL) -> np.ndarray:
    """bool [ceil(H/cell), ceil(W/cell)]: which cells of ``cell`` x ``cell`` pixels hold a hole pixel."""
    h, w = hole.shape
    gh, gw = -(-h // cell), -(-w // cell)
    # Row bands first (a view each), so no padded copy of the full-resolution mask is made.
    rows = np.zeros((gh, w), bool)
    for i in range(gh):
        rows[i] = hole[i * cell:(i + 1) * cell].any(axis=0)
    padded = np.zeros((gh, gw * cell), bool)
    padded[:, :w] = rows
    return padded.reshape(gh, gw, cell).any(axis=2)


def _window(lo: int, hi: int, size: int, limit: int) -> tuple[int, int]:
    """A window of ``size`` (at most ``limit``) inside [0, limit) holding [lo, hi), centred on it where it can be."""
    size = min(max(size, hi - lo), limit)
    start = min(max(0, (lo + hi) // 2 - size // 2), limit - size)
    return start, start + size


def plan_crops(hole: np.ndarray, work_size: int = DEFAULT_WORK_SIZE, *, merge_gap: int | None = None,
               cell: int = CELL) -> tuple[list[Crop], np.ndarray]:
    """The stage-1 crops for the hole map ``hole`` (bool [H, W]); returns them and the cell grid of group labels
    (int32, 0 = no hole in the cell) that says which crop owns a hole pixel.

    Holes within ``merge_gap`` pixels (default ``work_size // 6``) form one group. A group's crop is its bounding box
    grown to twice its size and to at least ``work_size`` (clamped to the image); if that fits in ``work_size`` it
    runs at full resolution. A larger group is covered by tiles (``work_size`` at their scale, cores of the middle
    half that do not overlap) at the finest scale at which every hole pixel of a core still has a known pixel
    within its tile's context (full resolution for a thin scratch or tear; a thick hole ``d`` pixels deep from its
    border is shrunk to ``work_size / 8 / d``), or by one crop shrunk to ``work_size`` when that is finer.
    """
    from scipy import ndimage

    if work_size < 64:
        raise ValueError(f"work_size={work_size}: must be >= 64")
    height, width = hole.shape
    merge_gap = work_size // 6 if merge_gap is None else merge_gap
    grid = hole_grid(hole, cell)
    if not grid.any():
        return [], np.zeros(grid.shape, np.int32)
    # Distance (pixels, on the cell grid: a slight overestimate) from each hole cell to the nearest cell without one.
    depth = ndimage.distance_transform_edt(grid) * cell
    tile_margin = work_size // 4
    # Thick holes (a stain, a DACON shape) apart from thin ones (scratches), even where a scratch runs into a stain:
    # the thin ones are then inpainted at full resolution. A blob is every hole cell near a cell too deep for that.
    deep = depth > tile_margin / 2
    blob = grid & (ndimage.distance_transform_edt(~deep) * cell <= tile_margin + cell) if deep.any() else deep
    eight = np.ones((3, 3), bool)
    labels = np.zeros(grid.shape, np.int32)
    for part in (blob, grid & ~blob):
        near = part
        if merge_gap > 0 and part.any():
            near = ndimage.binary_dilation(part, structure=eight, iterations=-(-merge_gap // cell))
        part_labels, _ = ndimage.label(near, structure=eight)
        labels = np.where(part, part_labels + labels.max() * (part_labels > 0), labels).astype(np.int32)
    count = int(labels.max())
    group_depth = ndimage.maximum(depth, labels, index=np.arange(1, count + 1))
    crops: list[Crop] = []
    for group, where in enumerate(ndimage.find_objects(labels), start=1):
        if where is None:  # every dilated component holds a hole cell; kept for safety
            continue
        y0, y1 = where[0].start * cell, min(height, where[0].stop * cell)
        x0, x1 = where[1].start * cell, min(width, where[1].stop * cell)
        box_y = _window(y0, y1, max(2 * (y1 - y0), work_size), height)
        box_x = _window(x0, x1, max(2 * (x1 - x0), work_size), width)
        whole = work_size / max(box_y[1] - box_y[0], box_x[1] - box_x[0])  # the scale that fits it in one crop
        if whole >= 1.0:
            crops.append(Crop((*box_y, *box_x), (y0, y1, x0, x1), group, 1.0))
            continue
        # Tiles whose context reaches a known pixel from every hole pixel of their core: at full resolution for a
        # thin hole, shrunk as far as its depth needs for a thick one; one shrunk crop if that is finer still.
        tiled = min(1.0, tile_margin / 2 / max(float(group_depth[group - 1]), 1.0))
        if tiled <= whole:
            crops.append(Crop((*box_y, *box_x), (y0, y1, x0, x1), group, whole))
            continue
        side, core = round(work_size / tiled), max(cell, round((work_size - 2 * tile_margin) / tiled))
        for ty in range(y0, y1, core):
            for tx in range(x0, x1, core):
                cy, cx = (ty, min(ty + core, y1)), (tx, min(tx + core, x1))
                if not (labels[cy[0] // cell:-(-cy[1] // cell), cx[0] // cell:-(-cx[1] // cell)] == group).any():
                    continue
                box = (*_window(*cy, side, height), *_window(*cx, side, width))
                crops.append(Crop(box, (*cy, *cx), group, min(1.0, work_size / max(box[1] - box[0],
                                                                                 box[3] - box[2]))))
    return crops, labels


def fit_long_side(height: int, width: int, long_side: int) -> tuple[int, int]:
    """(h, w) with the aspect of ``height`` x ``width`` and the long side ``long_side`` (never larger than it was)."""
    scale = min(1.0, long_side / max(height, width))
    return max(1, round(height * scale)), max(1, round(width * scale))


def area_downscale(gray: np.ndarray, size: tuple[int, int], device: torch.device | str = "cpu",
                   strip_pixels: int = STRIP_PIXELS["cpu"]) -> torch.Tensor:
    """uint8 [H, W] -> float [1, 1, h, w] in [0, 1]: ``F.interpolate(mode='area')`` (adaptive average pooling),
    computed separably: each strip of rows is pooled along its width, then the narrow result along its height; the
    pooled windows are the same, so no float copy of the full image is needed."""
    height, width = gray.shape
    h, w = size
    rows = max(1, strip_pixels // width)
    narrow = torch.empty((1, 1, height, w), dtype=torch.float32, device=device)
    for r0 in range(0, height, rows):
        strip = torch.from_numpy(gray[r0:r0 + rows].copy()).to(device)[None, None].float() / 255.0
        narrow[..., r0:r0 + rows, :] = F.adaptive_avg_pool2d(strip, (strip.shape[-2], w))
    return F.adaptive_avg_pool2d(narrow, (h, w))


def upsampled_rows(small: torch.Tensor, height: int, width: int, rows: int, start: int = 0,
                   stop: int | None = None) -> Iterator[tuple[int, int, torch.Tensor]]:
    """``F.interpolate(small, size=(height, width), mode='bilinear', align_corners=False)[..., start:stop, :]`` in
    strips of ``rows`` rows: yields (first row, end row, strip [B, C, r, width]). ``small`` is first widened to
    ``width`` (still only its own rows), then each output row is blended from the two source rows around it, with
    PyTorch's source index (``area_pixel_compute_source_index``), so no full-size tensor is made."""
    h = small.shape[-2]
    wide = F.interpolate(small, size=(h, width), mode="bilinear", align_corners=False)
    stop = height if stop is None else stop
    for r0 in range(start, stop, rows):
        r1 = min(stop, r0 + rows)
        # In float32, as PyTorch computes it, so the weights are the same numbers.
        scale = torch.tensor(h / height, dtype=torch.float32, device=small.device)
        src = (scale * (torch.arange(r0, r1, device=small.device, dtype=torch.float32) + 0.5) - 0.5).clamp_min(0.0)
        above = src.long().clamp_max(h - 1)
        below = (above + 1).clamp_max(h - 1)
        weight = (src - above.float()).to(wide.dtype).view(1, 1, -1, 1)
        yield r0, r1, wide[:, :, above] * (1 - weight) + wide[:, :, below] * weight


class LargeImageRestorer:
    """Restores one large image at a time with the given models (averaged, as ``Engine`` averages checkpoints) in
    bounded memory; ``restore(gray, mask) -> rgb uint8 [H, W, 3]``.

    ``autocast_dtype`` and ``channels_last`` are the engine's (they apply to the model calls only; chroma and luma
    are composed in fp32). ``log`` receives one line per image (size, holes, crops, seconds); ``last`` holds the
    same figures as a dict.
    """

    def __init__(self, models: torch.nn.Module | Sequence[torch.nn.Module], *, device: torch.device | str = "cpu",
                 work_size: int = DEFAULT_WORK_SIZE, tta: bool = False, composite: bool = True,
                 autocast_dtype: torch.dtype | None = None, channels_last: bool = False,
                 strip_pixels: int | None = None, log: Callable[[str], None] | None = None) -> None:
        if work_size < 64:
            raise ValueError(f"work_size={work_size}: must be >= 64")
        models = [models] if isinstance(models, torch.nn.Module) else list(models)
        if not models:
            raise ValueError("LargeImageRestorer needs at least one model")
        # Eager modules: a compiled engine's graphs are for its static batch; crops of every size would recompile.
        self.models = [unwrap(m) for m in models]
        self.device = torch.device(device)
        self.work_size, self.tta, self.composite = work_size, tta, composite
        self.autocast_dtype, self.channels_last = autocast_dtype, channels_last
        self.strip_pixels = strip_pixels or STRIP_PIXELS.get(self.device.type, STRIP_PIXELS["cpu"])
        self.log = log
        self.last: dict = {}

    def _autocast(self):
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.autocast_dtype)

    def _prepared(self, x: torch.Tensor) -> torch.Tensor:
        return x.contiguous(memory_format=torch.channels_last) if self.channels_last else x

    def _average(self, call: Callable[..., torch.Tensor], *images: torch.Tensor) -> torch.Tensor:
        """``call(model, *images)`` averaged over the models and (with TTA) the horizontal flip, in fp32."""
        total, n = None, 0
        with torch.inference_mode(), self._autocast():
            for model in self.models:
                for flip in ((False, True) if self.tta else (False,)):
                    views = [self._prepared(x.flip(-1) if flip else x) for x in images]
                    out = call(model, *views).float()
                    out = out.flip(-1) if flip else out
                    total = out if total is None else total + out
                    n += 1
        return total / n

    def restore(self, gray: np.ndarray, mask: np.ndarray, name: str = "", out: np.ndarray | None = None,
                ) -> np.ndarray:
        """``gray`` uint8 [H, W], ``mask`` [H, W] (nonzero = hole) -> RGB uint8 [H, W, 3] of the same size, written
        into ``out`` when given (a batch's row, so the image is not copied again)."""
        if gray.ndim != 2 or gray.dtype != np.uint8:
            raise ValueError(f"gray must be uint8 [H, W], got {gray.dtype} {gray.shape}")
        if mask.shape != gray.shape:
            raise ValueError(f"mask {mask.shape} and gray {gray.shape} differ in size")
        if out is not None and (out.shape != (*gray.shape, 3) or out.dtype != np.uint8):
            raise ValueError(f"out must be uint8 {(*gray.shape, 3)}, got {out.dtype} {out.shape}")
        start = time.perf_counter()
        hole = mask != 0
        restored, crops, groups = self._inpaint(gray, hole)
        inpainted = time.perf_counter()
        chroma, color_size = self._colorize(restored)
        colorized = time.perf_counter()
        rgb = self._compose(restored, chroma, out)
        end = time.perf_counter()
        height, width = gray.shape
        self.last = {
            "height": height, "width": width, "hole_pixels": int(np.count_nonzero(hole)), "groups": groups,
            "crops": len(crops), "shrunk_crops": sum(c.scale < 1.0 for c in crops),
            "color_size": color_size, "inpaint_s": round(inpainted - start, 3),
            "colorize_s": round(colorized - inpainted, 3), "compose_s": round(end - colorized, 3),
            "seconds": round(end - start, 3),
        }
        if self.log is not None:
            s = self.last
            self.log(f"large image {name + ' ' if name else ''}{width}x{height}: {s['groups']} hole region(s), "
                     f"{s['crops']} crop(s) ({s['shrunk_crops']} shrunk), colorized at {color_size[1]}x"
                     f"{color_size[0]}; {s['seconds']:.1f}s (inpaint {s['inpaint_s']:.1f}, colorize "
                     f"{s['colorize_s']:.1f}, compose {s['compose_s']:.1f})")
        return rgb

    def _inpaint(self, gray: np.ndarray, hole: np.ndarray) -> tuple[np.ndarray, list[Crop], int]:
        """Stage 1: a copy of ``gray`` with each hole pixel replaced by its crop's fill."""
        crops, labels = plan_crops(hole, self.work_size)
        restored = gray.copy()
        # Crops run in order (thick holes first) and each sees the fills written before it as known context.
        pending = hole.copy()
        for crop in crops:
            y0, y1, x0, x1 = crop.box
            cy0, cy1, cx0, cx1 = crop.core
            owned = hole[cy0:cy1, cx0:cx1] & (
                labels[np.ix_(np.arange(cy0, cy1) // CELL, np.arange(cx0, cx1) // CELL)] == crop.group)
            if crop.scale < 1.0:
                size = fit_long_side(y1 - y0, x1 - x0, round(max(y1 - y0, x1 - x0) * crop.scale))
                g = area_downscale(restored[y0:y1, x0:x1], size, self.device, self.strip_pixels)
                m = area_downscale(pending[y0:y1, x0:x1].view(np.uint8), size, self.device, self.strip_pixels)
                m = (m > 0).float()  # a pixel the hole touches is a hole
            else:
                g = torch.from_numpy(restored[y0:y1, x0:x1].copy()).to(self.device)[None, None].float() / 255.0
                m = torch.from_numpy(pending[y0:y1, x0:x1].copy()).to(self.device)[None, None].float()
            filled = self._average(lambda model, gi, mi: model.inpaint(gi, mi), g, m)
            if crop.scale < 1.0:  # upsampled to the crop's size, strip by strip, over the core's rows only
                strips = upsampled_rows(filled, y1 - y0, x1 - x0, max(1, self.strip_pixels // (x1 - x0)),
                                        start=cy0 - y0, stop=cy1 - y0)
            else:
                strips = [(cy0 - y0, cy1 - y0, filled[..., cy0 - y0:cy1 - y0, :])]
            for r0, r1, strip in strips:
                fill = (strip[0, 0, :, cx0 - x0:cx1 - x0].clamp(0, 1) * 255).round().to(torch.uint8).cpu().numpy()
                rows = slice(r0 - (cy0 - y0), r1 - (cy0 - y0))
                target = restored[y0 + r0:y0 + r1, cx0:cx1]
                target[owned[rows]] = fill[owned[rows]]
            pending[cy0:cy1, cx0:cx1] &= ~owned
        return restored, crops, int(labels.max())

    def _colorize(self, restored: np.ndarray) -> tuple[torch.Tensor, tuple[int, int]]:
        """Stage 2 at the working size: the chroma [1, 2, h, w] (0.5 = neutral) of the shrunk restored gray."""
        size = fit_long_side(*restored.shape, self.work_size)
        small = area_downscale(restored, size, self.device, self.strip_pixels)
        rgb = self._average(lambda model, x: model.colorize(x), small)
        return rgb_to_chroma(rgb.clamp(0.0, 1.0)), size

    def _compose(self, restored: np.ndarray, chroma: torch.Tensor, out: np.ndarray | None = None) -> np.ndarray:
        """The chroma upsampled (bilinear, as ``F.interpolate``) onto the full-resolution luma, strip by strip."""
        height, width = restored.shape
        out = np.empty((height, width, 3), np.uint8) if out is None else out
        for r0, r1, strip_chroma in upsampled_rows(chroma, height, width, max(1, self.strip_pixels // width)):
            luma8 = torch.from_numpy(np.ascontiguousarray(restored[r0:r1])).to(self.device)[None]
            rgb = compose_chroma(luma8[:, None].float() / 255.0, strip_chroma)
            rgb8 = (rgb * 255.0).round().to(torch.uint8)
            if self.composite:  # PIL's L of the output is the restored gray: the input outside the holes
                rgb8 = composite_luma(rgb8, luma8, torch.ones_like(luma8, dtype=torch.bool))
            out[r0:r1] = rgb8[0].permute(1, 2, 0).cpu().numpy()
        return out
