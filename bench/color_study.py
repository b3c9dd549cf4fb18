"""Colorization formulations against the averaging of L1/L2, stage 2 alone, scored on held-out real photos.

    python bench/color_study.py                                  # every formulation, the demo's budget (~12 min)
    python bench/color_study.py --steps 1000 --extra-photos DIR  # more steps and photos
    python bench/color_study.py --tiny --held-dir DIR            # CPU smoke (tests)

Stage 2 (the colorizer) is trained alone from the true gray image, so the hole does not enter: each formulation gets
the same photos (the demo's bundled training photos, ``launch.demo.TRAIN_PHOTOS``, plus ``--extra-photos``), the same
steps, batch, encoder (the demo's ``tu-mobilenetv3_small_050``) and seed, and is scored on the same held-out photos as
``bench/quality.py`` (the lomiri wallpaper photos; two 512x512 crops each) with the DACON score, the known luminance
re-imposed as inference does. The hole's masked SSIM then measures only what color does to it.

Formulations (``--formulations``):
  rgb           3 channels through a sigmoid; L1 + 0.5 (1 - SSIM) + 0.1 hue-histogram loss (the job's stage 2 loss)
  chroma        Cb, Cr through a sigmoid composed with the known luma (``color_mode=chroma``); the same loss
  colorful      chroma + a colorfulness term: |mean chroma magnitude of the prediction - of the truth| per image,
                a distribution statistic that counters desaturation without asking for per-pixel modes
  classes       Zhang et al. 2016 "Colorful Image Colorization": Cb/Cr quantized on a 1/16 grid (the in-gamut cells),
                logits at 1/4 resolution, soft-encoded targets (3x3 Gaussian, sigma half a cell), class-rebalanced
                cross-entropy (lambda 0.5, in-batch smoothed prior), annealed-mean decoding (T 0.38) + 0.1 hue loss
  classes_flat  the same without rebalancing
Training windows are zoomed out (a 40-100% square of a photo shrunk to the crop), as ``zoom_max`` does in the job.
A second held-out set (``--nature-dir``, default the 12 nature photos of ``mate-backgrounds``, which the demo's
photos do not include) is scored the same way when held-out photos are not given: meadows, leaves and water.
``--work-size`` colorizes at a lower resolution and lays the chroma on the full-resolution luma (DeOldify's render
factor). Prints a table, writes ``WORK/color_study.json`` and ``WORK/color_grid.png`` (truth | each formulation).
"""
from __future__ import annotations

import argparse
import json
import math
import shutil
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from report import emit  # noqa: E402

FORMULATIONS = ("rgb", "chroma", "colorful", "classes", "classes_flat")


def build(formulation: str, encoder: str, decoder: tuple[int, ...]):
    """The colorizer of a formulation: ``restore.model.Colorizer`` with color_mode rgb, chroma or classes."""
    from restore.model import Colorizer, ModelSpec

    mode = "classes" if formulation.startswith("classes") else "rgb" if formulation == "rgb" else "chroma"
    return Colorizer(ModelSpec(encoder=encoder, decoder_channels=decoder, encoder_depth=len(decoder),
                               color_mode=mode, prefill="none"))


def class_loss(model, logits, gt_rgb, rebalance: float):
    """The job's soft-encoded cross-entropy (``restore.color_classes``), optionally class-rebalanced as in Zhang et
    al. 2016 (``rebalance`` = lambda; 1 = none): weights from the in-batch class prior, smoothed over the grid."""
    import torch
    import torch.nn.functional as F

    from restore.color_classes import POOL, class_cross_entropy, soft_targets
    from restore.model import rgb_to_chroma

    table = model.class_table
    chroma = rgb_to_chroma(gt_rgb)
    if rebalance >= 1.0:
        return class_cross_entropy(logits, chroma, table)
    idx, weight = soft_targets(F.avg_pool2d(chroma, POOL, ceil_mode=True), table)
    ce = -(F.log_softmax(logits.float(), 1).gather(1, idx) * weight).sum(1)
    n, q = table.shape[0], logits.shape[1]
    target = idx.gather(1, weight.argmax(1, keepdim=True))[:, 0]
    prior = torch.bincount(target.flatten(), minlength=q).float()
    cells = torch.zeros(n, n, device=logits.device)
    valid = table >= 0
    cells[valid] = prior[table[valid]]
    kernel = torch.tensor([[1, 2, 1], [2, 4, 2], [1, 2, 1]], dtype=torch.float32, device=logits.device) / 16
    prior = F.conv2d(cells[None, None], kernel[None, None], padding=1)[0, 0][valid]
    prior = prior / prior.sum()
    w = 1.0 / ((1 - rebalance) * prior + rebalance / q)
    return (ce * (w / (prior * w).sum())[target]).mean()


