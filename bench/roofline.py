"""The roofline floor of the two-stage restorer: FLOPs, HBM bytes and kernels per image, from one traced pass.

    python bench/roofline.py                      # 512 px, EfficientNet-B4 x2, inference batch 32, training 8 / 32
    python bench/roofline.py --infer-img-s 274 --train-img-s seed=34.3,default=112.9   # measured rates vs floors
    python bench/roofline.py --tiny               # CPU smoke: timm test encoder, 64 px

Why: a measured rate (227 img/s inference, 85.6 img/s training on an H100) only says how far a target is once it is
set against what the GPU could do at best. Every op of one inference pass and one training step (the job's joint
loss, forward and backward) runs on the ``meta`` device under a dispatch mode that records the op's FLOPs (torch's
own formulas, ``torch.utils.flop_counter``), the bytes it reads and writes, and the module it belongs to. Nothing is
computed, so the full model at 512 px traces in seconds on any CPU, and the counts are exact for this code.

Floors per image, from the device peaks (default: H100 SXM, 989 TFLOP/s dense bf16, 495 TF32, 3.35 TB/s HBM):
  compute   all FLOPs at the tensor-core peak
  eager     op by op, each op at max(FLOPs / peak, bytes / bandwidth): every op a kernel that reads its inputs from
            and writes its output to memory, as eager PyTorch does (launch overhead not included); a conv's bias is
            one more such kernel, as eager cuDNN adds it apart (so folding a BatchNorm into a conv saves no bytes)
  fused     only the convolutions (and matmuls) at that bound, every other op fused away into them: the most any
            fusion (torch.compile) can give while the convolutions stay library kernels
A measured rate below a floor is impossible; the ratio measured/floor says how much of the GPU a recipe uses.
Precision: ``bf16`` traces the model in bf16 (autocast's conv dtype; its fp32 weight casts, <1% of the bytes, are
left out), ``fp32`` in fp32 with convolutions at the TF32 peak (cuDNN's default). The optimizer is counted as one fused
AdamW pass over fp32 parameters, gradients and two moments: 28 bytes per parameter per step.
"""
from __future__ import annotations

import argparse
import contextlib
import sys
import time
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten
from torch.utils.flop_counter import conv_flop_count, flop_registry
from torch.utils.module_tracker import ModuleTracker

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from job.step import StageLoss  # noqa: E402
from restore.fuse import fuse_batchnorm, restorer_probe  # noqa: E402
from restore.losses import Stage1Loss, Stage2Loss  # noqa: E402
from restore.model import ModelSpec, build_model, unfold_same_padding  # noqa: E402
from report import emit  # noqa: E402  (bench/report.py, beside this script)

# Ops that run on the tensor cores; everything else is bound by memory at these models' sizes.
MATMUL_OPS = {torch.ops.aten.convolution, torch.ops.aten.convolution_backward, torch.ops.aten.mm,
              torch.ops.aten.addmm, torch.ops.aten.bmm, torch.ops.aten.baddbmm}
_NO_KERNEL = {torch.ops.aten.detach, torch.ops.aten.empty, torch.ops.aten.empty_like, torch.ops.aten.empty_strided,
              torch.ops.aten.new_empty, torch.ops.aten.new_empty_strided}
ADAMW_BYTES_PER_PARAM = 28  # read param, grad, m, v (16 B) and write param, m, v (12 B), all fp32


@dataclass
class OpCost:
    calls: int = 0
    flops: int = 0
    bytes: int = 0


@dataclass
class Trace:
    """Costs of one traced pass, by op kind, by module part and in total."""

    by_op: dict[str, OpCost] = field(default_factory=lambda: defaultdict(OpCost))
    by_part: dict[str, OpCost] = field(default_factory=lambda: defaultdict(OpCost))
    seconds_eager: float = 0.0  # sum over ops of max(flops / peak, bytes / bandwidth)
    seconds_fused: float = 0.0  # the same over tensor-core ops only

    @property
    def total(self) -> OpCost:
        return OpCost(sum(c.calls for c in self.by_op.values()), sum(c.flops for c in self.by_op.values()),
                      sum(c.bytes for c in self.by_op.values()))


