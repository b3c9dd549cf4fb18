"""The training job: ``torchrun --nproc-per-node N -m job.train --shards DIR --out RUN_DIR [key=value ...]``.

``DIR`` holds ``train/`` and optionally ``val/`` (packed by ``shards.pack``). Without ``val/``, fold ``fold`` of
``num_folds`` of train is held out (by the manifest's groups when present; recorded in ``RUN/folds.json``).
Also runs as plain ``python -m job.train`` (one process) and as one SLURM task per GPU (see ``job.dist``).

Exit codes: 0 finished (including early stop, and "already finished" on a requeue), 2 bad config or input
(nothing trained), 75 preempted: SIGTERM or SIGUSR1 was received, every rank stopped at the same step boundary,
rank 0 wrote a checkpoint and ``RUN/preempted.json``; rerun the same command (``resume=auto``) to continue exactly.
Under torchrun the workers exit 75 but torchrun itself exits 1: launchers should look for ``RUN/preempted.json``
(and ``RUN/done.json`` for a finished run). torchrun forwards SIGTERM to the workers; to have it forward SIGUSR1
too, export ``TORCHELASTIC_SIGNALS_TO_HANDLE=SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1``.
"""
from __future__ import annotations

import argparse
import copy
import inspect
import json
import math
import resource
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
from torch.nn.parallel import DistributedDataParallel as DDP

from job import checkpoint as ckpt
from job import dist
from job.config import Config, ConfigError, parse_overrides
from restore import precision as precision_rule
from restore.compile_cache import CompileCache, counts as compile_counts, folder_for
from restore.losses import Stage1Loss, Stage2Loss
from restore.model import CHECKPOINT_FORMAT, ModelSpec, build_model
from restore.score import score_image, score_sums, summarize_sums
from shards import pipeline
from shards.folds import assign_folds
from shards.reader import read_manifest, shard_paths
from shards.schema import atomic_write_bytes, atomic_write_json

EXIT_OK, EXIT_BAD_INPUT, EXIT_PREEMPTED = 0, 2, 75
PREEMPT_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)
DONE, PREEMPTED, FOLDS, CONFIG, METRICS = "done.json", "preempted.json", "folds.json", "config.json", "metrics.jsonl"
COMPILE_CACHE = "compile_cache"


class InputError(Exception):
    """Bad input found before training (shards, folds, resume target): exit 2 with the message."""


# ------------------------------------------------------------------------------------------------------ data plan
@dataclass
class DataPlan:
    train_urls: list[str]  # this rank's shards to resample from
    train_keep: pipeline.KeyFilter
    num_train: int
    val_urls: list[str]  # all validation shards (split by node inside the loader)
    val_keep: pipeline.KeyFilter
    num_val: int
    val_workers: int
    folds: dict | None  # what RUN/folds.json records when a fold of train is held out


def _manifest_keys(manifest: dict) -> list[list[str]]:
    return [list(entry.get("keys", [])) for entry in manifest["shards"]]


def plan_data(shards_dir: Path, cfg: Config, rank: int, world: int) -> DataPlan:
    """Read manifests, hold out a fold if needed, and check that the shards can feed ``world`` ranks."""
    d = cfg.data
    try:
        train_dir = shards_dir / "train"
        train_manifest, train_paths = read_manifest(train_dir), shard_paths(train_dir)
        outliers = set(train_manifest.get("outliers") or []) if d.exclude_outliers else set()
        per_shard = _manifest_keys(train_manifest)
        val_dir = shards_dir / "val"
        folds = None
        if val_dir.exists():
            val_manifest, val_paths = read_manifest(val_dir), shard_paths(val_dir)
            train_keys = {k for keys in per_shard for k in keys} - outliers
            val_keys = {k for keys in _manifest_keys(val_manifest) for k in keys}
            val_shard_keys = _manifest_keys(val_manifest)
        else:
            all_keys = [k for keys in per_shard for k in keys]
            assignment = assign_folds(all_keys, d.num_folds, d.fold_seed, groups=train_manifest.get("groups"),
                                      exclude=outliers)
            train_keys = {k for k, f in assignment.items() if f != d.fold}
            val_keys = {k for k, f in assignment.items() if f == d.fold}
            val_paths, val_shard_keys = train_paths, per_shard
            folds = {"num_folds": d.num_folds, "fold": d.fold, "fold_seed": d.fold_seed,
                     "grouped": bool(train_manifest.get("groups")), "excluded": sorted(outliers & set(all_keys)),
                     "assignment": assignment}
    except (OSError, ValueError) as exc:
        raise InputError(str(exc)) from exc
    if d.val_max_samples:
        val_keys = set(sorted(val_keys)[: d.val_max_samples])
    counts = [sum(k in train_keys for k in keys) for keys in per_shard]
    if sum(counts) == 0:
        raise InputError(f"{train_dir}: no training samples left (after holding out fold {d.fold} and outliers)")
    if not val_keys:
        raise InputError(f"{shards_dir}: the validation split is empty")
    urls = [str(p) for p in train_paths]
    val_urls = [str(p) for p, keys in zip(val_paths, val_shard_keys) if any(k in val_keys for k in keys)]
    try:
        val_workers = pipeline.check_val_shards(val_urls, world, d.num_workers)
    except pipeline.ShardPlanError as exc:
        raise InputError(f"{val_dir if folds is None else train_dir}: {exc}") from exc
    return DataPlan(
        train_urls=pipeline.split_train_shards(urls, counts, rank, world, d.batch_size),
        train_keep=pipeline.KeyFilter(only=frozenset(train_keys)), num_train=sum(counts),
        val_urls=val_urls, val_keep=pipeline.KeyFilter(only=frozenset(val_keys)), num_val=len(val_keys),
        val_workers=val_workers, folds=folds)


