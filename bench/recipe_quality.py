"""Validation score per step: the seed recipe vs the project default, each trained by the real job, in one run.

    python bench/recipe_quality.py --shards SHARDS_DIR [--steps 400] [--val-every 100] [--json OUT.json]
    python bench/recipe_quality.py --tiny                      # CPU smoke: 2 gloo ranks, tiny model, 64 px

Both runs are ``python -m torch.distributed.run --standalone -m job.train`` on the same shards, seed (the job's 0, or
``seed=K`` among the extra overrides), schedule and validation split; only the speed settings differ:

  seed     precision=fp32 channels_last=false compile=off batch_size=--seed-batch (8)
  default  the job's own defaults (bf16 autocast, channels_last, torch.compile on CUDA) with batch_size=--batch (32)
           and lr=--default-lr (default: --lr scaled with the batch, --lr x --batch / --seed-batch: 4e-4)

Each run's ``metrics.jsonl`` gives the exact DACON validation score at every ``--val-every`` steps; the table puts
the two side by side per step, with the seconds since the run's launch (torchrun start and compilation included).
No shards given: bundled photos are packed first (as the demo does). The last line is JSON.

SIGTERM (e.g. from ``timeout``) stops the running job and waits for it: the job treats SIGTERM as a preemption
(finishes the step, writes a checkpoint), and a job left behind would hold the GPU while the next command starts.
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections import deque
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from report import emit  # noqa: E402  (bench/report.py, beside this script)


def recipe_overrides(name: str, batch: int, seed_batch: int) -> list[str]:
    if name == "seed":
        return ["precision=fp32", "channels_last=false", "compile=off", f"batch_size={seed_batch}"]
    return [f"batch_size={batch}"]  # precision, channels_last and compile stay the job's auto settings


def default_lr(args) -> float:
    """The default recipe's lr: as given, else the seed's scaled linearly with the batch (the docs' rule)."""
    return args.default_lr if args.default_lr else args.lr * args.batch / args.seed_batch


def pack_demo_shards(root: Path, crops_per_photo: int) -> Path:
    from launch.demo import write_demo_shards

    return write_demo_shards(root, crops_per_photo, seed=0)


def train(name: str, args, shards: Path, run_dir: Path, nproc: int) -> dict:
    overrides = [f"encoder={args.encoder}", f"decoder_channels={args.decoder_channels}", f"crop_size={args.size}",
                 f"max_steps={args.steps}", f"val_every={args.val_every}", f"warmup_steps={args.warmup_steps}",
                 f"num_workers={args.workers}", "resume=never", "patience=0",
                 f"lr={default_lr(args) if name == 'default' else args.lr}",
                 f"log_every={args.val_every}", *recipe_overrides(name, args.batch, args.seed_batch),
                 *args.extra]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}", "-m",
           "job.train", "--shards", str(shards), "--out", str(run_dir), *overrides]
    print("$ " + " ".join(cmd), flush=True)
    t0 = time.time()
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env=dict(os.environ, OMP_NUM_THREADS="1"))
    tail: deque[str] = deque(maxlen=60)  # the job's last lines, shown if it fails
    try:
        for line in proc.stdout:
            tail.append(line)
            if line.startswith("val step"):  # progress: the job's own validation lines
                print(f"  {name}: {line.rstrip()}", flush=True)
        proc.wait()
    finally:
        if proc.poll() is None:  # this script was stopped: stop the job too, and let it write its checkpoint
            proc.terminate()
            proc.wait()
    wall = time.time() - t0
    if proc.returncode != 0:
        sys.stdout.write("".join(tail))
        raise SystemExit(f"recipe_quality: the {name} run failed with exit code {proc.returncode}")
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    vals = {r["step"]: r["score"] for r in records if r["kind"] == "val"}
    rates = [r["img_per_s"] for r in records if r["kind"] == "train"]
    return {"recipe": name, "overrides": overrides, "wall_s": round(wall, 1), "val_score": vals,
            "img_per_s_last_interval": rates[-1] if rates else None,
            "val_time_s": {r["step"]: round(r["time"] - t0, 1) for r in records if r["kind"] == "val"}}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shards", type=Path, help="packed shards with train/ (and val/ or folds); default: demo photos")
    ap.add_argument("--steps", type=int, default=400)
    ap.add_argument("--val-every", type=int, default=100)
    ap.add_argument("--warmup-steps", type=int, default=50)
    ap.add_argument("--batch", type=int, default=32, help="the default recipe's per-GPU batch")
    ap.add_argument("--seed-batch", type=int, default=8, help="the seed recipe's batch")
    ap.add_argument("--lr", type=float, default=1e-4)
    ap.add_argument("--default-lr", type=float,
                    help="the default recipe's lr (default: --lr x --batch / --seed-batch, scaled with the batch)")
    ap.add_argument("--size", type=int, default=512)
    ap.add_argument("--encoder", default="efficientnet-b4")
    ap.add_argument("--decoder-channels", default="256,128,64,32,16")
    ap.add_argument("--workers", type=int, default=6)
    ap.add_argument("--recipes", default="seed,default")
    ap.add_argument("--crops-per-photo", type=int, default=16, help="without --shards: crops of each bundled photo")
    ap.add_argument("--tiny", action="store_true", help="CPU smoke: 2 gloo ranks, timm test encoder, 64 px, 4 steps")
    ap.add_argument("--json", type=Path)
    ap.add_argument("extra", nargs="*", help="more key=value overrides for both runs")
    args = ap.parse_args(argv)
    import torch

    signal.signal(signal.SIGTERM, lambda *_: sys.exit(128 + signal.SIGTERM))  # run the cleanup in train()
    on_gpu = torch.cuda.is_available() and not args.tiny
    nproc = 1 if on_gpu else 2
    if args.tiny:
        args.steps, args.val_every, args.warmup_steps, args.size, args.workers = 4, 2, 1, 64, 0
        args.batch, args.seed_batch = 4, 2
        args.encoder, args.decoder_channels, args.crops_per_photo = "tu-test_efficientnet", "16,8,8,8,8", 2
        args.extra = [*args.extra, "val_max_samples=4", "val_batch_size=2"]
    with tempfile.TemporaryDirectory(prefix="recipe_quality_") as tmp_name:
        tmp = Path(tmp_name)
        shards = args.shards or pack_demo_shards(tmp / "data", args.crops_per_photo)
        runs = [train(name, args, shards, tmp / f"run_{name}", nproc)
                for name in args.recipes.split(",") if name]
    device = torch.cuda.get_device_name() if on_gpu else "CPU (2 gloo ranks)"
    print(f"\nvalidation score (exact DACON metric) per step, {args.encoder}, {args.size}px, {device}")
    steps = sorted({s for r in runs for s in r["val_score"]})
    print(f"{'step':>6} " + " ".join(f"{r['recipe'] + ' score':>14} {'t (s)':>7}" for r in runs))
    for step in steps:
        cells = []
        for r in runs:
            score, t = r["val_score"].get(step), r["val_time_s"].get(step)
            cells.append(f"{score:14.4f} {t:7.1f}" if score is not None else f"{'-':>14} {'-':>7}")
        print(f"{step:>6} " + " ".join(cells))
    for r in runs:
        print(f"{r['recipe']:8s} wall {r['wall_s']:.0f}s (torchrun start, compile, validation included), "
              f"last interval {r['img_per_s_last_interval'] or float('nan'):.1f} img/s")
    result = {"date": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "device": device, "encoder": args.encoder,
              "size": args.size, "steps": args.steps, "runs": runs}
    emit(result, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
