"""Ray batch inference: restore a packed test set (or a folder of damaged gray PNGs) and build the submission zip.

    python -m restore.batch_infer --shards data/shards/test --checkpoint runs/exp1 --out submission.zip
    python -m restore.batch_infer --images scans/ --out restored.zip --png-dir restored/ --skip-bad
    python -m restore.batch_infer --shards archive/ --no-zip --png-dir out/ --compile default   # millions of images

Pipeline (Ray Data, streaming, so a test set of millions never sits in memory):

    from_items(one item per shard) -> flat_map(read + decode)      one read task per shard, CPU
      -> map_batches(RestoreWorker, ActorPoolStrategy(size=N))      the model, loaded once per actor; GPU or CPU
      -> map_batches(write_outputs)                                  PNG encode + atomic write (+ score), CPU tasks
      -> the driver: progress bar, bad keys, summary, then the zip

Reading goes through ``shards.reader.decode_sample`` on webdataset's raw per-key dicts rather than
``ray.data.read_webdataset``: the project's decoder is the one place that checks a sample (mode L input, mask, sizes)
and names the key and the shard in its errors, and decoding per sample lets one corrupt member become one bad key
(``--skip-bad``) instead of a failed read task. PNG encoding is a separate CPU stage so a GPU actor never waits on
zlib, and the encoders scale with the cluster's CPUs independently of the number of model actors.

Exactly-once and resumable: each ``KEY.png`` is written to a temp name and renamed, so an existing ``KEY.png`` is
complete; a rerun skips those keys (their input is read only for its size), deletes leftover temp files, and the
zip is written to a temp name, verified (flat; names and count equal the manifest's keys; every entry decodes as RGB
of its input's size) and only then renamed to ``--out``.

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

Exit codes: 0 done (with ``--skip-bad`` possibly without the bad keys, listed in ``bad_keys.json``), 2 bad input
(missing/empty shards dir, corrupt sample, missing mask, missing or mismatched checkpoint, no run found),
1 an internal failure.
"""
from __future__ import annotations

import argparse
import io
import logging
import os
import re
import socket
import sys
import tempfile
import time
import warnings
import zipfile
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np
from PIL import Image

from shards import schema
from shards.damage import NoDamageFound, detect_mask
from shards.reader import decode_sample, read_manifest, shard_paths

EXIT_BAD_INPUT = 2
EXIT_INTERNAL = 1
BAD_KEYS_NAME = "bad_keys.json"
IMAGES_PER_READ_TASK = 64  # --images mode: files per read task (one task per shard in --shards mode)
TODO, DONE, BAD = "todo", "done", "bad"
SCORE_TERMS = ("score", "ssim", "masked_ssim", "hist_sim")
# schema.atomic_write_bytes names its temp files ".KEY.png.<random>.tmp"
_TEMP_PNG = re.compile(r"^\..+\.png\..+\.tmp$")

_EMPTY_GRAY = np.zeros((0, 0), np.uint8)
_EMPTY_RGB = np.zeros((0, 0, 3), np.uint8)


class BadInput(Exception):
    """A problem with the user's input; the message names the file and the problem (exit 2)."""


# ---------------------------------------------------------------------------------------------- planning (driver)
@dataclass
class Plan:
    """What to restore: the expected keys (the zip must hold exactly these) and the read tasks' items."""

    kind: str  # "shards" | "images"
    source: Path
    keys: list[str]
    items: list[dict] = field(default_factory=list)


def plan_shards(split_dir: str | os.PathLike) -> Plan:
    split_dir = Path(split_dir)
    try:
        manifest = read_manifest(split_dir)
        paths = shard_paths(split_dir)
    except (FileNotFoundError, ValueError) as exc:
        raise BadInput(str(exc)) from exc
    items, keys = [], []
    for entry, path in zip(manifest["shards"], paths):
        shard_keys = list(entry.get("keys") or [])
        if not shard_keys and entry.get("count"):
            raise BadInput(f"{split_dir / schema.MANIFEST_NAME}: shard {entry['name']} lists no keys")
        items.append({"kind": "shard", "path": str(path), "keys": shard_keys})
        keys.extend(shard_keys)
    duplicates = sorted(k for k, n in Counter(keys).items() if n > 1)
    if duplicates:
        raise BadInput(f"{split_dir / schema.MANIFEST_NAME}: keys listed twice: {', '.join(duplicates[:10])}")
    if not keys:
        raise BadInput(f"{split_dir / schema.MANIFEST_NAME}: the manifest lists no samples (empty split)")
    return Plan("shards", split_dir, keys, items)


def plan_images(image_dir: str | os.PathLike) -> Plan:
    """Every ``*.png`` directly in ``image_dir``; the key (and output name) is the file's stem."""
    image_dir = Path(image_dir)
    if not image_dir.is_dir():
        raise BadInput(f"image directory {image_dir} does not exist")
    files = sorted(p for p in image_dir.iterdir() if p.is_file() and p.suffix.lower() == ".png")
    if not files:
        raise BadInput(f"image directory {image_dir} holds no .png files")
    stems: dict[str, Path] = {}
    for p in files:
        if p.stem in stems:
            raise BadInput(f"{image_dir}: {stems[p.stem].name} and {p.name} would both be written as {p.stem}.png")
        stems[p.stem] = p
    items = []
    for i in range(0, len(files), IMAGES_PER_READ_TASK):
        chunk = files[i : i + IMAGES_PER_READ_TASK]
        items.append({"kind": "images", "paths": [str(p) for p in chunk], "keys": [p.stem for p in chunk]})
    return Plan("images", image_dir, [p.stem for p in files], items)


def finished_keys(png_dir: Path) -> set[str]:
    """Keys whose ``KEY.png`` exists in ``png_dir`` (complete by construction: temp + rename)."""
    if not png_dir.is_dir():
        return set()
    return {p.stem for p in png_dir.iterdir() if p.suffix == ".png" and not p.name.startswith(".")}


def remove_temp_files(png_dir: Path) -> int:
    """Delete temp files a crashed run left behind; returns how many."""
    if not png_dir.is_dir():
        return 0
    leftovers = [p for p in png_dir.iterdir() if _TEMP_PNG.match(p.name)]
    for p in leftovers:
        p.unlink(missing_ok=True)
    return len(leftovers)


