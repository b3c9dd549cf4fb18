"""Training-loader throughput from shards, CPU only: samples/s per loader worker and workers needed per GPU.

    python bench/loader_throughput.py --shards SHARDS_DIR [--crop 512] [--batch 8] [--workers 0,1,2]
                                      [--gpu-img-s 105] [--headroom 1.5] [--json OUT.json]
    python bench/loader_throughput.py --shards SHARDS_DIR --tiny     # CI smoke: 32 px crops, a few batches

Three measurements on the same shards:
1. decode per sample (in memory, one process): the ground truth with PIL alone, the same with the project's
   ``shards.schema.decode_png`` (its own decoder for the project's PNGs, OpenCV for other 8-bit PNGs: what the
   loader uses when it re-masks), and the full ``shards.reader.decode_sample`` (input, mask and gt: the loader's
   path without re-masking);
2. augmentation per sample (crop, flip, PIL gray, new hole, damage) without decoding;
3. the real loader (``shards.pipeline.TrainBatches`` in a ``DataLoader``) end to end with W workers: samples/s and
   samples/s per worker (W = 0 means the main process does the work, i.e. one worker without IPC).
The last line is JSON. Workers needed = ceil(gpu_img_s * headroom / per-worker samples/s).
"""
from __future__ import annotations

import argparse
import io
import math
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from shards import pipeline  # noqa: E402
from shards.reader import decode_sample, shard_paths  # noqa: E402
from shards.schema import GT_EXT, decode_png  # noqa: E402
from report import emit  # noqa: E402  (bench/report.py, beside this script)


def raw_samples(urls: list[str], limit: int) -> list[dict]:
    import webdataset as wds

    ds = wds.DataPipeline(wds.SimpleShardList(urls), wds.tarfile_to_samples())
    out = []
    for raw in ds:
        out.append(raw)
        if len(out) >= limit:
            break
    return out


def per_sample_seconds(fn, items: list, min_time: float) -> tuple[float, float]:
    """(wall, CPU) seconds per call; CPU time is what a dedicated core would take (robust to a busy machine)."""
    n, t0, c0 = 0, time.perf_counter(), time.process_time()
    while True:
        for it in items:
            fn(it)
            n += 1
        if time.perf_counter() - t0 >= min_time:
            return (time.perf_counter() - t0) / n, (time.process_time() - c0) / n


def loader_rate(urls: list[str], augment: pipeline.Augment, batch: int, workers: int, batches: int) -> dict:
    import torch

    ds = pipeline.TrainBatches(urls, augment=augment, batch_size=batch, seed=0, epoch=0, rank=0, start=0,
                               steps=batches + 2 * max(1, workers), shuffle_buffer=8)
    loader = pipeline.train_loader(ds, workers, pin_memory=False)
    it = iter(loader)
    for _ in range(max(1, workers)):  # the first batch of each worker includes its start-up
        next(it)
    pids = [w.pid for w in getattr(it, "_workers", [])] or [os.getpid()]
    cpu0 = sum(_proc_cpu_seconds(p) for p in pids)
    t0 = time.perf_counter()
    n = 0
    for _ in range(batches):
        b = next(it)
        n += b["gt"].shape[0]
    dt = time.perf_counter() - t0
    cpu = sum(_proc_cpu_seconds(p) for p in pids) - cpu0  # the workers' CPU (or this process's with 0 workers)
    del it
    rate = n / dt
    # Workers run ahead (prefetch), so their CPU over the window can cover a few more samples than were consumed;
    # over many batches this error shrinks.
    # CPU time has clock-tick resolution (10 ms): a window shorter than a few ticks (--tiny) falls back to wall time.
    cpu_ms = cpu / n * 1e3 if cpu >= 0.05 else dt * max(1, workers) / n * 1e3
    return {"workers": workers, "samples_per_s": rate, "per_worker": rate / max(1, workers),
            "cpu_ms_per_sample": cpu_ms, "torch_threads": torch.get_num_threads()}