def touched_bytes(t: torch.Tensor) -> int:
    """Bytes a kernel must touch for ``t``: its strided span, so an expanded (stride-0) view counts once."""
    if t.numel() == 0:
        return 0
    return (1 + sum((n - 1) * abs(s) for n, s in zip(t.shape, t.stride()))) * t.element_size()


def conv_kind(weight: torch.Tensor, groups: int) -> str:
    """'conv depthwise', 'conv 1x1' or 'conv KxK' (dense or grouped) from a convolution's weight and groups."""
    if weight.shape[1] == 1 and groups > 1:
        return "conv depthwise"
    return "conv " + "x".join(str(k) for k in weight.shape[2:])


def conv_backward_flops(grad_out, x, weight, bias_sizes, stride, padding, dilation, transposed, output_padding,
                        groups, output_mask) -> int:
    """Each gradient of a convolution (input, weight) costs the forward's multiply-adds. torch's formula for the
    weight gradient leaves out ``groups``: for a depthwise convolution it counts C times the real work (an
    EfficientNet-B4 training step came out at 1.9 TFLOP per image instead of ~0.47)."""
    forward = conv_flop_count(list(x.shape), list(weight.shape), list(grad_out.shape), transposed)
    return forward * (int(output_mask[0]) + int(output_mask[1]))


def module_part(parents: set[str]) -> str:
    """'stage1.encoder', 'stage2.decoder', 'loss', ... from the module tracker's fully qualified names."""
    names = " ".join(parents)
    lower = names.lower()  # 'StageLoss.model.inpainter...' in training, 'GrayInpainter...' when called directly
    stage = "stage1" if "inpainter" in lower else "stage2" if "colorizer" in lower else None
    if stage is None:
        return "loss" if any(n.startswith("StageLoss.loss") for n in parents) else "other"
    for part in ("encoder", "cbam", "decoder", "segmentation_head"):
        if f".net.{part}" in names:
            return f"{stage}.{part.replace('segmentation_head', 'head')}"
    return f"{stage}.wrapper"  # normalisation, padding, the residual and the crop around the network


class CostCounter(TorchDispatchMode):
    """Records every non-view op: FLOPs from torch's registry, touched input + output bytes, kind and module."""

    def __init__(self, tracker: ModuleTracker, peak_flops: float, bandwidth: float) -> None:
        super().__init__()
        self.tracker, self.peak_flops, self.bandwidth = tracker, peak_flops, bandwidth
        self.trace = Trace()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if func.is_view or func._overloadpacket in _NO_KERNEL:
            return out  # metadata or allocation only: no kernel, no bytes
        packet = func._overloadpacket
        if packet is torch.ops.aten.convolution_backward:
            flops = conv_backward_flops(*args)
        else:
            flops = flop_registry[packet](*args, **kwargs, out_val=out) if packet in flop_registry else 0
        inputs = [t for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)]
        outputs = [t for t in tree_flatten(out)[0] if isinstance(t, torch.Tensor)]
        # Each distinct input is read once and each output written once; an in-place op's output is its input, so
        # it counts as read and written.
        unique_inputs = {id(t): t for t in inputs}.values()
        nbytes = sum(map(touched_bytes, unique_inputs)) + sum(map(touched_bytes, outputs))
        if packet is torch.ops.aten.convolution:
            kind = conv_kind(args[1], args[8])
        elif packet is torch.ops.aten.convolution_backward:
            kind = conv_kind(args[2], args[9]) + " backward"
        else:
            kind = str(packet)
        # The tracker's module stack is only reliable in the forward: backward ops are pooled.
        part = "backward" if self.tracker.is_bw else module_part(self.tracker.parents)
        seconds = max(flops / self.peak_flops, nbytes / self.bandwidth)
        for cost in (self.trace.by_op[kind], self.trace.by_part[part]):
            cost.calls += 1
            cost.flops += flops
            cost.bytes += nbytes
        self.trace.seconds_eager += seconds
        if packet in MATMUL_OPS:
            self.trace.seconds_fused += seconds
        if packet is torch.ops.aten.convolution and args[2] is not None:
            self._eager_bias_add(outputs[0], args[2], part)
        return out

    def _eager_bias_add(self, out: torch.Tensor, bias: torch.Tensor, part: str) -> None:
        """Eager cuDNN adds a conv's bias in a kernel of its own (``aten::add_``, 17% of the GPU time of an eager
        inference pass on an H100, 2026-11-26): the output read and written once more. Fused floors fuse it away.
        No FLOPs counted, as for the BatchNorm it may replace (torch's registry counts neither)."""
        nbytes = 2 * touched_bytes(out) + touched_bytes(bias)
        for cost in (self.trace.by_op["conv bias add (eager)"], self.trace.by_part[part]):
            cost.calls += 1
            cost.bytes += nbytes
        self.trace.seconds_eager += nbytes / self.bandwidth


