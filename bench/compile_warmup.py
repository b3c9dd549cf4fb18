"""What a restarted training process pays to compile, side by side in one run: from scratch, with the node's own
inductor cache, and with the run's compile cache (``restore.compile_cache``) on a node whose inductor cache is empty.

    python bench/compile_warmup.py [--size 512] [--batch 16] [--encoder efficientnet-b4] [--json OUT]   # GPU
    python bench/compile_warmup.py --tiny          # CPU smoke: a two-conv model at 16 px (the orchestration only)

Each case is a child process, a fresh torch as after a requeue, that compiles the job's joint training step
(``job.step.StageLoss``: both stages and their losses) with ``bench/train_throughput.py``'s default recipe (bf16
autocast on GPUs that have it, channels_last, fused AdamW) on synthetic batches, and times its first step
(compilation plus one step) and then ``--steps`` more:
  cold    an empty TORCHINDUCTOR_CACHE_DIR and no compile cache: a job's first start. Its artifacts are saved.
  node    the same inductor dir as ``cold``: a restart on the same node (what inductor's local cache gives).
  loaded  an empty inductor dir plus the artifacts ``cold`` saved: a restart on another node with
          ``compile_cache=true`` (the job's default).
The last line is JSON.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH.parent))
sys.path.insert(0, str(BENCH))

CASES = ("cold", "node", "loaded")


def child(args) -> dict:
    """One case, in this process (TORCHINDUCTOR_CACHE_DIR was set by the parent before torch was imported)."""
    import torch

    from restore.compile_cache import CompileCache, counts

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    cache = CompileCache.for_device(args.artifacts, device) if args.child in ("cold", "loaded") else None
    loaded = cache.load() if args.child == "loaded" else []
    if args.tiny:
        first_s, step_ms = _toy_steps(args, torch)
    else:
        # The train bench's own default recipe (bf16 on GPUs that have it, channels_last, fused AdamW), compiled.
        from restore.model import ModelSpec
        from train_throughput import recipes, run_one

        if device.type == "cuda":
            torch.backends.cudnn.benchmark = True
        recipe = {**recipes(device, tiny=False)["default"], "compile": True, "batch": args.batch}
        dec = tuple(int(x) for x in args.decoder_channels.split(","))
        spec = ModelSpec(encoder=args.encoder, decoder_channels=dec, encoder_depth=len(dec))
        bench_args = argparse.Namespace(size=args.size, warmup=1, steps=args.steps, profile_steps=0)
        row = run_one("default", recipe, "synthetic", bench_args, device, spec)
        first_s, step_ms = row["warmup_s"], row["step_ms"]
    saved = cache.save() if args.child == "cold" else None
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU ({platform.machine()})"
    return {"case": args.child, "first_step_s": first_s, "step_ms": step_ms, **counts(), "loaded": loaded,
            "saved": saved, "device": name, "torch": torch.__version__}


def _toy_steps(args, torch) -> tuple[float, float]:
    """``--tiny``: a two-conv model's compiled training step; (first step s, then ms per step)."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3, padding=1), torch.nn.SiLU(),
                                torch.nn.Conv2d(4, 1, 3, padding=1))
    x, target = torch.rand(args.batch, 1, args.size, args.size), torch.rand(args.batch, 1, args.size, args.size)
    step_fn = torch.compile(lambda: (model(x) - target).abs().mean())
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)

    def step():
        step_fn().backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    t0 = time.perf_counter()
    step()
    first_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    for _ in range(args.steps):
        step()
    return first_s, (time.perf_counter() - t0) / max(1, args.steps) * 1e3


def run_case(case: str, inductor_dir: Path, artifacts: Path, argv: list[str]) -> dict:
    env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": str(inductor_dir)}
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, __file__, "--child", case, "--artifacts", str(artifacts), *argv],
                          env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"compile_warmup: case {case} failed (exit {proc.returncode}):\n{proc.stderr[-4000:]}")
    row = json.loads(proc.stdout.strip().splitlines()[-1])
    row["process_s"] = time.perf_counter() - t0  # with the imports and the model build
    return row


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size", type=int, default=512)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--steps", type=int, default=3, help="steps timed after the first (the step's own time)")
    ap.add_argument("--encoder", default="efficientnet-b4")
    ap.add_argument("--decoder-channels", default="256,128,64,32,16")
    ap.add_argument("--tiny", action="store_true", help="CPU smoke: a two-conv model, 16 px, batch 2")
    ap.add_argument("--json", type=Path)
    ap.add_argument("--child", choices=CASES, help=argparse.SUPPRESS)
    ap.add_argument("--artifacts", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.tiny:
        args.size, args.batch = 16, 2
    if args.child:
        print(json.dumps(child(args)))
        return 0

    from report import emit

    passed = ["--size", str(args.size), "--batch", str(args.batch), "--steps", str(args.steps), "--encoder",
              args.encoder, "--decoder-channels", args.decoder_channels] + (["--tiny"] if args.tiny else [])
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                cwd=BENCH).stdout.strip()
    except OSError:
        commit = "?"
    model = "two-conv toy model" if args.tiny else f"{args.encoder} x2 U-Net++ joint step"
    print(f"# compile warm-up: {model}, {args.size}px, batch {args.batch}, commit {commit}", flush=True)
    with tempfile.TemporaryDirectory(prefix="compile_warmup_") as tmp:
        tmp = Path(tmp)
        artifacts = tmp / "compile_cache"
        dirs = {"cold": tmp / "inductor_a", "node": tmp / "inductor_a", "loaded": tmp / "inductor_b"}
        rows = []
        for case in CASES:
            row = run_case(case, dirs[case], artifacts, passed)
            rows.append(row)
            print(f"{case:6s} | first step {row['first_step_s']:7.1f} s | then {row['step_ms']:8.1f} ms/step | "
                  f"graphs {row['graph_misses']} compiled, {row['graph_hits']} from cache | "
                  f"process {row['process_s']:.1f} s", flush=True)
            for line in row["loaded"] + [row["saved"]] * bool(row["saved"]):
                print(f"       {line}")
        artifact_mib = sum(p.stat().st_size for p in artifacts.glob("*.bin")) / 2**20
    by = {r["case"]: r for r in rows}
    compile_s = {c: max(0.0, by[c]["first_step_s"] - by[c]["step_ms"] / 1e3) for c in CASES}
    ratios = {f"cold/{c}": compile_s["cold"] / max(compile_s[c], 1e-9) for c in ("node", "loaded")}
    for c in ("node", "loaded"):
        print(f"compile time (first step minus one step) cold/{c}: {compile_s['cold']:.1f} / {compile_s[c]:.1f} s "
              f"= {ratios['cold/' + c]:.2f}x")
    emit({"date": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "device": rows[0]["device"], "torch": rows[0]["torch"],
          "commit": commit, "model": model, "size": args.size, "batch": args.batch, "rows": rows,
          "compile_s": compile_s, "artifact_mib": artifact_mib, "ratio": ratios}, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
