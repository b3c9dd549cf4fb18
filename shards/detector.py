"""Finding DACON damage in a gray image, and calling it damage only when the evidence is clear.

The damage is ONE region filled with ONE constant gray (``shards.damage`` draws it). Photos have flat regions of
their own: crushed shadows, blown highlights, a black helmet, a fundus camera's black surround. So a region of one
value is only a *candidate*; it is called damage when the pixels around it say it was pasted onto the photo:

- **Size.** At least ``min_fraction`` of the image (0.5%; real DACON holes are 1.2-13%, the generator's 1-15%).
- **Hard edge.** Pasted fill cuts through the photo: across most of its outline the photo differs from the fill by a
  clear step (real DACON holes: median step 26-192 gray levels). A natural flat area fades into its surroundings
  (clipped shadows and skies change by a level or two per pixel), so most of its outline is soft. The share of the
  outline with a hard step is the main evidence; the outline on the image border shows nothing and is not counted,
  and a region bounded mostly by the image border is not called damage.
- **One exact value** (lossy files). In a PNG every pixel of the hole is the fill. JPEG codes each 8x8 block of its
  grid on its own: a block wholly inside the hole decodes to exactly the fill (every such block of 300 DACON-style
  holes did, at quality 90 and 75), and only the blocks the outline runs through ring. So the candidate grows from
  the blocks that are exactly a value standing out among the flat pixels (DACON's 0-100), through the pixels within a
  few levels of it, to the edge (a pixel joins when it is closer to the fill than to the photo just outside: JPEG
  keeps strong edges within about a pixel); then along its thin parts (a star's spikes, a polygon's slivers, whose
  ringing swings wider), through pixels at least twice as near the fill as the photo around them, in blocks that may
  hold the fill. Where thin parts leave the outline it shows nothing, unless they cover most of it (a natural area's
  soft rim grows all round). Its interior must be almost all exactly the fill: the pixels 6 px in from the edge, or
  every whole block inside it (a thin polygon rings 6 px in, its blocks do not), which natural smooth areas,
  drifting by a level from block to block, are not (except at the photo's dark end, where a crushed shadow's blocks
  flatten to one value too: there only the pixels count). Pieces of one value that JPEG cut apart (a polygon's thin
  necks) are judged together when they lie near each other.
- **One region.** The damage is the only pasted fill: when the photo holds more exactly flat JPEG blocks of the value
  elsewhere (beyond the candidate) than half as many as the candidate has, the value is the photo's own (a crushed
  shadow, a flat backdrop), in a JPEG where a flat area's edge and interior can look like a fill's.
- **Not clipping.** A blown highlight is one exact value at the top of the range, and its edge against a dark
  object is as hard as pasted fill's: a region near 255 with nothing in the photo brighter is not called damage
  (DACON fills are 0-100). In a JPEG a crushed shadow is exact too (the decoder clamps the ringing): a region with
  nothing in the photo darker needs an even more exact interior and must not run off the frame. In a PNG the
  one-pixel ring tells shadows apart (they fade by a level at a time).

``detect_damage`` returns a ``Detection`` (mask, fill, evidence, a one-line note); when nothing qualifies it raises
``NoDamageFound`` whose message says what was examined and why it was rejected (``.evidence`` holds the numbers).
``detect_mask`` is the two-value interface the packer uses. The thresholds were set on DACON-style damage over one
set of photos (Debian wallpaper photographs) and measured on another (the photos bundled with scikit-image,
scikit-learn and matplotlib): ``bench/detector.py``, results in ``bench/RESULTS.md``. Sizes scale with the image
(64x64 test images work); 6-7 CPU ms per 512x512 PNG, 14-22 per JPEG (bench/RESULTS.md).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import cv2
import numpy as np
from scipy import ndimage
from skimage import measure

# Evidence thresholds (bench/detector.py measures them; the module docstring says why each exists).
EXACT_HARD_SHARE = 0.6  # lossless: share of the visible outline with a hard step (natural regions in the tuning
# photos: at most 0.59, a lamp blown out to 255, which the bright-end rule rejects anyway)
LOSSY_HARD_SHARE = 0.6  # lossy: the same, for the coarser step 2-3 px out
MAX_BORDER_SHARE = 0.5  # share of the outline on the image border beyond which nothing is seen
EXACT_SOFT_STEP = 2  # lossless: a neighbour within this many levels of the fill continues it smoothly
LOSSY_HARD_STEP = 8  # lossy: the step 2-3 px outside the mask that counts as hard (JPEG ringing stays below)
LOSSY_INTERIOR_PX = 6  # lossy: the interior is the mask eroded this much (ringing reaches ~6 px into the hole)
LOSSY_INTERIOR_EXACT = 0.9  # lossy: share of the interior that must be exactly the fill
LOSSY_DARK_INTERIOR_EXACT = 0.95  # ... when nothing in the photo is darker (crushed shadows are nearly exact too)
LOSSY_LOW_STEP, LOSSY_LOW_SHARE, LOSSY_LOW_EXACT = 4, 0.7, 0.97  # lossy, low contrast: smaller steps, exact interior
LOSSY_LOW_FRACTION = 0.01  # ... and at least DACON's smallest hole (1% of the image)
LOSSY_TOLERANCE = 4  # lossy: gray levels around the fill that ringing inside the hole reaches
LOSSY_REACH = 6  # lossy: px from exactly-flat pixels that the tolerant region may extend (one JPEG block)
LOSSY_EDGE_PX = 3  # lossy: px grown through the ringing band at the edge
LOSSY_FILL_MAX = 100  # lossy: the fills looked for (DACON's are 0-100); brighter flat areas are the photo's (a JPEG's
# evidence is weaker than a PNG's exact value, so the known range is used)
LOSSY_SMOOTH = 2  # lossy: a JPEG block spanning at most this many levels is smooth: if the fill is outside its range,
# none of it is the hole's (a block holding hole pixels keeps them near the fill)
LOSSY_ROUGH = 8  # lossy: a block spanning more than this holds an edge (an island of photo inside a polygon)
LOSSY_THIN_REACH = 16  # lossy: px the thin parts of a hole are followed beyond its core
LOSSY_THIN_WINDOW = 7  # lossy: radius of the window the photo's gray around a thin part is taken over
LOSSY_THIN_FAR = 8  # lossy: ... from the pixels this far from the fill
LOSSY_THIN_NEAR = 0.5  # lossy: a thin part's pixel is at least twice as near the fill as the photo (not the edge's
# mid-gray blur, which would widen the whole outline)
LOSSY_THIN_SHARE = 0.6  # lossy: share of the core's outline thin parts may cover (a star's spikes: up to ~0.5)
LOSSY_BLOCK_ERODE = 3  # lossy: the blocks judged lie wholly 3 px inside the region (the edge growth overshoots)
LOSSY_MIN_BLOCKS = 4  # lossy: exact blocks needed to judge the interior block by block
LOSSY_ELSEWHERE_PX = 8  # lossy: exact blocks farther than this from the region are elsewhere in the photo
LOSSY_REPEAT_SHARE, LOSSY_REPEAT_MIN = 0.5, 4  # lossy: elsewhere >= max(4, half the region's): the photo's value
AUTO_RINGING_SHARE = 0.35  # lossy=None: an exact region ringed this much is handed to the lossy search
CLIP_MARGIN, CLIP_SHARE = 2, 0.01  # at a tonal end when < 1% of the photo is > 2 levels beyond the fill
# (not 0: JPEG ringing around a crushed shadow undershoots below it)
CLIP_BRIGHT = 245  # highlights clip at the top of the code range: the bright end counts from here (DACON fills <= 100)

_MAX_EXACT_REGIONS = 64  # bounds the work on images with many flat regions (graphics)
_MAX_LOSSY_VALUES = 8
_MAX_PIECES_PER_VALUE = 12
_GROUP_PX = 3  # lossy: pieces this close are one candidate (JPEG breaks a polygon's thin necks)
_UNION_PX = 32  # lossy: hard-edged pieces of one value this close (in chains) are judged together too
_SMALL_HOLE_PX = 64  # lossy: enclosed gaps this small are ringing inside the hole, not islands


class NoDamageFound(ValueError):
    """No region of the gray image is clearly damage; ``evidence`` holds the best candidate's numbers (or is empty)."""

    def __init__(self, message: str, evidence: dict[str, Any] | None = None):
        super().__init__(message)
        self.evidence: dict[str, Any] = dict(evidence or {})


