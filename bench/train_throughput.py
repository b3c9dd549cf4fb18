"""Training throughput of both stages: the seed recipe vs the project default, side by side in one run.

    python bench/train_throughput.py --shards SHARDS_DIR [--size 512] [--steps 30] [--warmup 8] [--workers 8]
                                     [--encoder efficientnet-b4] [--json OUT.json]
    python bench/train_throughput.py --tiny [--shards SHARDS_DIR]     # CPU smoke: test encoder, 64 px, 3 steps
    python bench/train_throughput.py --variant b16=default,batch=16 --recipes seed,default,b16   # extra recipes
    python bench/train_throughput.py --sources synthetic --recipes default --profile-steps 5       # + kernel profile
    python bench/train_throughput.py --variant pad=default,smp_padding=1,compile=0 \
        --variant eager=default,compile=0 --recipes pad,eager       # smp's ZeroPad2d copies vs padding in the convs

Recipes (same model: two U-Net++ stages with CBAM, trained jointly with the job's losses):
  seed     fp32, eager, contiguous (NCHW), AdamW (foreach), batch 8, the encoder as smp builds it (a ZeroPad2d copy
           before each padded conv; the project's models pad inside the stride-1 convs, the same function)
  default  the job's speed settings for a long run: precision auto (bf16 autocast on GPUs that have it),
           channels_last, fused AdamW (CUDA), torch.compile (CUDA), at batch 32, the setting docs/training.md gives
           for a GPU of 40 GB or more (``batch_size=32 lr=4e-4``; the job's own default batch is the seed's 8, as a
           larger batch is a recipe change: bench/recipe_quality.py). ``--variant b16=default,batch=16`` for less.
Sources: ``synthetic`` (one pre-made batch on the device: the GPU's speed alone) and ``shards`` (the project's
loader, ``shards.pipeline.TrainBatches``, with --workers processes, pinned memory, non-blocking copies).
Reported per recipe and source: img/s per GPU, step time, peak memory, GPU utilisation (when NVML is available),
time of the warm-up steps (includes compilation), and the default/seed img/s ratio. The last line is JSON.
"""
from __future__ import annotations

import argparse
import platform
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from job.step import AUTOCAST_DTYPE, StageLoss, batch_to_device, resolve_precision  # noqa: E402
from restore.losses import Stage1Loss, Stage2Loss  # noqa: E402
from restore.model import ModelSpec, build_model, unfold_same_padding  # noqa: E402
from shards import pipeline  # noqa: E402
from shards.damage import apply_damage, random_fill, random_mask, to_gray  # noqa: E402
from report import emit, op_profile, print_op_profile  # noqa: E402  (bench/report.py, beside this script)


def recipes(device: torch.device, tiny: bool) -> dict[str, dict]:
    cuda = device.type == "cuda"
    scale = 4 if tiny else 1  # tiny CPU mode: a quarter of the seed's batch, and 4 for the default (CPU seconds)
    return {
        "seed": dict(precision="fp32", channels_last=False, fused=False, compile=False, batch=8 // scale,
                     compile_mode="default", smp_padding=True),  # the model exactly as smp builds it
        "default": dict(precision=resolve_precision("auto", device), channels_last=True, fused=cuda, compile=cuda,
                        batch=4 if tiny else 32, compile_mode="default", smp_padding=False),
    }


def parse_variant(text: str, base_recipes: dict[str, dict]) -> tuple[str, dict]:
    """``NAME=BASE,key=value,...`` -> (NAME, BASE's recipe with those keys changed); values typed like BASE's."""
    head, _, rest = text.partition(",")
    name, eq, base = head.partition("=")
    if not eq or base not in base_recipes:
        raise SystemExit(f"--variant {text!r}: expected NAME=BASE,KEY=VALUE,... with BASE in {sorted(base_recipes)}")
    recipe = dict(base_recipes[base])
    for item in filter(None, rest.split(",")):
        key, eq, value = item.partition("=")
        if not eq or key not in recipe:
            raise SystemExit(f"--variant {text!r}: {item!r} is not KEY=VALUE with KEY in {sorted(recipe)}")
        old = recipe[key]
        if isinstance(old, bool):
            if value.lower() not in ("1", "0", "true", "false", "on", "off"):
                raise SystemExit(f"--variant {text!r}: {key} takes 1/0, got {value!r}")
            recipe[key] = value.lower() in ("1", "true", "on")
        elif isinstance(old, int):
            recipe[key] = int(value)
        else:
            recipe[key] = value
    return name, recipe


