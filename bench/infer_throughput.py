"""Batch inference img/s for ONE model worker end to end, against a plain single-process loop, in the same run.

    python bench/infer_throughput.py [--n 64] [--size 512] [--encoder efficientnet-b4] [--batch-size 16]
                                     [--shards DIR] [--checkpoint FILE] [--tta] [--json OUT]
    python bench/infer_throughput.py --tiny        # CPU smoke: 8 images of 64x64, timm's test encoder

Both paths do the same work on the same shards: read + decode the tar members, both stages (bf16 autocast and
channels_last on a GPU, via ``restore.engine.Engine``), luminance compositing, PNG encode and an atomic write
of ``KEY.png``:

- plain:  one process, ``shards.reader.iter_samples`` -> batches -> ``Engine.restore`` -> ``encode_png`` -> write,
          one stage after the other (what a user would write); the seconds of each stage are printed as a profile.
- ray:    ``python -m restore.batch_infer --workers 1 --no-zip`` in-process on a local Ray: read tasks, one model
          actor, PNG-writer tasks, all overlapping. ``--ray-actors 1,2`` runs it again with two actors sharing the
          GPU (``--gpus-per-worker 0.5``), so that one actor's host work overlaps the other's GPU work; each actor's
          time after its first batch is split into the model, the rest of its calls and outside its calls (waiting).

Then the CPU side alone, in CPU seconds of one core per image (robust to a busy machine): the read stage
(``inputs.read_item``: tar, input and mask decode, no gt), Ray building a block from those rows (the read
task's other cost) and the write stage (``encode_png`` + atomic write) for
each ``--png-compression`` setting, and the cores a GPU needs beside it at ``--target-img-s`` (default 500): what
bounds the end-to-end rate once the GPU is fast enough; and the model actor's cost of handing a batch of images to
Ray (one object per image vs the dense array it returns).

Reported per path: wall img/s (ray: including the actor's start-up, model load and first call; plain: excluding
the model load and one warm-up batch, printed separately), and steady img/s, what a long job sees: plain, images
after the first finished batch / time from it to the last; ray, the same from the actors' own clocks (the images of
the batches that ended after the first batch any actor finished / the time from it to the last batch's end, all
actors pooled on the wall clock). The driver's view of the Ray path (``arrivals``: batches as they reach the
driver) is printed too, but it overstates the rate at a few hundred images: the write stage hands batches back in
bursts. Without ``--checkpoint`` the model is randomly initialised (speed does not depend on the weights). No data
given: photos are generated and packed with the real ``python -m shards.pack photos``.
"""
from __future__ import annotations

import argparse
import itertools
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image
from skimage import data as skdata

from restore import batch_infer, infer_summary, inputs, ray_pipeline
from restore.engine import BENCHMARK_AFTER_CALLS, Engine
from shards import schema
from shards.reader import iter_samples, shard_paths
from report import op_profile, print_op_profile  # bench/report.py, beside this script

PHOTOS = ("astronaut", "coffee", "chelsea", "rocket")