@dataclass(frozen=True)
class Detection:
    """The damage found: ``mask`` bool [H,W], the ``fill`` gray, whether it was found as a ``lossy`` (JPEG) fill,
    the ``evidence`` that decided it and a one-line ``note`` for logs."""

    mask: np.ndarray
    fill: int
    lossy: bool
    evidence: dict[str, Any] = field(default_factory=dict)
    note: str = ""


def detect_damage(
    gray: np.ndarray,
    *,
    lossy: bool | None = False,
    min_fraction: float = 0.005,
    min_pixels: int = 50,
    max_fraction: float = 0.5,
) -> Detection:
    """The constant-fill damage of ``gray`` (uint8 [H,W]), or ``NoDamageFound`` unless the evidence is clear.

    ``lossy``: False (default) looks for an exactly constant region (PNG and other lossless files, the DACON data);
    True for a fill smeared by lossy compression (JPEG, lossy WebP); None when the file's history is unknown: exact
    first, and the lossy search when no exact region qualifies or when the one that does is ringed by near-fill values
    (the untouched core of a JPEG-smeared fill). Pass the file's format when you know it: the lossy search is meant
    for lossy files (bench/detector.py measures both). A region must cover at least ``min_fraction`` of the image
    and ``min_pixels``, and at most ``max_fraction`` (more is a flat image, not damage).
    """
    if gray.dtype != np.uint8 or gray.ndim != 2:
        raise ValueError(f"gray must be uint8 [H,W], got {gray.dtype} {gray.shape}")
    need = max(int(min_pixels), math.ceil(min_fraction * gray.size))
    examined: list[_Candidate] = []
    largest = (0, -1)  # (px, value) of the largest exactly constant region, for the message
    exact = None
    if lossy is not True:
        candidates, largest = _exact_candidates(gray, need)
        if largest[0] > max_fraction * gray.size:
            raise NoDamageFound(
                f"largest constant-gray region (value {largest[1]}) covers {largest[0] / gray.size:.1%} of the image, "
                f"more than {max_fraction:.0%}: a flat image, not a damage region",
                {"area_fraction": largest[0] / gray.size, "fill": largest[1]},
            )
        examined += candidates
        exact = _best(candidates)
        if exact is not None and (lossy is False or exact.evidence["ringing_share"] < AUTO_RINGING_SHARE):
            return exact.detection(gray.shape)
    if lossy is not False:
        candidates = _lossy_candidates(gray, need, max_fraction)
        examined += candidates
        found = _best(candidates)
        if exact is not None:  # auto, ringed exact region: the lossy one only if it is that region, grown
            found = next((c for c in sorted(candidates, key=lambda c: -c.area)
                          if not c.rejected and c.fill == exact.fill and _covers(c, exact)), exact)
        if found is not None:
            return found.detection(gray.shape)
    raise _nothing_found(examined, need, min_fraction, min_pixels, largest, lossy)


