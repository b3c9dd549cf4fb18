"""What each finished output was made from, so a rerun reuses only what is provably the same.

Beside the outputs, ``PNG_DIR/.restore_records.jsonl`` holds, per key, the sha256 of the input bytes (and of the
mask: the shard's mask member, or the user's mask file), the size and mtime of the PNG written, and the id of the
*recipe* it was made with: the sha256 of every checkpoint file, every option that changes pixels (``pixel_options``
in ``restore.batch_infer``), the device kind, and the code that computes the pixels (``code_identity``: each module's
syntax tree without docstrings, so editing a comment changes nothing). A rerun reuses ``KEY.png`` only when all of
these match: the recipe and the PNG here in the driver (``Records.reusable``), the input and mask bytes in the read
tasks, which hash what they read anyway. Anything else is redone and the log says why, per reason
(``redo 12: checkpoint changed; 3: input changed``).

The file is append-only while a job runs (one line per restored key, flushed per batch, so a crash keeps the
progress; a torn last line is ignored) and rewritten at the end with one line per key, to a temp name and renamed.
A PNG written but not yet recorded when a job dies fails the PNG check (its mtime is not the recorded one) and is
redone. One job at a time writes a ``PNG_DIR`` (``job_lock``).
"""
from __future__ import annotations

import ast
import contextlib
import fcntl
import hashlib
import json
import os
import socket
import time
from pathlib import Path
from typing import Iterable, Iterator, Sequence

RECORDS_NAME = ".restore_records.jsonl"
LOCK_NAME = ".restore.lock"
FORMAT = 1
# The code that decides the output's pixels (read, detect, mask, model, composite). The hash is of each module's
# syntax tree without docstrings: comments and docs change nothing.
PIXEL_CODE = ("restore/engine.py", "restore/model.py", "restore/composite.py", "restore/prefill.py",
              "restore/large_image.py", "restore/fuse.py", "restore/inputs.py", "shards/detector.py",
              "shards/reader.py")
_ROOT = Path(__file__).resolve().parent.parent


def _strip_docstrings(tree: ast.AST) -> ast.AST:
    for node in ast.walk(tree):
        body = getattr(node, "body", None)
        if (isinstance(body, list) and body and isinstance(body[0], ast.Expr)
                and isinstance(body[0].value, ast.Constant) and isinstance(body[0].value.value, str)):
            node.body = body[1:] or [ast.Pass()]
    return tree


def code_identity(files: Sequence[str] = PIXEL_CODE) -> dict[str, str]:
    """{module path: 16 hex digits of the sha256 of its syntax tree without docstrings} for the pixel code."""
    out = {}
    for rel in files:
        path = _ROOT / rel
        if path.is_file():
            tree = _strip_docstrings(ast.parse(path.read_text()))
            out[rel] = hashlib.sha256(ast.dump(tree).encode()).hexdigest()[:16]
    return out


def recipe(checkpoint_hashes: Sequence[str], options: dict, code: dict[str, str] | None = None) -> dict:
    """How this run makes its pixels: checkpoints (sha256, in order), options, code. Its ``recipe_id`` names it."""
    return {"format": FORMAT, "checkpoints": list(checkpoint_hashes), "options": dict(options),
            "code": code_identity() if code is None else dict(code)}


def recipe_id(r: dict) -> str:
    return hashlib.sha256(json.dumps(r, sort_keys=True).encode()).hexdigest()[:16]


def recipe_change(old: dict | None, new: dict) -> str:
    """Why ``old`` does not make the same pixels as ``new``: the first difference, in words ("" if none)."""
    if old is None:
        return "made by an unrecorded recipe"
    if old.get("format") != new["format"]:
        return "records of another format"
    if old.get("checkpoints") != new["checkpoints"]:
        return "checkpoint changed"
    for name in sorted(set(old.get("options", {})) | set(new["options"])):
        a, b = old.get("options", {}).get(name), new["options"].get(name)
        if a != b:
            return f"{name} changed ({a} -> {b})"
    changed = sorted(m for m in set(old.get("code", {})) | set(new["code"])
                     if old.get("code", {}).get(m) != new["code"].get(m))
    if changed:
        return f"code changed ({', '.join(changed)})"
    return ""


def png_stamp(path: str | os.PathLike) -> list[int]:
    """[size, mtime_ns] of a written PNG: a PNG replaced since it was recorded no longer matches."""
    st = os.stat(path)
    return [int(st.st_size), int(st.st_mtime_ns)]