def make_shards(root: Path, n: int, size: int) -> Path:
    """``n`` photo crops packed by the real CLI at ``size``; returns the split dir (``train/``, with gt)."""
    photos = root / "photos"
    photos.mkdir(parents=True)
    rng = np.random.default_rng(0)
    bases = [getattr(skdata, name)()[..., :3] for name in PHOTOS]
    for i in range(n):
        base = bases[i % len(bases)]
        h, w = base.shape[:2]
        side = int(min(h, w) * rng.uniform(0.5, 1.0))
        y, x = rng.integers(0, h - side + 1), rng.integers(0, w - side + 1)
        crop = base[y : y + side, x : x + side]
        Image.fromarray(crop[:, ::-1] if i % 2 else crop).save(photos / f"photo_{i:05d}.png")
    subprocess.run([sys.executable, "-m", "shards.pack", "photos", str(photos), str(root / "shards"), "--seed", "0",
                    "--size", str(size), "--shard-size", str(max(1, n // 4))], check=True, capture_output=True)
    return root / "shards" / "train"


def make_checkpoint(path: Path, encoder: str, decoder_channels: tuple[int, ...], cbam: bool) -> Path:
    import torch

    from restore.model import ModelSpec, build_model, inference_checkpoint

    torch.manual_seed(0)
    spec = ModelSpec(encoder=encoder, decoder_channels=decoder_channels, cbam=cbam)
    torch.save(inference_checkpoint(build_model(spec)), path)
    return path


def plain_loop(split: Path, checkpoint: Path, png_dir: Path, batch_size: int, tta: bool) -> dict:
    """The single-process baseline, with a per-stage profile (seconds per image)."""
    start = time.perf_counter()
    engine = Engine([checkpoint], tta=tta)
    first = next(iter_samples(shard_paths(split)))
    engine.restore(np.stack([first.input] * batch_size), np.stack([first.mask] * batch_size))  # warm-up
    engine.forward_passes = 0
    load_s = time.perf_counter() - start
    prof = {"read_decode": 0.0, "model": 0.0, "encode_write": 0.0}
    count = 0
    arrivals: list[tuple[float, int]] = []

    def flush(batch: list) -> None:
        t = time.perf_counter()
        rgb = engine.restore(np.stack([s.input for s in batch]), np.stack([s.mask for s in batch]))
        if engine.cuda:
            engine.torch.cuda.synchronize()
        prof["model"] += time.perf_counter() - t
        t = time.perf_counter()
        for sample, image in zip(batch, rgb):
            schema.atomic_write_bytes(png_dir / f"{sample.key}.png", schema.encode_png(image, "RGB"))
        prof["encode_write"] += time.perf_counter() - t
        arrivals.append((time.perf_counter(), len(batch)))

    start = time.perf_counter()
    batch: list = []
    samples = iter_samples(shard_paths(split), with_gt=False)
    while True:
        t = time.perf_counter()
        sample = next(samples, None)
        prof["read_decode"] += time.perf_counter() - t
        if sample is not None:
            batch.append(sample)
            count += 1
        if batch and (sample is None or len(batch) == batch_size):
            flush(batch)
            batch = []
        if sample is None:
            break
    wall = time.perf_counter() - start
    return {"images": count, "model_load_s": round(load_s, 3), "wall_s": round(wall, 3),
            "wall_img_s": count / wall, "steady_img_s": infer_summary.steady_rate(arrivals),
            "profile_s_per_img": {k: round(v / max(count, 1), 5) for k, v in prof.items()},
            "device": str(engine.device)}


def cpu_budget(split: Path, rgb_dir: Path, scratch: Path, target_img_s: float, max_images: int = 64) -> dict:
    """CPU seconds per image of the read stage and of each write setting; cores needed at ``target_img_s``.

    The write settings are timed on the first ``max_images`` restored images: ``small`` costs ~80 ms each, so all of
    a 1,024-image run would add minutes (seen on a GPU run that hit its time limit there)."""
    from ray.data._internal.delegating_block_builder import DelegatingBlockBuilder

    plan = inputs.plan_shards(split)
    start = time.process_time()
    rows = [row for item in plan.items for row in inputs.read_item(item, with_gt=False)]
    read_s = (time.process_time() - start) / len(rows)
    # What Ray Data does with the read task's rows (flat_map output) before they travel: build an Arrow block.
    start = time.process_time()
    for first in range(0, len(rows), 32):
        builder = DelegatingBlockBuilder()
        for row in rows[first:first + 32]:
            builder.add(row)
        builder.build()
    rows_to_block_s = (time.process_time() - start) / len(rows)
    images = [schema.decode_png(p.read_bytes(), "RGB") for p in sorted(rgb_dir.glob("*.png"))[:max_images]]
    scratch.mkdir(parents=True, exist_ok=True)
    out = {"read_cpu_s": read_s, "read_rows_to_block_cpu_s": rows_to_block_s, "write": {}}
    for setting in schema.PNG_COMPRESSION:
        start, size = time.process_time(), 0
        for i, image in enumerate(images):
            data = schema.encode_png(image, "RGB", setting)
            schema.atomic_write_bytes(scratch / f"{i}.png", data)
            size += len(data)
        write_s = (time.process_time() - start) / len(images)
        out["write"][setting] = {"write_cpu_s": write_s, "kib": size / len(images) / 1024,
                                 "cores_at_target": target_img_s * (read_s + rows_to_block_s + write_s)}
    out["target_img_s"] = target_img_s
    # The actor hands its images to Ray as a column; converting it into a block is the actor's CPU time, between
    # GPU batches. Object arrays (one ndarray per row) against the dense array the actor returns.
    from ray.data.block import BlockAccessor

    batch = images[:32]
    columns = {"object array": ray_pipeline._object_array(batch),
               "dense (actor default)": ray_pipeline._rgb_column(batch, list(range(len(batch))))}
    out["actor_output_ms_per_img"] = {}
    for name, column in columns.items():
        start = time.process_time()
        for _ in range(3):
            BlockAccessor.batch_to_block({"rgb": column})
        out["actor_output_ms_per_img"][name] = (time.process_time() - start) / 3 / len(batch) * 1e3
    return out


# Engine settings timed side by side on the model alone (uint8 in, both stages, compositing, uint8 RGB back on the host).
MODEL_VARIANTS = {
    "eager": {"cudnn_benchmark": False},  # the BatchNorms as trained (an eager engine's default)
    # eager with fp32 weights that autocast casts to bf16 on every call (the GPU engine before 2026-11-26)
    "castweights": {"cudnn_benchmark": False, "bf16_weights": False},
    "folded": {"cudnn_benchmark": False, "fuse_bn": True},  # eager with each BatchNorm folded into its conv
    "nchw": {"cudnn_benchmark": False, "channels_last": False},  # eager, contiguous NCHW (the CPU engine before)
    "benchmark": {},  # the engine's default: cuDNN's autotuner for recurring shapes
    "compile": {"compile": "default"},
    "cudagraphs": {"compile": "reduce-overhead"},
    "autotune": {"compile": "max-autotune-no-cudagraphs"},
}


def model_variants(checkpoint: Path, gray: np.ndarray, mask: np.ndarray, names: list[str], seconds: float,
                   backend: str, tta: bool = False) -> dict:
    """img/s of ``Engine.restore`` per variant on one batch; the first call (compilation) is timed apart."""
    import torch

    results: dict[str, dict] = {}
    reference = None
    for name in names:
        engine = Engine([checkpoint], tta=tta, batch_size=len(gray), compile_backend=backend,
                                    **MODEL_VARIANTS[name])
        if engine.cuda:
            torch.cuda.reset_peak_memory_stats()
        start = time.perf_counter()
        out = engine.restore(gray, mask)
        first_s = time.perf_counter() - start
        for _ in range(BENCHMARK_AFTER_CALLS):  # past the call that runs cuDNN's autotuner
            engine.restore(gray, mask)
        calls, start = 0, time.perf_counter()
        while calls < 2 or time.perf_counter() - start < seconds:
            engine.restore(gray, mask)  # returns host memory: the GPU work is finished
            calls += 1
        elapsed = time.perf_counter() - start
        reference = out if reference is None else reference
        results[name] = {
            "img_s": calls * len(gray) / elapsed, "ms_per_img": elapsed / (calls * len(gray)) * 1e3,
            "first_call_s": first_s, "peak_gib": torch.cuda.max_memory_allocated() / 2**30 if engine.cuda else None,
            "max_abs_diff_vs_first": int(np.abs(out.astype(np.int16) - reference).max()),
        }
        print(f"model {name}: {results[name]}", flush=True)
        del engine
    return results


def profile_engine(checkpoint: Path, gray: np.ndarray, mask: np.ndarray, calls: int, rows: int = 15,
                   tta: bool = False) -> dict:
    """torch.profiler over ``calls`` warm calls of the default engine: the ops that take the device's time."""
    from torch.profiler import ProfilerActivity, profile

    engine = Engine([checkpoint], tta=tta, batch_size=len(gray))
    for _ in range(BENCHMARK_AFTER_CALLS + 1):
        engine.restore(gray, mask)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if engine.cuda else [])
    with profile(activities=activities) as prof:
        for _ in range(calls):
            engine.restore(gray, mask)
    return op_profile(prof, engine.cuda, calls * len(gray), rows)


def ray_worker(split: Path, checkpoint: Path, png_dir: Path, batch_size: int, tta: bool,
               cpus_per_worker: float | None, actors: int = 1) -> dict:
    """``batch_infer.run`` with ``actors`` model actors sharing this machine's one GPU (``--gpus-per-worker 1/k``:
    one actor's host work overlaps another's GPU work), or on a CPU-only machine its CPUs less one."""
    import ray

    argv = ["--shards", str(split), "--checkpoint", str(checkpoint), "--no-zip", "--png-dir", str(png_dir),
            "--workers", str(actors), "--batch-size", str(batch_size)] + (["--tta"] if tta else [])
    gpus = ray.cluster_resources().get("GPU", 0)
    if gpus >= 1 and actors > 1:
        argv += ["--gpus-per-worker", f"{1 / actors:.6g}"]
    if cpus_per_worker:
        argv += ["--cpus-per-worker", str(cpus_per_worker)]
    elif gpus < 1 and actors > 1:  # CPU actors: the CPUs but one (for reading and writing), split between them
        argv += ["--cpus-per-worker", f"{(ray.cluster_resources()['CPU'] - 1) / actors:.6g}"]
    args = batch_infer.build_parser().parse_args(argv)
    start = time.perf_counter()
    summary = batch_infer.run(args)
    wall = time.perf_counter() - start
    workers = list(summary["workers"].values())
    steady = summary["steady"]  # the actors' own rate after the first batch, pooled
    return {"actors": actors, "images": summary["restored"], "wall_s": round(wall, 3),
            "wall_img_s": summary["restored"] / wall, "steady_img_s": steady["img_s"] if steady else None,
            "arrivals_img_s": summary["arrivals_img_per_s"],
            # one actor: its rate while in the model; several share a device, so their busy times overlap
            "model_busy_img_s": workers[0]["img_per_s"] if actors == 1 else None,
            "actor_after_first_batch": [w["after_first_batch"] for w in workers]}


def end_to_end(args: argparse.Namespace, split: Path, checkpoint: Path, tmp: Path) -> dict:
    """The plain loop and the Ray path (once per ``--ray-actors`` count) over the whole split, then the CPU budget."""
    import ray

    plain = plain_loop(split, checkpoint, tmp / "plain", args.batch_size, args.tta)
    print(f"plain: {plain}", flush=True)
    ray.init(address="local", num_cpus=os.cpu_count(), include_dashboard=False, logging_level="WARNING")
    runs = []
    try:
        for actors in args.ray_actors:
            runs.append(ray_worker(split, checkpoint, tmp / f"ray{actors}", args.batch_size, args.tta,
                                   args.cpus_per_worker, actors))
            print(f"ray x{actors}: {runs[-1]}", flush=True)
        # Inside the Ray session: Ray's block code needs it up.
        budget = cpu_budget(split, tmp / "plain", tmp / "budget", args.target_img_s, args.budget_images)
    finally:
        ray.shutdown()
    for run in runs:
        run["identical_pngs"] = sum((tmp / "plain" / p.name).read_bytes() == p.read_bytes()
                                    for p in (tmp / f"ray{run['actors']}").glob("*.png"))
        run["model_img_s"] = run["model_busy_img_s"]
    plain["model_img_s"] = 1.0 / plain["profile_s_per_img"]["model"] if plain["profile_s_per_img"]["model"] else None
    distributed = runs[0]
    return {
        "images": plain["images"], "plain": plain, "ray": distributed, "ray_runs": runs,
        "identical_pngs": distributed["identical_pngs"], "cpu_budget": budget,
        "ratio_wall": distributed["wall_img_s"] / plain["wall_img_s"],
        "ratio_steady": (distributed["steady_img_s"] / plain["steady_img_s"]
                         if distributed["steady_img_s"] and plain["steady_img_s"] else None),
    }


def print_model(result: dict) -> None:
    model = result["model"]
    first = next(iter(model.values()))
    print(f"\nmodel alone (Engine.restore, batch {result['batch_size']}, {result['device']}):")
    print(f"{'variant':<11} {'img/s':>9} {'ms/img':>8} {'ratio':>6} {'first call s':>13} {'peak GiB':>9} {'max diff':>9}")
    for name, r in model.items():
        peak = f"{r['peak_gib']:.1f}" if r["peak_gib"] is not None else "-"
        print(f"{name:<11} {r['img_s']:>9.2f} {r['ms_per_img']:>8.3f} {r['img_s'] / first['img_s']:>5.2f}x "
              f"{r['first_call_s']:>13.1f} {peak:>9} {r['max_abs_diff_vs_first']:>9}")
    if "profile" in result:
        print()
        print_op_profile(result["profile"], "img")


def print_end_to_end(result: dict, target_img_s: float) -> None:
    plain, budget = result["plain"], result["cpu_budget"]
    steady = f"{result['ratio_steady']:.2f}x" if result["ratio_steady"] else "n/a"
    print(f"\n{'path':<8} {'wall img/s':>11} {'steady img/s':>13} {'model img/s':>12} {'arrivals img/s':>15}")
    for name, r in [("plain", plain)] + [(f"ray x{r['actors']}", r) for r in result["ray_runs"]]:
        print(f"{name:<8} {r['wall_img_s']:>11.2f} {r['steady_img_s'] or float('nan'):>13.2f} "
              f"{r['model_img_s'] or float('nan'):>12.2f} {r.get('arrivals_img_s') or float('nan'):>15.2f}")
    for r in result["ray_runs"]:  # what bounds the Ray path: each actor busy in the model, or waiting on the rest
        for split in r["actor_after_first_batch"]:
            if split:
                print(f"ray x{r['actors']} actor after its first batch ({split['images']} images in "
                      f"{split['span_s']:.2f} s, {split['img_s']:.2f} img/s): model {split['model']:.1%}, rest of "
                      f"its calls {split['calls_other']:.1%}, outside its calls {split['outside_calls']:.1%}")
    print(f"ratio ray/plain: wall {result['ratio_wall']:.2f}x, steady {steady}; "
          f"{result['identical_pngs']}/{plain['images']} PNGs byte-identical; "
          f"plain profile s/img {plain['profile_s_per_img']}")
    print(f"\nCPU per image (one core): read {budget['read_cpu_s'] * 1e3:.2f} ms + Ray rows -> block "
          f"{budget['read_rows_to_block_cpu_s'] * 1e3:.2f} ms; cores per GPU at {target_img_s:g} img/s "
          f"= rate x (read + rows -> block + write):")
    for setting, w in budget["write"].items():
        print(f"  --png-compression {setting:<5}  write {w['write_cpu_s'] * 1e3:6.2f} ms  {w['kib']:6.0f} KiB  "
              f"cores {w['cores_at_target']:5.1f}")
    conv = budget["actor_output_ms_per_img"]
    print("actor output -> Ray block, CPU ms per image: "
          + ", ".join(f"{name} {ms:.3f}" for name, ms in conv.items())
          + f" ({conv['object array'] / max(conv['dense (actor default)'], 1e-9):.0f}x)")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--n", type=int, default=64)
    p.add_argument("--size", type=int, default=512)
    p.add_argument("--encoder", default="efficientnet-b4")
    p.add_argument("--decoder-channels", default="256,128,64,32,16")
    p.add_argument("--no-cbam", dest="cbam", action="store_false")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--shards", type=Path, help="an existing split dir instead of generated photos")
    p.add_argument("--checkpoint", type=Path, help="a real checkpoint instead of a random one")
    p.add_argument("--cpus-per-worker", type=float, help="passed to batch_infer (default: its own)")
    p.add_argument("--ray-actors", default="1",
                   help="model actors of the Ray path, comma-separated counts run one after the other (e.g. 1,2: "
                        "two actors sharing the GPU, so one's host work overlaps the other's GPU work)")
    p.add_argument("--tta", action="store_true")
    p.add_argument("--budget-images", type=int, default=64, help="images the CPU budget's write stage is timed on")
    p.add_argument("--target-img-s", type=float, default=500.0, help="GPU rate for the CPU-cores estimate")
    p.add_argument("--model-variants", default="eager,folded,benchmark",
                   help=f"engine settings timed on the model alone, comma-separated: {', '.join(MODEL_VARIANTS)}")
    p.add_argument("--model-seconds", type=float, default=10.0, help="timed seconds per model variant")
    p.add_argument("--compile-backend", default="inductor",
                   help="torch.compile backend of the compiled variants (aot_eager: trace only, for smoke runs)")
    p.add_argument("--profile", action="store_true", help="torch.profiler table of the default engine's ops")
    p.add_argument("--model-only", action="store_true",
                   help="only the model variants (and --profile): no plain loop, Ray run or CPU budget")
    p.add_argument("--tiny", action="store_true", help="CPU smoke: 8 images of 64x64, tiny encoder, batch 4")
    p.add_argument("--json", type=Path, help="also write the results here")
    args = p.parse_args(argv)
    if args.tiny:
        args.n, args.size, args.batch_size = 8, 64, 4
        args.encoder, args.decoder_channels, args.cbam = "tu-test_efficientnet", "16,8,8,8,8", False
        args.model_seconds = min(args.model_seconds, 1.0)
    try:
        args.ray_actors = [int(k) for k in args.ray_actors.split(",") if k]
    except ValueError:
        args.ray_actors = []
    if not args.ray_actors or min(args.ray_actors) < 1:
        p.error("--ray-actors: expected counts >= 1 separated by commas, e.g. 1,2")
    variants = [v for v in args.model_variants.split(",") if v]
    unknown = [v for v in variants if v not in MODEL_VARIANTS]
    if unknown or not variants:
        p.error(f"--model-variants: unknown {', '.join(unknown) or '(none given)'}; "
                f"choose from {', '.join(MODEL_VARIANTS)}")

    import torch

    with tempfile.TemporaryDirectory(prefix="infer_bench_") as tmp_name:
        tmp = Path(tmp_name)
        split = args.shards or make_shards(tmp / "data", args.n, args.size)
        checkpoint = args.checkpoint or make_checkpoint(
            tmp / "model.pt", args.encoder, tuple(int(c) for c in args.decoder_channels.split(",")), args.cbam)
        print(f"data {split}, checkpoint {checkpoint}, batch {args.batch_size}, "
              f"device {'cuda: ' + torch.cuda.get_device_name() if torch.cuda.is_available() else 'cpu'}, "
              f"{os.cpu_count()} CPUs", flush=True)

        samples = list(itertools.islice(iter_samples(shard_paths(split), with_gt=False), args.batch_size))
        samples = [samples[i % len(samples)] for i in range(args.batch_size)]
        gray, mask = np.stack([x.input for x in samples]), np.stack([x.mask for x in samples])
        result = {"size": args.size, "encoder": args.encoder, "batch_size": args.batch_size, "tta": args.tta,
                  "device": "cuda" if torch.cuda.is_available() else "cpu", "cpus": os.cpu_count(),
                  "model": model_variants(checkpoint, gray, mask, variants, args.model_seconds, args.compile_backend,
                                          args.tta)}
        if args.profile:
            result["profile"] = profile_engine(checkpoint, gray, mask, calls=3, tta=args.tta)
        if not args.model_only:
            result.update(end_to_end(args, split, checkpoint, tmp))
    print_model(result)
    if not args.model_only:
        print_end_to_end(result, args.target_img_s)
    if args.json:
        schema.atomic_write_json(args.json, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