def detect_mask(
    gray: np.ndarray,
    *,
    lossy: bool | None = False,
    min_fraction: float = 0.005,
    min_pixels: int = 50,
    max_fraction: float = 0.5,
) -> tuple[np.ndarray, int]:
    """``(mask bool[H,W], fill)`` of ``detect_damage``; lossless (exact) search by default, as for DACON PNGs."""
    found = detect_damage(gray, lossy=lossy, min_fraction=min_fraction, min_pixels=min_pixels,
                          max_fraction=max_fraction)
    return found.mask, found.fill


# ---------------------------------------------------------------------------------------------------------- candidates
@dataclass
class _Candidate:
    box: tuple[slice, slice]  # where ``region`` lies in the image
    region: np.ndarray  # bool, the crop ``box``
    fill: int
    lossy: bool
    evidence: dict[str, Any]
    rejected: str  # why it is not damage; "" when it is
    edge_ok: bool = True  # lossy pieces: the outline alone would pass (hard-edged, not the border, not clipped)
    core: np.ndarray | None = None  # lossy: ``region`` without its thin parts (its outline and interior are judged)

    @property
    def area(self) -> int:
        return int(self.evidence["area"])

    def detection(self, shape: tuple[int, int]) -> Detection:
        mask = np.zeros(shape, dtype=bool)
        mask[self.box] = self.region
        ev = self.evidence
        kind = "JPEG-smeared fill" if self.lossy else "constant fill"
        note = (f"damage: {kind} {self.fill} over {ev['area_fraction']:.1%} of the image, hard edge on "
                f"{ev['hard_edge_share']:.0%} of its outline")
        return Detection(mask=mask, fill=self.fill, lossy=self.lossy, evidence=dict(ev), note=note)


def _covers(big: _Candidate, small: _Candidate) -> bool:
    """Whether ``big`` holds at least 90% of ``small`` (both placed in the image)."""
    rows = slice(max(big.box[0].start, small.box[0].start), min(big.box[0].stop, small.box[0].stop))
    cols = slice(max(big.box[1].start, small.box[1].start), min(big.box[1].stop, small.box[1].stop))
    if rows.start >= rows.stop or cols.start >= cols.stop:
        return False

    def part(c: _Candidate) -> np.ndarray:
        return c.region[rows.start - c.box[0].start : rows.stop - c.box[0].start,
                        cols.start - c.box[1].start : cols.stop - c.box[1].start]

    return int((part(big) & part(small)).sum()) >= 0.9 * small.area


def _best(candidates: list[_Candidate]) -> _Candidate | None:
    """The largest accepted candidate; in a JPEG first one whose value the photo holds nowhere else (ONE fill)."""
    accepted = [c for c in candidates if not c.rejected]
    return max(accepted, key=lambda c: (c.evidence.get("elsewhere_blocks", 0) == 0, c.area)) if accepted else None


