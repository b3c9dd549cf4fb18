"""Ray batch inference: restore a packed test set (or a folder of scans) and build the submission zip.

    python -m restore.batch_infer --shards data/shards/test --checkpoint runs/exp1 --out submission.zip
    python -m restore.batch_infer --images scans/ --out restored.zip --png-dir restored/ --skip-bad
    python -m restore.batch_infer --images archive/ --recursive --masks archive_masks/ --gallery --no-zip --png-dir out/
    python -m restore.batch_infer --shards archive/ --no-zip --png-dir out/ --compile default   # millions of images

This module is the command line and the run's summary. The parts, each in its own module:

    restore.inputs        planning (which keys, which read tasks) and the read stage: shards, image folders, masks
    restore.engine        the checkpoints on one device: Engine.restore(gray, mask) -> rgb (no Ray)
    restore.ray_pipeline  Ray Data, streaming (a test set of millions never sits in memory): read tasks ->
                          RestoreWorker actors (the Engine) -> PNG writers -> the driver's progress bar
    restore.submission    the zip: temp name, verified, renamed
    restore.records       what each PNG was made from: the reuse rule
    restore.gallery       --gallery: the HTML contact sheet

Exactly-once and resumable: each ``KEY.png`` is written to a temp name and renamed, so an existing ``KEY.png`` is
complete, and recorded (``restore.records``: the input's and mask's sha256, the checkpoints' sha256, every option
that changes pixels, the code). A rerun reuses a PNG only when all of these match, redoes the rest and says why
(``redo 12: checkpoint changed; 3: input changed``), deletes leftover temp files, and the zip is written to a temp
name, verified (names and count equal the keys, flat unless keys hold folders; every entry decodes as RGB of its
input's size) and only then renamed to ``--out``. One job at a time writes a ``--png-dir`` (a lock file).

Compositing (``--no-composite`` turns it off): outside the hole the input is exactly PIL ``convert('L')`` of the
original, so the worker re-imposes it on the prediction (``restore.composite``: shift R, G, B by the same integer,
i.e. replace Y and keep Cb/Cr, bit-exact with PIL's L); inside the hole the prediction stands. ``docs/inference.md``
has the measurement behind the default.

Ray: by default a local Ray with this machine's CPUs (and GPUs); ``--address auto`` (or ``HOST:PORT`` /
``ray://HOST:10001``) joins a running cluster. Across a SLURM allocation (see ``slurm/ray_cluster.sh``):

    head=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n1)
    srun -N1 -n1 -w "$head" ray start --head --port=6379 --num-gpus=$GPUS --block &
    srun -N$((SLURM_JOB_NUM_NODES-1)) -n$((SLURM_JOB_NUM_NODES-1)) -x "$head" \\
         ray start --address="$head:6379" --num-gpus=$GPUS --block &
    python -m restore.batch_infer --address "$head:6379" --shards ... --workers $((SLURM_JOB_NUM_NODES*GPUS))

The shards, the checkpoints, ``--png-dir`` and ``--out`` must then be on a filesystem every node sees.

Exit codes: 0 done (with ``--skip-bad`` possibly without the bad inputs, listed in this job's bad list:
``OUTSTEM.bad.json`` beside the zip, with ``--no-zip`` ``PNG_DIR/SOURCE-HASH.bad.json``); 2 bad input, one line
``error: FILE: problem`` on stderr (missing/empty input folder, unreadable image or sample, a mask of another size,
missing, mismatched or not-a-checkpoint checkpoint, no run found, another job writing the ``--png-dir``); 1 an internal
failure (a traceback, then ``error: internal failure (...)``). Finished PNGs are kept and recorded in every case.
"""
from __future__ import annotations

import argparse
import hashlib
import sys
import time
import traceback
from collections import defaultdict
from pathlib import Path
from typing import Any, Sequence

from restore.engine import COMPILE_MODES
from restore.precision import PRECISIONS
from restore.large_image import DEFAULT_LARGE_ABOVE_MP, DEFAULT_WORK_SIZE
from restore.inputs import BAD, DONE, TODO, BadInput, Plan, plan_images, plan_shards, remove_temp_files
from restore.ray_pipeline import ACTOR_TIME_COLUMNS, SCORE_TERMS, run_pipeline
from restore.submission import build_zip
from shards import schema