# ---------------------------------------------------------------------------------------------------- the step
def resolve_precision(name: str, device: torch.device) -> str:
    """The job's precision: ``restore.precision``'s rule, shared with inference (``auto``: bf16 on GPUs with native
    bf16, else fp16 with a GradScaler; fp32 on CPU)."""
    try:
        return precision_rule.resolve_for(name, device)
    except precision_rule.PrecisionError as exc:
        raise ConfigError(str(exc)) from None


def resolve_compile(setting: str, device: torch.device, total_steps: int, min_steps: int) -> bool:
    """``auto``: compile on CUDA when the run is long enough to pay the compile time back (``min_steps``)."""
    if setting == "auto":
        return device.type == "cuda" and total_steps >= min_steps
    return setting == "on"


def compile_cache_dir(setting: str, run_dir: Path) -> Path | None:
    """``compile_cache``: ``auto`` = RUN/compile_cache, ``off`` = none, anything else is a folder."""
    return folder_for(setting, run_dir / COMPILE_CACHE)


# BatchNorm statistics are not broadcast at every forward (validation syncs them from rank 0 instead, see
# dist.broadcast_buffers); torch >= 2.14 renamed the option.
NO_FORWARD_BUFFER_SYNC = ({"forward_sync_buffers": False}
                          if "forward_sync_buffers" in inspect.signature(DDP.__init__).parameters
                          else {"broadcast_buffers": False})
AUTOCAST_DTYPE = {name: precision_rule.autocast_dtype(name) for name in ("bf16", "fp16", "fp32")}


def phases(cfg: Config, total_steps: int) -> list[tuple[str, int, int]]:
    """(phase, first step, end step): ``joint`` trains both stages end to end; ``staged`` trains stage 1 alone
    (stage_split[0] of the steps), then stage 2 alone on the true gray image (stage_split[1]), then both jointly."""
    if cfg.run.stages == "joint":
        return [("joint", 0, total_steps)]
    a = max(1, round(total_steps * cfg.run.stage_split[0]))
    b = min(total_steps, a + max(1, round(total_steps * cfg.run.stage_split[1])))
    out = [("stage1", 0, a), ("stage2", a, b), ("joint", b, total_steps)]
    return [p for p in out if p[2] > p[1]]


def phase_at(plan: list[tuple[str, int, int]], step: int) -> tuple[str, int, int]:
    for p in plan:
        if p[1] <= step < p[2]:
            return p
    return plan[-1]


class StageLoss(nn.Module):
    """The training forward of one phase, returning ``(total, terms, fake)``; wrapped by DDP (and torch.compile).

    With a discriminator (``gan=true``) stage 2's output also gets the adversarial generator term; the
    discriminator is held outside this module's parameters (its own DDP and optimizer, see ``DiscLoss``) and frozen
    here, so the generator's backward only flows through it. ``fake`` is (colorizer input, rgb) detached, for the
    discriminator's step, or None.
    """

    def __init__(self, model: nn.Module, loss1: Stage1Loss, loss2: Stage2Loss, phase: str,
                 disc: nn.Module | None = None, adv_g=None, gan_weight: float = 0.0) -> None:
        super().__init__()
        self.model, self.loss1, self.loss2, self.phase = model, loss1, loss2, phase
        self._disc = (disc,)  # a tuple: not a submodule, so not in this module's DDP
        self.adv_g, self.gan_weight = adv_g, gan_weight

    def forward(self, gray, mask, gt_gray, gt_rgb):
        terms: dict[str, torch.Tensor] = {}
        total, fake = None, None
        if self.phase in ("stage1", "joint"):
            restored = self.model.inpaint(gray, mask)
            total, terms1 = self.loss1(restored, gt_gray, mask)
            terms.update(terms1)
        if self.phase == "stage2":
            restored = gt_gray  # stage 2 alone learns from the true gray image
        if self.phase in ("stage2", "joint"):
            rgb = self.model.colorize(restored)
            t2, terms2 = self.loss2(rgb, gt_rgb)
            terms.update(terms2)
            total = t2 if total is None else total + t2
            disc = self._disc[0]
            if disc is not None:
                g_adv = self.adv_g(disc(torch.cat([restored, rgb], 1)))
                terms["gan_g"] = g_adv.detach()
                total = total + self.gan_weight * g_adv
                fake = (restored.detach(), rgb.detach())
        return total, terms, fake


