"""The training configuration: small validated dataclasses, filled from ``key=value`` overrides.

Keys are flat and unique across sections (``epochs=3 batch_size=16 precision=bf16``) because scripts, the SLURM
launcher and the docs spell them so. Defaults are the seed recipe (AdamW lr 1e-4, batch 8 per GPU, 50 epochs,
EfficientNet-B4, 512 px crops); the speed settings (bf16, channels_last, fused AdamW, compile) are resolved per device
by the job. An unknown key or a bad value raises ``ConfigError`` naming it; ``python -m job.train`` exits 2 on it.
"""
from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from dataclasses import dataclass, field
from typing import Any, Iterable, Mapping

from restore import compile_cache
from restore.precision import PRECISIONS
from restore.prefill import PREFILLS

STAGES = ("joint", "staged")
COLOR_MODES = ("rgb", "chroma", "classes")  # restore.model.COLOR_MODES; not imported: smp adds 1.3 s
TRISTATE = ("auto", "on", "off")


class ConfigError(ValueError):
    """A bad override: unknown key, unparsable value, or a value outside its range."""


@dataclass
class DataConfig:
    crop_size: int = 512
    batch_size: int = 8  # per rank (= per GPU)
    num_workers: int = 8  # loader processes per rank
    steps_per_epoch: int = 0  # 0: the train split's samples / (batch_size * world size), rounded up
    shuffle_buffer: int = 64  # samples held per loader worker for shuffling across shards
    remask_prob: float = 1.0  # probability of a fresh generated hole per sample (else the stored one, cropped)
    hole_min: float = 0.01  # hole area fraction range of generated holes
    hole_max: float = 0.15
    fill_min: int = 0  # gray fill value range of generated holes (real data: 0..100)
    fill_max: int = 100
    hflip: bool = True
    zoom_max: float = 1.0  # scale augmentation: crop windows up to this many times crop_size, shrunk to crop_size
    fold: int = 0  # with no val/ split: which fold of train is held out for validation
    num_folds: int = 5
    fold_seed: int = 0  # seed of the fold assignment (kept apart from `seed` so folds stay put across seeds)
    exclude_outliers: bool = True  # drop the manifest's `outliers` from training and validation
    val_batch_size: int = 4
    val_max_samples: int = 0  # 0: the whole validation split
    val_images: int = 4  # samples drawn at each validation (RUN/val/step_N.png, TensorBoard val/pictures); 0: none


@dataclass
class ModelConfig:
    encoder: str = "efficientnet-b4"
    encoder_weights: str | None = None  # None | "imagenet" | a local file
    decoder_channels: tuple[int, ...] = (256, 128, 64, 32, 16)
    cbam: bool = True
    color_mode: str = "chroma"
    color_size: int = 0  # stage 2 colorizes images with a larger short side shrunk to this size (0: full resolution)
    prefill: str = "harmonic"  # stage 1 starts from a classical fill of the hole (restore.prefill); none: from the fill


@dataclass
class OptimConfig:
    lr: float = 1e-4
    weight_decay: float = 1e-2
    beta1: float = 0.9
    beta2: float = 0.999
    warmup_steps: int = 500
    min_lr_ratio: float = 0.01  # cosine decays to lr * min_lr_ratio
    grad_clip: float = 0.0  # max global grad norm; 0 = off (the seed recipe does not clip)
    ema: float = 0.0  # EMA decay of the weights (e.g. 0.999); 0 = off. Validation and best.pt use the EMA.
    gan: bool = False  # PatchGAN adversarial term on stage 2
    gan_lr: float = 1e-4


@dataclass
class LossConfig:
    gray_l1: float = 1.0  # stage 1: L1 on the gray image
    gray_ssim: float = 1.0  # stage 1: masked SSIM (the hole counts)
    # Stage 2's per-pixel terms, for color_mode rgb and chroma; color_mode classes replaces them by color_classes.
    rgb_l1: float = 1.0  # stage 2: L1 on RGB
    rgb_ssim: float = 0.5  # stage 2: 1 - SSIM on RGB
    rgb_chroma: float = 0.0  # stage 2: L1 on Cb/Cr
    color_classes: float = 1.0  # stage 2, color_mode classes: cross-entropy of the chroma classes
    rgb_hue: float = 0.1  # stage 2, every color_mode: 1 - correlation of soft hue histograms (the score's hist_sim)
    gan_weight: float = 0.01  # adversarial term when gan=true


