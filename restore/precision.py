"""The one precision rule, for training (``job``) and inference (``restore.engine``) alike.

``auto`` is bf16 on a GPU whose tensor cores do bf16 natively (Ampere and later), fp16 on older GPUs (T4, V100:
bf16 is only emulated there, slower than fp32 or refused by cuDNN), and fp32 on the CPU. Training adds a GradScaler
to fp16; inference needs none. ``fp16`` on a CPU is refused: CPU autocast in fp16 is slow and untested here.
"""
from __future__ import annotations

PRECISIONS = ("auto", "bf16", "fp16", "fp32")


class PrecisionError(ValueError):
    """A precision setting that is unknown or cannot run on the device."""


def resolve(setting: str, device_type: str, native_bf16: bool) -> str:
    """``bf16`` | ``fp16`` | ``fp32`` for ``setting`` on a device of ``device_type`` ("cuda", "cpu", ...);
    ``native_bf16``: whether that GPU computes bf16 in hardware (ignored off CUDA)."""
    if setting not in PRECISIONS:
        raise PrecisionError(f"precision={setting!r}: must be one of {', '.join(PRECISIONS)}")
    cuda = device_type == "cuda"
    if setting == "auto":
        if not cuda:
            return "fp32"
        return "bf16" if native_bf16 else "fp16"
    if setting == "fp16" and not cuda:
        raise PrecisionError("precision=fp16 needs a CUDA device (use bf16 or fp32 on a CPU)")
    return setting


def resolve_for(setting: str, device) -> str:
    """``resolve`` for a ``torch.device``, asking CUDA whether the GPU has native bf16."""
    import torch

    device = torch.device(device)
    native = device.type == "cuda" and torch.cuda.is_bf16_supported(including_emulation=False)
    return resolve(setting, device.type, native)


def autocast_dtype(precision: str):
    """The autocast dtype of a resolved precision (None: fp32, no autocast)."""
    import torch

    return {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": None}[precision]