class DiscLoss(nn.Module):
    """The discriminator's step: real (true gray, true rgb) vs fake (colorizer input, its rgb), conditional."""

    def __init__(self, disc: nn.Module, adv_d) -> None:
        super().__init__()
        self.disc, self.adv_d = disc, adv_d

    def forward(self, real_gray, real_rgb, fake_gray, fake_rgb):
        real = self.disc(torch.cat([real_gray, real_rgb], 1))
        fake = self.disc(torch.cat([fake_gray, fake_rgb], 1))
        return self.adv_d(real, fake)


def stage_params(model: nn.Module, phase: str) -> list[nn.Parameter]:
    if phase == "stage1":
        return list(model.inpainter.parameters())
    if phase == "stage2":
        return list(model.colorizer.parameters())
    return list(model.parameters())


def batch_to_device(batch: dict, device: torch.device, channels_last: bool) -> dict[str, torch.Tensor]:
    """uint8 batch (pinned) -> float [0,1] on the device; the copies are asynchronous, the conversion on the GPU."""
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    out = {}
    for name in ("input", "mask", "gt_gray", "gt"):
        if name not in batch:
            continue
        t = batch[name].to(device, non_blocking=True)
        if name == "gt":
            t = t.permute(0, 3, 1, 2)  # NHWC memory viewed as NCHW: already channels_last
        out[name] = t.float().div_(255.0).contiguous(memory_format=fmt) if name != "mask" else \
            t.float().contiguous(memory_format=fmt)
    return out


def lr_lambda_for(plan: list[tuple[str, int, int]], warmup: int, min_ratio: float):
    """Linear warmup then cosine decay to ``min_ratio``, restarted in each phase of ``plan``."""
    def factor(step: int) -> float:
        _, start, end = phase_at(plan, step)
        local, length = step - start, max(1, end - start)
        w = min(warmup, max(0, length // 5)) if length < 5 * warmup else warmup  # short phases: shorter warmup
        if w and local < w:
            return (local + 1) / w
        progress = min(1.0, (local - w) / max(1, length - w))
        return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))
    return factor


class EMA:
    """Exponential moving average of the weights (buffers copied), kept as a frozen copy of the model."""

    def __init__(self, model: nn.Module, decay: float) -> None:
        self.decay = decay
        self.module = copy.deepcopy(model).eval()
        for p in self.module.parameters():
            p.requires_grad_(False)

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        ema_p = list(self.module.parameters())
        torch._foreach_lerp_(ema_p, [p.detach() for p in model.parameters()], 1.0 - self.decay)
        for b_ema, b in zip(self.module.buffers(), model.buffers()):
            b_ema.copy_(b)


