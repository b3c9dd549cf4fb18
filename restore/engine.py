"""The inference engine: the checkpoints on one device, ``Engine.restore(gray, mask) -> rgb uint8``.

No Ray here: the Ray actors (``restore.ray_pipeline.RestoreWorker``), ``bench/infer_throughput.py``'s plain loop and
any script of one's own run the same numerics through this class. Checkpoint averaging, flip TTA, luminance
compositing (``restore.composite``), the BatchNorm fold, channels_last, torch.compile and its cache, and the
precision (``restore.precision``, the rule training uses too) are decided here.

``Engine.restore`` takes a batch of same-size images; the caller decides what goes in one call (the Ray actor groups
a batch's images by size). Images of more than ``large_above`` megapixels are restored one at a time in bounded
memory by ``restore.large_image`` (stage 1 on crops around the holes, stage 2 at ``work_size``); smaller ones run
both stages on the whole image.
"""
from __future__ import annotations

import os
import warnings
from collections import Counter
from typing import Callable, Sequence

import numpy as np

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
    ``large_above`` (megapixels; None or inf: never) and ``work_size``: an image above that size is restored by
    ``restore.large_image.LargeImageRestorer`` at that working size, eagerly (crops differ in shape), with the same
    models, TTA, compositing and precision; ``large_log`` receives its one line per image (default: printed).
    """

    def __init__(self, checkpoints: Sequence[str | os.PathLike], *, tta: bool = False, composite: bool = True,
                 device: str | None = None, batch_size: int | None = None, compile: str = "off",
                 cudnn_benchmark: bool = True, compile_backend: str = "inductor", fuse_bn: bool | None = None,
                 channels_last: bool = True, compile_cache: str | os.PathLike | None = None,
                 precision: str = "auto", bf16_weights: bool = True, work_size: int | None = None,
                 large_above: float | None = None, large_log: Callable[[str], None] | None = None) -> None:
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
        from restore import large_image

        self.work_size = large_image.DEFAULT_WORK_SIZE if work_size is None else work_size
        self.large_above = large_image.DEFAULT_LARGE_ABOVE_MP if large_above is None else large_above
        if self.large_above < 0:
            raise ValueError(f"large_above={large_above}: must be >= 0 megapixels (inf: never)")
        self._is_large = large_image.is_large
        self.large = large_image.LargeImageRestorer(
            self.models, device=self.device, work_size=self.work_size, tta=tta, composite=composite,
            autocast_dtype=self.autocast_dtype, channels_last=channels_last,
            log=large_log or (lambda line: print(line, flush=True)))

    def is_large(self, height: int, width: int) -> bool:
        """Whether an image of this size takes the bounded-memory path (``restore.large_image``)."""
        return self._is_large(height, width, self.large_above)

    def restore(self, gray: np.ndarray, mask: np.ndarray, names: Sequence[str] | None = None) -> np.ndarray:
        """``gray`` uint8 [B,H,W], ``mask`` [B,H,W] (nonzero = hole) -> RGB uint8 [B,H,W,3]. ``names`` (the images'
        keys) only label the log line of each large image."""
        if gray.ndim == 3 and self.is_large(*gray.shape[1:]):
            return self._restore_large(gray, mask, names)
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

    def _restore_large(self, gray: np.ndarray, mask: np.ndarray, names: Sequence[str] | None) -> np.ndarray:
        """Each image on its own through ``restore.large_image`` (never stacked into one model call)."""
        if self.cuda:  # crops of every shape: cuDNN's autotuner would search anew for each
            self.torch.backends.cudnn.benchmark = False
        out = np.empty((*gray.shape, 3), np.uint8)
        for i in range(len(gray)):
            self.large.restore(gray[i], mask[i], name=names[i] if names else "", out=out[i])
            self.forward_passes += len(self.models) * (2 if self.tta else 1)
        return out

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
    from torch import nn

    for layer in model.modules():
        if isinstance(layer, (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)):
            layer.to(dtype)