def newest_run(runs_dir: Path) -> Path:
    """The run dir under ``runs_dir`` whose checkpoints changed last (its best.pt is then used)."""
    candidates = []
    if runs_dir.is_dir():
        for run in runs_dir.iterdir():
            ckpt_dir = run / "checkpoints"
            if ckpt_dir.is_dir():
                files = [p for p in ckpt_dir.iterdir() if p.suffix == ".pt" or p.name == "latest"]
                if files:
                    candidates.append((max(p.stat().st_mtime for p in files), run))
    if not candidates:
        raise BadInput(f"no --checkpoint given and no run with checkpoints under {runs_dir.resolve()}")
    return max(candidates)[1]


def resolve_checkpoints(given: Sequence[str] | None, runs_dir: Path) -> list[Path]:
    from restore.model import resolve_checkpoint

    if not given:
        run = newest_run(runs_dir)
        given = [str(run)]
        print(f"checkpoint: none given, using the newest run {run} (its best.pt, else its latest)")
    resolved = []
    for value in given:
        try:
            resolved.append(resolve_checkpoint(value).resolve())
        except (FileNotFoundError, ValueError) as exc:
            raise BadInput(f"--checkpoint {value}: {exc}") from exc
    return resolved


def inference_cache_dir(setting: str, checkpoints: Sequence[Path]) -> Path | None:
    """``--compile-cache``: ``auto`` = ``RUN/compile_cache/inference`` of the first checkpoint's run (beside the
    training graphs, in a folder of its own so neither loads the other's), ``off`` = none, else the folder given."""
    from restore.compile_cache import folder_for, setting_error

    error = setting_error(setting, option="--compile-cache ")
    if error:
        raise BadInput(error)
    first = Path(checkpoints[0])
    run_dir = first.parent.parent if first.parent.name == "checkpoints" else first.parent
    return folder_for(setting, run_dir / "compile_cache" / "inference")


def check_checkpoints(paths: Sequence[Path]) -> list[dict]:
    """Load each checkpoint once in the driver so a missing or mismatched one fails before any Ray work starts."""
    from restore.model import load_restorer

    specs = []
    for path in paths:
        try:
            model, info = load_restorer(path, map_location="cpu")
        except (FileNotFoundError, ValueError, RuntimeError, KeyError) as exc:
            raise BadInput(f"checkpoint {path}: {exc}") from exc
        specs.append({"path": str(path), "spec": model.spec.to_dict(), "weights": info.get("weights_used")})
        del model
    return specs


# ---------------------------------------------------------------------------------------------- read stage (tasks)
def _row(key: str, where: str, status: str, *, error: str = "", note: str = "", size: tuple[int, int] = (0, 0),
         gray: np.ndarray = _EMPTY_GRAY, mask: np.ndarray = _EMPTY_GRAY, gt: np.ndarray | None = None,
         with_gt: bool = False) -> dict:
    row = {"key": key, "where": where, "status": status, "error": error, "note": note,
           "height": int(size[0]), "width": int(size[1]), "input": gray, "mask": mask}
    if with_gt:
        row["gt"] = gt if gt is not None else _EMPTY_RGB
    return row


def _png_size(data: bytes) -> tuple[int, int]:
    with Image.open(io.BytesIO(data)) as img:  # reads the header only
        return img.height, img.width


def read_item(item: dict, *, with_gt: bool) -> Iterator[dict]:
    """Rows of one read item (a shard or a chunk of image files); never raises for bad data, emits ``bad`` rows."""
    if item["kind"] == "shard":
        yield from _read_shard(item, with_gt=with_gt)
    else:
        yield from _read_images(item)


def _read_shard(item: dict, *, with_gt: bool) -> Iterator[dict]:
    import webdataset as wds

    path, expected, done = item["path"], set(item["keys"]), set(item.get("done", ()))
    seen: set[str] = set()
    try:
        dataset = wds.WebDataset([path], shardshuffle=False, nodesplitter=None, workersplitter=None,
                                 empty_check=False)
        for raw in dataset:
            key = raw.get("__key__", "?")
            if key not in expected:
                yield _row(key, path, BAD, error=f"{path}: sample {key!r} is not in the manifest", with_gt=with_gt)
                continue
            if key in seen:
                yield _row(key, path, BAD, error=f"{path}: sample {key!r} appears twice", with_gt=with_gt)
                continue
            seen.add(key)
            if key in done and not with_gt:
                try:  # finished already: only the size is needed, for verifying the zip
                    yield _row(key, path, DONE, size=_png_size(raw[schema.INPUT_EXT]))
                except Exception as exc:  # a missing or corrupt input member
                    yield _row(key, path, BAD, error=f"sample {key!r} in {path}: {schema.INPUT_EXT}: {exc}")
                continue
            try:
                sample = decode_sample(raw, with_gt=with_gt)
            except ValueError as exc:
                yield _row(key, path, BAD, error=str(exc), with_gt=with_gt)
                continue
            if with_gt and sample.gt is None:
                yield _row(key, path, BAD, error=f"sample {key!r} in {path} has no gt (--score needs it)",
                           with_gt=with_gt)
                continue
            yield _row(key, path, DONE if key in done else TODO, size=sample.input.shape, gray=sample.input,
                       mask=sample.mask.astype(np.uint8), gt=sample.gt, with_gt=with_gt)
    except Exception as exc:  # the tar itself is unreadable (truncated, not a tar)
        for key in sorted(expected - seen):
            yield _row(key, path, BAD, error=f"{path}: unreadable shard ({type(exc).__name__}: {exc}); "
                                             f"sample {key!r} not read", with_gt=with_gt)
        return
    for key in sorted(expected - seen):
        yield _row(key, path, BAD, error=f"{path}: sample {key!r} is in the manifest but not in the shard",
                   with_gt=with_gt)


def load_gray_png(path: str) -> np.ndarray:
    """A damaged input file as uint8 [H,W]: mode L, or RGB with R == G == B; ``ValueError`` naming it otherwise."""
    try:
        with Image.open(path) as img:
            img.load()
            mode = img.mode
            array = np.asarray(img)
    except Exception as exc:
        raise ValueError(f"{path}: cannot read PNG ({exc})") from exc
    if mode == "L":
        return array
    if mode == "RGB" and (array[..., 0] == array[..., 1]).all() and (array[..., 1] == array[..., 2]).all():
        return np.ascontiguousarray(array[..., 0])
    raise ValueError(f"{path}: expected a gray PNG (mode L), got mode {mode}")