def train(formulation: str, photos: list[np.ndarray], args) -> object:
    import cv2
    import torch

    from restore.losses import Stage2Loss, hue_histogram_loss
    from restore.model import rgb_to_chroma
    from shards.damage import to_gray

    torch.manual_seed(args.seed)
    rng = np.random.default_rng(args.seed)
    decoder = tuple(int(c) for c in args.decoder_channels.split(","))
    model = build(formulation, args.encoder, decoder)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=1e-2)
    warmup = max(1, min(20, args.steps // 5))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / warmup) * (
        0.01 + 0.99 * 0.5 * (1 + math.cos(math.pi * min(1.0, s / max(1, args.steps))))))
    stage2 = Stage2Loss(l1=1.0, ssim=0.5, hue=0.1)
    model.train()
    for _ in range(args.steps):
        crops = []
        for _ in range(args.batch):
            image = photos[int(rng.integers(len(photos)))]
            h, w = image.shape[:2]
            side = int(min(h, w) * rng.uniform(0.4, 1.0))
            top, left = int(rng.integers(0, h - side + 1)), int(rng.integers(0, w - side + 1))
            crop = cv2.resize(image[top:top + side, left:left + side], (args.crop, args.crop),
                              interpolation=cv2.INTER_AREA)
            crops.append(crop[:, ::-1] if rng.random() < 0.5 else crop)
        gt = np.ascontiguousarray(np.stack(crops))
        gt_rgb = torch.from_numpy(gt).permute(0, 3, 1, 2).float() / 255
        gray = torch.from_numpy(np.stack([to_gray(c) for c in gt])).float()[:, None] / 255
        if formulation.startswith("classes"):
            logits = model.logits(gray)
            loss = class_loss(model, logits, gt_rgb, 0.5 if formulation == "classes" else 1.0)
            loss = loss + 0.1 * hue_histogram_loss(model.decode(logits, gray, 1.0), gt_rgb)
        else:
            rgb = model(gray)
            loss, _ = stage2(rgb, gt_rgb)
            if formulation == "colorful":
                def magnitude(x):
                    return (rgb_to_chroma(x) - 0.5).norm(dim=1).mean((1, 2))
                loss = loss + (magnitude(rgb) - magnitude(gt_rgb)).abs().mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
    return model.eval()


def colorize(model, gray_u8: np.ndarray, work_size: int) -> np.ndarray:
    import torch
    import torch.nn.functional as F

    from restore.composite import composite_luma
    from restore.model import compose_chroma, rgb_to_chroma

    gray_u8 = np.array(gray_u8)  # a writable copy: to_gray gives a read-only array
    g = torch.from_numpy(gray_u8).float()[None, None] / 255
    with torch.no_grad():
        if work_size and work_size < max(g.shape[-2:]):
            small = F.interpolate(g, size=(work_size, work_size), mode="area")
            chroma = F.interpolate(rgb_to_chroma(model(small)), size=g.shape[-2:], mode="bilinear",
                                   align_corners=False)
            rgb = compose_chroma(g, chroma)
        else:
            rgb = model(g)
    out = (rgb.clamp(0, 1) * 255).round().byte()
    known = torch.ones(1, *gray_u8.shape, dtype=torch.bool)
    return composite_luma(out, torch.from_numpy(gray_u8)[None], known)[0].permute(1, 2, 0).numpy()


