"""Ray batch inference: restore a packed test set (or a folder of damaged gray PNGs) and build the submission zip.

    python -m restore.batch_infer --shards data/shards/test --checkpoint runs/exp1 --out submission.zip
    python -m restore.batch_infer --images scans/ --out restored.zip --png-dir restored/ --skip-bad
    python -m restore.batch_infer --shards archive/ --no-zip --png-dir out/ --compile default   # millions of images

This module is the command line and the run's summary. The parts, each in its own module:

    restore.inputs        planning (which keys, which read tasks) and the read stage: shards, image folders, masks
    restore.engine        the checkpoints on one device: Engine.restore(gray, mask) -> rgb (no Ray)
    restore.ray_pipeline  Ray Data, streaming (a test set of millions never sits in memory): read tasks ->
                          RestoreWorker actors (the Engine) -> PNG writers -> the driver's progress bar
    restore.submission    the zip: temp name, verified, renamed

Exactly-once and resumable: each ``KEY.png`` is written to a temp name and renamed, so an existing ``KEY.png`` is
complete; a rerun skips those keys (their input is read only for its size), deletes leftover temp files, and the
zip is written to a temp name, verified (flat; names and count equal the manifest's keys; every entry decodes as RGB
of its input's size) and only then renamed to ``--out``.

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

Exit codes: 0 done (with ``--skip-bad`` possibly without the bad keys, listed in ``bad_keys.json``), 2 bad input
(missing/empty shards dir, corrupt sample, missing mask, missing or mismatched checkpoint, no run found),
1 an internal failure.
"""
from __future__ import annotations

from __future__ import annotations

import argparse
import sys
import time
from collections import defaultdict
from pathlib import Path
from typing import Any, Sequence

from restore.engine import COMPILE_MODES
from restore.large_image import DEFAULT_LARGE_ABOVE_MP, DEFAULT_WORK_SIZE
from restore.inputs import BAD, TODO, BadInput, Plan, finished_keys, plan_images, plan_shards, remove_temp_files
from restore.ray_pipeline import ACTOR_TIME_COLUMNS, SCORE_TERMS, run_pipeline
from restore.submission import build_zip
from shards import schema

EXIT_BAD_INPUT = 2
EXIT_INTERNAL = 1
BAD_KEYS_NAME = "bad_keys.json"


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


def check_checkpoints(paths: Sequence[Path]) -> list[dict]:
    """Load each checkpoint once in the driver so a missing or mismatched one fails before any Ray work starts."""
    from restore.model import load_restorer

    specs = []
    for path in paths:
        try:
            model, info = load_restorer(path, map_location="cpu")
        except (FileNotFoundError, ValueError, RuntimeError, KeyError) as exc:
            raise BadInput(f"checkpoint {path}: {exc}") from exc
        specs.append({"path": str(path), "spec": model.spec.to_dict(), "weights": info.get("weights_used")})
        del model
    return specs


# ---------------------------------------------------------------------------------------------- the run (driver)
def default_png_dir(out: Path) -> Path:
    return out.with_name(out.stem + "_png")


def run(args: argparse.Namespace) -> dict:
    """The whole job; returns the summary. Raises ``BadInput`` for the user's mistakes."""
    started = time.perf_counter()
    plan = plan_shards(args.shards) if args.shards else plan_images(args.images)
    if args.score and plan.kind != "shards":
        raise BadInput("--score needs --shards with gt members (a folder of images has no ground truth)")
    checkpoints = resolve_checkpoints(args.checkpoint, Path(args.runs_dir))
    specs = check_checkpoints(checkpoints)
    cache_dir = inference_cache_dir(args.compile_cache, checkpoints)  # checked even when unused: a typo is an error
    cache_dir = cache_dir if args.compile != "off" else None
    for s in specs:
        print(f"checkpoint: {s['path']} ({s['weights']} weights, encoder {s['spec']['encoder']}, "
              f"color_mode {s['spec']['color_mode']})")

    out = Path(args.out) if args.out else None
    png_dir = Path(args.png_dir) if args.png_dir else default_png_dir(out)
    if plan.kind == "images" and png_dir.resolve() == plan.source.resolve():
        raise BadInput(f"--png-dir {png_dir} is the input folder: KEY.png would overwrite the damaged inputs")
    png_dir.mkdir(parents=True, exist_ok=True)
    removed = remove_temp_files(png_dir)
    done = finished_keys(png_dir) & set(plan.keys)
    print(f"{plan.kind}: {plan.source}: {len(plan.keys)} images; {len(done)} already in {png_dir}"
          + (f"; removed {removed} leftover temp files" if removed else ""))
    for item in plan.items:
        item["done"] = [k for k in item["keys"] if k in done]

    rows, arrivals = run_pipeline(plan, checkpoints, args, png_dir=png_dir, cache_dir=cache_dir)
    summary = _finish(args, plan, rows, png_dir, out, time.perf_counter() - started)
    # The driver's view of the batches as they arrive: bursty (the writers hand batches back in groups), so the
    # steady rate is the actors' own, pooled (``summary["steady"]``); this one is kept for comparison.
    summary["arrivals_img_per_s"] = steady_rate(arrivals)
    return summary


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
            elapsed: float) -> dict:
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
    summary: dict[str, Any] = {
        "images": len(plan.keys), "restored": len(restored), "already_done": len(good) - len(restored),
        "bad": len(bad), "seconds": round(elapsed, 3),
        "img_per_s": round(len(restored) / elapsed, 3) if elapsed > 0 else None,
        "steady": steady,
        "workers": {w: {**v, "img_per_s": round(v["images"] / v["busy_s"], 3) if v["busy_s"] else None}
                    for w, v in sorted(per_worker.items())},
        "png_dir": str(png_dir), "zip": None,
        "notes": sorted({f"{by_key[k]['key']}: {by_key[k]['note']}" for k in good if by_key[k]["note"]}),
    }

    bad_path = (out.parent if out else png_dir) / BAD_KEYS_NAME
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
                   f"(see {BAD_KEYS_NAME})" if bad else f"restore.batch_infer: all {len(good)} images")
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

    for note in summary["notes"]:
        print(f"note: {note}")
    print(f"done: {summary['restored']} restored, {summary['already_done']} already done, {summary['bad']} bad, "
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
    src.add_argument("--images", help="a folder of damaged gray PNGs; masks are detected on the fly")
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
    p.add_argument("--score", action="store_true", help="score against the shards' gt (DACON score and its terms)")
    p.add_argument("--skip-bad", action="store_true",
                   help="restore the rest when inputs are bad; list them in bad_keys.json next to the zip")
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
    try:
        run(args)
    except BadInput as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    return 0


if __name__ == "__main__":
    sys.exit(main())