# ------------------------------------------------------------------------------------------------- validation
@torch.no_grad()
def validate(model: nn.Module, loader, device: torch.device, autocast_dtype, channels_last: bool) -> list[float]:
    """This rank's ``score_sums`` of the exact DACON score over its share of the validation split."""
    was_training = model.training
    model.eval()
    per_image = []
    for batch in loader:
        b = batch_to_device(batch, device, channels_last)
        with torch.autocast(device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
            _, rgb = model(b["input"], b["mask"])
        pred = (rgb.float().clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
        gt, mask = batch["gt"].numpy(), batch["mask"].numpy()[:, 0] > 0
        per_image.extend(score_image(gt[i], pred[i], mask[i]) for i in range(len(pred)))
    model.train(was_training)
    return score_sums(per_image)


# ---------------------------------------------------------------------------------------------------- logging
class RunLog:
    """Rank 0's outputs: stdout lines, RUN/metrics.jsonl and TensorBoard (other ranks: no-ops)."""

    def __init__(self, run_dir: Path, enabled: bool, resume_step: int | None) -> None:
        self.enabled, self.path, self.tb = enabled, run_dir / METRICS, None
        if not enabled:
            return
        if resume_step is not None and self.path.exists():
            # Drop what was logged after the checkpoint we resume from (a hard kill can leave such lines).
            keep = [ln for ln in self.path.read_text().splitlines() if ln.strip()
                    and json.loads(ln).get("step", 0) <= resume_step]
            atomic_write_bytes(self.path, "".join(ln + "\n" for ln in keep).encode())
        from torch.utils.tensorboard import SummaryWriter
        self.tb = SummaryWriter(str(run_dir / "tb"))

    def print(self, msg: str) -> None:
        if self.enabled:
            print(msg, flush=True)

    def record(self, kind: str, step: int, values: dict[str, Any]) -> None:
        if not self.enabled:
            return
        with open(self.path, "a") as f:
            f.write(json.dumps({"kind": kind, "step": step, "time": time.time(), **values}) + "\n")
        for k, v in values.items():
            if isinstance(v, (int, float)) and not isinstance(v, bool):
                self.tb.add_scalar(f"{kind}/{k}", v, step)

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()


def memory_gib(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Linux: KiB


# ------------------------------------------------------------------------------------------------------ trainer
class Trainer:
    def __init__(self, cfg: Config, spec: ModelSpec, plan: DataPlan, run_dir: Path, env: dist.DistEnv,
                 device: torch.device, precision: str, resume_from: Path | None) -> None:
        self.cfg, self.spec, self.plan, self.run_dir, self.env, self.device = cfg, spec, plan, run_dir, env, device
        self.precision = precision
        self.autocast_dtype = AUTOCAST_DTYPE[precision]
        self.channels_last = cfg.run.channels_last
        r, d = cfg.run, cfg.data
        self.world = env.world_size
        self.steps_per_epoch = d.steps_per_epoch or pipeline.default_steps_per_epoch(plan.num_train, d.batch_size,
                                                                                      self.world)
        self.total_steps = r.max_steps or r.epochs * self.steps_per_epoch
        self.compile = resolve_compile(r.compile, device, self.total_steps, r.compile_min_steps)
        self.phase_plan = phases(cfg, self.total_steps)

        torch.manual_seed(r.seed)  # identical initial weights on every rank (DDP also broadcasts rank 0's)
        model = build_model(spec).to(device)
        if self.channels_last:
            model = model.to(memory_format=torch.channels_last)
        self.model = model
        self.ema = EMA(model, cfg.optim.ema) if cfg.optim.ema > 0 else None
        o = cfg.optim
        self.optimizer = torch.optim.AdamW(model.parameters(), lr=o.lr, betas=(o.beta1, o.beta2),
                                           weight_decay=o.weight_decay, fused=device.type == "cuda")
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lr_lambda_for(self.phase_plan, o.warmup_steps, o.min_lr_ratio))
        self.scaler = torch.amp.GradScaler(device.type, enabled=precision == "fp16")
        l = cfg.loss
        self.loss1 = Stage1Loss(l1=l.gray_l1, ssim=l.gray_ssim)
        self.loss2 = Stage2Loss(l1=l.rgb_l1, ssim=l.rgb_ssim, hue=l.rgb_hue, chroma=l.rgb_chroma)
        self.disc = self.disc_opt = self.disc_step_fn = None
        if o.gan:
            from restore.gan import PatchDiscriminator, adversarial_losses

            torch.manual_seed(r.seed + 1)
            self.disc = PatchDiscriminator(in_channels=4).to(device)
            if self.channels_last:
                self.disc = self.disc.to(memory_format=torch.channels_last)
            self.adv = adversarial_losses("hinge")
            self.disc_opt = torch.optim.AdamW(self.disc.parameters(), lr=o.gan_lr, betas=(0.5, 0.999),
                                              weight_decay=0.0, fused=device.type == "cuda")
            module = DiscLoss(self.disc, self.adv.discriminator)
            if env.world_size > 1:
                module = DDP(module, device_ids=[device.index] if device.type == "cuda" else None,
                             bucket_cap_mb=r.ddp_bucket_mb, **NO_FORWARD_BUFFER_SYNC)
            self.disc_step_fn = module
        self.step, self.best, self.best_step, self.bad_vals = 0, -math.inf, -1, 0
        self.last_val: dict = {}
        self.stop_signal: int | None = None
        self.phase: str | None = None
        self.step_fn = None
        self.compiling = False  # the next step is the first of a compiled phase
        cache_dir = compile_cache_dir(r.compile_cache, run_dir)
        self.compile_cache = CompileCache.for_device(cache_dir, device) if self.compile and cache_dir else None
        torch.manual_seed(r.seed * 1000 + env.rank)  # per-rank stream for anything random in the step

        resume_step = None
        if resume_from is not None:
            self.load(resume_from)
            resume_step = self.step
        self.log = RunLog(run_dir, env.is_main, resume_step)
        if resume_from is not None:
            self.log.print(f"resumed from {resume_from} at step {self.step}")

    # -- state ------------------------------------------------------------------------------------------------
    def state(self) -> dict:
        model_state = {k: v.detach().cpu() for k, v in self.model.state_dict().items()}
        rngs = dist.all_gather_objects(ckpt.rng_state())  # every rank's RNG, for an exact resume
        epoch, offset = divmod(self.step, self.steps_per_epoch)
        return {
            "format": CHECKPOINT_FORMAT,
            "model_spec": self.spec.to_dict(),
            "model": model_state,
            "ema": {k: v.detach().cpu() for k, v in self.ema.module.state_dict().items()} if self.ema else None,
            "discriminator": {k: v.detach().cpu() for k, v in self.disc.state_dict().items()} if self.disc else None,
            "disc_optimizer": self.disc_opt.state_dict() if self.disc_opt else None,
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict(),
            "step": self.step,
            "epoch": epoch,
            "rng": {"world_size": self.world, "ranks": rngs},
            "data_pos": {"epoch": epoch, "batch_in_epoch": offset, "steps_per_epoch": self.steps_per_epoch,
                         "world_size": self.world, "num_workers": self.cfg.data.num_workers,
                         "batch_size": self.cfg.data.batch_size, "seed": self.cfg.run.seed},
            "config": self.cfg.to_dict(),
            "metrics": {"best_score": self.best, "best_step": self.best_step, "bad_validations": self.bad_vals,
                        "last_val": self.last_val},
        }

    def load(self, path: Path) -> None:
        state = ckpt.load_checkpoint(path, map_location="cpu")
        if state["model_spec"] != self.spec.to_dict():
            raise InputError(f"{path}: model_spec {state['model_spec']} differs from this config's "
                             f"{self.spec.to_dict()}")
        self.model.load_state_dict(state["model"])
        if self.ema is not None:
            self.ema.module.load_state_dict(state["ema"] if state.get("ema") is not None else state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        if self.disc is not None:
            if state.get("discriminator") is not None:
                self.disc.load_state_dict(state["discriminator"])
                self.disc_opt.load_state_dict(state["disc_optimizer"])
            elif self.env.is_main:
                print(f"warning: {path} has no discriminator: it starts from scratch", file=sys.stderr, flush=True)
        self.scheduler.load_state_dict(state["scheduler"])
        if state.get("scaler"):  # empty when the saving run had no scaler (not fp16)
            self.scaler.load_state_dict(state["scaler"])
        self.step = int(state["step"])
        m = state.get("metrics") or {}
        self.best, self.best_step = float(m.get("best_score", -math.inf)), int(m.get("best_step", -1))
        self.bad_vals, self.last_val = int(m.get("bad_validations", 0)), dict(m.get("last_val") or {})
        pos = state["data_pos"]
        same = (pos.get("world_size"), pos.get("num_workers"), pos.get("batch_size"), pos.get("seed"),
                pos.get("steps_per_epoch")) == (self.world, self.cfg.data.num_workers, self.cfg.data.batch_size,
                                                 self.cfg.run.seed, self.steps_per_epoch)
        rng = state.get("rng") or {}
        if same and rng.get("world_size") == self.world:
            ckpt.set_rng_state(rng["ranks"][self.env.rank])
        elif self.env.is_main:
            print(f"warning: {path} was written with world_size/num_workers/batch_size/seed/steps_per_epoch "
                  f"{pos.get('world_size')}/{pos.get('num_workers')}/{pos.get('batch_size')}/{pos.get('seed')}/"
                  f"{pos.get('steps_per_epoch')}; continuing from step {self.step} with a different data order",
                  file=sys.stderr, flush=True)

    def save(self, best: bool = False) -> None:
        state = self.state()  # collective (RNG gather): every rank calls it
        if self.env.is_main:
            path = ckpt.save_checkpoint(self.run_dir, state, keep_last=self.cfg.run.keep_last)
            if best:
                ckpt.save_best(self.run_dir, state)
            self.log.print(f"checkpoint {path.name}" + (" (best)" if best else ""))
            saved = self.compile_cache.save(only_if_compiled=True) if self.compile_cache is not None else None
            if saved:  # graphs compiled after a phase's first step (a recompile) are kept too
                self.log.print(saved)
        dist.barrier()

    # -- phases -----------------------------------------------------------------------------------------------
    def enter_phase(self, phase: str) -> None:
        """Train only this phase's stage(s): freeze the rest, then (re)wrap so DDP expects only live gradients."""
        live = {id(p) for p in stage_params(self.model, phase)}
        for p in self.model.parameters():
            p.requires_grad_(id(p) in live)
        gan = self.disc is not None and phase in ("stage2", "joint")
        module = StageLoss(self.model, self.loss1, self.loss2, phase, disc=self.disc if gan else None,
                           adv_g=self.adv.generator if gan else None, gan_weight=self.cfg.loss.gan_weight)
        if dist.world_size() > 1:
            module = DDP(module, device_ids=[self.device.index] if self.device.type == "cuda" else None,
                         bucket_cap_mb=self.cfg.run.ddp_bucket_mb, gradient_as_bucket_view=True,
                         **NO_FORWARD_BUFFER_SYNC)
        self.step_fn = torch.compile(module) if self.compile else module
        self.compiling = self.compile
        self.live_params = [p for p in self.model.parameters() if p.requires_grad]
        self.phase = phase
        self.log.print(f"phase {phase}: steps {phase_at(self.phase_plan, self.step)[1]}.."
                       f"{phase_at(self.phase_plan, self.step)[2]}, {sum(p.numel() for p in self.live_params):,} "
                       f"trainable parameters" + ("; torch.compile compiles its step on the first batch (minutes "
                                                  "unless the compile cache has it)" if self.compile else ""))

    # -- loops ------------------------------------------------------------------------------------------------
    def train_loader(self, epoch: int, start: int, steps: int):
        d = self.cfg.data
        augment = pipeline.Augment(crop_size=d.crop_size, remask_prob=d.remask_prob,
                                   hole_range=(d.hole_min, d.hole_max), fill_range=(d.fill_min, d.fill_max),
                                   hflip=d.hflip, zoom_max=d.zoom_max)
        ds = pipeline.TrainBatches(self.plan.train_urls, augment=augment, batch_size=d.batch_size,
                                   seed=self.cfg.run.seed, epoch=epoch, rank=self.env.rank, start=start, steps=steps,
                                   keep=self.plan.train_keep, shuffle_buffer=d.shuffle_buffer)
        return pipeline.train_loader(ds, d.num_workers, pin_memory=self.device.type == "cuda")

    def run_validation(self) -> dict:
        d = self.cfg.data
        ds = pipeline.ValSamples(self.plan.val_urls, rank=self.env.rank, world=self.world,
                                 batch_size=d.val_batch_size, keep=self.plan.val_keep)
        loader = pipeline.val_loader(ds, self.plan.val_workers, pin_memory=self.device.type == "cuda")
        model = self.ema.module if self.ema is not None else self.model
        dist.broadcast_buffers(model)
        t0 = time.perf_counter()
        sums = validate(model, loader, self.device, self.autocast_dtype, self.channels_last)
        total = dist.all_reduce_sum(sums, self.device)  # the one collective of a validation
        summary = summarize_sums(total)
        summary["seconds"] = time.perf_counter() - t0
        return summary

    def on_signal(self, signum: int, frame) -> None:
        self.stop_signal = signum

    def run(self) -> int:
        r = self.cfg.run
        if self.env.is_main:
            (self.run_dir / PREEMPTED).unlink(missing_ok=True)
        for sig in PREEMPT_SIGNALS:
            signal.signal(sig, self.on_signal)
        self.log.print(f"training {self.total_steps} steps ({self.steps_per_epoch}/epoch, {self.world} rank(s) x "
                       f"batch {self.cfg.data.batch_size}), {self.plan.num_train} train / {self.plan.num_val} val "
                       f"samples, precision {self.precision}, compile {self.compile}, device {self.device}")
        if self.compile_cache is not None:
            for line in self.compile_cache.load():  # every rank: each compiles for itself
                self.log.print(line)
        reason = None
        acc: dict[str, torch.Tensor] = {}
        n_acc, t_log = 0, time.perf_counter()
        while self.step < self.total_steps and reason is None:
            epoch, offset = divmod(self.step, self.steps_per_epoch)
            steps = min(self.steps_per_epoch, self.total_steps - epoch * self.steps_per_epoch)
            loader = iter(self.train_loader(epoch, offset, steps))
            for batch in loader:
                phase = phase_at(self.phase_plan, self.step)[0]
                if phase != self.phase:
                    self.enter_phase(phase)
                t_step = time.perf_counter()
                terms = self.train_step(batch)
                if self.compiling:
                    self.after_compile(time.perf_counter() - t_step)
                for k, v in terms.items():  # stays on the device: no host sync per step
                    acc[k] = acc[k] + v if k in acc else v.clone()
                n_acc += 1
                self.step += 1
                if self.step % r.log_every == 0 or self.step == self.total_steps:
                    self.log_train(acc, n_acc, time.perf_counter() - t_log, epoch)
                    acc, n_acc, t_log = {}, 0, time.perf_counter()
                end_of_epoch = self.step % self.steps_per_epoch == 0 or self.step == self.total_steps
                do_val = (self.step % r.val_every == 0) if r.val_every else end_of_epoch
                do_val = do_val or self.step == self.total_steps
                best = False
                if do_val:
                    best, reason = self.after_validation(self.run_validation())
                # Every rank agrees on a preemption signal here, at a step boundary (host-side gloo all-reduce).
                if dist.any_true(self.stop_signal is not None):
                    reason = reason or "preempted"
                do_ckpt = (self.step % r.ckpt_every == 0) if r.ckpt_every else do_val
                if do_ckpt or best or reason is not None or self.step == self.total_steps:
                    self.save(best=best)
                if reason is not None:
                    break
            del loader  # joins this epoch's loader workers
        if reason == "preempted":
            if self.env.is_main:
                atomic_write_json(self.run_dir / PREEMPTED, {
                    "step": self.step, "signal": signal.Signals(self.stop_signal).name if self.stop_signal else None,
                    "checkpoint": ckpt.latest_checkpoint(self.run_dir).name, "time": time.time()})
            self.log.print(f"preempted at step {self.step}: checkpoint written, exiting {EXIT_PREEMPTED}")
            self.log.close()
            dist.barrier()
            return EXIT_PREEMPTED
        reason = reason or "finished"
        if self.env.is_main:
            atomic_write_json(self.run_dir / DONE, {
                "reason": reason, "step": self.step, "total_steps": self.total_steps, "best_score": self.best,
                "best_step": self.best_step, "last_val": self.last_val, "time": time.time()})
        self.log.print(f"done ({reason}) at step {self.step}; best score {self.best:.4f} at step {self.best_step}")
        self.log.close()
        dist.barrier()
        return EXIT_OK

    def train_step(self, batch: dict) -> dict[str, torch.Tensor]:
        b = batch_to_device(batch, self.device, self.channels_last)
        with torch.autocast(self.device.type, dtype=self.autocast_dtype, enabled=self.autocast_dtype is not None):
            total, terms, fake = self.step_fn(b["input"], b["mask"], b["gt_gray"], b["gt"])
        if fake is not None:
            self.disc.requires_grad_(False)  # the generator's backward passes through, the D grads stay empty
        self.scaler.scale(total).backward()
        if self.cfg.optim.grad_clip > 0:
            self.scaler.unscale_(self.optimizer)
            terms["grad_norm"] = torch.nn.utils.clip_grad_norm_(self.live_params, self.cfg.optim.grad_clip,
                                                                foreach=True).detach()
        self.scaler.step(self.optimizer)
        if fake is not None:
            self.disc.requires_grad_(True)
            with torch.autocast(self.device.type, dtype=self.autocast_dtype, enabled=self.autocast_dtype is not None):
                d_loss = self.disc_step_fn(b["gt_gray"], b["gt"], *fake)
            self.scaler.scale(d_loss).backward()
            self.scaler.step(self.disc_opt)
            self.disc_opt.zero_grad(set_to_none=True)
            terms["gan_d"] = d_loss.detach()
        self.scaler.update()  # once per step, after both optimizers
        self.optimizer.zero_grad(set_to_none=True)
        self.scheduler.step()
        if self.ema is not None:
            self.ema.update(self.model)
        return terms

    def after_compile(self, seconds: float) -> None:
        """After a phase's first compiled step: log what compiling cost, keep new artifacts for a restart."""
        self.compiling = False
        c = compile_counts()
        saved = self.compile_cache.save() if self.compile_cache is not None and self.env.is_main else None
        self.log.record("compile", self.step, {"phase": self.phase, "first_step_s": seconds, **c})
        self.log.print(f"compile: phase {self.phase}, first step {seconds:.1f} s; graphs {c['graph_misses']} compiled, "
                       f"{c['graph_hits']} from cache (so far in this process)")
        if saved:
            self.log.print(saved)

    def log_train(self, acc: dict, n: int, seconds: float, epoch: int) -> None:
        if not self.env.is_main or not acc:
            return
        names = sorted(acc)
        values = torch.stack([acc[k].float() for k in names]).div_(n).tolist()  # the one host sync per interval
        terms = dict(zip(names, values))
        img_s = n * self.cfg.data.batch_size / max(seconds, 1e-9)
        lr = self.scheduler.get_last_lr()[0]
        mem = memory_gib(self.device)
        self.log.record("train", self.step, {**terms, "img_per_s": img_s, "lr": lr, "mem_gib": mem, "epoch": epoch,
                                             "phase": self.phase})
        shown = " ".join(f"{k} {v:.4f}" for k, v in terms.items() if not k.endswith("_total"))
        self.log.print(f"step {self.step}/{self.total_steps} ep {epoch} [{self.phase}] {shown} | "
                       f"{img_s:.1f} img/s/rank | lr {lr:.2e} | mem {mem:.2f} GiB")

    def after_validation(self, summary: dict) -> tuple[bool, str | None]:
        """Best/early-stop bookkeeping (identical on every rank: the summary is all-reduced)."""
        self.last_val = {k: summary[k] for k in ("score", "ssim", "masked_ssim", "hist_sim", "n", "n_degenerate")}
        best = summary["score"] > self.best
        if best:
            self.best, self.best_step, self.bad_vals = summary["score"], self.step, 0
        else:
            self.bad_vals += 1
        self.log.record("val", self.step, {**summary, "best_score": self.best, "bad_validations": self.bad_vals})
        self.log.print(f"val step {self.step}: score {summary['score']:.4f} (ssim {summary['ssim']:.4f}, masked "
                       f"{summary['masked_ssim']:.4f}, hist {summary['hist_sim']:.4f}; n {summary['n']}) "
                       f"best {self.best:.4f}@{self.best_step} [{summary['seconds']:.1f}s]")
        patience = self.cfg.run.patience
        if patience and self.bad_vals >= patience:
            self.log.print(f"early stop: no better score in {patience} validations")
            return best, "early_stop"
        return best, None


# ------------------------------------------------------------------------------------------------------- main
def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m job.train", description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog="overrides: key=value (see job/config.py); exit codes 0 done, 2 bad input, "
                                        "75 preempted (requeue)")
    ap.add_argument("--shards", required=True, type=Path, help="folder with train/ (and optionally val/) shards")
    ap.add_argument("--out", required=True, type=Path, help="the run dir (created; resume=auto continues it)")
    ap.add_argument("overrides", nargs="*", help="key=value config overrides")
    return ap.parse_args(argv)


def _error(msg: str) -> int:
    print(f"job.train: error: {msg}", file=sys.stderr, flush=True)
    return EXIT_BAD_INPUT


def model_spec(cfg: Config) -> ModelSpec:
    m = cfg.model
    decoder = tuple(m.decoder_channels)
    return ModelSpec(encoder=m.encoder, encoder_weights=m.encoder_weights, decoder_channels=decoder,
                     encoder_depth=len(decoder), cbam=m.cbam, color_mode=m.color_mode,
                     prefill=m.prefill, color_size=m.color_size)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        cfg = parse_overrides(args.overrides)
        spec = model_spec(cfg)
    except (ConfigError, ValueError) as exc:
        return _error(str(exc))
    try:
        env = dist.detect()
    except dist.DistEnvError as exc:
        return _error(str(exc))
    device = dist.device_for(env)
    run_dir = args.out
    # Everything that can be wrong with the input is checked before joining the process group, identically on
    # every rank, so a bad path makes every rank exit 2 instead of leaving the others waiting.
    try:
        precision = resolve_precision(cfg.run.precision, device)
        weights = spec.encoder_weights
        if weights not in (None, "imagenet") and not Path(weights).is_file():
            raise ConfigError(f"encoder_weights={weights}: no such file")
        if (run_dir / DONE).exists() and cfg.run.resume == "auto":
            if env.is_main:
                print(f"{run_dir / DONE} exists: this run already finished", flush=True)
            return EXIT_OK
        resume_from = ckpt.resolve_resume(cfg.run.resume, run_dir)
        if cfg.run.resume == "never" and ckpt.step_checkpoints(run_dir):
            raise InputError(f"{run_dir} already has checkpoints; use resume=auto or a new --out")
        plan = plan_data(args.shards, cfg, env.rank, env.world_size)
    except (ConfigError, InputError, ckpt.CheckpointError) as exc:
        return _error(str(exc))

    dist.init(env, device)
    try:
        if env.is_main:
            run_dir.mkdir(parents=True, exist_ok=True)
            resolved = cfg.to_dict()
            resolved["resolved"] = {"precision": precision, "device": str(device), "world_size": env.world_size,
                                    "dist_source": env.source, "shards": str(args.shards.resolve()),
                                    "model_spec": spec.to_dict()}
            atomic_write_json(run_dir / CONFIG, resolved)
            if plan.folds is not None:
                atomic_write_json(run_dir / FOLDS, plan.folds)
        dist.barrier()
        if device.type == "cuda":
            torch.backends.cudnn.benchmark = True
        try:
            trainer = Trainer(cfg, spec, plan, run_dir, env, device, precision, resume_from)
        except InputError as exc:
            return _error(str(exc))
        return trainer.run()
    finally:
        dist.shutdown()


if __name__ == "__main__":
    sys.exit(main())