@dataclass
class RunConfig:
    epochs: int = 50
    max_steps: int = 0  # 0: epochs * steps_per_epoch; else stop after this many optimizer steps
    stages: str = "joint"  # joint | staged (stage 1 only, then stage 2 only, then both: see stage_split)
    stage_split: tuple[float, ...] = (0.4, 0.4)  # staged: fractions of all steps for stage 1 and stage 2; rest joint
    precision: str = "auto"  # auto: bf16 on GPUs with native bf16, else fp16 + GradScaler; fp32 on CPU
    channels_last: bool = True
    compile: str = "auto"  # auto: on for CUDA runs of at least compile_min_steps steps, off on CPU
    # torch.compile of both stages took ~290 s on an H100 and saved 64 ms per batch-16 step: it paid back after
    # ~4.5k steps (bench/RESULTS.md), so shorter runs stay eager under compile=auto.
    compile_min_steps: int = 5000
    # Where torch.compile's artifacts are kept so a restarted process loads them instead of compiling again
    # (restore.compile_cache): auto = RUN/compile_cache (a requeued job on another node), off, or a folder that
    # several runs of the same model share (e.g. the folds of a K-fold sweep).
    compile_cache: str = "auto"
    val_every: int = 0  # steps between validations; 0 = at the end of every epoch
    patience: int = 7  # early stop after this many validations without a better score; 0 = never
    ckpt_every: int = 0  # steps between checkpoints; 0 = at every validation
    keep_last: int = 3  # step checkpoints kept (best.pt is kept apart)
    log_every: int = 50
    seed: int = 0
    resume: str = "auto"  # auto | never | a checkpoint file or run dir
    ddp_bucket_mb: int = 25


@dataclass
class Config:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    run: RunConfig = field(default_factory=RunConfig)

    def to_dict(self) -> dict[str, dict[str, Any]]:
        out = {}
        for section in _SECTIONS:
            values = dataclasses.asdict(getattr(self, section))
            out[section] = {k: list(v) if isinstance(v, tuple) else v for k, v in values.items()}
        return out

    def flat(self) -> dict[str, Any]:
        return {k: v for section in self.to_dict().values() for k, v in section.items()}

    @classmethod
    def from_dict(cls, d: Mapping[str, Mapping[str, Any]]) -> "Config":
        """Inverse of ``to_dict`` (e.g. the ``config`` saved in a checkpoint); validates like overrides do."""
        cfg = cls()
        for section, values in d.items():
            if section not in _SECTIONS:
                raise ConfigError(f"unknown config section {section!r}")
            for key, value in values.items():
                _set(cfg, key, value if not isinstance(value, list) else tuple(value), from_text=False)
        validate(cfg)
        return cfg


_SECTIONS = ("data", "model", "optim", "loss", "run")


def _field_index() -> dict[str, tuple[str, dataclasses.Field]]:
    index: dict[str, tuple[str, dataclasses.Field]] = {}
    for section in _SECTIONS:
        for f in dataclasses.fields(Config.__dataclass_fields__[section].default_factory):  # type: ignore[arg-type]
            assert f.name not in index, f"config key {f.name} defined twice"
            index[f.name] = (section, f)
    return index


_FIELDS = _field_index()
KEYS = tuple(sorted(_FIELDS))


def _resolved_type(section: str, f: dataclasses.Field) -> Any:
    cls = Config.__dataclass_fields__[section].default_factory  # type: ignore[attr-defined]
    return typing.get_type_hints(cls)[f.name]