EXIT_OK = 0
EXIT_BAD_INPUT = 2
EXIT_INTERNAL = 1
DEFAULT_MASK_DILATE = 3  # px a user mask is grown by (--mask-dilate): a scratch's soft edge leaves no seam
NOTES_SHOWN = 200  # per-image note lines printed at the end (the rest: counted; the gallery shows every one)


# ---------------------------------------------------------------------------------------------- checkpoints (driver)
def newest_run(runs_dir: Path) -> Path:
    """The run dir under ``runs_dir`` whose checkpoints changed last (its best.pt is then used)."""
    candidates = []
    if runs_dir.is_dir():
        for run in runs_dir.iterdir():
            ckpt_dir = run / "checkpoints"
            if ckpt_dir.is_dir():
                files = [p for p in ckpt_dir.iterdir() if p.suffix == ".pt" or p.name == "latest"]
                if files:
                    candidates.append((max(p.stat().st_mtime for p in files), run))
    if not candidates:
        raise BadInput(f"no --checkpoint given and no run with checkpoints under {runs_dir.resolve()}")
    return max(candidates)[1]


def resolve_checkpoints(given: Sequence[str] | None, runs_dir: Path) -> list[Path]:
    from restore.model import resolve_checkpoint

    if not given:
        run = newest_run(runs_dir)
        given = [str(run)]
        print(f"checkpoint: none given, using the newest run {run} (its best.pt, else its latest)")
    resolved = []
    for value in given:
        try:
            resolved.append(resolve_checkpoint(value).resolve())
        except (FileNotFoundError, ValueError) as exc:
            raise BadInput(f"--checkpoint {value}: {exc}") from exc
    return resolved


def inference_cache_dir(setting: str, checkpoints: Sequence[Path]) -> Path | None:
    """``--compile-cache``: ``auto`` = ``RUN/compile_cache/inference`` of the first checkpoint's run (beside the
    training graphs, in a folder of its own so neither loads the other's), ``off`` = none, else the folder given."""
    from restore.compile_cache import folder_for, setting_error

    error = setting_error(setting, option="--compile-cache ")
    if error:
        raise BadInput(error)
    first = Path(checkpoints[0])
    run_dir = first.parent.parent if first.parent.name == "checkpoints" else first.parent
    return folder_for(setting, run_dir / "compile_cache" / "inference")


def not_a_checkpoint(path: Path) -> str | None:
    """Why ``path`` cannot be a checkpoint, from its first bytes (None: it may be one). ``torch.save`` writes a zip
    (``PK``) or, in its legacy format, a pickle (``0x80``)."""
    with open(path, "rb") as f:
        head = f.read(32)
    if not head:
        return "is empty (0 bytes), not a checkpoint"
    if head.startswith(b"PK") or head[:1] == b"\x80":
        return None
    text = all(32 <= b < 127 or b in b"\t\r\n" for b in head)
    return (f"is not a checkpoint (torch.save writes a zip or a pickle): it is {'a text file' if text else 'data'} "
            f"starting with {head[:20]!r}")


def check_checkpoints(paths: Sequence[Path]) -> list[dict]:
    """Load each checkpoint once in the driver so a missing or mismatched one fails before any Ray work starts, and
    hash its bytes (the records' checkpoint identity)."""
    from restore.model import load_restorer
    from shards.schema import file_sha256

    specs = []
    for path in paths:
        problem = not_a_checkpoint(path)
        if problem:
            raise BadInput(f"checkpoint {path} {problem}")
        try:
            model, info = load_restorer(path, map_location="cpu")
        except (FileNotFoundError, ValueError, RuntimeError, KeyError) as exc:
            raise BadInput(f"checkpoint {path}: {exc}") from exc
        specs.append({"path": str(path), "spec": model.spec.to_dict(), "weights": info.get("weights_used"),
                      "sha256": file_sha256(path)})
        del model
    return specs


# ---------------------------------------------------------------------------------------------- the run (driver)
def default_png_dir(out: Path) -> Path:
    return out.with_name(out.stem + "_png")


