"""The two-stage restorer: stage 1 inpaints the gray image, stage 2 colorizes it.

`build_model(spec)` is the one factory (training, evaluation, inference, tests); `load_restorer(path)` rebuilds a model
from a checkpoint file or a run dir. Both stages are U-Net++ (segmentation-models-pytorch) with a CBAM block on the
deepest encoder feature.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import segmentation_models_pytorch as smp
import torch
import torch.nn.functional as F
from segmentation_models_pytorch.decoders.unetplusplus.decoder import DecoderBlock as _SmpDecoderBlock
from torch import nn

from restore import color_classes
from restore.prefill import PREFILLS, prefill

CHECKPOINT_FORMAT = "restore-ckpt/1"
COLOR_MODES = ("rgb", "chroma", "classes")
# Keys added to ModelSpec after checkpoints were written, with the value that reproduces those older models.
LEGACY_SPEC_DEFAULTS = {"prefill": "none", "color_size": 0}
# Inputs in [0, 1] are normalized inside the model, as the seed recipe did outside it: (x - 0.5) / 0.225.
INPUT_MEAN = 0.5
INPUT_STD = 0.225
# ITU-R BT.601 luma, the weights of PIL's convert('L') (R*299/1000 + G*587/1000 + B*114/1000).
LUMA_WEIGHTS = (0.299, 0.587, 0.114)
# Full-range YCbCr (JPEG/BT.601): RGB = Y + M @ (Cb - 0.5, Cr - 0.5). Every row of M has zero luma, so any chroma
# keeps the luma Y; only clipping to [0, 1] could change it, which `compose_chroma` avoids by scaling chroma.
_CHROMA_TO_RGB = ((0.0, 1.402), (-0.344136, -0.714136), (1.772, 0.0))
_RGB_TO_CHROMA = ((-0.168736, -0.331264, 0.5), (0.5, -0.418688, -0.081312))


@dataclass(frozen=True)
class ModelSpec:
    """Everything needed to rebuild the model; primitives only so it round-trips through JSON and checkpoints."""

    encoder: str = "efficientnet-b4"
    # None: random init; "imagenet": smp's online weights; any other string: a local .pth/.pt/.safetensors file
    # holding the state dict of the 3-channel encoder (the format smp publishes); its first conv is adapted.
    encoder_weights: str | None = None
    decoder_channels: tuple[int, ...] = (256, 128, 64, 32, 16)
    encoder_depth: int = 5
    cbam: bool = True
    cbam_reduction: int = 16
    cbam_kernel: int = 7
    color_mode: str = "chroma"
    # Stage 1's starting image in the hole (restore.prefill): "harmonic" (classical fill, the network learns a
    # correction) or "none" (the constant damage value, as checkpoints written before the prefill existed).
    prefill: str = "harmonic"
    # Stage 2's working size: an image whose short side is larger is colorized shrunk to this short side and its
    # chroma laid on the full-resolution luma (DeOldify's render factor), so the colorizer sees a whole photo at the
    # scale of its training windows. 0: colorize at full resolution.
    color_size: int = 0

    def __post_init__(self) -> None:
        if isinstance(self.decoder_channels, list):
            object.__setattr__(self, "decoder_channels", tuple(self.decoder_channels))
        problems = []
        if not _known_encoder(self.encoder):
            problems.append(f"encoder {self.encoder!r} is not an smp encoder name (nor 'tu-' + a timm model name)")
        if self.encoder_weights is not None and (not isinstance(self.encoder_weights, str) or not self.encoder_weights):
            problems.append(f"encoder_weights must be None, 'imagenet' or a file path, got {self.encoder_weights!r}")
        if not _is_int(self.encoder_depth) or not 3 <= self.encoder_depth <= 5:
            problems.append(f"encoder_depth must be an int in 3..5, got {self.encoder_depth!r}")
        if not isinstance(self.decoder_channels, tuple) or not all(
            _is_int(c) and c > 0 for c in self.decoder_channels
        ):
            problems.append(f"decoder_channels must be positive ints, got {self.decoder_channels!r}")
        elif _is_int(self.encoder_depth) and len(self.decoder_channels) != self.encoder_depth:
            problems.append(
                f"decoder_channels has {len(self.decoder_channels)} entries, encoder_depth is {self.encoder_depth}"
            )
        if not isinstance(self.cbam, bool):
            problems.append(f"cbam must be a bool, got {self.cbam!r}")
        if not _is_int(self.cbam_reduction) or self.cbam_reduction < 1:
            problems.append(f"cbam_reduction must be an int >= 1, got {self.cbam_reduction!r}")
        if not _is_int(self.cbam_kernel) or self.cbam_kernel < 1 or self.cbam_kernel % 2 == 0:
            problems.append(f"cbam_kernel must be an odd int >= 1, got {self.cbam_kernel!r}")
        if self.color_mode not in COLOR_MODES:
            problems.append(f"color_mode must be one of {COLOR_MODES}, got {self.color_mode!r}")
        if not _is_int(self.color_size) or self.color_size < 0:
            problems.append(f"color_size must be an int >= 0 (0 = full resolution), got {self.color_size!r}")
        if self.prefill not in PREFILLS:
            problems.append(f"prefill must be one of {PREFILLS}, got {self.prefill!r}")
        if problems:
            raise ValueError("invalid ModelSpec: " + "; ".join(problems))

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["decoder_channels"] = list(self.decoder_channels)
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "ModelSpec":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown ModelSpec keys: {', '.join(unknown)} (known: {', '.join(sorted(known))})")
        # A spec saved before a key existed describes the model as it was then, not today's default.
        return cls(**{**LEGACY_SPEC_DEFAULTS, **d})


def _known_encoder(name: Any) -> bool:
    if not isinstance(name, str):
        return False
    if name.startswith("tu-"):
        import timm

        return timm.is_model(name[3:])
    return name in smp.encoders.get_encoder_names()


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


class CBAM(nn.Module):
    """Convolutional Block Attention Module (Woo et al. 2018): channel attention, then spatial attention."""

    def __init__(self, channels: int, reduction: int = 16, kernel_size: int = 7) -> None:
        super().__init__()
        hidden = max(1, channels // reduction)
        self.channel_mlp = nn.Sequential(
            nn.Conv2d(channels, hidden, 1, bias=False),
            nn.ReLU(inplace=True),
            nn.Conv2d(hidden, channels, 1, bias=False),
        )
        self.spatial_conv = nn.Conv2d(2, 1, kernel_size, padding=kernel_size // 2, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        avg = self.channel_mlp(F.adaptive_avg_pool2d(x, 1))
        mx = self.channel_mlp(F.adaptive_max_pool2d(x, 1))
        x = x * torch.sigmoid(avg + mx)
        pooled = torch.cat([x.mean(dim=1, keepdim=True), x.amax(dim=1, keepdim=True)], dim=1)
        return x * torch.sigmoid(self.spatial_conv(pooled))


class SameDtypeUpsampleBlock(_SmpDecoderBlock):
    """smp's U-Net++ decoder block, its nearest-neighbour upsampling run in the feature map's own dtype.

    CUDA autocast runs ``upsample_nearest2d`` in fp32 (it is on autocast's fp32 list), so under bf16 each block cast
    its bf16 input up, upsampled it in fp32, concatenated the bf16 skips into an fp32 tensor and cast that back down
    for its first conv: twice the bytes of the block's largest tensors, and two extra kernels. On an H100, eager
    inference spent about a quarter of its GPU time in that upsampling, concatenation and the up-casts (bench
    profile, 2026-11-26). Nearest upsampling only copies values, so the conv receives the same bf16 numbers either way.
    Other interpolation modes compute new values and keep autocast's fp32.
    """

    def forward(self, x: torch.Tensor, skip: torch.Tensor | None = None) -> torch.Tensor:
        if self.interpolation_mode != "nearest":
            return super().forward(x, skip)
        with torch.autocast(x.device.type, enabled=False):
            x = F.interpolate(x, scale_factor=2.0, mode="nearest")
        if self.is_empty:
            return x.new_empty(x.shape[0], 0, *x.shape[2:])
        if skip is not None:
            x = self.attention1(torch.cat([x, skip], dim=1))
        return self.attention2(self.conv2(self.conv1(x)))


class CBAMUnetPlusPlus(smp.UnetPlusPlus):
    """smp's U-Net++ with CBAM on the deepest encoder feature (nn.Identity when disabled: no extra keys), its decoder
    blocks upsampling in their input's dtype (``SameDtypeUpsampleBlock``; the same modules and parameters)."""

    def __init__(self, *, cbam: bool, cbam_reduction: int, cbam_kernel: int, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        deepest = self.encoder.out_channels[-1]
        self.cbam = CBAM(deepest, cbam_reduction, cbam_kernel) if cbam else nn.Identity()
        for block in self.decoder.modules():
            if type(block) is _SmpDecoderBlock:
                block.__class__ = SameDtypeUpsampleBlock

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        features = self.encoder(x)
        features = [*features[:-1], self.cbam(features[-1])]
        return self.segmentation_head(self.decoder(features))


def fold_same_padding(module: nn.Module) -> int:
    """Moves symmetric TF-"same" zero padding into the convolutions' own ``padding``; returns how many convs.

    smp's EfficientNet encoders (efficientnet-pytorch's ``Conv2dStaticSamePadding``) zero-pad with a ``ZeroPad2d``
    module before every k>1 conv: one extra kernel and one copy of the activation each, 8% of the memory traffic of
    an inference pass at 512 px (bench/roofline.py). For stride-1 convs the padding is symmetric and the conv's own
    zero padding computes the same function; the strided convs' asymmetric padding stays. No parameters change.
    """
    folded = 0
    for conv in module.modules():
        pad = getattr(conv, "static_padding", None)
        if not isinstance(conv, nn.Conv2d) or not isinstance(pad, nn.ZeroPad2d):
            continue
        left, right, top, bottom = pad.padding
        if left != right or top != bottom or tuple(conv.padding) != (0, 0) or conv.padding_mode != "zeros":
            continue
        conv.padding = (top, left)
        conv.static_padding = nn.Identity()
        folded += 1
    return folded


def unfold_same_padding(module: nn.Module) -> int:
    """The inverse of `fold_same_padding`: the ZeroPad2d modules put back, the model as smp builds it (for the
    benchmarks and tests that compare the two). Returns how many convs."""
    unfolded = 0
    for conv in module.modules():
        if isinstance(conv, nn.Conv2d) and isinstance(getattr(conv, "static_padding", None), nn.Identity) \
                and tuple(conv.padding) != (0, 0):
            top, left = conv.padding
            conv.static_padding, conv.padding = nn.ZeroPad2d((left, left, top, top)), (0, 0)
            unfolded += 1
    return unfolded


class _PaddedStage(nn.Module):
    """Normalizes the input, reflect-pads it to the network's stride, runs the network, crops the output back."""

    def __init__(self, spec: ModelSpec, in_channels: int, out_channels: int) -> None:
        super().__init__()
        online = spec.encoder_weights == "imagenet"
        try:
            self.net = CBAMUnetPlusPlus(
                encoder_name=spec.encoder,
                encoder_depth=spec.encoder_depth,
                encoder_weights="imagenet" if online else None,
                decoder_channels=spec.decoder_channels,
                in_channels=in_channels,
                classes=out_channels,
                cbam=spec.cbam,
                cbam_reduction=spec.cbam_reduction,
                cbam_kernel=spec.cbam_kernel,
            )
        except OSError as e:
            if not online:
                raise
            raise OSError(
                f"encoder_weights='imagenet' downloads the {spec.encoder} weights from the Hugging Face hub and that "
                f"failed ({type(e).__name__}: {e}); without network access give a local weights file instead"
            ) from e
        fold_same_padding(self.net)

    @property
    def stride(self) -> int:
        return int(self.net.encoder.output_stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, w = x.shape[-2:]
        s = self.stride
        pad_h, pad_w = (-h) % s, (-w) % s
        x = (x - INPUT_MEAN) / INPUT_STD
        if pad_h or pad_w:
            # Reflect needs the pad smaller than the side; tiny inputs fall back to replicate.
            mode = "reflect" if pad_h < h and pad_w < w else "replicate"
            x = F.pad(x, (0, pad_w, 0, pad_h), mode=mode)
        return self.net(x)[..., :h, :w]


class GrayInpainter(_PaddedStage):
    """Stage 1: (gray, mask) -> gray with the hole filled; pixels outside the hole pass through bit for bit.

    The hole is first filled classically (``spec.prefill``, ``restore.prefill``); the network sees that prefilled
    image and the mask and adds a residual inside the hole. Its last layer starts at zero, so an untrained inpainter
    returns the classical fill, and training learns only the correction.
    """

    def __init__(self, spec: ModelSpec) -> None:
        super().__init__(spec, in_channels=2, out_channels=1)
        self.prefill = spec.prefill
        if self.prefill != "none":
            head = [m for m in self.net.segmentation_head.modules() if isinstance(m, nn.Conv2d)][-1]
            nn.init.zeros_(head.weight)
            if head.bias is not None:
                nn.init.zeros_(head.bias)

    def forward(self, gray: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        mask = mask.to(gray.dtype)
        start = prefill(self.prefill, gray, mask)
        residual = super().forward(torch.cat([start, mask], dim=1)).to(gray.dtype)
        filled = (start + residual).clamp(0.0, 1.0)
        # where() rather than gray*(1-mask) + filled*mask: exact outside the hole in any dtype, even if filled is NaN.
        return torch.where(mask > 0.5, filled, gray)


class Colorizer(_PaddedStage):
    """Stage 2: restored gray -> RGB. Takes the gray image only: after stage 1 the image is whole, and at inference
    the mask is a detection that may be wrong, so colors should not depend on it.

    color_mode "rgb": 3 channels through a sigmoid. "chroma": 2 channels (Cb, Cr through a sigmoid, 0.5 = neutral)
    composed with the input luma by `compose_chroma`, so the output's BT.601 luma equals the gray input.
    "classes": logits over quantized Cb/Cr cells at 1/4 resolution (`restore.color_classes`), read out as the
    annealed mean and composed with the luma the same way; `logits` and `decode` are the two halves, for training.
    With ``spec.color_size`` an image larger than that is colorized shrunk and its chroma upsampled onto the full luma.
    """

    def __init__(self, spec: ModelSpec) -> None:
        channels = {"rgb": 3, "chroma": 2, "classes": 1}[spec.color_mode]
        super().__init__(spec, in_channels=1, out_channels=channels)
        self.color_mode = spec.color_mode
        self.color_size = spec.color_size
        if self.color_mode == "classes":
            table, centers = color_classes.chroma_classes()
            self.net.segmentation_head = nn.Identity()  # the class head below reads the last decoder features
            width = spec.decoder_channels[-1]
            self.class_head = nn.Sequential(nn.Conv2d(width, 64, 3, padding=1), nn.ReLU(inplace=True),
                                            nn.Conv2d(64, len(centers), 1))
            # Constants of the quantization, rebuilt from the code: not saved in checkpoints.
            self.register_buffer("class_centers", torch.from_numpy(centers), persistent=False)
            self.register_buffer("class_table", torch.from_numpy(table), persistent=False)

    def forward(self, gray: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        h, w = gray.shape[-2:]
        if self.color_size and min(h, w) > self.color_size:
            scale = self.color_size / min(h, w)
            small = F.interpolate(gray.float(), size=(max(1, round(h * scale)), max(1, round(w * scale))),
                                  mode="area").to(gray.dtype)
            chroma = rgb_to_chroma(self._color(small))
            chroma = F.interpolate(chroma, size=(h, w), mode="bilinear", align_corners=False)
            return compose_chroma(gray, chroma).to(gray.dtype)
        return self._color(gray)

    def _color(self, gray: torch.Tensor) -> torch.Tensor:
        if self.color_mode == "classes":
            return self.decode(self.logits(gray), gray).to(gray.dtype)
        out = torch.sigmoid(_PaddedStage.forward(self, gray).to(gray.dtype))
        if self.color_mode == "rgb":
            return out
        return compose_chroma(gray, out)

    def training_outputs(self, gray: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """What the training loss needs: (rgb, class logits or None). For color_mode "classes" the rgb is the plain
        mean decode (temperature 1), which keeps the image-level terms' gradients smooth; else the forward's rgb."""
        if self.color_mode != "classes":
            return self(gray), None
        logits = self.logits(gray)
        return self.decode(logits, gray, temperature=1.0), logits

    def logits(self, gray: torch.Tensor) -> torch.Tensor:
        """color_mode "classes": B,1,H,W gray -> B,Q,ceil(H/4),ceil(W/4) chroma-class logits."""
        features = _PaddedStage.forward(self, gray)
        return self.class_head(F.avg_pool2d(features, color_classes.POOL, ceil_mode=True))

    def decode(self, logits: torch.Tensor, gray: torch.Tensor,
               temperature: float = color_classes.ANNEAL_T) -> torch.Tensor:
        """Class logits + the gray image -> RGB with the gray as its luma, read out at ``temperature`` (inference:
        the annealed mean; `training_outputs`: 1)."""
        chroma = color_classes.annealed_mean(logits, self.class_centers, temperature)
        chroma = F.interpolate(chroma, size=gray.shape[-2:], mode="bilinear", align_corners=False)
        return compose_chroma(gray, chroma)


def rgb_to_chroma(rgb: torch.Tensor) -> torch.Tensor:
    """B,3,H,W RGB in [0,1] -> B,2,H,W (Cb, Cr) in [0,1], full-range BT.601."""
    rgb = rgb.float()
    with torch.autocast(rgb.device.type, enabled=False):  # a bf16 matmul would lose the luma/chroma precision
        return torch.einsum("kc,bchw->bkhw", rgb.new_tensor(_RGB_TO_CHROMA), rgb) + 0.5


def rgb_to_luma(rgb: torch.Tensor) -> torch.Tensor:
    """B,3,H,W -> B,1,H,W BT.601 luma (PIL convert('L') before its integer rounding)."""
    rgb = rgb.float()
    with torch.autocast(rgb.device.type, enabled=False):
        return torch.einsum("c,bchw->bhw", rgb.new_tensor(LUMA_WEIGHTS), rgb).unsqueeze(1)


def compose_chroma(luma: torch.Tensor, chroma: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """RGB in [0,1] from luma (B,1,H,W in [0,1]) and chroma (B,2,H,W, 0.5 = neutral) with the luma kept exactly.

    Converting YCbCr to RGB and clipping would change the luma of out-of-gamut colors. Instead each pixel's chroma
    offset is scaled by the largest t in [0, 1] that keeps all of R, G, B in [0, 1]: the luma stays Y (zero-luma
    offsets), the hue stays, only the saturation of out-of-gamut colors drops.
    """
    luma, chroma = luma.float(), chroma.float()
    # fp32 even under autocast: bf16 (8-bit mantissa) would shift the luma by up to ~4e-3.
    with torch.autocast(luma.device.type, enabled=False):
        delta = torch.einsum("ck,bkhw->bchw", chroma.new_tensor(_CHROMA_TO_RGB), chroma - 0.5)  # zero-luma offsets
    room_up = (1.0 - luma) / delta.clamp_min(eps)
    room_down = luma / (-delta).clamp_min(eps)
    limit = torch.where(delta > eps, room_up, torch.where(delta < -eps, room_down, torch.full_like(delta, 1.0)))
    t = limit.amin(dim=1, keepdim=True).clamp(0.0, 1.0)
    return (luma + t * delta).clamp(0.0, 1.0)  # the clamp only removes float rounding at the bounds


class TwoStageRestorer(nn.Module):
    def __init__(self, spec: ModelSpec) -> None:
        super().__init__()
        self.spec = spec
        self.inpainter = GrayInpainter(spec)
        self.colorizer = Colorizer(spec)

    def inpaint(self, gray: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return self.inpainter(gray, mask)

    def colorize(self, gray_restored: torch.Tensor) -> torch.Tensor:
        return self.colorizer(gray_restored)

    def forward(self, gray: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        gray_restored = self.inpaint(gray, mask)
        return gray_restored, self.colorize(gray_restored)


def build_model(spec: ModelSpec) -> TwoStageRestorer:
    """The one factory. Local encoder weights (a file path in spec.encoder_weights) are loaded into both stages."""
    model = TwoStageRestorer(spec)
    weights = spec.encoder_weights
    if weights is not None and weights != "imagenet":
        state = _read_state_dict(Path(weights), what="encoder weights")
        for stage in (model.inpainter, model.colorizer):
            _load_encoder_weights(stage.net.encoder, state, Path(weights))
    return model


def _read_state_dict(path: Path, what: str) -> dict[str, torch.Tensor]:
    if not path.is_file():
        raise FileNotFoundError(f"{what} file not found: {path}")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path), device="cpu")
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # a corrupt or foreign file: say which one
        raise ValueError(f"cannot read {what} from {path}: {e}") from e
    if not isinstance(state, Mapping) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"{what} file {path} does not hold a state dict (name -> tensor)")
    return dict(state)


def _load_encoder_weights(encoder: nn.Module, state: Mapping[str, torch.Tensor], path: Path) -> None:
    """Load a 3-channel encoder state dict, adapting the first conv to this encoder's input channels as smp does."""
    from timm.models import adapt_input_conv

    own = encoder.state_dict()
    state = dict(state)
    if not set(own) & set(state) and all(k.startswith("encoder.") for k in state):
        state = {k[len("encoder."):]: v for k, v in state.items()}  # saved from a whole smp model's encoder
    adapted = {}
    for k, v in state.items():
        target = own.get(k)
        if (target is not None and v.ndim == 4 and target.ndim == 4 and v.shape[1] == 3 and target.shape[1] != 3
                and v.shape[0] == target.shape[0] and v.shape[2:] == target.shape[2:]):
            v = adapt_input_conv(target.shape[1], v)
        adapted[k] = v
    _check_keys(own, adapted, f"encoder weights {path} do not match encoder of this model")
    encoder.load_state_dict(adapted, strict=True)


def _check_keys(expected: Mapping[str, torch.Tensor], got: Mapping[str, torch.Tensor], what: str) -> None:
    missing = [k for k in expected if k not in got]
    unexpected = [k for k in got if k not in expected]
    wrong = [
        f"{k} {tuple(got[k].shape)} != {tuple(v.shape)}"
        for k, v in expected.items()
        if k in got and got[k].shape != v.shape
    ]
    if missing or unexpected or wrong:
        parts = []
        for name, keys in (("missing", missing), ("unexpected", unexpected), ("shape mismatch", wrong)):
            if keys:
                more = f" (+{len(keys) - 5} more)" if len(keys) > 5 else ""
                parts.append(f"{name} {len(keys)}: {', '.join(keys[:5])}{more}")
        raise ValueError(f"{what}: " + "; ".join(parts))


# ---------------------------------------------------------------- checkpoints


def resolve_checkpoint(path: str | Path) -> Path:
    """A checkpoint file, or a run dir (or its checkpoints/ dir): best.pt, else the file named by `latest`."""
    p = Path(path)
    if p.is_file():
        return p
    if not p.exists():
        raise FileNotFoundError(f"checkpoint or run dir not found: {p}")
    ckpt_dir = p / "checkpoints" if (p / "checkpoints").is_dir() else p
    best = ckpt_dir / "best.pt"
    if best.is_file():
        return best
    pointer = ckpt_dir / "latest"
    if pointer.is_file():
        name = pointer.read_text().strip()
        if not name:
            raise FileNotFoundError(f"checkpoint pointer {pointer} is empty")
        target = ckpt_dir / name
        if not target.is_file():
            raise FileNotFoundError(f"checkpoint pointer {pointer} names {name}, which does not exist: {target}")
        return target
    raise FileNotFoundError(f"no checkpoint in {p}: neither {best} nor {pointer} exists")


def unwrap(model: nn.Module) -> nn.Module:
    """The bare module inside DDP / AveragedModel (`.module`) and torch.compile (`._orig_mod`) wrappers."""
    while True:
        inner = getattr(model, "_orig_mod", None) or getattr(model, "module", None)
        if not isinstance(inner, nn.Module):
            return model
        model = inner


_WRAPPER_PREFIXES = ("module.", "_orig_mod.")


def _strip_wrappers(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Accept state dicts saved through wrappers: drop 'module.' / '_orig_mod.' prefixes and AveragedModel's
    'n_averaged' counter."""
    out = {}
    for k, v in state.items():
        if k == "n_averaged":
            continue
        while k.startswith(_WRAPPER_PREFIXES):
            k = k.split(".", 1)[1]
        out[k] = v
    return out


def load_restorer(path: str | Path, map_location: str | torch.device = "cpu") -> tuple[TwoStageRestorer, dict]:
    """Rebuild the model from a checkpoint (file or run dir); returns (model in eval mode, checkpoint minus optimizer).

    Uses `ema` weights when present and not None, else `model`. The spec's encoder_weights are not loaded again
    (the checkpoint holds every weight, and the file or the network may be absent where inference runs).
    """
    file = resolve_checkpoint(path)
    try:
        ckpt = torch.load(file, map_location=map_location, weights_only=True)
    except Exception as e:
        raise ValueError(f"cannot read checkpoint {file}: {e}") from e
    if not isinstance(ckpt, dict) or ckpt.get("format") != CHECKPOINT_FORMAT:
        got = ckpt.get("format") if isinstance(ckpt, dict) else type(ckpt).__name__
        raise ValueError(f"{file} is not a {CHECKPOINT_FORMAT} checkpoint (format: {got!r})")
    for key in ("model_spec", "model"):
        if key not in ckpt:
            raise ValueError(f"checkpoint {file} lacks {key!r}")
    try:
        spec = ModelSpec.from_dict(ckpt["model_spec"])
    except (TypeError, ValueError) as e:
        raise ValueError(f"checkpoint {file} has a bad model_spec: {e}") from e
    use = "ema" if ckpt.get("ema") is not None else "model"
    state = _strip_wrappers(ckpt[use])
    model = build_model(dataclasses.replace(spec, encoder_weights=None))
    _check_keys(model.state_dict(), state, f"checkpoint {file} ({use!r} weights) does not match its model_spec")
    model.load_state_dict(state, strict=True)
    model.to(map_location).eval()
    info = {k: v for k, v in ckpt.items() if k != "optimizer"}
    info["path"] = str(file)
    info["weights_used"] = use
    return model, info


def inference_checkpoint(model: nn.Module, spec: ModelSpec | None = None) -> dict[str, Any]:
    """The minimal checkpoint `load_restorer` accepts (format, model_spec, model on CPU)."""
    model = unwrap(model)
    spec = spec if spec is not None else model.spec
    return {
        "format": CHECKPOINT_FORMAT,
        "model_spec": spec.to_dict(),
        "model": {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()},
    }