def _parse(key: str, text: str, typ: Any) -> Any:
    """Parse override text as ``typ`` (int, float, bool, str, Optional[...], tuple[int|float, ...])."""
    origin = typing.get_origin(typ)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(typ) if a is not type(None)]
        if text.strip().lower() in ("none", "null", ""):
            return None
        return _parse(key, text, args[0])
    if origin is tuple:
        elem = typing.get_args(typ)[0]
        parts = [p for p in text.replace(" ", "").strip("()[]").split(",") if p]
        return tuple(_parse(key, p, elem) for p in parts)
    if typ is bool:
        low = text.strip().lower()
        if low in ("1", "true", "yes", "on"):
            return True
        if low in ("0", "false", "no", "off"):
            return False
        raise ConfigError(f"{key}={text!r}: expected a boolean (true/false)")
    if typ is int:
        try:
            return int(text)
        except ValueError:
            raise ConfigError(f"{key}={text!r}: expected an integer") from None
    if typ is float:
        try:
            return float(text)
        except ValueError:
            raise ConfigError(f"{key}={text!r}: expected a number") from None
    return text


def _set(cfg: Config, key: str, value: Any, *, from_text: bool) -> None:
    if key not in _FIELDS:
        close = difflib.get_close_matches(key, KEYS, n=3)
        hint = f" (did you mean {' or '.join(close)}?)" if close else ""
        raise ConfigError(f"unknown config key {key!r}{hint}; known keys: {', '.join(KEYS)}")
    section, f = _FIELDS[key]
    if from_text:
        value = _parse(key, value, _resolved_type(section, f))
    setattr(getattr(cfg, section), key, value)


def parse_overrides(items: Iterable[str], base: Config | None = None) -> Config:
    """A validated ``Config`` from ``key=value`` strings applied over ``base`` (default: the defaults)."""
    cfg = Config.from_dict(base.to_dict()) if base is not None else Config()
    for item in items:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not key=value")
        key, text = item.split("=", 1)
        _set(cfg, key.strip(), text.strip(), from_text=True)
    validate(cfg)
    return cfg