def _proc_cpu_seconds(pid: int) -> float:
    """utime + stime of a live process from /proc (Linux); 0 where unavailable."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, IndexError, ValueError):
        return 0.0





def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shards", type=Path, required=True, help="a packed dir (uses train/) or a split dir")
    ap.add_argument("--crop", type=int, default=512)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--workers", default="0,1,2", help="comma-separated loader worker counts to measure")
    ap.add_argument("--batches", type=int, default=12, help="timed batches per worker setting")
    ap.add_argument("--gpu-img-s", type=float, default=105.0,
                    help="training img/s per GPU to feed (issue 9: 105 img/s bf16+compile on an H100)")
    ap.add_argument("--headroom", type=float, default=1.5)
    ap.add_argument("--min-time", type=float, default=2.0, help="seconds per micro-benchmark")
    ap.add_argument("--tiny", action="store_true", help="smoke mode: 32 px crops, batch 2, 2 batches, short timers")
    ap.add_argument("--json", type=Path, help="also write the result here")
    args = ap.parse_args(argv)
    if args.tiny:
        args.crop, args.batch, args.batches, args.min_time, args.workers = 32, 2, 2, 0.05, "0,1"
    split = args.shards / "train" if (args.shards / "train").is_dir() else args.shards
    urls = [str(p) for p in shard_paths(split)]
    raws = raw_samples(urls, 16)
    if not raws:
        print(f"error: no samples in {split}", file=sys.stderr)
        return 2
    size = decode_png(raws[0][GT_EXT], "RGB").shape
    print(f"# loader bench: {len(urls)} shard(s) in {split}, images {size[1]}x{size[0]}, crop {args.crop}, "
          f"batch {args.batch}; {platform.processor() or platform.machine()}, {os.cpu_count()} cpu(s)")

    result: dict = {"date": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "host": platform.node(), "cpus": os.cpu_count(),
                    "image": list(size), "crop": args.crop, "batch": args.batch}
    timed = {
        "decode_gt_pil": per_sample_seconds(lambda r: np.asarray(Image.open(io.BytesIO(r[GT_EXT]))), raws,
                                            args.min_time),
        "decode_gt_project": per_sample_seconds(lambda r: decode_png(r[GT_EXT], "RGB"), raws, args.min_time),
        "decode_sample_all": per_sample_seconds(decode_sample, raws, args.min_time),
    }
    augment = pipeline.Augment(crop_size=args.crop)
    decoded = [dict(r, **{"__gt": decode_png(r[GT_EXT], "RGB")}) for r in raws]
    rng = np.random.default_rng(0)

    def augment_only(r):  # the loader's work after decoding: feed the decoded gt through a re-encoded-free path
        from shards.damage import apply_damage, random_fill, random_mask, to_gray

        gt = r["__gt"]
        c = args.crop
        top, left = rng.integers(0, gt.shape[0] - c + 1), rng.integers(0, gt.shape[1] - c + 1)
        crop = np.ascontiguousarray(gt[top:top + c, left:left + c][:, ::-1])
        gray = to_gray(crop)
        mask, _ = random_mask(rng, c, c)
        apply_damage(gray, mask, random_fill(rng))

    timed["augment_remask"] = per_sample_seconds(augment_only, decoded, args.min_time)
    timed["full_sample"] = per_sample_seconds(lambda r: augment(r, rng), raws, args.min_time)
    micro = {}
    for k, (wall, cpu) in timed.items():
        micro[f"{k}_ms"], micro[f"{k}_cpu_ms"] = wall * 1e3, cpu * 1e3
        print(f"{k:20s} {wall * 1e3:8.2f} ms/sample wall, {cpu * 1e3:8.2f} ms CPU "
              f"({1 / cpu:7.1f} samples/s per dedicated core)")
    result["per_sample"] = micro

    rates = []
    for w in [int(x) for x in args.workers.split(",") if x.strip()]:
        r = loader_rate(urls, augment, args.batch, w, args.batches)
        rates.append(r)
        print(f"loader workers={w}: {r['samples_per_s']:7.1f} samples/s total, {r['per_worker']:7.1f} per worker "
              f"(wall); {r['cpu_ms_per_sample']:.2f} ms CPU/sample = {1e3 / r['cpu_ms_per_sample']:.1f} samples/s "
              f"per dedicated core")
    result["loader"] = rates
    # Per worker on a core of its own: the end-to-end loader's CPU cost per sample (decode, augmentation,
    # re-masking, collation and IPC), the wall-clock figure on this machine is printed above.
    per_worker = max(1e3 / r["cpu_ms_per_sample"] for r in rates if r["workers"] >= 1) if any(
        r["workers"] >= 1 for r in rates) else 1e3 / rates[0]["cpu_ms_per_sample"]
    need = math.ceil(args.gpu_img_s * args.headroom / per_worker)
    result.update(per_worker_samples_s=per_worker, gpu_img_s=args.gpu_img_s, headroom=args.headroom,
                  workers_needed=need)
    print(f"samples/s per worker (dedicated core): {per_worker:.1f}; to feed {args.gpu_img_s:g} img/s per GPU x "
          f"{args.headroom:g} headroom: {need} workers per GPU")
    emit(result, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