def _read_images(item: dict) -> Iterator[dict]:
    done = set(item.get("done", ()))
    for path, key in zip(item["paths"], item["keys"]):
        if key in done:
            try:
                with Image.open(path) as img:
                    yield _row(key, path, DONE, size=(img.height, img.width))
            except Exception as exc:
                yield _row(key, path, BAD, error=f"{path}: cannot read PNG ({exc})")
            continue
        try:
            gray = load_gray_png(path)
        except ValueError as exc:
            yield _row(key, path, BAD, error=str(exc))
            continue
        note = ""
        try:
            mask, _fill = detect_mask(gray)
        except NoDamageFound as exc:  # an undamaged photo still gets colorized
            mask, note = np.zeros(gray.shape, bool), f"no damage detected ({exc}); colorized only"
        yield _row(key, path, TODO, note=note, size=gray.shape, gray=gray, mask=mask.astype(np.uint8))


# ---------------------------------------------------------------------------------------------- the model (actors)
# torch.compile settings for the model actors: "off" (eager), or a torch.compile mode. Compiled actors run one static
# batch shape (the last, short batch is padded) so the model compiles once per image size; "reduce-overhead" adds
# CUDA graphs on top of that.
COMPILE_MODES = ("off", "default", "reduce-overhead", "max-autotune-no-cudagraphs")
# cuDNN's autotuner searches kernels anew for every input shape: worth it for a shape that recurs (a packed split of
# one size), wasted on a folder of photos that all differ. So an engine turns it on for a shape's third call.
BENCHMARK_AFTER_CALLS = 3


class Engine:
    """The checkpoints on one device: ``restore(gray, mask) -> rgb uint8`` with averaging, TTA and compositing.

    Used by the Ray actors and by ``bench/infer_throughput.py``'s plain loop, so both run the same numerics.
    ``batch_size`` splits larger inputs into model calls of at most that many images; with ``compile`` on it is the
    static batch every call is padded to. ``compile_backend`` is torch.compile's (tests use "aot_eager", which traces
    the same graphs without generating kernels). ``fuse_bn`` folds each BatchNorm into its conv (``restore.fuse``);
    by default (None) only for a compiled engine, where the conv's bias fuses into the next op. Eager, a folded
    BatchNorm only trades its own kernel for cuDNN's separate bias add: 242 vs 246 img/s unfolded on an H100 (two
    runs each), no difference on a CPU (2026-11-26); left as trained, an eager engine computes what training did.
    ``channels_last`` runs weights and activations NHWC, on the GPU and the CPU alike. ``compile_cache``: a folder
    of ``restore.compile_cache`` files that a compiled engine loads before its first call and adds its graphs to
    after a call that compiled, so an actor started on another node loads them instead of compiling; its log lines
    collect in ``cache_log``. ``precision``: ``bf16`` runs the model under bf16 autocast with the convolutions'
    weights held in bf16 (``bf16_weights``; fp16 likewise), ``fp32`` without autocast; ``auto`` follows
    ``restore.precision``, the rule training uses too: bf16 on a GPU with native bf16, fp16 on older GPUs, fp32 on CPU.
    """

    def __init__(self, checkpoints: Sequence[str | os.PathLike], *, tta: bool = False, composite: bool = True,
                 device: str | None = None, batch_size: int | None = None, compile: str = "off",
                 cudnn_benchmark: bool = True, compile_backend: str = "inductor", fuse_bn: bool | None = None,
                 channels_last: bool = True, compile_cache: str | os.PathLike | None = None,
                 precision: str = "auto", bf16_weights: bool = True) -> None:
        import torch

        from restore.fuse import fuse_batchnorm, restorer_probe
        from restore.model import load_restorer

        if compile not in COMPILE_MODES:
            raise ValueError(f"compile={compile!r}: must be one of {', '.join(COMPILE_MODES)}")
        if batch_size is not None and batch_size < 1:
            raise ValueError(f"batch_size={batch_size}: must be >= 1")
        if compile != "off" and batch_size is None:
            raise ValueError("a compiled engine needs batch_size: the static batch its calls are padded to")
        self.torch = torch
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.cuda = self.device.type == "cuda"
        from restore import precision as precision_rule

        self.precision = precision_rule.resolve_for(precision, self.device)  # PrecisionError is a ValueError
        self.autocast_dtype = precision_rule.autocast_dtype(self.precision)
        self.tta, self.composite = tta, composite
        self.batch_size, self.compile, self.cudnn_benchmark = batch_size, compile, cudnn_benchmark
        self.channels_last = channels_last
        self.models = []
        self._calls_per_shape: Counter = Counter()
        self.fuse_reports = []
        if fuse_bn is None:
            fuse_bn = compile != "off"
        for path in checkpoints:
            model, _ = load_restorer(path, map_location="cpu")
            if fuse_bn:  # checked on the CPU in fp32: no TF32 or bf16 rounding in the comparison
                model, report = fuse_batchnorm(model, *restorer_probe())
                self.fuse_reports.append(report)
            model = model.to(self.device)
            if self.autocast_dtype is not None and bf16_weights:
                _hold_conv_weights_in(model, self.autocast_dtype)
            if channels_last:  # the fast path for bf16 on tensor cores, and for oneDNN on CPUs (1.2-1.35x there)
                model = model.to(memory_format=torch.channels_last)
            model = model.eval()
            if compile != "off":
                # dynamic=False: one graph for the static batch, no shape guards to re-check per call.
                options = {"mode": compile} if compile_backend == "inductor" else {}  # modes are inductor's
                model = torch.compile(model, backend=compile_backend, dynamic=False, **options)
            self.models.append(model)
        self.forward_passes = 0  # images x models x flips, for the summary and the tests
        self.padded_images = 0  # images added to fill a compiled engine's static batch
        self.cache_log: list[str] = []
        self.compile_cache = None
        if compile != "off" and compile_backend == "inductor" and compile_cache is not None:
            from restore.compile_cache import CompileCache

            self.compile_cache = CompileCache.for_device(compile_cache, self.device)
            self.cache_log += self.compile_cache.load()

    def restore(self, gray: np.ndarray, mask: np.ndarray) -> np.ndarray:
        """``gray`` uint8 [B,H,W], ``mask`` [B,H,W] (nonzero = hole) -> RGB uint8 [B,H,W,3]."""
        step = self.batch_size or max(len(gray), 1)
        parts = []
        for first in range(0, len(gray), step):
            g, m = gray[first:first + step], mask[first:first + step]
            short = step - len(g) if self.compile != "off" else 0
            if short:  # pad with copies of the last image to the static batch; their outputs are dropped
                g = np.concatenate([g, np.repeat(g[-1:], short, axis=0)])
                m = np.concatenate([m, np.repeat(m[-1:], short, axis=0)])
                self.padded_images += short
            parts.append(self._restore_batch(g, m)[: len(g) - short])
            if self.compile_cache is not None:  # cheap unless this call compiled (a new size): then it is saved
                line = self.compile_cache.save(only_if_compiled=True)
                if line:
                    self.cache_log.append(line)
        return parts[0] if len(parts) == 1 else np.concatenate(parts)  # one call: no copy

    def compile_counts(self) -> dict[str, int]:
        """This process's compiled graphs so far: ``compiled`` (cache misses) and ``cached`` (loaded, not compiled)."""
        if self.compile == "off":
            return {"compiled": 0, "cached": 0}
        from restore.compile_cache import counts

        c = counts()
        return {"compiled": c["graph_misses"], "cached": c["graph_hits"]}

    def _benchmark_this_call(self, shape: tuple[int, ...]) -> bool:
        """Whether cuDNN's autotuner runs for this call: from a shape's ``BENCHMARK_AFTER_CALLS``-th call on."""
        shape = tuple(shape)
        self._calls_per_shape[shape] += 1
        return self.cudnn_benchmark and self._calls_per_shape[shape] >= BENCHMARK_AFTER_CALLS

    def _restore_batch(self, gray: np.ndarray, mask: np.ndarray) -> np.ndarray:
        torch = self.torch
        benchmark = self._benchmark_this_call(gray.shape)
        if self.cuda:
            torch.backends.cudnn.benchmark = benchmark
        with warnings.catch_warnings():
            # Ray hands an actor zero-copy, read-only columns; they are only read here (torch warns about them once).
            warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
            g8 = torch.from_numpy(np.ascontiguousarray(gray, dtype=np.uint8)).to(self.device, non_blocking=True)
            # Nonzero = hole, compared on the device: astype(bool) on the host copied the batch (0.4-0.9 ms per 32
            # images of 512x512 on the actor's one CPU).
            hole = torch.from_numpy(np.ascontiguousarray(mask)).to(self.device, non_blocking=True) != 0
        x = (g8.float() / 255.0)[:, None]
        m = hole.float()[:, None]
        if self.channels_last:
            x, m = x.contiguous(memory_format=torch.channels_last), m.contiguous(memory_format=torch.channels_last)
        views = [False, True] if self.tta else [False]
        graphs = self.compile == "reduce-overhead"
        total = None
        with torch.inference_mode(), torch.autocast(self.device.type, dtype=self.autocast_dtype or torch.float32, enabled=self.autocast_dtype is not None):
            for model in self.models:
                for flip in views:
                    xi, mi = (x.flip(-1), m.flip(-1)) if flip else (x, m)
                    if graphs:  # each call is a new step: its outputs may reuse the previous replay's memory
                        torch.compiler.cudagraph_mark_step_begin()
                    _, rgb = model(xi, mi)
                    rgb = rgb.float().clone() if graphs else rgb.float()
                    rgb = rgb.flip(-1) if flip else rgb
                    total = rgb if total is None else total + rgb
                    self.forward_passes += int(x.shape[0])
            rgb = total / (len(self.models) * len(views))
            out = (rgb.clamp(0.0, 1.0) * 255.0).round().to(torch.uint8)
            if self.composite:
                from restore.composite import composite_luma

                out = composite_luma(out, g8, ~hole)
        return out.permute(0, 2, 3, 1).contiguous().cpu().numpy()