def _exact_candidates(gray: np.ndarray, need: int) -> tuple[list[_Candidate], tuple[int, int]]:
    """Every 4-connected region of one exact value with at least ``need`` px (largest first), with its evidence."""
    labels = measure.label(gray, connectivity=1, background=-1)  # every pixel labelled, one label per flat region
    sizes = np.bincount(labels.ravel())
    sizes[0] = 0
    top = int(sizes.argmax())
    largest = (int(sizes[top]), int(gray.ravel()[np.flatnonzero(labels.ravel() == top)[0]]) if top else -1)
    order = np.argsort(-sizes, kind="stable")
    big = order[sizes[order] >= need][:_MAX_EXACT_REGIONS]
    if big.size == 0:
        return [], largest
    # Pixels that belong to another sizeable flat region: a step onto one says nothing about how a region meets the
    # photo (a hole cut into a clipped shadow has a hard step onto the shadow, and the shadow onto the hole).
    flat_elsewhere = (sizes >= max(need // 4, 16))[labels]
    histogram = np.bincount(gray.ravel(), minlength=256)
    rank = np.zeros(sizes.size, dtype=np.int32)
    rank[big] = np.arange(1, big.size + 1)  # find_objects over the few big labels only
    boxes = ndimage.find_objects(rank[labels])
    out = []
    for i, label in enumerate(big):
        box = _padded(boxes[i], gray.shape, 1)
        region = labels[box] == label
        fill = int(gray[box][region][0])
        ignore = flat_elsewhere[box] & ~region
        out.append(_judge_exact(gray, box, region, fill, ignore, histogram))
    return out, largest


def _lossy_candidates(gray: np.ndarray, need: int, max_fraction: float) -> list[_Candidate]:
    """Near-constant regions of the values most exactly flat pixels share, grown through JPEG ringing, with evidence.

    Regions are 4-connected, like the real holes. For each value every piece (pieces a few px apart are one) is judged
    on its own; the hard-edged ones lying near each other are judged again together (JPEG breaks a polygon's thin
    necks), and each alone when the union fails.
    """
    flat = cv2.erode(gray, _kernel(0)) == cv2.dilate(gray, _kernel(0))  # equal to every 4-neighbour
    counts = np.bincount(gray[flat], minlength=256)
    # A fill is a spike among the flat pixels' values; a smooth natural area spreads over neighbouring values.
    spread = ndimage.median_filter(counts, size=7, mode="constant")
    excess = counts - spread
    excess[LOSSY_FILL_MAX + 1 :] = 0
    values = [int(v) for v in np.argsort(-excess, kind="stable")[:_MAX_LOSSY_VALUES] if excess[v] >= need / 4]
    if not values:
        return []
    g16 = gray.astype(np.int16)
    histogram = np.bincount(gray.ravel(), minlength=256)
    min_piece = max(16, need // 8)
    grid = _JpegGrid(gray)
    margin = LOSSY_THIN_REACH + LOSSY_THIN_WINDOW + 1
    out: list[_Candidate] = []
    for value in values:
        # Seeds: the blocks that are exactly the value (a hole's inside); a hole too thin for a whole block: patches.
        seeds = grid.exact_pixels(value)
        if not seeds.any():
            _, seed_labels, seed_stats, _ = cv2.connectedComponentsWithStats(_u8(gray == value), connectivity=4)
            big = seed_stats[:, cv2.CC_STAT_AREA] >= 16  # one 4x4 patch of the exact value at least
            big[0] = False
            seeds = big[seed_labels]
        near = np.abs(g16 - value) <= LOSSY_TOLERANCE
        core = _grow(seeds & near, near, LOSSY_REACH)
        may_hold = grid.may_hold(value)
        _, labels, stats, _ = cv2.connectedComponentsWithStats(_u8(_dilate(core, _GROUP_PX)), connectivity=4)
        pieces: list[_Candidate] = []
        for label in 1 + np.argsort(-stats[1:, cv2.CC_STAT_AREA], kind="stable")[:_MAX_PIECES_PER_VALUE]:
            x, y, w, h, area = stats[label]
            box = _padded((slice(y, y + h), slice(x, x + w)), gray.shape, margin)
            piece = (labels[box] == label) & core[box]
            if area < min_piece or piece.sum() < min_piece:
                continue
            piece_core = _grow_to_edge(gray[box], piece, value)
            region = _grow_thin(gray[box], piece_core, value, may_hold[box])
            pieces.append(_judge_lossy(gray, box, region, piece_core, value, histogram, grid, need=min_piece))
        # The hard-edged pieces of one value near each other are one damage region broken by JPEG (a thin piece's
        # interior is all ringing, so it is judged on its outline alone): they are judged together.
        for group in _near_groups([p for p in pieces if p.edge_ok], grid):
            whole = None
            if len(group) > 1:
                whole = _judge_lossy(gray, *_union(group), value, histogram, grid, need=need)
                out.append(whole)
            if whole is None or whole.rejected:  # a natural piece of the same value may spoil the union: each alone
                out += [_judge_lossy(gray, p.box, p.region, p.core, value, histogram, grid, need=need)
                        for p in group]
        out += [p for p in pieces if not p.edge_ok]
    for c in out:
        if not c.rejected and c.area > max_fraction * gray.size:
            c.rejected = f"covers {c.evidence['area_fraction']:.0%} of the image: a flat image, not damage"
    return out


# ------------------------------------------------------------------------------------------------------------ evidence
def _judge_exact(gray, box, region, fill, ignore, histogram) -> _Candidate:
    """Evidence for an exactly constant region: the step to each 4-neighbour outside it."""
    ring = _dilate(region, 0) & ~region
    steps = np.abs(gray[box][ring].astype(np.int16) - fill)
    hard = steps > EXACT_SOFT_STEP
    counted = ~hard | ~ignore[ring]  # hard steps onto other flat regions are not counted
    share = float(hard[counted].mean()) if counted.any() else 0.0
    ev = _common_evidence(gray.shape, box, region, share, int(ring.sum()), steps[counted])
    # Neighbours 1-4 levels off the fill: JPEG ringing around the exact core of a smeared fill (pasted fill in a PNG
    # meets the photo, which is that close to the fill on <= 34% of the outline in the tuning set).
    ev["ringing_share"] = float(((steps >= 1) & (steps <= LOSSY_TOLERANCE)).mean()) if steps.size else 0.0
    rejected = _verdict(ev, need=0, hard_share=EXACT_HARD_SHARE)
    if not rejected and _clip_end(histogram, region, gray[box], fill) == "bright":
        rejected = _BLOWN.format(fill=fill)
    return _Candidate(box, region, fill, False, ev, rejected)


def _judge_lossy(gray, box, region, core, fill, histogram, grid, *, need) -> _Candidate:
    """Evidence for a JPEG-smeared region (``core``: it without its thin parts): steps 2-3 px outside the core, the
    exactness of its interior, whether the photo holds the value elsewhere and whether it sits at the tonal end."""
    g = gray[box].astype(np.int16)
    # Where the thin parts leave the core the outline shows nothing; when they cover most of it, they are no thin
    # parts but a natural area's soft rim, grown all round: then the core alone is judged.
    ring = _dilate(core, 3) & ~_dilate(core, 1)
    thin_share = float((ring & region).sum() / max(1, ring.sum()))
    if thin_share > LOSSY_THIN_SHARE:
        region = core
    else:
        ring &= ~region
    steps = np.abs(g[ring] - fill)
    share = float((steps > LOSSY_HARD_STEP).mean()) if steps.size else 0.0
    ev = _common_evidence(gray.shape, box, region, share, int((_dilate(region, 0) & ~region).sum()), steps)
    ev["thin_share"] = thin_share
    ev["low_step_share"] = float((steps > LOSSY_LOW_STEP).mean()) if steps.size else 0.0
    clip = _clip_end(histogram, region, gray[box], fill)
    ev["interior_exact_share"] = exact = _interior_exactness(g, core, fill, grid, box, by_blocks=clip != "dark")
    ev["own_blocks"], ev["elsewhere_blocks"] = grid.exact_blocks_around(region, box, fill, LOSSY_ELSEWHERE_PX)
    need_exact = LOSSY_DARK_INTERIOR_EXACT if clip == "dark" else LOSSY_INTERIOR_EXACT
    # A low-contrast hole (fill close to the photo's tones) has small steps: accepted on smaller steps when its
    # interior is even more exactly one value.
    low_contrast = ev["low_step_share"] >= LOSSY_LOW_SHARE and ev["area_fraction"] >= LOSSY_LOW_FRACTION
    if share < LOSSY_HARD_SHARE and low_contrast and exact >= max(need_exact, LOSSY_LOW_EXACT):
        ev["hard_edge_share"] = ev["low_step_share"]
    rejected = _verdict(ev, need=need, hard_share=LOSSY_HARD_SHARE)
    runs_off_dark = clip == "dark" and ev["border_share"] > 0
    edge_ok = not _verdict(ev, need=0, hard_share=LOSSY_HARD_SHARE) and clip != "bright" and not runs_off_dark
    if not rejected and clip == "bright":
        rejected = _BLOWN.format(fill=fill)
    if not rejected and runs_off_dark:
        rejected = (f"nothing in the photo is darker than {fill} and it runs off the frame: in a JPEG a shadow "
                    f"(crushed to one value, its ringing clipped) cannot be told from a constant fill there")
    own, elsewhere = ev["own_blocks"], ev["elsewhere_blocks"]
    if not rejected and elsewhere >= max(LOSSY_REPEAT_MIN, LOSSY_REPEAT_SHARE * own):
        rejected = (f"the photo holds {elsewhere} more JPEG blocks of exactly {fill} elsewhere ({own} in the region): "
                    f"its own value (a crushed shadow, a flat backdrop), not one pasted fill")
    if not rejected and exact < need_exact:
        rejected = (f"{exact:.0%} of its interior is exactly {fill} (needs {need_exact:.0%}"
                    f"{' at the dark end of the photo, where shadows crush' if clip == 'dark' else ''}): "
                    f"a natural flat area")
    return _Candidate(box, region, fill, True, ev, rejected, edge_ok, core)


def _interior_exactness(g: np.ndarray, core: np.ndarray, fill: int, grid: _JpegGrid, box: tuple[slice, slice], *,
                        by_blocks: bool) -> float:
    """Share of the interior that is exactly ``fill``: of the pixels 6 px inside ``core`` (a crop at ``box``); 1 when
    ``by_blocks`` and every JPEG block lying wholly inside is exactly the fill (at least ``LOSSY_MIN_BLOCKS``; blocks
    with an edge, an island of photo, are not judged): a thin polygon rings 6 px in, but no block inside a hole rings.
    Not at the photo's dark end: a crushed shadow's smooth blocks are flattened to one value too."""
    interior = _erode(core, LOSSY_INTERIOR_PX)
    if not interior.any():  # a thin shape: what is left after a smaller erosion, or the region
        interior = _erode(core, 2) if _erode(core, 2).any() else core
    exact = float((g[interior] == fill).mean())
    if by_blocks and exact < 1:
        lo, hi = grid.blocks_inside(_erode(core, LOSSY_BLOCK_ERODE), box)
        exact_blocks = (lo == fill) & (hi == fill)
        judged = exact_blocks | (hi.astype(np.int16) - lo <= LOSSY_ROUGH)
        if exact_blocks.sum() >= LOSSY_MIN_BLOCKS and exact_blocks.sum() == judged.sum():
            return 1.0
    return exact


_BLOWN = "nothing in the photo is brighter than {fill}: a blown highlight (DACON fills are 0-100)"


def _clip_end(histogram: np.ndarray, region: np.ndarray, crop: np.ndarray, fill: int) -> str:
    """"dark" / "bright" when almost no pixel outside ``region`` is darker / brighter than ``fill`` (by more than
    ``CLIP_MARGIN`` levels): the region sits where the photo's tones end, where shadows crush (at the photo's own black
    point, often lifted) and highlights clip (at the top of the code range: ``fill >= CLIP_BRIGHT``)."""
    outside = histogram - np.bincount(crop[region], minlength=256)
    allowed = CLIP_SHARE * outside.sum()
    if outside[: max(fill - CLIP_MARGIN, 0)].sum() <= allowed:
        return "dark"
    if fill >= CLIP_BRIGHT and outside[fill + CLIP_MARGIN + 1 :].sum() <= allowed:
        return "bright"
    return ""


def _common_evidence(shape, box, region, hard_share, outline_px, steps) -> dict[str, Any]:
    """Size, edge and border evidence; ``outline_px``: the 4-neighbours outside the region within the image."""
    on_border = _border_pixels(region, box, shape)
    area = int(region.sum())
    return {
        "area": area,
        "area_fraction": area / (shape[0] * shape[1]),
        "hard_edge_share": hard_share,
        "median_step": float(np.median(steps)) if len(steps) else 0.0,
        "border_share": on_border / max(1, on_border + outline_px),
    }


def _verdict(ev: dict[str, Any], *, need: int, hard_share: float) -> str:
    """Why the size, border and edge evidence is not enough ("" when it is)."""
    if ev["area"] < need:
        return f"{ev['area']} px, fewer than {need}"
    if ev["border_share"] > MAX_BORDER_SHARE:
        return f"{ev['border_share']:.0%} of its outline is the image border: nothing to judge it by"
    if ev["hard_edge_share"] < hard_share:
        return (f"soft-edged: a hard step on only {ev['hard_edge_share']:.0%} of its outline "
                f"(needs {hard_share:.0%}; median step {ev['median_step']:.0f} levels)")
    return ""


def _nothing_found(examined, need, min_fraction, min_pixels, largest, lossy) -> NoDamageFound:
    if not examined:
        seen = f"the largest has {largest[0]} px (value {largest[1]})" if largest[1] >= 0 else "none is close"
        if lossy is True:
            seen = f"no gray value of 0-{LOSSY_FILL_MAX} (the fills looked for) is shared by enough exactly flat pixels"
        return NoDamageFound(
            f"no region of one constant gray of at least {need} px "
            f"({min_fraction:.1%} of the image, at least {min_pixels} px): {seen}",
            {"largest_flat_px": largest[0], "largest_flat_value": largest[1]},
        )
    best = max(examined, key=lambda c: c.area)
    kind = "near-constant (JPEG)" if best.lossy else "constant"
    return NoDamageFound(
        f"{len(examined)} flat region(s) examined; the largest, {kind} gray {best.fill} over "
        f"{best.evidence['area_fraction']:.1%} of the image, is not damage: {best.rejected}",
        dict(best.evidence, fill=best.fill, lossy=best.lossy),
    )


# -------------------------------------------------------------------------------------------------------- lossy masks
def _grow_to_edge(g8: np.ndarray, core: np.ndarray, fill: int) -> np.ndarray:
    """The hole behind a JPEG-ringing ``core``: grown ``LOSSY_EDGE_PX`` layers outward, a pixel joining when its gray
    is closer to the fill than to the photo just outside (the local mean of the median-filtered gray a few px beyond
    the band)."""
    core = _fill_small_holes(core)
    beyond = _dilate(core, LOSSY_EDGE_PX + 3) & ~_dilate(core, LOSSY_EDGE_PX + 1)
    if not beyond.any():
        return core
    size = (2 * LOSSY_EDGE_PX + 7,) * 2
    weight = cv2.boxFilter(beyond.astype(np.float32), -1, size, normalize=False)
    total = cv2.boxFilter(np.where(beyond, cv2.medianBlur(g8, 3), 0).astype(np.float32), -1, size, normalize=False)
    outside = total / np.maximum(weight, 1e-6)
    g = g8.astype(np.float32)
    closer = (np.abs(g - fill) < np.abs(g - outside)) & (weight > 0)
    return _grow_through(core, closer, LOSSY_EDGE_PX)


def _grow_thin(g8: np.ndarray, core: np.ndarray, fill: int, may_hold: np.ndarray) -> np.ndarray:
    """``core`` grown along the hole's thin parts (a star's spikes, ``LOSSY_THIN_REACH`` px at most): through pixels
    at least twice as near the fill as the photo around them (the mean of the pixels nearby that are far from the
    fill), in blocks that may hold the fill. Ringing in a thin part swings wide, but stays near the fill."""
    g = g8.astype(np.float32)
    far = (np.abs(g - fill) > LOSSY_THIN_FAR).astype(np.float32)
    size = (2 * LOSSY_THIN_WINDOW + 1,) * 2
    weight = cv2.boxFilter(far, -1, size, normalize=False, borderType=cv2.BORDER_CONSTANT)
    total = cv2.boxFilter(g * far, -1, size, normalize=False, borderType=cv2.BORDER_CONSTANT)
    photo = total / np.maximum(weight, 1e-6)
    closer = may_hold & (weight >= 4) & (np.abs(g - fill) < LOSSY_THIN_NEAR * np.abs(g - photo))
    return _grow_through(core, closer, LOSSY_THIN_REACH)


def _grow_through(core: np.ndarray, allowed: np.ndarray, steps: int) -> np.ndarray:
    """``core`` grown into the ``allowed`` pixels it touches (``_grow``), small gaps filled."""
    return _fill_small_holes(_grow(core, allowed, steps))


def _grow(core: np.ndarray, allowed: np.ndarray, steps: int) -> np.ndarray:
    """``core`` grown through 4-neighbours into ``allowed`` pixels, a pixel at a time, at most ``steps`` px."""
    mask = core
    for _ in range(steps):
        add = _dilate(mask, 0) & ~mask & allowed
        if not add.any():
            break
        mask = mask | add
    return mask


def _fill_small_holes(region: np.ndarray) -> np.ndarray:
    """``region`` with its enclosed gaps of at most ``_SMALL_HOLE_PX`` filled (ringing, not islands)."""
    n, labels, stats, _ = cv2.connectedComponentsWithStats(_u8(~np.pad(region, 1)), connectivity=4)
    small = stats[:, cv2.CC_STAT_AREA] <= _SMALL_HOLE_PX
    small[labels[0, 0]] = False  # the outside (the padding touches it everywhere)
    if not small.any():
        return region
    return region | small[labels[1:-1, 1:-1]]


def _near_groups(pieces: list[_Candidate], grid: _JpegGrid) -> list[list[_Candidate]]:
    """``pieces`` in groups lying near each other (chains of pieces at most ``_UNION_PX`` apart, measured in JPEG
    blocks): one damage region broken by JPEG lies in one group; flat areas of one value across the photo do not."""
    if len(pieces) < 2:
        return [pieces] if pieces else []
    near = np.zeros(grid.lo.shape, bool)
    firsts = []
    for p in pieces:
        rows, cols, touched = grid.blocks_touched(p.region, p.box)
        near[rows : rows + touched.shape[0], cols : cols + touched.shape[1]] |= touched
        r, c = np.argwhere(touched)[0]
        firsts.append((rows + r, cols + c))
    _, labels = cv2.connectedComponents(_u8(_dilate(near, _UNION_PX // 16)), connectivity=8)
    groups: dict[int, list[_Candidate]] = {}
    for p, (r, c) in zip(pieces, firsts):
        groups.setdefault(int(labels[r, c]), []).append(p)
    return list(groups.values())


def _union(pieces: list[_Candidate]) -> tuple[tuple[slice, slice], np.ndarray, np.ndarray]:
    """(box, region, core) of ``pieces`` together."""
    rows = slice(min(p.box[0].start for p in pieces), max(p.box[0].stop for p in pieces))
    cols = slice(min(p.box[1].start for p in pieces), max(p.box[1].stop for p in pieces))
    region = np.zeros((rows.stop - rows.start, cols.stop - cols.start), dtype=bool)
    core = region.copy()
    for p in pieces:
        at = (slice(p.box[0].start - rows.start, p.box[0].stop - rows.start),
              slice(p.box[1].start - cols.start, p.box[1].stop - cols.start))
        region[at] |= p.region
        core[at] |= p.core
    return (rows, cols), region, core


# --------------------------------------------------------------------------------------------------------- JPEG blocks
class _JpegGrid:
    """The 8x8 blocks a JPEG coded the image in, each block's lowest and highest gray (``lo``, ``hi``).

    The grid lies where the most 8x8 blocks are exactly flat (an image cropped off the grid after decoding is still
    read right); blocks the image edge cuts count with their pixels in the image.
    """

    def __init__(self, gray: np.ndarray):
        h, w = gray.shape
        first_row, first_col = _grid_offset(gray)
        self.top, self.left = (8 - first_row) % 8, (8 - first_col) % 8  # padding that puts a block corner at (0, 0)
        pad = ((self.top, -(h + self.top) % 8), (self.left, -(w + self.left) % 8))
        blocks = np.pad(gray, pad, mode="edge")  # a cut block repeats its own pixels: its lo/hi stay its own
        blocks = blocks.reshape(blocks.shape[0] // 8, 8, blocks.shape[1] // 8, 8)
        self.lo = blocks.min(axis=(1, 3))
        self.hi = blocks.max(axis=(1, 3))
        self.shape = (h, w)

    def _pixels(self, per_block: np.ndarray) -> np.ndarray:
        h, w = self.shape
        return np.repeat(np.repeat(per_block, 8, 0), 8, 1)[self.top : self.top + h, self.left : self.left + w]

    def exact_pixels(self, fill: int) -> np.ndarray:
        """Pixels of the blocks that are exactly ``fill``."""
        return self._pixels((self.lo == fill) & (self.hi == fill))

    def may_hold(self, fill: int) -> np.ndarray:
        """Pixels whose block may hold part of a hole of ``fill``: all but smooth blocks whose grays miss the fill."""
        smooth = self.hi.astype(np.int16) - self.lo <= LOSSY_SMOOTH
        return self._pixels(~(smooth & ((self.lo > fill) | (self.hi < fill))))

    def blocks_touched(self, region: np.ndarray, box: tuple[slice, slice], *, whole: bool = False):
        """(first block row, first block col, bool per block): the blocks holding a pixel of ``region`` (a crop at
        ``box``), or with ``whole`` the blocks lying wholly in it (a block the image edge cuts never does)."""
        r0, c0 = box[0].start + self.top, box[1].start + self.left
        a, b = r0 % 8, c0 % 8
        h, w = region.shape
        buf = np.zeros((-(-(a + h) // 8) * 8, -(-(b + w) // 8) * 8), dtype=bool)
        buf[a : a + h, b : b + w] = region
        buf = buf.reshape(buf.shape[0] // 8, 8, buf.shape[1] // 8, 8)
        return (r0 - a) // 8, (c0 - b) // 8, (buf.all(axis=(1, 3)) if whole else buf.any(axis=(1, 3)))

    def blocks_inside(self, region: np.ndarray, box: tuple[slice, slice]) -> tuple[np.ndarray, np.ndarray]:
        """(lo, hi) of the blocks lying wholly in ``region`` (a crop at ``box``)."""
        rows, cols, inside = self.blocks_touched(region, box, whole=True)
        at = (slice(rows, rows + inside.shape[0]), slice(cols, cols + inside.shape[1]))
        return self.lo[at][inside], self.hi[at][inside]

    def exact_blocks_around(self, region: np.ndarray, box: tuple[slice, slice], fill: int,
                            px: int) -> tuple[int, int]:
        """(blocks exactly ``fill`` holding a pixel of ``region``, such blocks farther than ``px`` from it)."""
        exact = (self.lo == fill) & (self.hi == fill)
        total = int(exact.sum())
        if total == 0:
            return 0, 0

        def count(mask: np.ndarray) -> int:
            rows, cols, touched = self.blocks_touched(mask, box)
            return int((exact[rows : rows + touched.shape[0], cols : cols + touched.shape[1]] & touched).sum())

        return count(region), total - count(_dilate(region, px))


def _grid_offset(gray: np.ndarray) -> tuple[int, int]:
    """(row, col) where the first whole JPEG block starts: the offset with the most exactly flat 8x8 blocks ((0, 0)
    unless another has more)."""
    h, w = gray.shape
    if h < 16 or w < 16:
        return 0, 0
    kernel = np.ones((8, 8), np.uint8)
    lo = cv2.erode(gray, kernel, anchor=(0, 0), borderType=cv2.BORDER_REPLICATE)  # over [y, y+8) x [x, x+8)
    hi = cv2.dilate(gray, kernel, anchor=(0, 0), borderType=cv2.BORDER_REPLICATE)
    flat = (lo == hi)[: h - 7, : w - 7]
    counts = np.array([[np.count_nonzero(flat[dy::8, dx::8]) for dx in range(8)] for dy in range(8)])
    dy, dx = np.unravel_index(int(counts.argmax()), counts.shape)
    return (int(dy), int(dx)) if counts[dy, dx] > counts[0, 0] else (0, 0)


# ------------------------------------------------------------------------------------------------------------- helpers
def _u8(mask: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(mask, dtype=np.uint8)


_KERNELS: dict[int, np.ndarray] = {0: cv2.getStructuringElement(cv2.MORPH_CROSS, (3, 3))}


def _kernel(radius: int) -> np.ndarray:
    """Radius 0: the 4-neighbour cross; else a disk (rounder than <= r^2 at small radii)."""
    if radius not in _KERNELS:
        yy, xx = np.mgrid[-radius : radius + 1, -radius : radius + 1]
        _KERNELS[radius] = (yy * yy + xx * xx <= radius * radius + radius).astype(np.uint8)
    return _KERNELS[radius]


def _dilate(mask: np.ndarray, radius: int) -> np.ndarray:
    return cv2.dilate(_u8(mask), _kernel(radius)).astype(bool)


def _erode(mask: np.ndarray, radius: int) -> np.ndarray:
    return cv2.erode(_u8(mask), _kernel(radius)).astype(bool)


def _padded(box: tuple[slice, slice], shape: tuple[int, int], margin: int) -> tuple[slice, slice]:
    rows, cols = box
    return (slice(max(rows.start - margin, 0), min(rows.stop + margin, shape[0])),
            slice(max(cols.start - margin, 0), min(cols.stop + margin, shape[1])))


def _border_pixels(region: np.ndarray, box: tuple[slice, slice], shape: tuple[int, int]) -> int:
    """Pixels of ``region`` (a crop at ``box``) on the image border: outline that shows nothing."""
    rows, cols = box
    n = 0
    if rows.start == 0:
        n += int(region[0].sum())
    if rows.stop == shape[0]:
        n += int(region[-1].sum())
    if cols.start == 0:
        n += int(region[:, 0].sum())
    if cols.stop == shape[1]:
        n += int(region[:, -1].sum())
    return n