def default_gallery_dir(out: Path | None, png_dir: Path) -> Path:
    """``--gallery`` without a folder: ``OUTSTEM_gallery/`` beside the zip, else ``PNGDIR_gallery/`` beside the PNGs."""
    return out.with_name(out.stem + "_gallery") if out is not None else png_dir.with_name(png_dir.name + "_gallery")


def bad_list_path(given: str | None, out: Path | None, png_dir: Path, source: Path) -> Path:
    """This job's list of bad inputs: ``--bad-list``, else ``OUTSTEM.bad.json`` beside the zip, else (``--no-zip``)
    ``PNG_DIR/SOURCE-HASH.bad.json``, named after the input folder (and a hash of its full path), so another job
    writing the same folder keeps its own list."""
    if given:
        return Path(given)
    if out is not None:
        return out.with_name(out.stem + ".bad.json")
    tag = hashlib.sha256(str(source.resolve()).encode()).hexdigest()[:8]
    return png_dir / f"{source.name or 'input'}-{tag}.bad.json"


def pixel_options(args: argparse.Namespace, device: str) -> dict:
    """Every option that changes the pixels of every image, for the records (``restore.records``): a rerun with any
    of them different redoes the work. ``--mask-dilate`` (user-masked images only) and ``--work-size`` /
    ``--large-above`` (large images only) are recorded per image instead (``Records.reusable``). The device kind is
    one: ``--precision auto`` is bf16 or fp16 on a GPU, fp32 on a CPU."""
    return {"tta": bool(args.tta), "composite": bool(args.composite), "precision": args.precision,
            "bn_folded": args.compile != "off", "device": device}


def _listing(names: Sequence[str], shown: int = 5) -> str:
    return ", ".join(names[:shown]) + (f", ... ({len(names) - shown} more)" if len(names) > shown else "")


def _plan(args: argparse.Namespace, png_dir: Path, gallery_dir: Path | None) -> Plan:
    if args.shards:
        if args.masks or args.recursive:
            raise BadInput("--masks and --recursive are for --images (a shard holds each sample's mask)")
        plan = plan_shards(args.shards)
        print(f"shards: {plan.source}: {len(plan.keys)} images")
        return plan
    plan = plan_images(args.images, recursive=args.recursive, masks_dir=args.masks, mask_dilate=args.mask_dilate,
                       exclude=[d for d in (png_dir, gallery_dir) if d is not None])
    line = f"images: {plan.source}: {len(plan.keys)} images"
    if plan.ignored:
        line += f"; ignored {len(plan.ignored)} non-image files ({_listing(plan.ignored)})"
    if plan.unsearched_dirs:
        line += f"; {plan.unsearched_dirs} subfolders not searched (--recursive restores them)"
    print(line)
    if args.masks:
        print(f"masks: {len(plan.masked)} given in {args.masks} (grown {args.mask_dilate} px); "
              f"{len(plan.keys) - len(plan.masked)} images without one get the detector"
              + (f"; {len(plan.unused_masks)} masks match no image ({_listing(plan.unused_masks)})"
                 if plan.unused_masks else ""))
    return plan