def count(fn: Callable[[], object], peak_flops: float, bandwidth: float) -> Trace:
    """Runs ``fn`` (on meta tensors) once under the counter; returns its trace."""
    tracker = ModuleTracker()
    counter = CostCounter(tracker, peak_flops, bandwidth)
    with tracker, counter, meta_autocast():
        fn()
    return counter.trace


@contextlib.contextmanager
def meta_autocast():
    """The meta device has no autocast state, so ``torch.autocast('meta', enabled=False)`` (the losses' and colour
    conversions' fp32 islands) would raise; there it is the CPU's no-op instead, which changes nothing on meta."""
    real = torch.autocast

    class _Autocast(real):  # type: ignore[misc,valid-type]
        def __init__(self, device_type: str, *args, **kwargs) -> None:
            super().__init__("cpu" if device_type == "meta" else device_type, *args, **kwargs)

    torch.autocast = _Autocast
    try:
        yield
    finally:
        torch.autocast = real


@dataclass(frozen=True)
class Peaks:
    bf16_flops: float
    tf32_flops: float
    bandwidth: float

    def flops_for(self, dtype: torch.dtype) -> float:
        return self.bf16_flops if dtype in (torch.bfloat16, torch.float16) else self.tf32_flops


def meta_model(spec: ModelSpec, dtype: torch.dtype, train: bool, fuse_bn: bool = False,
               smp_padding: bool = False) -> torch.nn.Module:
    model = build_model(spec)
    if smp_padding:
        unfold_same_padding(model)
    if fuse_bn:  # as the inference Engine runs it: found and checked on the CPU, then moved to meta
        model, _ = fuse_batchnorm(model, *restorer_probe())
    model = model.to(device="meta", dtype=dtype).to(memory_format=torch.channels_last)
    return model.train(train)


def inference_trace(spec: ModelSpec, size: int, batch: int, dtype: torch.dtype, peaks: Peaks,
                    fuse_bn: bool = True, smp_padding: bool = False) -> Trace:
    model = meta_model(spec, dtype, train=False, fuse_bn=fuse_bn, smp_padding=smp_padding)
    gray = torch.empty(batch, 1, size, size, device="meta", dtype=dtype)
    mask = torch.empty(batch, 1, size, size, device="meta", dtype=dtype)

    def run():
        with torch.no_grad():
            model.colorize(model.inpaint(gray, mask))

    return count(run, peaks.flops_for(dtype), peaks.bandwidth)


def training_trace(spec: ModelSpec, size: int, batch: int, dtype: torch.dtype, peaks: Peaks,
                   smp_padding: bool = False) -> tuple[Trace, int]:
    """One step of the job's joint phase (both stages, both losses), forward and backward; and the parameter count."""
    model = meta_model(spec, dtype, train=True, smp_padding=smp_padding)
    step = StageLoss(model, Stage1Loss(), Stage2Loss(), "joint")
    gray, mask, gt_gray = (torch.empty(batch, 1, size, size, device="meta", dtype=dtype) for _ in range(3))
    gt_rgb = torch.empty(batch, 3, size, size, device="meta", dtype=dtype)

    def run():
        total, _, _ = step(gray, mask, gt_gray, gt_rgb)
        total.backward()

    trace = count(run, peaks.flops_for(dtype), peaks.bandwidth)
    return trace, sum(p.numel() for p in model.parameters())


