"""``--gallery``: an HTML contact sheet of a run, to page through and check the restorations by eye.

    GALLERY/index.html            the run: counts, the pages (first and last key of each), the bad inputs and why
    GALLERY/page_001.html, ...    PER_PAGE images each: before (the gray input, the hole outlined in red) | after,
                                  the key, size, where the mask came from, its area and the image's notes;
                                  prev / next links (and the arrow keys)
    GALLERY/thumbs/KEY.before.jpg, KEY.after.jpg   thumbnails, THUMB pixels on the long side

The thumbnails are made by the PNG writers (``write_thumbnails``, in the Ray write tasks, which hold the input, the
mask and the restoration anyway); the pages by the driver at the end (``write_pages``). Every file is written to a
temp name and renamed. The "after" thumbnail links to the full-size PNG.
"""
from __future__ import annotations

import html
import os
from pathlib import Path
from typing import Sequence
from urllib.parse import quote

import numpy as np
from PIL import Image, ImageFilter

from shards.schema import atomic_write_bytes

THUMB = 320  # long side, pixels
PER_PAGE = 48
OUTLINE_RGB = (255, 32, 32)
_JPEG_QUALITY = 85


def thumb_paths(gallery_dir: str | os.PathLike, key: str) -> tuple[Path, Path]:
    """(before, after) thumbnail files of ``key`` (``KEY`` may hold subfolders, mirrored under ``thumbs/``)."""
    base = Path(gallery_dir) / "thumbs"
    return base / f"{key}.before.jpg", base / f"{key}.after.jpg"


def _shrunk_size(height: int, width: int, size: int) -> tuple[int, int]:
    scale = min(1.0, size / max(height, width))
    return max(1, round(width * scale)), max(1, round(height * scale))


def _jpeg(img: Image.Image) -> bytes:
    import io

    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=_JPEG_QUALITY)
    return buf.getvalue()


def before_thumbnail(gray: np.ndarray, mask: np.ndarray, size: int = THUMB) -> Image.Image:
    """The gray input shrunk to ``size`` on its long side, as RGB, with the hole's outline drawn in red: every
    thumbnail pixel whose cell holds a hole pixel is inside, so a thin scratch still shows."""
    wh = _shrunk_size(*gray.shape, size)
    img = Image.fromarray(np.ascontiguousarray(gray)).resize(wh, Image.BOX).convert("RGB")
    if mask.size and np.any(mask):
        hole = Image.fromarray((np.asarray(mask) != 0).astype(np.uint8) * 255).resize(wh, Image.BOX)
        inside = np.asarray(hole) > 0  # any hole pixel in the cell
        region = Image.fromarray(inside.astype(np.uint8) * 255)
        ring = (np.asarray(region.filter(ImageFilter.MaxFilter(3))) > 0) & ~(
            np.asarray(region.filter(ImageFilter.MinFilter(3))) > 0)
        pixels = np.array(img)
        pixels[ring] = OUTLINE_RGB
        img = Image.fromarray(pixels)
    return img


def write_thumbnails(gallery_dir: str | os.PathLike, key: str, gray: np.ndarray, mask: np.ndarray, rgb: np.ndarray,
                     size: int = THUMB) -> None:
    """Write ``key``'s before (hole outlined) and after thumbnails."""
    before, after = thumb_paths(gallery_dir, key)
    atomic_write_bytes(before, _jpeg(before_thumbnail(gray, mask, size)))
    wh = _shrunk_size(*rgb.shape[:2], size)
    atomic_write_bytes(after, _jpeg(Image.fromarray(np.ascontiguousarray(rgb)).resize(wh, Image.BOX)))


def _href(target: Path, start: Path) -> str:
    return quote(os.path.relpath(target, start).replace(os.sep, "/"))


_STYLE = """
body { font-family: sans-serif; margin: 1em; background: #f4f4f4; color: #222; }
nav { margin: 0.5em 0; font-size: 1.1em; }
nav a, nav span { margin-right: 1em; }
.grid { display: grid; grid-template-columns: repeat(auto-fill, minmax(520px, 1fr)); gap: 12px; }
figure { margin: 0; padding: 8px; background: #fff; border: 1px solid #ccc; }
.pair { display: flex; gap: 6px; align-items: flex-start; }
.pair div { flex: 1; text-align: center; font-size: 0.8em; color: #666; }
.pair img { width: 100%; max-width: 320px; height: auto; display: block; margin: 0 auto; }
figcaption { font-size: 0.85em; margin-top: 4px; overflow-wrap: anywhere; }
.key { font-weight: bold; }
.note { color: #555; }
table { border-collapse: collapse; background: #fff; }
td, th { border: 1px solid #ccc; padding: 3px 8px; text-align: left; font-size: 0.9em; }
"""