def run(args: argparse.Namespace) -> dict:
    """The whole job; returns the summary. Raises ``BadInput`` for the user's mistakes."""
    import ray

    from restore.ray_pipeline import configure_ray_data, pool_resources, start_ray
    from restore.records import Records, job_lock

    started = time.perf_counter()
    out = Path(args.out) if args.out else None
    png_dir = Path(args.png_dir) if args.png_dir else default_png_dir(out)
    gallery_dir = (Path(args.gallery) if args.gallery != "auto" else default_gallery_dir(out, png_dir)) \
        if args.gallery else None
    plan = _plan(args, png_dir, gallery_dir)
    if args.score and plan.kind != "shards":
        raise BadInput("--score needs --shards with gt members (a folder of images has no ground truth)")
    checkpoints = resolve_checkpoints(args.checkpoint, Path(args.runs_dir))
    specs = check_checkpoints(checkpoints)
    cache_dir = inference_cache_dir(args.compile_cache, checkpoints)  # checked even when unused: a typo is an error
    cache_dir = cache_dir if args.compile != "off" else None
    for s in specs:
        print(f"checkpoint: {s['path']} ({s['weights']} weights, encoder {s['spec']['encoder']}, "
              f"color_mode {s['spec']['color_mode']}, sha256 {s['sha256'][:12]})")
    if plan.kind == "images" and png_dir.resolve() == plan.source.resolve():
        raise BadInput(f"--png-dir {png_dir} is the input folder: KEY.png would overwrite the damaged inputs")
    if gallery_dir is not None and gallery_dir.resolve() in (png_dir.resolve(), plan.source.resolve()):
        raise BadInput(f"--gallery {gallery_dir} is the {'PNG' if gallery_dir.resolve() == png_dir.resolve() else 'input'}"
                       f" folder: give the gallery a folder of its own")

    png_dir.mkdir(parents=True, exist_ok=True)
    try:
        lock = job_lock(png_dir)
        lock.__enter__()
    except BlockingIOError as exc:
        raise BadInput(str(exc)) from None
    own_ray = False
    records = None
    try:
        removed = remove_temp_files(png_dir)
        if removed:
            print(f"{png_dir}: removed {removed} leftover temp files")
        own_ray = start_ray(args.address)
        configure_ray_data()
        pool = pool_resources(args.workers, args.gpus_per_worker, args.cpus_per_worker)
        current = recipe_for(specs, args, device="cuda" if pool[1] > 0 else "cpu")
        records = Records(png_dir)
        redo = plan_reuse(plan, records, current, args)
        rows, arrivals = run_pipeline(
            plan, checkpoints, args, png_dir=png_dir, cache_dir=cache_dir, pool=pool, gallery_dir=gallery_dir,
            on_batch=lambda batch: records.add(batch, current, mask_dilate=args.mask_dilate,
                                               large_above=args.large_above, work_size=args.work_size))
    finally:
        if records is not None:
            records.compact()
        if own_ray:
            ray.shutdown()
        lock.__exit__(None, None, None)
    summary = _finish(args, plan, rows, png_dir, out, time.perf_counter() - started, redo=redo,
                      gallery_dir=gallery_dir)
    # The driver's view of the batches as they arrive: bursty (the writers hand batches back in groups), so the
    # steady rate is the actors' own, pooled (``summary["steady"]``); this one is kept for comparison.
    summary["arrivals_img_per_s"] = steady_rate(arrivals)
    return summary


def recipe_for(specs: Sequence[dict], args: argparse.Namespace, device: str) -> dict:
    from restore.records import recipe

    return recipe([s["sha256"] for s in specs], pixel_options(args, device))


def plan_reuse(plan: Plan, records, current: dict, args: argparse.Namespace) -> dict[str, list[str]]:
    """Which finished outputs may be reused: sets each item's ``expect`` (the input and mask sha256 the read task
    must find); returns {reason: keys} for the finished outputs redone anyway, and prints both."""
    redo: dict[str, list[str]] = defaultdict(list)
    candidates = 0
    for item in plan.items:
        expect = {}
        for key in item["keys"]:
            ok, reason = records.reusable(key, current, user_mask=key in plan.masked, mask_dilate=args.mask_dilate,
                                          large_above=args.large_above, work_size=args.work_size)
            if ok is not None:
                expect[key] = ok
            elif reason:
                redo[reason].append(key)
        item["expect"] = expect
        candidates += len(expect)
    line = (f"reuse: {candidates} of {len(plan.keys)} images have a finished PNG made the same way in "
            f"{records.png_dir} (their input bytes are checked as they are read)")
    if redo:
        line += "; redo " + "; ".join(f"{len(keys)}: {reason} ({_listing(keys, 3)})"
                                      for reason, keys in sorted(redo.items(), key=lambda kv: -len(kv[1])))
    print(line)
    return redo