def synthetic_batch(batch: int, size: int, seed: int = 0) -> dict[str, torch.Tensor]:
    """A loader-shaped uint8 batch: smooth random color images with real damage from ``shards.damage``."""
    rng = np.random.default_rng(seed)
    out = {"input": [], "mask": [], "gt": [], "gt_gray": []}
    yy, xx = np.mgrid[0:size, 0:size] / size
    for _ in range(batch):
        f, ph = rng.uniform(1, 6, 3), rng.uniform(0, 6.28, 3)
        gt = np.stack([127 + 100 * np.sin(f[c] * (xx + (c + 1) * yy) * 3.14 + ph[c]) for c in range(3)], -1)
        gt = gt.clip(0, 255).astype(np.uint8)
        gray = to_gray(gt)
        mask, _ = random_mask(rng, size, size)
        out["input"].append(apply_damage(gray, mask, random_fill(rng))[None])
        out["mask"].append(mask.astype(np.uint8)[None])
        out["gt"].append(gt)
        out["gt_gray"].append(gray[None])
    return {k: torch.from_numpy(np.stack(v)) for k, v in out.items()}


class GpuUtil:
    """Mean GPU utilisation over a window, sampled by NVML (torch.cuda.utilization) in a thread; None without it."""

    def __init__(self, device: torch.device) -> None:
        self.device, self.samples, self.stop = device, [], threading.Event()
        self.ok = device.type == "cuda"
        if self.ok:
            try:
                torch.cuda.utilization(device)
            except Exception:
                self.ok = False

    def __enter__(self):
        if self.ok:
            self.thread = threading.Thread(target=self._run, daemon=True)
            self.thread.start()
        return self

    def _run(self):
        while not self.stop.is_set():
            self.samples.append(torch.cuda.utilization(self.device))
            time.sleep(0.05)

    def __exit__(self, *exc):
        self.stop.set()
        if self.ok:
            self.thread.join()

    @property
    def mean(self) -> float | None:
        return float(np.mean(self.samples)) if self.samples else None


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run_one(name: str, recipe: dict, source: str, args, device: torch.device, spec: ModelSpec) -> dict:
    torch.manual_seed(0)
    model = build_model(spec)
    if recipe["smp_padding"]:  # smp's ZeroPad2d copies back, as the H100 figures of 2026-11-25 ran
        unfold_same_padding(model)
    model = model.to(device)
    if recipe["channels_last"]:
        model = model.to(memory_format=torch.channels_last)
    fused = recipe["fused"]
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=fused if fused else None)
    precision = recipe["precision"]
    dtype = AUTOCAST_DTYPE[precision]
    scaler = torch.amp.GradScaler(device.type, enabled=precision == "fp16")
    module = StageLoss(model, Stage1Loss(), Stage2Loss(), "joint")
    step_fn = torch.compile(module, mode=recipe["compile_mode"]) if recipe["compile"] else module
    batch = recipe["batch"]

    if source == "synthetic":
        fixed = synthetic_batch(batch, args.size)
        if device.type == "cuda":
            fixed = {k: v.pin_memory() for k, v in fixed.items()}
        batches = iter(lambda: fixed, None)
        loader = None
    else:
        augment = pipeline.Augment(crop_size=args.size)
        ds = pipeline.TrainBatches(args.urls, augment=augment, batch_size=batch, seed=0, epoch=0, rank=0, start=0,
                                   steps=args.warmup + args.steps, shuffle_buffer=16)
        loader = pipeline.train_loader(ds, args.workers, pin_memory=device.type == "cuda")
        batches = iter(loader)

    def step():
        b = batch_to_device(next(batches), device, recipe["channels_last"])
        with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
            total, _, _ = step_fn(b["input"], b["mask"], b["gt_gray"], b["gt"])
        scaler.scale(total).backward()
        scaler.step(opt)
        scaler.update()
        opt.zero_grad(set_to_none=True)
        return total

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    t0 = time.perf_counter()
    for _ in range(args.warmup):
        last = step()
    sync(device)
    warm_s = time.perf_counter() - t0
    with GpuUtil(device) as util:
        t0 = time.perf_counter()
        for _ in range(args.steps):
            last = step()
        sync(device)
        dt = time.perf_counter() - t0
    loss = float(last.detach())
    profile = None
    if args.profile_steps:
        from torch.profiler import ProfilerActivity, profile as torch_profile

        cuda = device.type == "cuda"
        with torch_profile(activities=[ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])) as prof:
            t0 = time.perf_counter()
            for _ in range(args.profile_steps):
                step()
            sync(device)
            profiled_s = time.perf_counter() - t0
        profile = op_profile(prof, cuda, args.profile_steps)
        # Device time against wall time of the same steps: the share of the step the GPU had work (the profiler's
        # own overhead lowers it a little).
        profile["wall_ms_per_unit"] = profiled_s / args.profile_steps * 1e3
    if loader is not None:
        del batches
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
    step_ms = dt / args.steps * 1e3
    return {"recipe": name, "source": source, "precision": precision, "batch": batch,
            "channels_last": recipe["channels_last"], "fused_adamw": fused,
            "compile": recipe["compile"] and recipe["compile_mode"], "smp_padding": recipe["smp_padding"],
            "img_per_s": batch * args.steps / dt, "step_ms": step_ms, "peak_mem_gib": peak,
            "gpu_util": util.mean, "warmup_s": warm_s,
            "warmup_overhead_s": max(0.0, warm_s - args.warmup * step_ms / 1e3), "loss": loss, "profile": profile}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shards", type=Path, help="packed shards (train/ is read); without it only synthetic runs")
    ap.add_argument("--size", type=int, default=512)
    ap.add_argument("--steps", type=int, default=30, help="timed steps per run")
    ap.add_argument("--warmup", type=int, default=8, help="untimed steps first (cudnn autotune, compilation)")
    ap.add_argument("--workers", type=int, default=8, help="loader workers for the shards source")
    ap.add_argument("--encoder", default="efficientnet-b4")
    ap.add_argument("--decoder-channels", default="256,128,64,32,16")
    ap.add_argument("--recipes", default="seed,default")
    ap.add_argument("--variant", action="append", default=[], metavar="NAME=BASE,KEY=VALUE,...",
                    help="an extra recipe: BASE (seed|default) with some keys changed, e.g. b32=default,batch=32 or "
                         "eager=default,compile=0; run it by naming it in --recipes")
    ap.add_argument("--sources", default="synthetic,shards")
    ap.add_argument("--profile-steps", type=int, default=0,
                    help="after the timed steps, this many more under torch.profiler: the ops that take the step's "
                         "device time, kernels per step (is it launch-bound?)")
    ap.add_argument("--tiny", action="store_true", help="CPU smoke: timm test encoder, 64 px, 3 steps, batch 2/4")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args(argv)
    if args.tiny:
        args.size, args.steps, args.warmup, args.workers = 64, 3, 1, 0
        args.encoder, args.decoder_channels = "tu-test_efficientnet", "16,8,8,8,8"
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    dec = tuple(int(x) for x in args.decoder_channels.split(","))
    spec = ModelSpec(encoder=args.encoder, decoder_channels=dec, encoder_depth=len(dec))
    sources = [s for s in args.sources.split(",") if s]
    if "shards" in sources:
        if args.shards is None:
            sources.remove("shards")
            print("# no --shards: the loader source is skipped")
        else:
            from shards.reader import shard_paths

            split = args.shards / "train" if (args.shards / "train").is_dir() else args.shards
            args.urls = [str(p) for p in shard_paths(split)]
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                cwd=Path(__file__).parent).stdout.strip()
    except OSError:
        commit = "?"
    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU ({platform.machine()})"
    print(f"# train bench: {gpu}, torch {torch.__version__}, {args.encoder} x2 U-Net++, {args.size}px, "
          f"{args.steps} timed steps after {args.warmup} warm-up, commit {commit}")
    all_recipes = recipes(device, args.tiny)
    for text in args.variant:
        name, recipe = parse_variant(text, all_recipes)
        all_recipes[name] = recipe
    unknown = [r for r in args.recipes.split(",") if r and r not in all_recipes]
    if unknown:
        ap.error(f"--recipes names {unknown}, not among {sorted(all_recipes)} (define it with --variant)")
    rows = []
    for source in sources:
        for name in [r for r in args.recipes.split(",") if r]:
            row = run_one(name, all_recipes[name], source, args, device, spec)
            rows.append(row)
            mem = f"{row['peak_mem_gib']:.1f} GiB" if row["peak_mem_gib"] is not None else "n/a"
            util = f"{row['gpu_util']:.0f}%" if row["gpu_util"] is not None else "n/a"
            print(f"{source:9s} {name:8s} {row['precision']:4s} batch {row['batch']:3d} | {row['img_per_s']:8.2f} img/s"
                  f" | step {row['step_ms']:8.1f} ms | peak {mem} | util {util} | warm-up {row['warmup_s']:.1f}s",
                  flush=True)
            if row["profile"]:
                print(f"{source} {name}: {args.profile_steps} steps profiled, "
                      f"{row['profile']['wall_ms_per_unit']:.1f} ms wall per step;", end=" ")
                print_op_profile(row["profile"], "step")
    ratios = {}
    for source in sources:
        by = {r["recipe"]: r for r in rows if r["source"] == source}
        if "seed" in by and "default" in by:
            ratios[source] = by["default"]["img_per_s"] / by["seed"]["img_per_s"]
            print(f"ratio default/seed ({source}): {ratios[source]:.2f}x")
    result = {"date": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "device": gpu, "commit": commit, "size": args.size,
              "encoder": args.encoder, "rows": rows, "ratio": ratios}
    emit(result, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