def validate(cfg: Config) -> None:
    """Raise ``ConfigError`` listing every bad value (types first, then ranges and choices)."""
    problems: list[str] = []
    for key, (section, f) in _FIELDS.items():
        value = getattr(getattr(cfg, section), key)
        if not _type_ok(value, _resolved_type(section, f)):
            problems.append(f"{key}={value!r}: wrong type")
    if problems:
        raise ConfigError("; ".join(problems))

    d, m, o, l, r = cfg.data, cfg.model, cfg.optim, cfg.loss, cfg.run

    def need(ok: bool, msg: str) -> None:
        if not ok:
            problems.append(msg)

    need(d.crop_size >= 32 and d.crop_size % 32 == 0, f"crop_size={d.crop_size}: must be a multiple of 32, >= 32")
    need(d.batch_size >= 1, f"batch_size={d.batch_size}: must be >= 1")
    need(d.val_batch_size >= 1, f"val_batch_size={d.val_batch_size}: must be >= 1")
    need(d.num_workers >= 0, f"num_workers={d.num_workers}: must be >= 0")
    need(d.steps_per_epoch >= 0, f"steps_per_epoch={d.steps_per_epoch}: must be >= 0 (0 = from the data)")
    need(d.shuffle_buffer >= 1, f"shuffle_buffer={d.shuffle_buffer}: must be >= 1")
    need(0.0 <= d.remask_prob <= 1.0, f"remask_prob={d.remask_prob}: must be in [0, 1]")
    need(0.0 < d.hole_min <= d.hole_max < 1.0, f"hole_min={d.hole_min}, hole_max={d.hole_max}: need 0 < min <= max < 1")
    need(0 <= d.fill_min <= d.fill_max <= 255,
         f"fill_min={d.fill_min}, fill_max={d.fill_max}: need 0 <= min <= max <= 255")
    need(d.num_folds >= 2, f"num_folds={d.num_folds}: must be >= 2")
    need(0 <= d.fold < d.num_folds, f"fold={d.fold}: must be in 0..num_folds-1 ({d.num_folds - 1})")
    need(d.val_max_samples >= 0, f"val_max_samples={d.val_max_samples}: must be >= 0")
    need(d.val_images >= 0, f"val_images={d.val_images}: must be >= 0 (0 = no pictures)")
    need(bool(m.encoder), "encoder: must not be empty")
    need(len(m.decoder_channels) >= 1 and all(c > 0 for c in m.decoder_channels),
         f"decoder_channels={m.decoder_channels}: must be positive integers")
    need(m.prefill in PREFILLS, f"prefill={m.prefill!r}: must be one of {', '.join(PREFILLS)}")
    need(m.color_size >= 0, f"color_size={m.color_size}: must be >= 0 (0 = full resolution)")
    need(d.zoom_max >= 1.0, f"zoom_max={d.zoom_max}: must be >= 1 (1 = plain crops)")
    need(m.color_mode in COLOR_MODES, f"color_mode={m.color_mode!r}: must be one of {', '.join(COLOR_MODES)}")
    need(o.lr > 0, f"lr={o.lr}: must be > 0")
    need(o.gan_lr > 0, f"gan_lr={o.gan_lr}: must be > 0")
    need(o.weight_decay >= 0, f"weight_decay={o.weight_decay}: must be >= 0")
    need(0 <= o.beta1 < 1 and 0 <= o.beta2 < 1, f"beta1={o.beta1}, beta2={o.beta2}: must be in [0, 1)")
    need(o.warmup_steps >= 0, f"warmup_steps={o.warmup_steps}: must be >= 0")
    need(0 <= o.min_lr_ratio <= 1, f"min_lr_ratio={o.min_lr_ratio}: must be in [0, 1]")
    need(o.grad_clip >= 0, f"grad_clip={o.grad_clip}: must be >= 0 (0 = off)")
    need(0 <= o.ema < 1, f"ema={o.ema}: must be in [0, 1) (0 = off)")
    for name in ("gray_l1", "gray_ssim", "rgb_l1", "rgb_ssim", "rgb_hue", "rgb_chroma", "color_classes",
                 "gan_weight"):
        need(getattr(l, name) >= 0, f"{name}={getattr(l, name)}: must be >= 0")
    need(r.epochs >= 1, f"epochs={r.epochs}: must be >= 1")
    need(r.max_steps >= 0, f"max_steps={r.max_steps}: must be >= 0 (0 = epochs * steps_per_epoch)")
    need(r.stages in STAGES, f"stages={r.stages!r}: must be one of {', '.join(STAGES)}")
    need(len(r.stage_split) == 2 and all(x > 0 for x in r.stage_split) and sum(r.stage_split) <= 1,
         f"stage_split={r.stage_split}: two positive fractions (stage 1, stage 2) summing to <= 1")
    need(r.precision in PRECISIONS, f"precision={r.precision!r}: must be one of {', '.join(PRECISIONS)}")
    need(r.compile in TRISTATE, f"compile={r.compile!r}: must be one of {', '.join(TRISTATE)}")
    need(r.compile_min_steps >= 0, f"compile_min_steps={r.compile_min_steps}: must be >= 0")
    cache_error = compile_cache.setting_error(r.compile_cache)
    need(cache_error is None, cache_error or "")
    need(r.val_every >= 0, f"val_every={r.val_every}: must be >= 0 (0 = every epoch)")
    need(r.patience >= 0, f"patience={r.patience}: must be >= 0 (0 = never stop early)")
    need(r.ckpt_every >= 0, f"ckpt_every={r.ckpt_every}: must be >= 0")
    need(r.keep_last >= 1, f"keep_last={r.keep_last}: must be >= 1")
    need(r.log_every >= 1, f"log_every={r.log_every}: must be >= 1")
    need(r.seed >= 0, f"seed={r.seed}: must be >= 0")
    need(bool(r.resume), "resume: must be auto, never or a path")
    need(r.ddp_bucket_mb >= 1, f"ddp_bucket_mb={r.ddp_bucket_mb}: must be >= 1")
    if problems:
        raise ConfigError("; ".join(problems))


def _type_ok(value: Any, typ: Any) -> bool:
    origin = typing.get_origin(typ)
    if origin in (typing.Union, types.UnionType):
        return any(_type_ok(value, a) for a in typing.get_args(typ))
    if typ is type(None):
        return value is None
    if origin is tuple:
        elem = typing.get_args(typ)[0]
        return isinstance(value, tuple) and all(_type_ok(v, elem) for v in value)
    if typ is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if typ is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, typ)