def rate_after_first_batch(batch_ends: Sequence[float]) -> dict | None:
    """The steady rate after the first batch (model loads and compilation excluded): the images of the batches that
    ended after the first one, over the time from its end to the last batch's end. ``batch_ends``: one time per
    restored image, the end of its batch: one actor's clock (``actor_time_split``), all actors' wall clocks pooled
    (the run's steady rate, whether they overlapped or not), or the arrivals at the driver (``steady_rate``). None
    with fewer than two batches."""
    if not batch_ends:
        return None
    first, last = min(batch_ends), max(batch_ends)
    if last <= first:
        return None
    images = sum(1 for t in batch_ends if t > first)
    return {"images": images, "span_s": round(last - first, 3), "img_s": round(images / (last - first), 3)}


def steady_rate(arrivals: list[tuple[float, int]]) -> float | None:
    """Restored images per second after the first batch that restored any (start-up and model load excluded), from
    (arrival time, images restored) per batch."""
    rate = rate_after_first_batch([t for t, n in arrivals for _ in range(n)])
    return rate["img_s"] if rate else None


# ---------------------------------------------------------------------------------------------- the summary
def actor_time_split(marks: Sequence[tuple[float, float, float]]) -> dict | None:
    """What one actor did from the end of its first batch (model load, compilation and cuDNN's first calls excluded)
    to the end of its last: shares of that span in the model (``model``), in the rest of its calls (``calls_other``:
    stacking, copies, building the result) and outside its calls (``outside_calls``: Ray batching its input and
    storing its output, or the actor waiting for input because reading does not keep up), and the images it restored
    in that span and their rate (``images``, ``img_s``: the actor's steady rate, which the driver's view of arriving
    batches only approximates, as the write stage hands them back in bursts). ``marks``: one per restored image, the
    actor's (clock, model, calls) seconds at the end of the image's batch, cumulative. None with fewer than two
    batches."""
    rate = rate_after_first_batch([clock for clock, _, _ in marks])
    if rate is None:
        return None
    (clock0, model0, calls0), (clock1, model1, calls1) = min(marks), max(marks)
    span = clock1 - clock0
    model, calls = model1 - model0, calls1 - calls0
    return {"span_s": rate["span_s"], "model": round(model / span, 4), "calls_other": round((calls - model) / span, 4),
            "outside_calls": round(1.0 - calls / span, 4), "images": rate["images"], "img_s": rate["img_s"]}