def summarize(trace: Trace, images: int, extra_bytes: int, peaks: Peaks, dtype: torch.dtype) -> dict:
    total = trace.total
    extra_s = extra_bytes / peaks.bandwidth
    per = 1e3 / images  # seconds per pass -> ms per image
    return {
        "gflop_per_image": total.flops / images / 1e9,
        "gb_per_image": (total.bytes + extra_bytes) / images / 1e9,
        "kernels_per_pass": total.calls,
        "kernels_per_image": total.calls / images,
        "floor_ms_per_image": {
            "compute": total.flops / peaks.flops_for(dtype) * per,
            "eager": (trace.seconds_eager + extra_s) * per,
            "fused": (trace.seconds_fused + extra_s) * per,
        },
        "by_op": _rows(trace.by_op, images),
        "by_part": _rows(trace.by_part, images),
    }


def _rows(costs: dict[str, OpCost], images: int) -> list[dict]:
    rows = [{"name": k, "calls_per_pass": c.calls, "gflop_per_image": c.flops / images / 1e9,
             "gb_per_image": c.bytes / images / 1e9} for k, c in costs.items()]
    return sorted(rows, key=lambda r: -r["gb_per_image"])


def print_summary(title: str, s: dict, measured: float | None, top: int) -> None:
    f = s["floor_ms_per_image"]
    print(f"{title}: {s['gflop_per_image']:.1f} GFLOP, {s['gb_per_image']:.2f} GB moved, "
          f"{s['kernels_per_image']:.0f} kernels per image ({s['kernels_per_pass']} per pass)")
    for name in ("compute", "eager", "fused"):
        print(f"  floor {name:7s} {f[name]:7.3f} ms/img = {1e3 / f[name]:8.0f} img/s")
    if measured:
        ms = 1e3 / measured
        print(f"  measured {measured:.1f} img/s = {ms:.3f} ms/img: {f['eager'] / ms:.0%} of the eager floor's rate, "
              f"{f['fused'] / ms:.0%} of the fused floor's")
    total_gb = s["gb_per_image"]
    for label, key in (("by op", "by_op"), ("by module", "by_part")):
        print(f"  {label} (GB/img, share of bytes, GFLOP/img, calls/pass):")
        for r in s[key][:top]:
            print(f"    {r['gb_per_image']:7.3f} {r['gb_per_image'] / total_gb:6.1%} {r['gflop_per_image']:8.2f}"
                  f" {r['calls_per_pass']:6d}  {r['name']}")


