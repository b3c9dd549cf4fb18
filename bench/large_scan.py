"""Large scans: the bounded-memory path (``restore.large_image``) against the full-image path, side by side.

    python bench/large_scan.py                                  # CPU: 4000x3000 both models, both paths at 2000x1500
    python bench/large_scan.py --device cuda --megapixels 60    # one GPU: a 60 MP scan (8944x6708)
    python bench/large_scan.py --tiny                           # smoke: the test encoder at 800x600

Every run is a fresh process (so its peak RSS is its own): it builds the model (random init: speed and memory do
not depend on the weights), makes the scan (scikit-image's astronaut stretched to the size, one DACON-style hole of
1-13% of the area filled with a constant gray, and a 3 px scratch across the middle third, as a user mask would
give it) and restores it once, timed. Reported per run: seconds in the restore call, the process's peak RSS
(model and libraries included: what a machine must have), how much the restore call grew it, and on a GPU the peak
of allocated GPU memory. The parent watches each child's RSS and stops it above ``--memory-cap`` GiB (default 8,
the issue's budget for a 4000x3000 scan on a 2-core CPU) or after ``--time-cap`` seconds, and says so.

Paths, both through ``restore.engine.Engine`` as the CLI's actors run it: ``large`` is ``restore.large_image`` at
``--work-size`` (crops around the holes, colorized at the working size, chroma on the full luma); ``full`` is both
stages on the whole image (what every image got before), run at the sizes ``--full-sizes`` names. Models: ``demo``
is the CPU demo's (``tu-mobilenetv3_small_050``, decoder 64,32,16,16,8), ``b4`` the training default
(EfficientNet-B4, decoder 256..16, CBAM), ``tiny`` the tests' encoder.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
MODELS = {
    "tiny": {"encoder": "tu-test_efficientnet", "decoder_channels": [16, 8, 8, 8, 8], "cbam": False},
    "demo": {"encoder": "tu-mobilenetv3_small_050", "decoder_channels": [64, 32, 16, 16, 8]},
    "b4": {"encoder": "efficientnet-b4", "decoder_channels": [256, 128, 64, 32, 16]},
}
FILL = 40


def size_of(text: str) -> tuple[int, int]:
    """``WxH`` -> (height, width)."""
    w, h = text.lower().split("x")
    return int(h), int(w)


def size_for_megapixels(mp: float) -> tuple[int, int]:
    """(height, width) of a 4:3 scan of ``mp`` megapixels (60 -> 6708 x 8944)."""
    width = round(math.sqrt(mp * 1e6 * 4 / 3))
    return round(width * 3 / 4), width


def make_scan(height: int, width: int, seed: int = 0):
    """(damaged gray uint8 [H, W], mask uint8 [H, W]): a stretched photo, a DACON-style hole and a thin scratch."""
    import numpy as np
    from PIL import Image
    from skimage import data

    from shards.damage import random_mask

    photo = Image.fromarray(data.astronaut()).convert("L").resize((width, height), Image.BILINEAR)
    gray = np.array(photo)
    del photo
    rng = np.random.default_rng(seed)
    mask, _shape = random_mask(rng, height, width, area_range=(0.01, 0.13))
    mask = mask.astype(np.uint8)
    xs = np.arange(width // 3, 2 * width // 3)
    ys = (height * 0.3 + (xs - width // 3) * 0.25).astype(int)
    for dy in (-1, 0, 1):
        mask[np.clip(ys + dy, 0, height - 1), xs] = 1
    gray[mask != 0] = FILL
    return gray, mask


def child(spec: dict) -> dict:
    """One measured run in this (fresh) process."""
    import resource

    import numpy as np
    import torch

    from restore.model import ModelSpec, build_model, inference_checkpoint

    if spec["threads"]:
        torch.set_num_threads(spec["threads"])
    device = torch.device(spec["device"])
    torch.manual_seed(0)
    model = build_model(ModelSpec(**MODELS[spec["model"]]))
    height, width = spec["height"], spec["width"]
    gray, mask = make_scan(height, width)

    from restore.engine import Engine

    with tempfile.TemporaryDirectory() as tmp:
        ckpt = Path(tmp) / "model.pt"
        torch.save(inference_checkpoint(model), ckpt)
        del model
        # The engine the CLI's actors run (precision auto: bf16 on a recent GPU, fp32 on a CPU), on the large path
        # for every image or for none.
        engine = Engine([ckpt], device=str(device), batch_size=1, work_size=spec["work_size"],
                        large_above=0.0 if spec["path"] == "large" else float("inf"), large_log=lambda line: None)

    def restore():
        return engine.restore(gray[None], mask[None])[0]

    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    rgb = restore()
    if device.type == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    from PIL import Image

    luma = np.asarray(Image.fromarray(rgb).convert("L"))
    known = mask == 0
    result = {"seconds": round(seconds, 2), "peak_rss_gib": round(peak / 2**20, 3),
              "grew_gib": round((peak - before) / 2**20, 3), "shape": list(rgb.shape),
              "known_luma_exact": bool((luma[known] == gray[known]).all()),
              "hole_pixels": int((~known).sum())}
    if device.type == "cuda":
        result["gpu_peak_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 3)
    if spec["path"] == "large":
        result["detail"] = engine.large.last
    return result


def _rss_gib(pid: int) -> float:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 2**20
    except OSError:
        pass
    return 0.0


def measure(spec: dict, memory_cap_gib: float, time_cap_s: float) -> dict:
    """Runs ``child(spec)`` in a fresh process, stopped above the memory cap or after the time cap."""
    with tempfile.NamedTemporaryFile("r", suffix=".json") as out:
        cmd = [sys.executable, __file__, "--child", json.dumps({**spec, "out": out.name})]
        proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        start, seen, stopped = time.perf_counter(), 0.0, ""
        while proc.poll() is None:
            seen = max(seen, _rss_gib(proc.pid))
            if seen > memory_cap_gib:
                stopped = f"stopped above {memory_cap_gib:g} GiB"
            elif time.perf_counter() - start > time_cap_s:
                stopped = f"stopped after {time_cap_s:g} s"
            if stopped:
                proc.kill()
                proc.wait()
                break
            time.sleep(0.05)
        stderr = proc.stderr.read()
        if stopped:
            return {"status": stopped, "peak_rss_gib": round(seen, 3)}
        if proc.returncode != 0:
            tail = stderr.strip().splitlines()[-1:] or ["?"]
            return {"status": f"failed (exit {proc.returncode}): {tail[0][:200]}", "peak_rss_gib": round(seen, 3)}
        return {"status": "ok", **json.loads(Path(out.name).read_text())}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--child", help=argparse.SUPPRESS)
    p.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    p.add_argument("--sizes", default="4000x3000", help="comma-separated WxH for the large path (default 4000x3000)")
    p.add_argument("--megapixels", type=float, help="instead of --sizes: one 4:3 scan of this many megapixels")
    p.add_argument("--full-sizes", default="2000x1500,4000x3000",
                   help="sizes at which the full-image path runs too (default 2000x1500,4000x3000; '' for none)")
    p.add_argument("--models", default="demo,b4", help=f"comma-separated, of {', '.join(MODELS)} (default demo,b4)")
    p.add_argument("--work-size", type=int, default=768, help="the engine's --work-size (default 768)")
    p.add_argument("--threads", type=int, default=0, help="torch threads (default: torch's own)")
    p.add_argument("--memory-cap", type=float, default=8.0, help="GiB of RSS before a run is stopped (default 8)")
    p.add_argument("--time-cap", type=float, default=600.0, help="seconds before a run is stopped (default 600)")
    p.add_argument("--tiny", action="store_true", help="smoke run: the tiny model at 800x600, both paths")
    p.add_argument("--json", help="also write the rows here")
    args = p.parse_args(argv)

    if args.child:
        spec = json.loads(args.child)
        Path(spec["out"]).write_text(json.dumps(child(spec)))
        return 0
    if args.tiny:
        args.models, args.sizes, args.full_sizes, args.work_size = "tiny", "800x600", "800x600", 256
    sizes = [size_for_megapixels(args.megapixels)] if args.megapixels else [size_of(s) for s in args.sizes.split(",")]
    full_sizes = [size_of(s) for s in args.full_sizes.split(",") if s]
    runs = [("large", size) for size in sizes]
    runs += [(path, size) for size in full_sizes for path in ("large", "full") if (path, size) not in runs]
    runs.sort(key=lambda r: (r[1][0] * r[1][1], r[0] != "large"))
    import torch

    print(f"torch {torch.__version__}, {os.cpu_count()} CPUs, threads {args.threads or torch.get_num_threads()}, "
          f"device {args.device}" + (f" ({torch.cuda.get_device_name()})" if args.device == "cuda" else "")
          + f", work size {args.work_size}, caps {args.memory_cap:g} GiB / {args.time_cap:g} s", flush=True)
    rows = []
    header = (f"{'path':<6} {'model':<5} {'size':>10} {'MP':>5} {'seconds':>8} {'peak RSS':>9} {'grew':>7} "
              f"{'GPU peak':>9}  status")
    print(header, flush=True)
    for model in args.models.split(","):
        for path, (height, width) in runs:
            spec = {"path": path, "model": model, "height": height, "width": width, "device": args.device,
                    "work_size": args.work_size, "threads": args.threads}
            result = measure(spec, args.memory_cap, args.time_cap)
            rows.append({**spec, **result})
            gpu = f"{result['gpu_peak_gib']:.2f} GiB" if "gpu_peak_gib" in result else "-"
            seconds = f"{result['seconds']:.1f}" if "seconds" in result else "-"
            grew = f"{result['grew_gib']:.2f}" if "grew_gib" in result else "-"
            status = result["status"]
            if status == "ok" and not result["known_luma_exact"]:
                status = "ok, BUT the luma outside the holes changed"
            if "detail" in result:
                d = result["detail"]
                status += (f"; {d['groups']} hole groups, {d['crops']} crops ({d['shrunk_crops']} shrunk): inpaint "
                           f"{d['inpaint_s']:.1f} s, colorize {d['colorize_s']:.1f} s, compose {d['compose_s']:.1f} s")
            print(f"{path:<6} {model:<5} {f'{width}x{height}':>10} {height * width / 1e6:>5.1f} {seconds:>8} "
                  f"{result['peak_rss_gib']:>5.2f} GiB {grew:>7} {gpu:>9}  {status}", flush=True)
    for model in args.models.split(","):
        for height, width in full_sizes:
            pair = {r["path"]: r for r in rows if r["model"] == model and (r["height"], r["width"]) == (height, width)}
            if all(pair.get(k, {}).get("status") == "ok" for k in ("large", "full")):
                large, full = pair["large"], pair["full"]
                print(f"{model} at {width}x{height}: large path {large['seconds']:.1f} s vs full "
                      f"{full['seconds']:.1f} s ({full['seconds'] / large['seconds']:.1f}x), peak RSS "
                      f"{large['peak_rss_gib']:.2f} vs {full['peak_rss_gib']:.2f} GiB")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