def _hold_conv_weights_in(model, dtype) -> None:
    """Casts every convolution's (and linear layer's) weight and bias to the autocast ``dtype`` (bf16 or fp16), once.

    Under bf16 autocast these are the parameters autocast would cast on every call: two cast kernels per layer, about
    760 of the ~2,460 kernels of an eager call of 32 images on the two EfficientNet-B4 stages on an H100 (bench
    profile, 2026-11-26). Autocast leaves a tensor that is already bf16 as it is, and the cast gives the same values
    it would give, so the outputs do not change. Normalization layers keep their fp32 parameters and statistics, as
    under autocast alone."""
    import torch
    from torch import nn

    for layer in model.modules():
        if isinstance(layer, (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)):
            layer.to(dtype)


class RestoreWorker:
    """One Ray actor: the engine loaded once; restores the ``todo`` rows of each batch, passes the others on."""

    def __init__(self, checkpoints: Sequence[str], tta: bool, composite: bool, keep_gt: bool,
                 batch_size: int | None = None, compile: str = "off", compile_cache: str | None = None) -> None:
        import torch

        if not torch.cuda.is_available():
            # Ray sets OMP_NUM_THREADS to the actor's num_cpus; make torch's intra-op pool follow it.
            torch.set_num_threads(max(1, int(os.environ.get("OMP_NUM_THREADS", "1"))))
        self.engine = Engine(checkpoints, tta=tta, composite=composite, batch_size=batch_size, compile=compile,
                             compile_cache=compile_cache)
        self.keep_gt = keep_gt
        self.name = f"{socket.gethostname()}:{os.getpid()}:{self.engine.device}"
        # The actor's clock (from the start of its first call) and its seconds in the model and in its calls, so far:
        # every row carries them, and the driver tells from them what the actor waited on (``actor_time_split``).
        self._clock_start: float | None = None
        self._model_s = 0.0
        self._calls_s = 0.0
        self._cache_lines_shown = 0
        self._show_cache_log()

    def _show_cache_log(self) -> None:
        """Print the engine's new compile-cache lines (Ray shows an actor's output in the driver's)."""
        for line in self.engine.cache_log[self._cache_lines_shown:]:
            print(f"{self.name}: {line}", flush=True)
        self._cache_lines_shown = len(self.engine.cache_log)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        call_start = time.perf_counter()
        if self._clock_start is None:
            self._clock_start = call_start
        n = len(batch["key"])
        rgb = [_EMPTY_RGB] * n
        infer_s = np.zeros(n, np.float64)
        todo = [i for i in range(n) if batch["status"][i] == TODO]
        by_shape: dict[tuple, list[int]] = defaultdict(list)
        for i in todo:
            by_shape[tuple(batch["input"][i].shape)].append(i)
        out = None
        for idx in by_shape.values():
            start = time.perf_counter()
            out = self.engine.restore(_stacked(batch["input"], idx), _stacked(batch["mask"], idx))
            model_s = time.perf_counter() - start
            self._model_s += model_s
            per_image = model_s / len(idx)
            for j, i in enumerate(idx):
                rgb[i], infer_s[i] = out[j], per_image
        result = {k: batch[k] for k in ("key", "where", "status", "error", "note", "height", "width")}
        # The usual batch (every row restored, one size): the engine's array is the column as it is. Copying it into
        # a new one costs the actor ~10 ms per 32 images at 512x512, time in which its GPU would wait.
        result["rgb"] = out if len(todo) == n and len(by_shape) == 1 else _rgb_column(rgb, todo)
        result["worker"] = np.array([self.name if s == TODO else "" for s in batch["status"]], dtype=object)
        result["infer_s"] = infer_s
        self._show_cache_log()
        graphs = self.engine.compile_counts()  # so far in this actor; the driver keeps each worker's last
        result["graphs_compiled"] = np.full(n, graphs["compiled"], np.int64)
        result["graphs_cached"] = np.full(n, graphs["cached"], np.int64)
        if self.keep_gt:
            result["gt"], result["mask"] = batch["gt"], batch["mask"]
        end = time.perf_counter()
        self._calls_s += end - call_start
        result["actor_clock_s"] = np.full(n, end - self._clock_start)
        result["actor_model_s"] = np.full(n, self._model_s)
        result["actor_calls_s"] = np.full(n, self._calls_s)
        # The wall clock too: actors sharing a GPU (or spread over nodes) are pooled by the driver on one time axis.
        result["actor_end_unix"] = np.full(n, time.time())
        return result


