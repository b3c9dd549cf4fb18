"""The submission zip: written to a temp name, verified, then renamed, so ``--out`` is complete or absent.

DACON wants a flat zip of RGB PNGs named like the test inputs; ``verify_zip`` checks exactly that (names and count
equal the keys, every entry decodes as RGB of its input's size) before ``build_zip`` renames it into place. A key with
folders (``--images DIR --recursive``: ``box1/scan_0001``) is stored under its relative path; the competition's keys
have none, so its zip stays flat.
"""
from __future__ import annotations

import zipfile
from pathlib import Path
from typing import Sequence

from PIL import Image

from shards.schema import atomic_write


def build_zip(png_dir: Path, keys: Sequence[str], sizes: dict[str, tuple[int, int]], out: Path,
              comment: str = "") -> None:
    """Write ``out`` (one ``KEY.png`` per key: flat unless keys hold folders) via a temp name; verify it before the
    rename."""
    missing = [k for k in keys if not (png_dir / f"{k}.png").is_file()]
    if missing:
        raise RuntimeError(f"{png_dir}: {len(missing)} restored images are missing: {', '.join(missing[:10])}")
    out.parent.mkdir(parents=True, exist_ok=True)
    for stale in out.parent.glob(f".{out.name}.*.tmp"):  # a zip temp left by a crashed run
        stale.unlink(missing_ok=True)

    def write_entries(f) -> None:
        # PNG is compressed already: storing is as small and much faster than deflating again.
        with zipfile.ZipFile(f, "w", compression=zipfile.ZIP_STORED) as zf:
            for key in keys:
                zf.write(png_dir / f"{key}.png", arcname=f"{key}.png")
            zf.comment = comment.encode()[:65535]

    atomic_write(out, write_entries, check=lambda tmp: verify_zip(tmp, keys, sizes))


def verify_zip(path: Path, keys: Sequence[str], sizes: dict[str, tuple[int, int]]) -> None:
    """Names and count exactly ``KEY.png`` per key (so flat when no key holds a folder: nothing nested that is not
    a key's own path); each entry decodes as RGB of its input's (H, W)."""
    with zipfile.ZipFile(path) as zf:
        names = zf.namelist()
        expected = {f"{k}.png" for k in keys}
        nested = [n for n in names if ("/" in n or "\\" in n) and n not in expected]
        if nested or len(names) != len(expected) or set(names) != expected:
            extra, lacking = sorted(set(names) - expected), sorted(expected - set(names))
            raise RuntimeError(f"{path}: zip check failed: {len(names)} entries for {len(expected)} keys; "
                               f"nested {nested[:5]}, unexpected {extra[:5]}, missing {lacking[:5]}")
        for name in names:
            with zf.open(name) as member, Image.open(member) as img:
                img.load()
                if img.mode != "RGB":
                    raise RuntimeError(f"{path}: {name} is mode {img.mode}, not RGB")
                want = sizes.get(name[: -len(".png")])
                if want is not None and (img.height, img.width) != tuple(want):
                    raise RuntimeError(f"{path}: {name} is {img.width}x{img.height}, its input is "
                                       f"{want[1]}x{want[0]}")