def _finish(args: argparse.Namespace, plan: Plan, rows: list[dict], png_dir: Path, out: Path | None,
            elapsed: float, *, redo: dict[str, list[str]], gallery_dir: Path | None) -> dict:
    by_key: dict[str, dict] = {}
    for row in rows:
        if row["key"] in by_key and by_key[row["key"]]["status"] != BAD:
            continue  # a duplicate copy inside a shard: the first good one counts
        by_key[row["key"]] = row
    unseen = [k for k in plan.keys if k not in by_key]
    if unseen:
        raise RuntimeError(f"the pipeline returned no row for {len(unseen)} keys: {', '.join(unseen[:10])}")
    expected = set(plan.keys)
    bad = [by_key[k] for k in plan.keys if by_key[k]["status"] == BAD]
    bad += [r for r in rows if r["status"] == BAD and r["key"] not in expected]
    good = [k for k in plan.keys if by_key[k]["status"] != BAD]
    restored = [by_key[k] for k in good if by_key[k]["status"] == TODO]

    per_worker: dict[str, dict] = defaultdict(lambda: {"images": 0, "busy_s": 0.0, "graphs_compiled": 0,
                                                       "graphs_cached": 0})
    marks: dict[str, list[tuple[float, ...]]] = defaultdict(list)
    for r in restored:
        w = per_worker[r["worker"]]
        w["images"] += 1
        w["busy_s"] += float(r["infer_s"])
        for k in ("graphs_compiled", "graphs_cached"):  # each row holds the actor's count so far
            w[k] = max(w[k], int(r[k]))
        marks[r["worker"]].append(tuple(float(r[k]) for k in ACTOR_TIME_COLUMNS))
    for name, w in per_worker.items():
        w["after_first_batch"] = actor_time_split(marks[name])
    steady = rate_after_first_batch([float(r["actor_end_unix"]) for r in restored])
    read_redo: dict[str, list[str]] = defaultdict(list)  # finished outputs whose input (or mask) bytes changed
    for r in restored:
        if r.get("redo"):
            read_redo[r["redo"]].append(r["key"])
    all_redo = {reason: len(keys) for reason, keys in {**redo, **read_redo}.items()}
    summary: dict[str, Any] = {
        "images": len(plan.keys), "restored": len(restored), "already_done": len(good) - len(restored),
        "bad": len(bad), "seconds": round(elapsed, 3),
        "img_per_s": round(len(restored) / elapsed, 3) if elapsed > 0 else None,
        "steady": steady,
        "workers": {w: {**v, "img_per_s": round(v["images"] / v["busy_s"], 3) if v["busy_s"] else None}
                    for w, v in sorted(per_worker.items())},
        "png_dir": str(png_dir), "zip": None, "gallery": None, "redo": all_redo,
        "ignored": list(plan.ignored), "unused_masks": list(plan.unused_masks),
        "notes": [f"{k}: {by_key[k]['note']}" for k in good if by_key[k]["note"]],
    }
    if read_redo:
        print("redo " + "; ".join(f"{len(keys)}: {reason} ({_listing(keys, 3)})"
                                  for reason, keys in sorted(read_redo.items(), key=lambda kv: -len(kv[1]))))

    bad_path = bad_list_path(args.bad_list, out, png_dir, plan.source)
    summary["bad_list"] = str(bad_path) if bad else None
    if bad:
        listing = [{"key": r["key"], "where": r["where"], "error": r["error"]} for r in bad]
        schema.atomic_write_json(bad_path, {"count": len(listing), "bad": listing, "zip_holds": len(good),
                                            "expected": len(plan.keys)})
        print(f"skipped {len(bad)} bad input(s) (listed in {bad_path}):")
        for r in listing:
            print(f"  {r['key']}: {r['error']}")
    else:
        bad_path.unlink(missing_ok=True)  # stale from an earlier run

    if out is not None:
        sizes = {k: (int(by_key[k]["height"]), int(by_key[k]["width"])) for k in good}
        comment = (f"restore.batch_infer: {len(good)} of {len(plan.keys)} images; {len(bad)} bad inputs left out "
                   f"(see {bad_path.name})" if bad else f"restore.batch_infer: all {len(good)} images")
        build_zip(png_dir, good, sizes, out, comment)
        summary["zip"] = str(out)
        print(f"zip: {out}: {len(good)} images, verified" + (f" (WITHOUT the {len(bad)} bad keys)" if bad else ""))

    if args.score:
        from restore.score import summarize

        scored = [{**{t: by_key[k][t] for t in SCORE_TERMS}, "degenerate": by_key[k]["degenerate"]} for k in good]
        result = summarize(scored)
        summary["score"] = result
        print(f"score {result['score']:.4f}  ssim {result['ssim']:.4f}  masked_ssim {result['masked_ssim']:.4f}  "
              f"hist_sim {result['hist_sim']:.4f}  (n={result['n']}, degenerate={result['n_degenerate']})")

    if gallery_dir is not None:
        from restore.gallery import PER_PAGE, write_pages

        entries = [{**{c: by_key[k][c] for c in ("key", "height", "width", "mask_source", "hole_frac", "note")},
                    "reused": by_key[k]["status"] == DONE} for k in good]
        lines = [f"{len(plan.keys)} images from {plan.source}: {len(restored)} restored, "
                 f"{len(good) - len(restored)} reused, {len(bad)} not restored",
                 f"restorations in {png_dir.resolve()}"]
        lines += [f"redone: {n} {reason}" for reason, n in all_redo.items()]
        if plan.ignored:
            lines.append(f"ignored {len(plan.ignored)} non-image files: {_listing(plan.ignored, 20)}")
        index = write_pages(gallery_dir, entries, png_dir=png_dir, title=f"restore: {plan.source.name or plan.source}",
                            bad=[{"key": r["key"], "where": r["where"], "error": r["error"]} for r in bad],
                            summary_lines=lines)
        summary["gallery"] = str(index)
        print(f"gallery: {index} ({len(entries)} images, {-(-len(entries) // PER_PAGE) or 1} pages)")

    for note in summary["notes"][:NOTES_SHOWN]:
        print(f"note: {note}")
    if len(summary["notes"]) > NOTES_SHOWN:
        print(f"note: ... and {len(summary['notes']) - NOTES_SHOWN} more notes (--gallery shows every image's)")
    print(f"done: {summary['restored']} restored, {summary['already_done']} already done, {summary['bad']} bad"
          + (f", {sum(all_redo.values())} redone" if all_redo else "")
          + (f", {len(plan.ignored)} non-image files ignored" if plan.ignored else "") + ", "
          f"{elapsed:.1f}s, {summary['img_per_s'] or 0:.2f} img/s end to end"
          + (f"; steady {steady['img_s']:.2f} img/s ({steady['images']} images after the first batch, "
             f"{steady['span_s']:.2f} s)" if steady else ""))
    for name, w in summary["workers"].items():
        print(f"  worker {name}: {w['images']} images, {w['busy_s']:.2f}s in the model, "
              f"{w['img_per_s'] or 0:.2f} img/s"
              + (f"; graphs {w['graphs_compiled']} compiled, {w['graphs_cached']} from the compile cache"
                 if args.compile != "off" else ""))
        split = w["after_first_batch"]
        if split:
            print(f"    after its first batch ({split['images']} images in {split['span_s']:.2f} s, "
                  f"{split['img_s']:.2f} img/s): in the model {split['model']:.0%}, in the rest "
                  f"of its calls {split['calls_other']:.0%}, outside its calls {split['outside_calls']:.0%} "
                  f"(Ray's batching and hand-off, or waiting for input)")
    return summary


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m restore.batch_infer", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--shards", help="a packed split dir (manifest.json + tars), e.g. data/shards/test")
    src.add_argument("--images", help="a folder of scans: any format Pillow reads (PNG, JPEG, TIFF, WebP, BMP, ...), "
                                      "8- or 16-bit, gray, palette or color (converted to luma); the key is the file "
                                      "name without its suffix; masks are detected on the fly unless --masks has one")
    p.add_argument("--recursive", action="store_true",
                   help="--images: also restore the subfolders' images, the tree mirrored in --png-dir and the zip "
                        "(key box1/scan_0001 -> PNG_DIR/box1/scan_0001.png)")
    p.add_argument("--masks", metavar="DIR",
                   help="--images: user masks, one per image with the same name (same relative path with "
                        "--recursive), any suffix; white (> 127) = damaged, as in LaMa and IOPaint. Images without a "
                        "mask get the detector")
    p.add_argument("--mask-dilate", type=int, default=DEFAULT_MASK_DILATE, metavar="N",
                   help=f"grow each user mask by N pixels so no seam of the scratch's edge shows (default "
                        f"{DEFAULT_MASK_DILATE}; 0: as drawn). Detected masks are used as found")
    p.add_argument("--gallery", nargs="?", const="auto", metavar="DIR",
                   help="write an HTML contact sheet to page through: before (mask outlined) | after, with each "
                        "image's notes (default DIR: OUTSTEM_gallery/ beside the zip, else PNGDIR_gallery/)")
    p.add_argument("--checkpoint", action="append",
                   help="checkpoint file or run dir (best.pt, else latest); repeat to average several models. "
                        "Default: the newest run under --runs-dir")
    p.add_argument("--runs-dir", default="runs", help="where to look for the newest run (default: ./runs)")
    p.add_argument("--out", default="submission.zip", help="the zip to build (default: submission.zip)")
    p.add_argument("--no-zip", dest="out", action="store_const", const="",
                   help="only write PNGs (an archive of millions needs no zip)")
    p.add_argument("--png-dir", help="where KEY.png files go (default: next to --out, OUTSTEM_png/)")
    p.add_argument("--workers", type=int, help="model actors (default: one per GPU, else 1)")
    p.add_argument("--gpus-per-worker", type=float, help="GPUs per actor (default: 1 if the cluster has GPUs, else 0)")
    p.add_argument("--cpus-per-worker", type=float,
                   help="CPUs per actor (default: 1 with GPUs; else all CPUs but one, split over the actors)")
    p.add_argument("--batch-size", type=int, default=None, help="images per model call (default: 32 GPU, 4 CPU)")
    p.add_argument("--address", help="join a running Ray cluster: auto, HOST:PORT or ray://HOST:10001")
    p.add_argument("--tta", action="store_true", help="also run the horizontally flipped image and average")
    p.add_argument("--no-composite", dest="composite", action="store_false",
                   help="keep the raw prediction outside the hole (default: re-impose the known luminance)")
    p.add_argument("--compile", default="off", choices=COMPILE_MODES,
                   help="torch.compile the model in each actor (default off). Costs minutes of compilation per "
                        "actor at start-up, so it is for large sets; reduce-overhead adds CUDA graphs. Each actor "
                        "runs one static batch shape (the last batch is padded)")
    p.add_argument("--compile-cache", default="auto",
                   help="with --compile: a folder of compiled graphs each actor loads instead of compiling, and adds "
                        "to when it compiles something new (default auto: RUN/compile_cache/inference of the first "
                        "checkpoint's run; off: none). Across nodes it must be on a filesystem every node sees")
    p.add_argument("--png-compression", default="fast", choices=sorted(schema.PNG_COMPRESSION),
                   help="PNG writer (default fast: ~4 ms of CPU per 512x512 image; none: ~2 ms, 2.2x larger files; "
                        "small: libpng's adaptive filters, ~20x slower than fast, 7-15%% smaller)")
    p.add_argument("--work-size", type=int, default=DEFAULT_WORK_SIZE,
                   help=f"large images: the long side, in pixels, of the crops inpainted around the holes and of the "
                        f"image colorized (default {DEFAULT_WORK_SIZE}; changes pixels)")
    p.add_argument("--large-above", type=float, default=DEFAULT_LARGE_ABOVE_MP, metavar="MP",
                   help=f"images with more megapixels are restored in bounded memory: stage 1 on crops around the "
                        f"holes, stage 2 at --work-size with its chroma laid on the full-size luma (default "
                        f"{DEFAULT_LARGE_ABOVE_MP:g}; inf: never, 0: always; changes pixels)")
    p.add_argument("--precision", default="auto", choices=PRECISIONS,
                   help="the model's arithmetic (default auto: bf16 on GPUs with native bf16, fp16 on older GPUs, "
                        "fp32 on a CPU, restore.precision; changes pixels slightly)")
    p.add_argument("--score", action="store_true", help="score against the shards' gt (DACON score and its terms)")
    p.add_argument("--skip-bad", action="store_true",
                   help="restore the rest when inputs are bad; list them (key, file, why) in this job's bad list: "
                        "OUTSTEM.bad.json beside the zip, else PNG_DIR/SOURCE-HASH.bad.json")
    p.add_argument("--bad-list", metavar="PATH", help="where this job lists its bad inputs (default: see --skip-bad)")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if not args.out and not args.png_dir:
        print("error: --no-zip needs --png-dir", file=sys.stderr)
        return EXIT_BAD_INPUT
    if args.batch_size is None:
        import torch

        args.batch_size = 32 if torch.cuda.is_available() else 4
    if args.batch_size < 1 or (args.workers is not None and args.workers < 1):
        print("error: --batch-size and --workers must be >= 1", file=sys.stderr)
        return EXIT_BAD_INPUT
    if args.work_size < 64:
        print(f"error: --work-size must be >= 64 pixels, got {args.work_size}", file=sys.stderr)
        return EXIT_BAD_INPUT
    if not args.large_above >= 0:  # NaN too
        print(f"error: --large-above must be >= 0 megapixels (inf: never), got {args.large_above:g}", file=sys.stderr)
        return EXIT_BAD_INPUT
    if args.mask_dilate < 0:
        print(f"error: --mask-dilate must be >= 0 pixels, got {args.mask_dilate}", file=sys.stderr)
        return EXIT_BAD_INPUT
    try:
        run(args)
    except BadInput as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except Exception as exc:  # a bug or an environment failure (a full disk, Ray dying): the trace helps
        traceback.print_exc()
        print(f"error: internal failure ({type(exc).__name__}: {exc}); finished PNGs are kept and recorded, a rerun "
              f"resumes", file=sys.stderr)
        return EXIT_INTERNAL
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())