def _stacked(column: np.ndarray, idx: list[int]) -> np.ndarray:
    """Rows ``idx`` of an image column as one [k,H,W] array. The usual batch (every row, one size) arrives from Ray
    as one dense array and is passed on as it is: stacking 32 images of 512x512 copies 8 MB per column (~1 ms)."""
    if len(idx) == len(column) and column.dtype != object and column.ndim == 3:
        return column
    return np.stack([column[i] for i in idx])


ACTOR_TIME_COLUMNS = ("actor_clock_s", "actor_model_s", "actor_calls_s")
# What every row carries from its actor, so far (cumulative): the writers pass them on to the driver's worker lines.
ACTOR_COLUMNS = ("graphs_compiled", "graphs_cached", *ACTOR_TIME_COLUMNS, "actor_end_unix")


def actor_time_split(marks: Sequence[tuple[float, float, float]]) -> dict | None:
    """What one actor did from the end of its first batch (model load, compilation and cuDNN's first calls excluded)
    to the end of its last: shares of that span in the model (``model``), in the rest of its calls (``calls_other``:
    stacking, copies, building the result) and outside its calls (``outside_calls``: Ray batching its input and
    storing its output, or the actor waiting for input because reading does not keep up), and the images it restored
    in that span and their rate (``images``, ``img_s``: the actor's steady rate, which the driver's view of arriving
    batches only approximates, as the write stage hands them back in bursts). ``marks``: one per restored image, the
    actor's (clock, model, calls) seconds at the end of the image's batch, cumulative. None with fewer than two
    batches."""
    rate = rate_after_first_batch([clock for clock, _, _ in marks])
    if rate is None:
        return None
    (clock0, model0, calls0), (clock1, model1, calls1) = min(marks), max(marks)
    span = clock1 - clock0
    model, calls = model1 - model0, calls1 - calls0
    return {"span_s": rate["span_s"], "model": round(model / span, 4), "calls_other": round((calls - model) / span, 4),
            "outside_calls": round(1.0 - calls / span, 4), "images": rate["images"], "img_s": rate["img_s"]}


def _rgb_column(rgb: list[np.ndarray], todo: list[int]) -> np.ndarray:
    """The batch's images as one dense uint8 [B,H,W,3] array when the restored ones share a size (rows not restored
    get zeros), else an object array. Ray turns both into the same tensor column, but an object array costs the actor
    0.14-0.22 ms of CPU per 512x512 photo (3 ms for noise-like images) against 0.004 ms for the dense array
    (bench/infer_throughput.py), time in which the actor is not feeding its GPU."""
    shapes = {rgb[i].shape for i in todo}
    if len(shapes) > 1:
        return _object_array(rgb)
    dense = np.zeros((len(rgb), *(shapes.pop() if shapes else _EMPTY_RGB.shape)), np.uint8)
    for i in todo:
        dense[i] = rgb[i]
    return dense


def _object_array(arrays: list[np.ndarray]) -> np.ndarray:
    out = np.empty(len(arrays), dtype=object)
    out[:] = arrays
    return out