class Records:
    """The records of one output folder: loaded once by the driver, appended to as outputs arrive, compacted."""

    def __init__(self, png_dir: str | os.PathLike) -> None:
        self.png_dir = Path(png_dir)
        self.path = self.png_dir / RECORDS_NAME
        self.recipes: dict[str, dict] = {}
        self.keys: dict[str, dict] = {}
        self.torn = 0
        self._file = None
        self._written_recipes: set[str] = set()
        if self.path.is_file():
            with open(self.path, encoding="utf-8") as f:
                for line in f:
                    try:
                        entry = json.loads(line)
                    except json.JSONDecodeError:  # a line torn by a crash
                        self.torn += 1
                        continue
                    if "recipe" in entry:
                        self.recipes[entry["recipe_id"]] = entry["recipe"]
                    elif "key" in entry:
                        self.keys[entry["key"]] = entry
        self._written_recipes = set(self.recipes)

    def reusable(self, key: str, current: dict, *, user_mask: bool, mask_dilate: int,
                 large_above: float | None = None, work_size: int | None = None) -> tuple[dict | None, str]:
        """For a key of this run: (what its read task must find to reuse ``KEY.png``: the recorded input and mask
        sha256, or None when it is redone anyway; the reason, "" when there is no finished output). Per image, besides
        the recipe: whether a user mask was given and how much it was grown, whether the image takes the large-image
        path (``restore.large_image.is_large`` at ``large_above``) and, if so, at which ``work_size``."""
        entry = self.keys.get(key)
        png = self.png_dir / f"{key}.png"
        if entry is None:
            return None, ("" if not png.exists() else "no record of how it was made")
        try:
            stamp = png_stamp(png)
        except FileNotFoundError:
            return None, ""
        if entry.get("png") != stamp:
            return None, "PNG not the one recorded"
        change = recipe_change(self.recipes.get(entry.get("recipe_id")), current)
        if change:
            return None, change
        if bool(entry.get("user_mask")) != user_mask:
            return None, "mask given now" if user_mask else "no mask given now"
        if user_mask and entry.get("mask_dilate") != mask_dilate:
            return None, f"mask_dilate changed ({entry.get('mask_dilate')} -> {mask_dilate})"
        large = _is_large(entry.get("size") or [0, 0], large_above)
        if bool(entry.get("large")) != large:
            return None, f"large_above changed (the large-image path now {'on' if large else 'off'})"
        if large and entry.get("work_size") != work_size:
            return None, f"work_size changed ({entry.get('work_size')} -> {work_size})"
        return {"input": entry.get("input"), "mask": entry.get("mask") or ""}, ""

    def add(self, rows: Iterable[dict], current: dict, *, mask_dilate: int, large_above: float | None = None,
            work_size: int | None = None) -> int:
        """Append a record for each row restored and written in this run (status todo, a PNG stamp); flushed."""
        rid = recipe_id(current)
        lines = []
        for row in rows:
            if row.get("status") != "todo" or not row.get("png_size"):
                continue
            user = row.get("mask_source") == "user"
            large = _is_large([row["height"], row["width"]], large_above)
            entry = {"key": row["key"], "recipe_id": rid, "input": row["input_sha"], "mask": row["mask_sha"] or None,
                     "user_mask": user, "mask_dilate": mask_dilate if user else None,
                     "large": large, "work_size": work_size if large else None,
                     "png": [int(row["png_size"]), int(row["png_mtime_ns"])],
                     "size": [int(row["height"]), int(row["width"])], "source": row["where"],
                     "precision": row.get("precision") or None, "at": round(time.time(), 3)}
            self.keys[row["key"]] = entry
            lines.append(json.dumps(entry, sort_keys=True))
        if not lines:
            return 0
        if self._file is None:
            self.png_dir.mkdir(parents=True, exist_ok=True)
            self._file = open(self.path, "a", encoding="utf-8")
        if rid not in self._written_recipes:
            self.recipes[rid] = current
            self._file.write(json.dumps({"recipe_id": rid, "recipe": current}, sort_keys=True) + "\n")
            self._written_recipes.add(rid)
        self._file.write("\n".join(lines) + "\n")
        self._file.flush()
        return len(lines)

    def compact(self) -> None:
        """Rewrite the file with one line per key (and the recipes they use): temp name, fsync, rename."""
        if self._file is not None:
            self._file.close()
            self._file = None
        if not self.keys and not self.path.exists():
            return
        from shards.schema import atomic_write_bytes

        used = {e.get("recipe_id") for e in self.keys.values()}
        lines = [json.dumps({"recipe_id": rid, "recipe": r}, sort_keys=True)
                 for rid, r in sorted(self.recipes.items()) if rid in used]
        lines += [json.dumps(self.keys[k], sort_keys=True) for k in sorted(self.keys)]
        atomic_write_bytes(self.path, ("\n".join(lines) + "\n").encode() if lines else b"")
        self._written_recipes = set(self.recipes)


def _is_large(size: Sequence[int], large_above: float | None) -> bool:
    from restore.large_image import is_large

    return is_large(int(size[0]), int(size[1]), large_above)


@contextlib.contextmanager
def job_lock(png_dir: str | os.PathLike) -> Iterator[Path]:
    """Hold ``PNG_DIR/.restore.lock`` for the job: a second job writing the same folder at the same time would
    overwrite its PNGs and records. Raises ``BlockingIOError`` naming the holder when another job has it."""
    path = Path(png_dir) / LOCK_NAME
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 400, 0).decode(errors="replace").strip() or "unknown"
            raise BlockingIOError(f"{png_dir}: another restore job is writing this folder ({holder}); wait for it "
                                  f"or give another --png-dir") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()} on {socket.gethostname()}, since {time.ctime()}\n".encode(), 0)
        yield path
    finally:
        os.close(fd)  # releases the lock