def parse_rates(text: str | None) -> dict[str, float]:
    """``seed=33.0,default=85.6`` -> {"seed": 33.0, "default": 85.6}; ValueError naming the bad item."""
    out: dict[str, float] = {}
    for item in filter(None, (text or "").split(",")):
        name, _, value = item.partition("=")
        try:
            rate = float(value)
        except ValueError:
            rate = 0.0
        if not name or not rate > 0:
            raise ValueError(f"{item!r}: expected RECIPE=IMG_PER_S with a rate > 0, e.g. seed=33.0,default=85.6")
        out[name] = rate
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size", type=int, default=512)
    ap.add_argument("--encoder", default="efficientnet-b4")
    ap.add_argument("--decoder-channels", default="256,128,64,32,16")
    ap.add_argument("--infer-batch", type=int, default=32)
    ap.add_argument("--infer-precision", choices=("bf16", "fp32"), default="bf16")
    ap.add_argument("--train-recipes", help="NAME=PRECISION:BATCH,... traced as training steps (default: the "
                    "train bench's seed=fp32:8,default=bf16:32; smaller batches with --tiny)")
    ap.add_argument("--peak-bf16-tflops", type=float, default=989.4)
    ap.add_argument("--peak-tf32-tflops", type=float, default=494.7)
    ap.add_argument("--hbm-tbs", type=float, default=3.35, help="memory bandwidth, TB/s")
    ap.add_argument("--infer-img-s", type=float, help="a measured inference rate to set against the floors")
    ap.add_argument("--infer-measured-fused", action="store_true",
                    help="--infer-img-s was measured with BatchNorm folded (compiled engines, and eager ones from "
                         "2026-11-25 evening to 2026-11-26); otherwise it is set against the unfolded model")
    ap.add_argument("--train-img-s", help="measured training rates, RECIPE=IMG_PER_S,...")
    ap.add_argument("--smp-padding", action="store_true",
                    help="trace the model as smp builds it, a ZeroPad2d before every padded EfficientNet conv (the "
                         "code the H100 figures of 2026-11-25 ran), instead of the padding moved into the convs")
    ap.add_argument("--top", type=int, default=8, help="rows per breakdown")
    ap.add_argument("--tiny", action="store_true", help="CPU smoke: timm test encoder, 64 px")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args(argv)
    if args.tiny:
        args.size, args.encoder, args.decoder_channels = 64, "tu-test_efficientnet", "16,8,8,8,8"
        args.infer_batch = 4
    if args.train_recipes is None:
        args.train_recipes = "seed=fp32:2,default=bf16:4" if args.tiny else "seed=fp32:8,default=bf16:32"
    dtypes = {"bf16": torch.bfloat16, "fp32": torch.float32}
    recipes = {}
    for item in filter(None, args.train_recipes.split(",")):
        name, _, rest = item.partition("=")
        precision, _, batch = rest.partition(":")
        if precision not in dtypes or not batch.isdigit() or int(batch) < 1:
            ap.error(f"--train-recipes {item!r}: expected NAME=bf16|fp32:BATCH")
        recipes[name] = (precision, int(batch))
    try:
        measured_train = parse_rates(args.train_img_s)
    except ValueError as e:
        ap.error(f"--train-img-s {e}")
    unknown = sorted(set(measured_train) - set(recipes))
    if unknown:
        ap.error(f"--train-img-s names {unknown}, not among the traced recipes {sorted(recipes)}")
    peaks = Peaks(args.peak_bf16_tflops * 1e12, args.peak_tf32_tflops * 1e12, args.hbm_tbs * 1e12)
    dec = tuple(int(x) for x in args.decoder_channels.split(","))
    spec = ModelSpec(encoder=args.encoder, decoder_channels=dec, encoder_depth=len(dec))
    print(f"# roofline: {args.encoder} x2 U-Net++ with CBAM, {args.size} px"
          + (", smp's ZeroPad2d padding" if args.smp_padding else "") + f"; peaks {args.peak_bf16_tflops:g} TFLOP/s "
          f"bf16, {args.peak_tf32_tflops:g} TF32, {args.hbm_tbs:g} TB/s; torch {torch.__version__}")
    result: dict = {"size": args.size, "encoder": args.encoder, "peaks": vars(peaks), "smp_padding": args.smp_padding}
    t0 = time.perf_counter()
    dtype = dtypes[args.infer_precision]
    for key, fuse_bn, label in (("inference", True, "BatchNorm folded, as a compiled Engine runs it"),
                                ("inference_unfused", False, "BatchNorm as trained, as an eager Engine runs it")):
        infer = summarize(inference_trace(spec, args.size, args.infer_batch, dtype, peaks, fuse_bn, args.smp_padding),
                          args.infer_batch, 0, peaks, dtype)
        measured = args.infer_img_s if fuse_bn == args.infer_measured_fused else None
        print_summary(f"inference, {label}, {args.infer_precision}, batch {args.infer_batch}", infer, measured,
                      args.top)
        result[key] = dict(infer, precision=args.infer_precision, batch=args.infer_batch, measured_img_s=measured)
    result["training"] = {}
    for name, (precision, batch) in recipes.items():
        dtype = dtypes[precision]
        trace, params = training_trace(spec, args.size, batch, dtype, peaks, args.smp_padding)
        s = summarize(trace, batch, params * ADAMW_BYTES_PER_PARAM, peaks, dtype)
        print_summary(f"training step '{name}', {precision}, batch {batch} ({params / 1e6:.1f} M parameters)", s,
                      measured_train.get(name), args.top)
        result["training"][name] = dict(s, precision=precision, batch=batch, params=params,
                                        measured_img_s=measured_train.get(name))
    result["trace_seconds"] = time.perf_counter() - t0
    emit(result, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
