"""PNG write and read cost of the project's encoder settings against PIL's zlib level 1, side by side, CPU only.

    python bench/png_codec.py [--shards SHARDS_DIR] [--size 512] [--n 8] [--json OUT.json]
    python bench/png_codec.py --tiny                 # CI smoke: 64 px, one repetition

Every PNG the project writes goes through ``shards.schema.encode_png``: the ground truth and inputs at pack time (read
back by every training step) and every restored image at inference (500 img/s per GPU is the target). This script
times, per image and in CPU seconds of one core (robust to a busy machine):
- encode: ``encode_png`` with each ``PNG_COMPRESSION`` setting against what the libraries offer: PIL at zlib level 1
  (libpng's adaptive filters; the reference, and the project's first writer) and OpenCV's fastest lossless setting
  (UP filter, run-length deflate, level 1; the second);
- decode: the same bytes read by ``decode_png`` (what the project's readers call: its own decoder for the
  project's "fast"/"none" RGB PNGs, OpenCV for the rest), by OpenCV alone and by PIL;
- size in KiB.
Images: scikit-image's photos resized to ``--size`` and a blurred copy of each (restored images are smoother than
photos), or the ground truth of ``--shards`` samples. Every encoding is checked to decode to the exact pixels.
The last line is JSON; ratios are against the PIL level-1 reference measured in the same run.
"""
from __future__ import annotations

import argparse
import io
import platform
import sys
import time
from pathlib import Path

import cv2
import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from shards.schema import PNG_COMPRESSION, decode_png, encode_png  # noqa: E402
from report import emit  # noqa: E402  (bench/report.py, beside this script)

REFERENCE = "pil-level1"


def photo_images(size: int, n: int) -> list[np.ndarray]:
    from skimage import data

    names = ["astronaut", "coffee", "chelsea", "rocket", "immunohistochemistry", "motorcycle_left"]
    out = []
    for name in names:
        try:
            rgb = getattr(data, name)()
        except Exception:  # some images need the optional pooch download; skip those, the rest suffice
            continue
        rgb = cv2.resize(np.ascontiguousarray(rgb[..., :3]), (size, size), interpolation=cv2.INTER_AREA)
        out += [rgb, cv2.GaussianBlur(rgb, (5, 5), 1.2)]
    return out[:n]


def shard_images(shards: str, n: int) -> list[np.ndarray]:
    from shards.reader import iter_samples, shard_paths

    out = []
    for sample in iter_samples(shard_paths(shards)):
        if sample.gt is not None:
            out.append(sample.gt)
        if len(out) >= n:
            break
    if not out:
        raise SystemExit(f"{shards}: no samples with a ground truth")
    return out


def pil_level1(rgb: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, format="PNG", compress_level=1)
    return buf.getvalue()


def opencv_up_rle(rgb: np.ndarray) -> bytes:
    params = [cv2.IMWRITE_PNG_COMPRESSION, 1, cv2.IMWRITE_PNG_FILTER, cv2.IMWRITE_PNG_FILTER_UP,
              cv2.IMWRITE_PNG_STRATEGY, cv2.IMWRITE_PNG_STRATEGY_RLE]
    return cv2.imencode(".png", rgb[:, :, ::-1], params)[1].tobytes()


def cpu_ms(fn, arg, reps: int) -> float:
    start = time.process_time()
    for _ in range(reps):
        fn(arg)
    return (time.process_time() - start) / reps * 1000


def measure(images: list[np.ndarray], reps: int) -> dict[str, dict[str, float]]:
    encoders = {REFERENCE: pil_level1, "opencv-up-rle": opencv_up_rle}
    encoders.update({f"project-{name}": (lambda a, name=name: encode_png(a, "RGB", name)) for name in PNG_COMPRESSION})
    rows = {}
    for label, encode in encoders.items():
        enc, dec_project, dec_cv, dec_pil, kib = [], [], [], [], []
        for rgb in images:
            data = encode(rgb)
            back = cv2.cvtColor(cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR), cv2.COLOR_BGR2RGB)
            if not np.array_equal(back, rgb) or not np.array_equal(decode_png(data, "RGB"), rgb):
                raise SystemExit(f"{label}: decoded pixels differ from the encoded image")
            enc.append(cpu_ms(encode, rgb, reps))
            dec_project.append(cpu_ms(lambda d: decode_png(d, "RGB"), data, reps))
            dec_cv.append(cpu_ms(lambda d: cv2.imdecode(np.frombuffer(d, np.uint8), cv2.IMREAD_COLOR), data, reps))
            dec_pil.append(cpu_ms(lambda d: np.asarray(Image.open(io.BytesIO(d))), data, reps))
            kib.append(len(data) / 1024)
        rows[label] = {"encode_ms": float(np.mean(enc)), "decode_project_ms": float(np.mean(dec_project)),
                       "decode_opencv_ms": float(np.mean(dec_cv)),
                       "decode_pil_ms": float(np.mean(dec_pil)), "kib": float(np.mean(kib))}
    ref = rows[REFERENCE]
    for row in rows.values():
        row["encode_speedup"] = ref["encode_ms"] / row["encode_ms"]
        row["decode_opencv_speedup"] = ref["decode_opencv_ms"] / row["decode_opencv_ms"]
        row["size_ratio"] = row["kib"] / ref["kib"]
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shards", help="a split dir (with manifest.json): use its ground truth instead of the photos")
    p.add_argument("--size", type=int, default=512, help="photo side in pixels (ignored with --shards)")
    p.add_argument("--n", type=int, default=None, help="images (default 8; 2 with --tiny)")
    p.add_argument("--reps", type=int, default=5, help="timed repetitions per image")
    p.add_argument("--tiny", action="store_true", help="CI smoke: 64 px, 1 repetition")
    p.add_argument("--json", help="also write the JSON result here")
    args = p.parse_args(argv)
    if args.tiny:
        args.size, args.reps = 64, 1
    args.n = args.n or (2 if args.tiny else 8)
    cv2.setNumThreads(1)  # one core per image, as in a loader worker or a Ray write task
    images = shard_images(args.shards, args.n) if args.shards else photo_images(args.size, args.n)
    rows = measure(images, args.reps)
    print(f"{len(images)} images {images[0].shape}, CPU ms per image on one core; ratios vs {REFERENCE}")
    print(f"{'setting':16s} {'encode':>8s} {'decode':>7s} {'decode cv2':>11s} {'decode PIL':>11s} {'KiB':>6s} "
          f"{'enc x':>6s} {'dec x':>6s} {'size x':>7s}")
    for label, r in rows.items():
        print(f"{label:16s} {r['encode_ms']:8.2f} {r['decode_project_ms']:7.2f} {r['decode_opencv_ms']:11.2f} {r['decode_pil_ms']:11.2f} "
              f"{r['kib']:6.0f} {r['encode_speedup']:6.2f} {r['decode_opencv_speedup']:6.2f} {r['size_ratio']:7.2f}")
    result = {"images": len(images), "shape": list(images[0].shape), "source": args.shards or "skimage photos",
              "machine": platform.processor() or platform.machine(), "opencv": cv2.__version__, "rows": rows}
    emit(result, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
