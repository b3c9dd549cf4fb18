"""The whole system end to end on an embedded default, in a few minutes on a 2-core CPU machine.

    python -m launch.demo [--out demo_out] [--gpus N]

photos that ship with scikit-image, scikit-learn and matplotlib (``shards.sample_photos``) -> crops with DACON-style
damage packed into WebDataset shards (``python -m shards.pack photos``; two photos held out whole for validation)
-> both stages trained briefly by the real DDP job under torchrun (``python -m job.train``; CPU: 2 gloo ranks, GPU:
one rank per GPU) -> Ray batch inference (``python -m restore.batch_infer``) -> a submission zip -> its DACON score
(``python -m restore.score``) next to two baselines scored the same way -> a picture grid (damaged input | stage 1 |
final color | ground truth).

Every stage runs the project's real command line in a subprocess, so the demo exercises what users run.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import NamedTuple, Sequence

import numpy as np
from PIL import Image

# The demo trains on these bundled photos (shards.sample_photos: scikit-image, scikit-learn, matplotlib; no download)
# and validates on other photos, never on other crops of a training photo.
TRAIN_PHOTOS = ("astronaut", "rocket", "motorcycle", "china", "flower", "grace_hopper")
VAL_PHOTOS = ("chelsea", "coffee")


def write_photo_crops(out_dir: Path, names: Sequence[str], crops_per_photo: int, seed: int) -> list[Path]:
    """Random square crops (40-100% of the short side, half mirrored) of each named bundled photo, as PNG."""
    from shards.sample_photos import load_photo, random_square_crops

    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for index, name in enumerate(names):
        rng = np.random.default_rng([seed, index])
        for number, crop in enumerate(random_square_crops(load_photo(name), crops_per_photo, rng)):
            path = out_dir / f"{name}_{number:02d}.png"
            Image.fromarray(crop).save(path)
            written.append(path)
    return written


def write_extra_photos(out_dir: Path, folders: Sequence[Path], crops_per_photo: int, seed: int) -> list[Path]:
    """The same crops of every photo in ``folders`` (any format Pillow reads, searched recursively)."""
    from shards.pack import list_photos, unique_keys
    from shards.sample_photos import random_square_crops

    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for folder_index, folder in enumerate(folders):
        photos = list_photos(Path(folder))
        # named by the path inside the folder: wallpaper packages keep every photo as .../images/2560x1600.jpg
        names = unique_keys([p.relative_to(folder).with_suffix("").as_posix().replace("/", "_") for p in photos])
        for index, (path, name) in enumerate(zip(photos, names)):
            with Image.open(path) as img:
                image = np.asarray(img.convert("RGB"))
            rng = np.random.default_rng([seed, 1000 + folder_index, index])
            for number, crop in enumerate(random_square_crops(image, crops_per_photo, rng)):
                target = out_dir / f"extra{folder_index}_{name}_{number:02d}.png"
                Image.fromarray(crop).save(target)
                written.append(target)
    return written


def pack_command(train_dir: Path, val_dir: Path, shards_dir: Path, n_photos: int, seed: int) -> list[str]:
    """``python -m shards.pack photos`` for the demo's crops at 512 px, the validation photos held out whole."""
    return [sys.executable, "-m", "shards.pack", "photos", str(train_dir), str(shards_dir), "--seed", str(seed),
            "--size", "512", "--val-dir", str(val_dir), "--shard-size", str(max(1, n_photos // 16))]


def run(cmd: list[str], log: Path, env: dict | None = None) -> None:
    """Run one stage, echoing its output to the terminal and to ``log``; stop the demo if it fails."""
    print(f"\n$ {' '.join(cmd)}", flush=True)
    with open(log, "ab") as log_file:
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env)
        assert proc.stdout is not None
        for line in proc.stdout:
            sys.stdout.buffer.write(line)
            sys.stdout.flush()
            log_file.write(line)
        code = proc.wait()
    if code != 0:
        raise SystemExit(f"demo: stage failed with exit code {code}: {' '.join(cmd)} (log: {log})")


def baseline_scores(val_dir: Path) -> dict[str, dict]:
    from restore import baselines
    from restore.score import score_image, summarize
    from shards.reader import iter_samples, shard_paths

    per_baseline: dict[str, list] = {name: [] for name in baselines.BASELINES}
    for sample in iter_samples(shard_paths(val_dir)):
        for name in baselines.BASELINES:
            pred = baselines.predict(name, sample.input, sample.mask)
            per_baseline[name].append(score_image(sample.gt, pred, sample.mask))
    return {name: summarize(scores) for name, scores in per_baseline.items()}


def label(image: np.ndarray, text: str) -> np.ndarray:
    import cv2

    image = np.ascontiguousarray(image.copy())
    cv2.putText(image, text, (8, 28), cv2.FONT_HERSHEY_SIMPLEX, 0.9, (0, 0, 0), 4, cv2.LINE_AA)
    cv2.putText(image, text, (8, 28), cv2.FONT_HERSHEY_SIMPLEX, 0.9, (255, 255, 255), 2, cv2.LINE_AA)
    return image


def picture_grid(val_dir: Path, run_dir: Path, pred_dir: Path, out_path: Path, rows: int) -> None:
    """One row per held-out image: damaged input | stage-1 gray | final color (the submitted PNG) | ground truth."""
    import torch

    from restore.model import load_restorer
    from shards.reader import iter_samples, shard_paths

    model, _ = load_restorer(run_dir, map_location="cpu")
    model.eval()
    lines = []
    for sample in iter_samples(shard_paths(val_dir)):
        if len(lines) == rows:
            break
        gray = torch.from_numpy(sample.input).float().div(255)[None, None]
        mask = torch.from_numpy(sample.mask).float()[None, None]
        with torch.no_grad():
            stage1 = model.inpaint(gray, mask)[0, 0].mul(255).round().clamp(0, 255).byte().numpy()
        final = np.asarray(Image.open(pred_dir / f"{sample.key}.png").convert("RGB"))
        to_rgb = lambda g: np.repeat(g[..., None], 3, axis=-1)  # noqa: E731
        lines.append(np.concatenate([
            label(to_rgb(sample.input), "damaged input"), label(to_rgb(stage1), "stage 1"),
            label(final, "final color"), label(sample.gt, "ground truth")], axis=1))
    Image.fromarray(np.concatenate(lines, axis=0)).save(out_path)


def gpu_batch(gpu_memory_gib: float) -> tuple[int, float]:
    """The demo's (batch size, lr) on a GPU with this much memory. Batch 8 leaves an H100 half idle in bf16 and batch
    16 wants the lr doubled (bench/RESULTS.md), but the demo's short run stays eager (compile=auto), where batch 16
    peaks at 28.0 GiB at 512 px and batch 8 at 14.3 GiB: a 24 GB card gets the job's default batch 8."""
    return (16, 2e-4) if gpu_memory_gib >= 32 else (8, 1e-4)


def write_demo_shards(out: Path, crops_per_photo: int, seed: int, extra_photos: Sequence[Path] = (),
                      log: Path | None = None) -> Path:
    """The demo's data: crops of the bundled training photos (+ ``extra_photos`` folders) in ``train/``, crops of
    the held-out photos in ``val/``, packed with DACON-style damage at 512 px into ``out/shards``."""
    train = write_photo_crops(out / "photos" / "train", TRAIN_PHOTOS, crops_per_photo, seed)
    train += write_extra_photos(out / "photos" / "train", extra_photos, crops_per_photo, seed)
    val = write_photo_crops(out / "photos" / "val", VAL_PHOTOS, crops_per_photo, seed)
    print(f"demo: {len(train)} training crops of {len(TRAIN_PHOTOS)} bundled photos"
          + (f" and the photos in {', '.join(map(str, extra_photos))}" if extra_photos else "")
          + f", {len(val)} validation crops of {len(VAL_PHOTOS)} other photos ({', '.join(VAL_PHOTOS)}), in "
          f"{out / 'photos'}", flush=True)
    shards_dir = out / "shards"
    cmd = pack_command(out / "photos" / "train", out / "photos" / "val", shards_dir, len(train) + len(val), seed)
    if log is None:
        subprocess.run(cmd, check=True, capture_output=True)
    else:
        run(cmd, log)
    return shards_dir


# The CPU recipe (2 gloo ranks, a few minutes), chosen on held-out real photos with bench/quality.py (bench/RESULTS.md):
# small crops and a light encoder and decoder; stage 1 starts from the harmonic fill and needs few steps of its own
# (stages=staged: 10% stage 1 alone, 90% stage 2 alone on the true gray, whose steps cost about half a joint step);
# lr 2e-3 for the short run; stage 2 colorizes the whole 512 px photo at 128 px (color_size), the scale of its
# training crops, and lays the chroma on the full-resolution luma. Six photos are memorized after a few hundred
# steps, so the validation pick (best.pt) matters: validation every CPU_STEPS // 8 steps.
CPU_RECIPE = ("batch_size=4", "crop_size=128", "num_workers=1", "precision=fp32", "lr=2e-3",
              "decoder_channels=64,32,16,16,8", "warmup_steps=20", "log_every=20", "stages=staged",
              "stage_split=0.1,0.9", "color_size=128")
CPU_STEPS, GPU_STEPS = 480, 1000


def validation_interval(steps: int) -> int:
    return max(steps // 8, 1)


def check_gpus(gpus: int) -> None:
    """Exit with one line when this machine has fewer CUDA GPUs than asked for."""
    import torch

    found = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if found < gpus:
        raise SystemExit(f"--gpus {gpus}: this machine has {found} CUDA GPU(s); use --gpus 0 (the CPU recipe) here")


class Recipe(NamedTuple):
    ranks: int  # torchrun processes: 2 gloo ranks on CPU, one per GPU
    steps: int
    encoder: str
    overrides: list[str]  # job.train key=value options (seed and resume are the caller's)


def training_recipe(gpus: int, steps: int | None = None, encoder: str | None = None) -> Recipe:
    """The demo's training: ``CPU_RECIPE`` on 2 gloo ranks, or on ``gpus`` GPUs EfficientNet-B4 at 512 px with the
    batch and lr of ``gpu_batch``; bench/quality.py trains the same way."""
    on_gpu = gpus > 0
    steps = steps or (GPU_STEPS if on_gpu else CPU_STEPS)
    encoder = encoder or ("efficientnet-b4" if on_gpu else "tu-mobilenetv3_small_050")
    overrides = [f"encoder={encoder}", f"max_steps={steps}", f"val_every={validation_interval(steps)}"]
    if not on_gpu:
        return Recipe(2, steps, encoder, overrides + list(CPU_RECIPE))
    import torch

    check_gpus(gpus)
    memory_gib = torch.cuda.get_device_properties(0).total_memory / 2**30
    batch, lr = gpu_batch(memory_gib)
    print(f"demo: {memory_gib:.0f} GiB per GPU: batch_size={batch} lr={lr:g}", flush=True)
    return Recipe(gpus, steps, encoder,
                  overrides + [f"batch_size={batch}", f"lr={lr:g}", "crop_size=512", "num_workers=4"])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m launch.demo", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("demo_out"), help="everything goes here (default demo_out)")
    parser.add_argument("--gpus", type=int, default=0, help="GPUs to train and infer on (0 = CPU, 2 gloo ranks)")
    parser.add_argument("--steps", type=int, default=None,
                        help=f"training steps (default: {CPU_STEPS} on CPU, {GPU_STEPS} on GPU)")
    parser.add_argument("--encoder", default=None, help="encoder (default: tu-mobilenetv3_small_050 on CPU, efficientnet-b4 on GPU)")
    parser.add_argument("--crops-per-photo", type=int, default=8)
    parser.add_argument("--extra-photos", type=Path, action="append", default=[],
                        help="a folder of more training photos (repeatable; bench/quality.py's larger recipe)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("overrides", nargs="*", help="key=value training options after the demo's own (job.train)")
    args = parser.parse_args(argv)

    out: Path = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    log = out / "demo.log"
    log.write_text("")
    py = sys.executable
    on_gpu = args.gpus > 0
    started = time.time()
    nproc, steps, encoder, overrides = training_recipe(args.gpus, args.steps, args.encoder)  # --gpus checked first

    shards_dir = write_demo_shards(out, args.crops_per_photo, args.seed, args.extra_photos, log=log)

    run_dir = out / "run"
    overrides += [f"seed={args.seed}", "resume=never", *args.overrides]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    run([py, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}", "-m", "job.train",
         "--shards", str(shards_dir), "--out", str(run_dir), *overrides], log, env=env)

    zip_path = out / "submission.zip"
    pred_dir = out / "pred"
    infer = [py, "-m", "restore.batch_infer", "--shards", str(shards_dir / "val"), "--checkpoint", str(run_dir),
             "--out", str(zip_path), "--png-dir", str(pred_dir)]
    if on_gpu:
        infer += ["--workers", str(args.gpus), "--gpus-per-worker", "1"]
    run(infer, log)

    score_json = subprocess.run([py, "-m", "restore.score", str(zip_path), str(shards_dir / "val"), "--json"],
                                check=True, capture_output=True, text=True).stdout
    model_score = json.loads(score_json)
    scores = {"model": model_score, **baseline_scores(shards_dir / "val")}
    report = {"scores": scores, "train_steps": steps, "encoder": encoder, "gpus": args.gpus,
              "margin_over_gray_copy": model_score["score"] - scores["gray_copy"]["score"],
              "seconds": round(time.time() - started, 1)}
    (out / "report.json").write_text(json.dumps(report, indent=2) + "\n")

    grid = out / "grid.png"
    picture_grid(shards_dir / "val", run_dir, pred_dir, grid, rows=4)

    print(f"\nDACON score on {model_score['n']} held-out images (same scorer for all rows):")
    print(f"{'':16s} {'score':>7s} {'ssim':>7s} {'masked':>7s} {'hist':>7s}")
    for name, s in scores.items():
        print(f"{name:16s} {s['score']:7.4f} {s['ssim']:7.4f} {s['masked_ssim']:7.4f} {s['hist_sim']:7.4f}")
    print(f"\nmodel - gray_copy = {report['margin_over_gray_copy']:+.4f}")
    print(f"demo finished in {report['seconds']:.0f}s. Outputs:\n"
          f"  shards       {shards_dir}\n  run dir      {run_dir}  (config.json, metrics.jsonl, tb/, checkpoints/)\n"
          f"  submission   {zip_path}\n  PNGs         {pred_dir}\n  report       {out / 'report.json'}\n"
          f"  picture      {grid}\n  log          {log}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