def main(argv: list[str] | None = None) -> int:
    import torch
    from PIL import Image

    from quality import held_out_photos, write_held_crops  # bench/quality.py, beside this script
    from launch.demo import TRAIN_PHOTOS
    from restore.score import score_image, summarize
    from shards.damage import random_mask, to_gray
    from shards.pack import list_photos
    from shards.sample_photos import load_photo

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--formulations", default=",".join(FORMULATIONS))
    ap.add_argument("--steps", type=int, default=240)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--crop", type=int, default=128)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--seed", type=int, default=0, help="initial weights and training windows")
    ap.add_argument("--encoder", default="tu-mobilenetv3_small_050")
    ap.add_argument("--decoder-channels", default="64,32,16,16,8")
    ap.add_argument("--work-size", type=int, default=0, help="colorize at this size, chroma upsampled (0: full)")
    ap.add_argument("--extra-photos", type=Path, action="append", default=[])
    ap.add_argument("--held-dir", type=Path)
    ap.add_argument("--nature-dir", type=Path, help="second held-out set (default: mate-backgrounds' nature photos, "
                    "which the demo never trains on; none with --held-dir/--tiny)")
    ap.add_argument("--cache", type=Path, default=Path.home() / ".cache" / "restore-bench")
    ap.add_argument("--work", type=Path, default=Path("bench_quality"))
    ap.add_argument("--tiny", action="store_true", help="smoke: 2 steps, tiny encoder, 64 px")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    size = 512
    if args.tiny:
        args.steps, args.batch, args.crop, size = 2, 2, 32, 64
        args.encoder, args.decoder_channels = "tu-test_efficientnet", "16,8,8,8,8"
    formulations = [f for f in args.formulations.split(",") if f]
    unknown = [f for f in formulations if f not in FORMULATIONS]
    if unknown:
        ap.error(f"unknown formulation(s) {unknown}; choose from {', '.join(FORMULATIONS)}")

    work = args.work.resolve()
    work.mkdir(parents=True, exist_ok=True)
    def crops_of(photos: list[Path], name: str) -> list[np.ndarray]:
        folder = work / name
        shutil.rmtree(folder, ignore_errors=True)
        write_held_crops(photos, folder, size)
        return [np.asarray(Image.open(p).convert("RGB")) for p in sorted(folder.iterdir())]

    held_photos, nature_photos = held_out_photos(args.held_dir, args.nature_dir, args.tiny, args.cache)
    held = crops_of(held_photos, "color_held")
    nature = crops_of(nature_photos, "color_nature") if nature_photos else []
    train_photos = [load_photo(n) for n in TRAIN_PHOTOS]
    for folder in args.extra_photos:
        train_photos += [np.asarray(Image.open(p).convert("RGB")) for p in list_photos(folder)]
    rng = np.random.default_rng(11)
    masks = [random_mask(rng, size, size, area_range=(0.01, 0.13))[0] for _ in held]
    nature_masks = [random_mask(rng, size, size, area_range=(0.01, 0.13))[0] for _ in nature]

    def scored(predict) -> tuple[dict, list[np.ndarray]]:
        """``predict(gray) -> rgb`` on every held-out crop: the summary (the nature set's under "nature") and the
        first set's predictions."""
        preds = [predict(to_gray(h)) for h in held]
        summary = summarize([score_image(h, p, m) for h, p, m in zip(held, preds, masks)])
        if nature:
            summary["nature"] = summarize([score_image(h, predict(to_gray(h)), m)
                                           for h, m in zip(nature, nature_masks)])
        return summary, preds

    results, rows = {}, [[h for h in held[:4]]]
    results["gray copy"], _ = scored(lambda g: np.repeat(g[..., None], 3, -1))
    for f in formulations:
        t0 = time.time()
        model = train(f, train_photos, args)
        train_s = round(time.time() - t0, 1)
        results[f], preds = scored(lambda g: colorize(model, g, args.work_size))
        results[f]["train_s"] = train_s
        rows.append(preds[:4])
        print(f"color_study: {f}: score {results[f]['score']:.4f} hist {results[f]['hist_sim']:.4f} "
              f"({results[f]['train_s']:.0f} s)", flush=True)
    Image.fromarray(np.concatenate([np.concatenate(r, axis=0) for r in rows], axis=1)).save(work / "color_grid.png")
    print(f"\n{'stage 2 alone, ' + str(len(held)) + ' held-out crops':34s} {'score':>7s} {'ssim':>7s} {'masked':>7s} "
          f"{'hist':>7s}" + (f" | {len(nature)} nature crops: score, hist" if nature else ""))
    for name, s in results.items():
        print(f"{name:34s} {s['score']:7.4f} {s['ssim']:7.4f} {s['masked_ssim']:7.4f} {s['hist_sim']:7.4f}"
              + (f" | {s['nature']['score']:7.4f} {s['nature']['hist_sim']:7.4f}" if nature else ""))
    result = {"steps": args.steps, "seed": args.seed, "photos": len(train_photos), "work_size": args.work_size, "scores": results}
    (work / "color_study.json").write_text(json.dumps(result, indent=2) + "\n")
    emit(result, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