# ---------------------------------------------------------------------------------------------- write stage (tasks)
def write_outputs(batch: dict[str, np.ndarray], *, png_dir: str, score: bool, compression: str = "fast",
                  ) -> dict[str, np.ndarray]:
    """Encode and atomically write each restored image as ``png_dir/KEY.png``; score it against gt if asked."""
    n = len(batch["key"])
    encode_s = np.zeros(n, np.float64)
    terms = {t: np.full(n, np.nan) for t in SCORE_TERMS}
    degenerate = np.array([""] * n, dtype=object)
    for i in range(n):
        status, key = batch["status"][i], batch["key"][i]
        pred = None
        if status == TODO:
            start = time.perf_counter()
            pred = np.asarray(batch["rgb"][i], dtype=np.uint8)
            schema.atomic_write_bytes(Path(png_dir) / f"{key}.png", schema.encode_png(pred, "RGB", compression))
            encode_s[i] = time.perf_counter() - start
        elif status == DONE and score:
            pred = schema.decode_png((Path(png_dir) / f"{key}.png").read_bytes(), "RGB", f"{png_dir}/{key}.png")
        if score and pred is not None:
            from restore.score import score_image

            result = score_image(np.asarray(batch["gt"][i]), pred, np.asarray(batch["mask"][i]).astype(bool))
            for t in SCORE_TERMS:
                terms[t][i] = result[t]
            degenerate[i] = ",".join(result["degenerate"])
    out = {k: batch[k] for k in ("key", "where", "status", "error", "note", "height", "width", "worker",
                                 "infer_s", *ACTOR_COLUMNS)}
    out["encode_s"] = encode_s
    out["degenerate"] = degenerate
    out.update(terms)
    return out


# ---------------------------------------------------------------------------------------------- the zip (driver)
def build_zip(png_dir: Path, keys: Sequence[str], sizes: dict[str, tuple[int, int]], out: Path,
              comment: str = "") -> None:
    """Write ``out`` (flat, one ``KEY.png`` per key) via a temp name; verify it before the rename."""
    missing = [k for k in keys if not (png_dir / f"{k}.png").is_file()]
    if missing:
        raise RuntimeError(f"{png_dir}: {len(missing)} restored images are missing: {', '.join(missing[:10])}")
    out.parent.mkdir(parents=True, exist_ok=True)
    for stale in out.parent.glob(f".{out.name}.*.tmp"):  # a zip temp left by a crashed run
        stale.unlink(missing_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        # PNG is compressed already: storing is as small and much faster than deflating again.
        with zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_STORED) as zf:
            for key in keys:
                zf.write(png_dir / f"{key}.png", arcname=f"{key}.png")
            zf.comment = comment.encode()[:65535]
        verify_zip(tmp, keys, sizes)
        os.replace(tmp, out)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def verify_zip(path: Path, keys: Sequence[str], sizes: dict[str, tuple[int, int]]) -> None:
    """Flat; names and count exactly ``KEY.png`` per key; each entry decodes as RGB of its input's (H, W)."""
    with zipfile.ZipFile(path) as zf:
        names = zf.namelist()
        expected = {f"{k}.png" for k in keys}
        nested = [n for n in names if "/" in n or "\\" in n]
        if nested or len(names) != len(expected) or set(names) != expected:
            extra, lacking = sorted(set(names) - expected), sorted(expected - set(names))
            raise RuntimeError(f"{path}: zip check failed: {len(names)} entries for {len(expected)} keys; "
                               f"nested {nested[:5]}, unexpected {extra[:5]}, missing {lacking[:5]}")
        for name in names:
            with zf.open(name) as member, Image.open(member) as img:
                img.load()
                if img.mode != "RGB":
                    raise RuntimeError(f"{path}: {name} is mode {img.mode}, not RGB")
                want = sizes.get(name[: -len(".png")])
                if want is not None and (img.height, img.width) != tuple(want):
                    raise RuntimeError(f"{path}: {name} is {img.width}x{img.height}, its input is "
                                       f"{want[1]}x{want[0]}")


# ---------------------------------------------------------------------------------------------- the driver
def default_png_dir(out: Path) -> Path:
    return out.with_name(out.stem + "_png")


def start_ray(address: str | None) -> bool:
    """Connect to (or start) Ray; returns True when this call started it (so the caller shuts it down).

    Without ``--address`` a new local Ray is started (``address="local"``) even if another Ray runs on this machine:
    joining someone else's cluster silently would be a surprise.
    """
    import ray

    if ray.is_initialized():
        return False
    quiet = dict(include_dashboard=False, logging_level=logging.WARNING, configure_logging=True)
    if address:
        ray.init(address=address, logging_level=logging.WARNING)
    else:
        ray.init(address="local", num_cpus=os.cpu_count(), **quiet)
    return True


def configure_ray_data() -> None:
    import ray.data

    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False  # ours (tqdm over finished batches) replaces Ray's per-operator bars
    ctx.print_on_execution_start = False
    ctx.enable_auto_log_stats = False
    ctx.execution_options.preserve_order = False
    logging.getLogger("ray.data").setLevel(logging.WARNING)