_ARROWS = """<script>
document.addEventListener('keydown', function (e) {
  var link = document.querySelector(e.key === 'ArrowLeft' ? 'a[rel=prev]' : e.key === 'ArrowRight' ? 'a[rel=next]' : '');
  if (link) { window.location = link.href; }
});
</script>"""


def _page_name(number: int) -> str:
    return f"page_{number:03d}.html"


def _document(title: str, body: str) -> bytes:
    return (f"<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n<title>{html.escape(title)}"
            f"</title>\n<style>{_STYLE}</style>\n</head>\n<body>\n{body}\n{_ARROWS}\n</body>\n</html>\n").encode()


def _nav(number: int, pages: int) -> str:
    prev = (f'<a rel="prev" href="{_page_name(number - 1)}">&larr; prev</a>' if number > 1
            else "<span>&larr; prev</span>")
    nxt = (f'<a rel="next" href="{_page_name(number + 1)}">next &rarr;</a>' if number < pages
           else "<span>next &rarr;</span>")
    return f'<nav>{prev}<span>page {number} of {pages}</span>{nxt}<a href="index.html">index</a></nav>'


def _mask_words(entry: dict) -> str:
    source, frac = entry.get("mask_source", ""), float(entry.get("hole_frac", 0.0))
    if source == "user":
        return f"mask: given, {frac:.2%} of the image"
    if source == "detected":
        return f"mask: detected, {frac:.2%} of the image"
    if source == "shard":
        return f"mask: the shard's, {frac:.2%} of the image"
    return "no damage found: colorized only"


def write_pages(gallery_dir: str | os.PathLike, entries: Sequence[dict], *, png_dir: str | os.PathLike,
                title: str, bad: Sequence[dict] = (), summary_lines: Sequence[str] = (),
                per_page: int = PER_PAGE) -> Path:
    """Write the index and the pages for ``entries`` (each: key, height, width, mask_source, hole_frac, note,
    reused); ``bad``: rows that were not restored (key, where, error). Returns the index's path."""
    gallery_dir, png_dir = Path(gallery_dir), Path(png_dir)
    pages = max(1, -(-len(entries) // per_page))
    for number in range(1, pages + 1):
        chunk = entries[(number - 1) * per_page:number * per_page]
        cards = []
        for e in chunk:
            before, after = thumb_paths(gallery_dir, e["key"])
            png = png_dir / f"{e['key']}.png"
            note = html.escape(e.get("note") or "")
            cards.append(
                f'<figure id="{html.escape(e["key"])}">\n<div class="pair">'
                f'<div><img src="{_href(before, gallery_dir)}" alt="before: {html.escape(e["key"])}">before</div>'
                f'<div><a href="{_href(png, gallery_dir)}"><img src="{_href(after, gallery_dir)}" '
                f'alt="after: {html.escape(e["key"])}"></a>after</div></div>\n'
                f'<figcaption><span class="key">{html.escape(e["key"])}</span> '
                f'{int(e["width"])}x{int(e["height"])}{" (reused)" if e.get("reused") else ""}<br>'
                f'{html.escape(_mask_words(e))}' + (f'<br><span class="note">{note}</span>' if note else "")
                + "</figcaption>\n</figure>")
        body = (f"<h1>{html.escape(title)}</h1>\n{_nav(number, pages)}\n<div class=\"grid\">\n" + "\n".join(cards)
                + f"\n</div>\n{_nav(number, pages)}")
        atomic_write_bytes(gallery_dir / _page_name(number), _document(f"{title}: page {number}", body))
    for stale in gallery_dir.glob("page_*.html"):  # pages of an earlier, longer run
        try:
            if int(stale.stem.split("_")[1]) > pages:
                stale.unlink()
        except (IndexError, ValueError):
            pass

    rows = []
    for number in range(1, pages + 1):
        chunk = entries[(number - 1) * per_page:number * per_page]
        span = f"{html.escape(chunk[0]['key'])} &hellip; {html.escape(chunk[-1]['key'])}" if chunk else "(empty)"
        rows.append(f'<tr><td><a href="{_page_name(number)}">page {number}</a></td><td>{len(chunk)}</td>'
                    f"<td>{span}</td></tr>")
    body = [f"<h1>{html.escape(title)}</h1>", "<ul>"] + [f"<li>{html.escape(s)}</li>" for s in summary_lines]
    body += ["</ul>", '<h2>Pages</h2>', "<table><tr><th>page</th><th>images</th><th>keys</th></tr>", *rows,
             "</table>"]
    if bad:
        body += [f"<h2>Not restored ({len(bad)})</h2>", "<table><tr><th>key</th><th>file</th><th>why</th></tr>"]
        body += [f"<tr><td>{html.escape(str(b['key']))}</td><td>{html.escape(str(b.get('where', '')))}</td>"
                 f"<td>{html.escape(str(b.get('error', '')))}</td></tr>" for b in bad]
        body.append("</table>")
    index = gallery_dir / "index.html"
    atomic_write_bytes(index, _document(title, "\n".join(body)))
    return index
