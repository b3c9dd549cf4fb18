"""Ray batch inference: restore a packed test set (or a folder of scans) and build the submission zip.

    python -m restore.batch_infer --shards data/shards/test --checkpoint runs/exp1 --out submission.zip
    python -m restore.batch_infer --images scans/ --out restored.zip --png-dir restored/ --skip-bad
    python -m restore.batch_infer --images archive/ --recursive --masks archive_masks/ --gallery --no-zip --png-dir out/
    python -m restore.batch_infer --shards archive/ --no-zip --png-dir out/ --compile default   # millions of images

This module is the command line and the job's order of work (plan, check, reuse, run, finish). The parts, each in
its own module:

    restore.inputs        planning (which keys, which read tasks) and the read stage: shards, image folders, masks
    restore.infer_checkpoints  which checkpoints, checked before Ray starts (a bad one is exit 2, naming the file)
    restore.engine        the checkpoints on one device: Engine.restore(gray, mask) -> rgb (no Ray)
    restore.ray_pipeline  Ray Data, streaming (a test set of millions never sits in memory): read tasks ->
                          RestoreWorker actors (the Engine) -> PNG writers -> the driver's progress bar
    restore.submission    the zip: temp name, verified, renamed
    restore.infer_summary the result: bad list, zip, score, gallery, rates, the report printed at the end
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
import sys
import time
import traceback
from collections import defaultdict
from pathlib import Path
from typing import Sequence

from restore.engine import COMPILE_MODES
from restore.precision import PRECISIONS
from restore.large_image import DEFAULT_LARGE_ABOVE_MP, DEFAULT_WORK_SIZE
from restore.infer_checkpoints import check_checkpoints, inference_cache_dir, resolve_checkpoints
from restore.infer_summary import finish, listing, steady_rate
from restore.inputs import BadInput, Plan, plan_images, plan_shards, remove_temp_files
from restore.ray_pipeline import run_pipeline
from shards import schema

EXIT_OK = 0
EXIT_BAD_INPUT = 2
EXIT_INTERNAL = 1
DEFAULT_MASK_DILATE = 3  # px a user mask is grown by (--mask-dilate): a scratch's soft edge leaves no seam


# ---------------------------------------------------------------------------------------------- the run (driver)
def default_png_dir(out: Path) -> Path:
    return out.with_name(out.stem + "_png")


def default_gallery_dir(out: Path | None, png_dir: Path) -> Path:
    """``--gallery`` without a folder: ``OUTSTEM_gallery/`` beside the zip, else ``PNGDIR_gallery/`` beside the PNGs."""
    return out.with_name(out.stem + "_gallery") if out is not None else png_dir.with_name(png_dir.name + "_gallery")


def pixel_options(args: argparse.Namespace, device: str) -> dict:
    """Every option that changes the pixels of every image, for the records (``restore.records``): a rerun with any
    of them different redoes the work. ``--mask-dilate`` (user-masked images only) and ``--work-size`` /
    ``--large-above`` (large images only) are recorded per image instead (``Records.reusable``). The device kind is
    one: ``--precision auto`` is bf16 or fp16 on a GPU, fp32 on a CPU."""
    return {"tta": bool(args.tta), "composite": bool(args.composite), "precision": args.precision,
            "bn_folded": args.compile != "off", "device": device}


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
        line += f"; ignored {len(plan.ignored)} non-image files ({listing(plan.ignored)})"
    if plan.unsearched_dirs:
        line += f"; {plan.unsearched_dirs} subfolders not searched (--recursive restores them)"
    print(line)
    if args.masks:
        print(f"masks: {len(plan.masked)} given in {args.masks} (grown {args.mask_dilate} px); "
              f"{len(plan.keys) - len(plan.masked)} images without one get the detector"
              + (f"; {len(plan.unused_masks)} masks match no image ({listing(plan.unused_masks)})"
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
    summary = finish(args, plan, rows, png_dir, out, time.perf_counter() - started, redo=redo,
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
        line += "; redo " + "; ".join(f"{len(keys)}: {reason} ({listing(keys, 3)})"
                                      for reason, keys in sorted(redo.items(), key=lambda kv: -len(kv[1])))
    print(line)
    return redo


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