def pool_resources(workers: int | None, gpus_per_worker: float | None, cpus_per_worker: float | None,
                   ) -> tuple[int, float, float]:
    """Default to one actor per GPU (or one CPU actor), and refuse what the cluster cannot place (no hang)."""
    import ray

    total = ray.cluster_resources()
    gpus, cpus = float(total.get("GPU", 0)), float(total.get("CPU", 1))
    nodes = [n["Resources"] for n in ray.nodes() if n.get("Alive")]
    node_cpus = max((float(r.get("CPU", 0)) for r in nodes), default=cpus)
    node_gpus = max((float(r.get("GPU", 0)) for r in nodes), default=gpus)
    if gpus_per_worker is None:
        gpus_per_worker = 1.0 if gpus >= 1 else 0.0
    if workers is None:
        workers = max(1, int(gpus // gpus_per_worker)) if gpus_per_worker > 0 else 1
    if cpus_per_worker is None:
        # GPU actors only feed the device; CPU actors get the CPUs but one (the read/write tasks need it), as many
        # as one node has.
        cpus_per_worker = 1.0 if gpus_per_worker > 0 else max(1.0, min(node_cpus, float(int((cpus - 1) // workers))))
    if workers * gpus_per_worker > gpus + 1e-9 or gpus_per_worker > node_gpus + 1e-9:
        raise BadInput(f"--workers {workers} x --gpus-per-worker {gpus_per_worker:g} does not fit: the Ray cluster "
                       f"has {gpus:g} GPUs, at most {node_gpus:g} on one node")
    if cpus_per_worker > node_cpus or workers * cpus_per_worker > cpus - 1 + 1e-9:
        raise BadInput(f"--workers {workers} x {cpus_per_worker:g} CPUs does not fit and leave a CPU for reading "
                       f"and writing: the Ray cluster has {cpus:g} CPUs, at most {node_cpus:g} on one node")
    return workers, gpus_per_worker, cpus_per_worker


def run(args: argparse.Namespace) -> dict:
    """The whole job; returns the summary. Raises ``BadInput`` for the user's mistakes."""
    started = time.perf_counter()
    plan = plan_shards(args.shards) if args.shards else plan_images(args.images)
    if args.score and plan.kind != "shards":
        raise BadInput("--score needs --shards with gt members (a folder of images has no ground truth)")
    checkpoints = resolve_checkpoints(args.checkpoint, Path(args.runs_dir))
    specs = check_checkpoints(checkpoints)
    cache_dir = inference_cache_dir(args.compile_cache, checkpoints)  # checked even when unused: a typo is an error
    cache_dir = cache_dir if args.compile != "off" else None
    for s in specs:
        print(f"checkpoint: {s['path']} ({s['weights']} weights, encoder {s['spec']['encoder']}, "
              f"color_mode {s['spec']['color_mode']})")

    out = Path(args.out) if args.out else None
    png_dir = Path(args.png_dir) if args.png_dir else default_png_dir(out)
    if plan.kind == "images" and png_dir.resolve() == plan.source.resolve():
        raise BadInput(f"--png-dir {png_dir} is the input folder: KEY.png would overwrite the damaged inputs")
    png_dir.mkdir(parents=True, exist_ok=True)
    removed = remove_temp_files(png_dir)
    done = finished_keys(png_dir) & set(plan.keys)
    print(f"{plan.kind}: {plan.source}: {len(plan.keys)} images; {len(done)} already in {png_dir}"
          + (f"; removed {removed} leftover temp files" if removed else ""))
    for item in plan.items:
        item["done"] = [k for k in item["keys"] if k in done]

    import ray
    import ray.data

    own_ray = start_ray(args.address)
    try:
        configure_ray_data()
        workers, gpus_per_worker, cpus_per_worker = pool_resources(args.workers, args.gpus_per_worker,
                                                                   args.cpus_per_worker)
        print(f"ray: {workers} worker(s) x ({gpus_per_worker:g} GPU, {cpus_per_worker:g} CPU), "
              f"batch {args.batch_size}, tta {'on' if args.tta else 'off'}, "
              f"composite {'on' if args.composite else 'off'}, compile {args.compile}, "
              f"{len(checkpoints)} checkpoint(s)")
        if args.compile != "off":
            print(f"compile: each actor compiles the model on its first batch (minutes on a GPU, unless the compile "
                  f"cache has it) before its first images arrive; then every call runs a static batch of "
                  f"{args.batch_size}; compile cache {cache_dir or 'off'}")
        ds = ray.data.from_items(plan.items, override_num_blocks=len(plan.items))
        ds = ds.flat_map(read_item, fn_kwargs={"with_gt": args.score})
        ds = ds.map_batches(
            RestoreWorker,
            fn_constructor_kwargs={"checkpoints": [str(c) for c in checkpoints], "tta": args.tta,
                                   "composite": args.composite, "keep_gt": args.score,
                                   "batch_size": args.batch_size, "compile": args.compile,
                                   "compile_cache": str(cache_dir) if cache_dir else None},
            compute=ray.data.ActorPoolStrategy(size=workers),
            batch_size=args.batch_size, batch_format="numpy", num_gpus=gpus_per_worker, num_cpus=cpus_per_worker,
            zero_copy_batch=True,  # read-only views: neither stage writes its input (older Rays copy by default)
        )
        ds = ds.map_batches(write_outputs, fn_kwargs={"png_dir": str(png_dir.resolve()), "score": args.score,
                                                      "compression": args.png_compression},
                            batch_size=args.batch_size, batch_format="numpy", zero_copy_batch=True)
        rows, arrivals = _consume(ds, len(plan.keys), skip_bad=args.skip_bad)
    finally:
        if own_ray:
            ray.shutdown()
    summary = _finish(args, plan, rows, png_dir, out, time.perf_counter() - started)
    # The driver's view of the batches as they arrive: bursty (the writers hand batches back in groups), so the
    # steady rate is the actors' own, pooled (``summary["steady"]``); this one is kept for comparison.
    summary["arrivals_img_per_s"] = steady_rate(arrivals)
    return summary


def rate_after_first_batch(batch_ends: Sequence[float]) -> dict | None:
    """The steady rate after the first batch (model loads and compilation excluded): the images of the batches that
    ended after the first one, over the time from its end to the last batch's end. ``batch_ends``: one time per
    restored image, the end of its batch: one actor's clock (``actor_time_split``), all actors' wall clocks pooled
    (the run's steady rate, whether they overlapped or not), or the arrivals at the driver (``steady_rate``). None
    with fewer than two batches."""
    if not batch_ends:
        return None
    first, last = min(batch_ends), max(batch_ends)
    if last <= first:
        return None
    images = sum(1 for t in batch_ends if t > first)
    return {"images": images, "span_s": round(last - first, 3), "img_s": round(images / (last - first), 3)}


def steady_rate(arrivals: list[tuple[float, int]]) -> float | None:
    """Restored images per second after the first batch that restored any (start-up and model load excluded), from
    (arrival time, images restored) per batch."""
    rate = rate_after_first_batch([t for t, n in arrivals for _ in range(n)])
    return rate["img_s"] if rate else None


def _consume(ds, total: int, *, skip_bad: bool) -> tuple[list[dict], list[tuple[float, int]]]:
    """Drain the pipeline with a progress bar; the first bad key aborts unless ``skip_bad``.

    Returns the rows and, per arriving batch, (time, images restored in it).
    """
    from tqdm import tqdm

    rows: list[dict] = []
    arrivals: list[tuple[float, int]] = []
    restored = 0
    with tqdm(total=total, unit="img", desc="restore", file=sys.stderr, mininterval=1.0, smoothing=0.1) as bar:
        for batch in ds.iter_batches(batch_size=None, batch_format="numpy"):
            for i in range(len(batch["key"])):
                row = {k: (v[i].item() if hasattr(v[i], "item") else v[i]) for k, v in batch.items()}
                if row["status"] == BAD and not skip_bad:
                    raise BadInput(f"{row['error']}\n(rerun with --skip-bad to restore the rest and list the "
                                   f"bad keys; finished images are kept and will not be redone)")
                rows.append(row)
                restored += row["status"] == TODO
            arrivals.append((time.perf_counter(), int(np.sum(batch["status"] == TODO))))
            bar.update(len(batch["key"]))
            bar.set_postfix(restored=restored, refresh=False)
    return rows, arrivals


def _finish(args: argparse.Namespace, plan: Plan, rows: list[dict], png_dir: Path, out: Path | None,
            elapsed: float) -> dict:
    by_key: dict[str, dict] = {}
    for row in rows:
        if row["key"] in by_key and by_key[row["key"]]["status"] != BAD:
            continue  # a duplicate copy inside a shard: the first good one counts
        by_key[row["key"]] = row
    unseen = [k for k in plan.keys if k not in by_key]
    if unseen:
        raise RuntimeError(f"the pipeline returned no row for {len(unseen)} keys: {', '.join(unseen[:10])}")
    expected = set(plan.keys)
    bad = [by_key[k] for k in plan.keys if by_key[k]["status"] == BAD]
    bad += [r for r in rows if r["status"] == BAD and r["key"] not in expected]
    good = [k for k in plan.keys if by_key[k]["status"] != BAD]
    restored = [by_key[k] for k in good if by_key[k]["status"] == TODO]

    per_worker: dict[str, dict] = defaultdict(lambda: {"images": 0, "busy_s": 0.0, "graphs_compiled": 0,
                                                       "graphs_cached": 0})
    marks: dict[str, list[tuple[float, ...]]] = defaultdict(list)
    for r in restored:
        w = per_worker[r["worker"]]
        w["images"] += 1
        w["busy_s"] += float(r["infer_s"])
        for k in ("graphs_compiled", "graphs_cached"):  # each row holds the actor's count so far
            w[k] = max(w[k], int(r[k]))
        marks[r["worker"]].append(tuple(float(r[k]) for k in ACTOR_TIME_COLUMNS))
    for name, w in per_worker.items():
        w["after_first_batch"] = actor_time_split(marks[name])
    steady = rate_after_first_batch([float(r["actor_end_unix"]) for r in restored])
    summary: dict[str, Any] = {
        "images": len(plan.keys), "restored": len(restored), "already_done": len(good) - len(restored),
        "bad": len(bad), "seconds": round(elapsed, 3),
        "img_per_s": round(len(restored) / elapsed, 3) if elapsed > 0 else None,
        "steady": steady,
        "workers": {w: {**v, "img_per_s": round(v["images"] / v["busy_s"], 3) if v["busy_s"] else None}
                    for w, v in sorted(per_worker.items())},
        "png_dir": str(png_dir), "zip": None,
        "notes": sorted({f"{by_key[k]['key']}: {by_key[k]['note']}" for k in good if by_key[k]["note"]}),
    }

    bad_path = (out.parent if out else png_dir) / BAD_KEYS_NAME
    if bad:
        listing = [{"key": r["key"], "where": r["where"], "error": r["error"]} for r in bad]
        schema.atomic_write_json(bad_path, {"count": len(listing), "bad": listing, "zip_holds": len(good),
                                            "expected": len(plan.keys)})
        print(f"skipped {len(bad)} bad input(s) (listed in {bad_path}):")
        for r in listing:
            print(f"  {r['key']}: {r['error']}")
    else:
        bad_path.unlink(missing_ok=True)  # stale from an earlier run

    if out is not None:
        sizes = {k: (int(by_key[k]["height"]), int(by_key[k]["width"])) for k in good}
        comment = (f"restore.batch_infer: {len(good)} of {len(plan.keys)} images; {len(bad)} bad inputs left out "
                   f"(see {BAD_KEYS_NAME})" if bad else f"restore.batch_infer: all {len(good)} images")
        build_zip(png_dir, good, sizes, out, comment)
        summary["zip"] = str(out)
        print(f"zip: {out}: {len(good)} images, verified" + (f" (WITHOUT the {len(bad)} bad keys)" if bad else ""))

    if args.score:
        from restore.score import summarize

        scored = [{**{t: by_key[k][t] for t in SCORE_TERMS}, "degenerate": by_key[k]["degenerate"]} for k in good]
        result = summarize(scored)
        summary["score"] = result
        print(f"score {result['score']:.4f}  ssim {result['ssim']:.4f}  masked_ssim {result['masked_ssim']:.4f}  "
              f"hist_sim {result['hist_sim']:.4f}  (n={result['n']}, degenerate={result['n_degenerate']})")

    for note in summary["notes"]:
        print(f"note: {note}")
    print(f"done: {summary['restored']} restored, {summary['already_done']} already done, {summary['bad']} bad, "
          f"{elapsed:.1f}s, {summary['img_per_s'] or 0:.2f} img/s end to end"
          + (f"; steady {steady['img_s']:.2f} img/s ({steady['images']} images after the first batch, "
             f"{steady['span_s']:.2f} s)" if steady else ""))
    for name, w in summary["workers"].items():
        print(f"  worker {name}: {w['images']} images, {w['busy_s']:.2f}s in the model, "
              f"{w['img_per_s'] or 0:.2f} img/s"
              + (f"; graphs {w['graphs_compiled']} compiled, {w['graphs_cached']} from the compile cache"
                 if args.compile != "off" else ""))
        split = w["after_first_batch"]
        if split:
            print(f"    after its first batch ({split['images']} images in {split['span_s']:.2f} s, "
                  f"{split['img_s']:.2f} img/s): in the model {split['model']:.0%}, in the rest "
                  f"of its calls {split['calls_other']:.0%}, outside its calls {split['outside_calls']:.0%} "
                  f"(Ray's batching and hand-off, or waiting for input)")
    return summary


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m restore.batch_infer", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--shards", help="a packed split dir (manifest.json + tars), e.g. data/shards/test")
    src.add_argument("--images", help="a folder of damaged gray PNGs; masks are detected on the fly")
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
    p.add_argument("--score", action="store_true", help="score against the shards' gt (DACON score and its terms)")
    p.add_argument("--skip-bad", action="store_true",
                   help="restore the rest when inputs are bad; list them in bad_keys.json next to the zip")
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
    try:
        run(args)
    except BadInput as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    return 0


if __name__ == "__main__":
    sys.exit(main())
