"""The training loop of one rank: model, optimizers, phases, checkpoints, validation, preemption."""
from __future__ import annotations

import math
import resource
import signal
import sys
import time
from pathlib import Path

import torch
from torch.nn.parallel import DistributedDataParallel as DDP

from job import checkpoint as ckpt
from job import dist
from job.config import Config, ConfigError
from job.data_plan import DataPlan, InputError, schedule_steps, train_loader, val_loader
from job.run_log import DONE, PREEMPTED, RunLog
from job.step import (AUTOCAST_DTYPE, EMA, NO_FORWARD_BUFFER_SYNC, DiscLoss, StageLoss, batch_to_device,
                      compile_cache_dir, lr_lambda_for, phase_at, phases, resolve_compile, stage_params)
from job.validation import picture_grid, validate
from restore.compile_cache import CompileCache, counts as compile_counts
from restore.losses import Stage1Loss, Stage2Loss
from restore.model import CHECKPOINT_FORMAT, ModelSpec, build_model
from restore.score import summarize_sums
from shards.schema import atomic_write_json

EXIT_OK, EXIT_PREEMPTED = 0, 75
PREEMPT_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


def memory_gib(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Linux: KiB


def extend_schedule(plan: list[tuple[str, int, int]], total_steps: int) -> list[tuple[str, int, int]]:
    """The phases of a run whose total changed: a longer run appends a phase of the last kind from the old end to
    the new one (its own warmup and cosine, like every phase); a shorter one is cut at the new end."""
    end = plan[-1][2]
    if total_steps > end:
        return [*plan, (plan[-1][0], end, total_steps)]
    if total_steps < end:
        return [(name, start, min(stop, total_steps)) for name, start, stop in plan if start < total_steps]
    return list(plan)


def saved_schedule(state: dict) -> list[tuple[str, int, int]]:
    """The phases a checkpoint was trained under (its ``schedule``; older checkpoints: from their config)."""
    if state.get("schedule"):
        return [(str(n), int(a), int(b)) for n, a, b in state["schedule"]]
    try:
        saved = Config.from_dict(state["config"])
    except (ConfigError, KeyError, TypeError):
        raise InputError("the checkpoint holds neither its schedule nor a readable config") from None
    per_epoch = int(state["data_pos"]["steps_per_epoch"])
    return phases(saved, saved.run.max_steps or saved.run.epochs * per_epoch)


class Trainer:
    def __init__(self, cfg: Config, spec: ModelSpec, plan: DataPlan, run_dir: Path, env: dist.DistEnv,
                 device: torch.device, precision: str, resume_from: Path | None,
                 resume_state: dict | None = None) -> None:
        """``resume_from``: the checkpoint to continue from (``resume_state``: its contents when already read)."""
        self.cfg, self.spec, self.plan, self.run_dir, self.env, self.device = cfg, spec, plan, run_dir, env, device
        self.precision = precision
        self.autocast_dtype = AUTOCAST_DTYPE[precision]
        self.channels_last = cfg.run.channels_last
        r = cfg.run
        self.world = env.world_size
        self.steps_per_epoch, self.total_steps = schedule_steps(cfg, plan.num_train, self.world)
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
        if cfg.model.color_mode == "classes":
            self.loss2 = Stage2Loss(l1=0.0, ssim=0.0, hue=l.rgb_hue, classes=l.color_classes)
        else:
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

        resume_step, extended = None, None
        if resume_from is not None:
            extended = self.load(resume_from, resume_state)
            resume_step = self.step
        self.log = RunLog(run_dir, env.is_main, resume_step)
        if resume_from is not None:
            self.log.print(f"resumed from {resume_from} at step {self.step}")
        if extended:
            self.log.print(extended)

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
            "schedule": [list(p) for p in self.phase_plan],  # phases and LR segments, kept when a run is extended
            "rng": {"world_size": self.world, "ranks": rngs},
            "data_pos": {"epoch": epoch, "batch_in_epoch": offset, "steps_per_epoch": self.steps_per_epoch,
                         "world_size": self.world, "num_workers": self.cfg.data.num_workers,
                         "batch_size": self.cfg.data.batch_size, "seed": self.cfg.run.seed},
            "config": self.cfg.to_dict(),
            "metrics": {"best_score": self.best, "best_step": self.best_step, "bad_validations": self.bad_vals,
                        "last_val": self.last_val},
        }

    def load(self, path: Path, state: dict | None = None) -> str | None:
        """Continue from checkpoint ``path`` (``state``: its contents when already read, and its model checked by
        ``job.train.check``); a line to log when the run is extended beyond the total it was planned for."""
        state = ckpt.load_checkpoint(path, map_location="cpu") if state is None else state
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
        saved = saved_schedule(state)
        self.phase_plan = extend_schedule(saved, self.total_steps)
        # The schedule is a function (not in the scheduler's state): the next step follows the phases above.
        self.scheduler.lr_lambdas = [lr_lambda_for(self.phase_plan, self.cfg.optim.warmup_steps,
                                                   self.cfg.optim.min_lr_ratio)] * len(self.optimizer.param_groups)
        if state.get("scaler"):  # empty when the saving run had no scaler (not fp16)
            self.scaler.load_state_dict(state["scaler"])
        self.step = int(state["step"])
        m = state.get("metrics") or {}
        self.best, self.best_step = float(m.get("best_score", -math.inf)), int(m.get("best_step", -1))
        self.bad_vals, self.last_val = int(m.get("bad_validations", 0)), dict(m.get("last_val") or {})
        extended = None
        if self.total_steps > saved[-1][2]:
            self.bad_vals = 0  # patience counts again from the extension on
            extended = (f"extended from {saved[-1][2]} to {self.total_steps} steps: steps {saved[-1][2]}.."
                        f"{self.total_steps} are a new {saved[-1][0]} phase with its own warmup and cosine "
                        f"(lr {self.scheduler.base_lrs[0]:g} down to "
                        f"{self.scheduler.base_lrs[0] * self.cfg.optim.min_lr_ratio:g})")
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
        return extended

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
        return train_loader(self.plan, self.cfg, epoch=epoch, rank=self.env.rank, start=start, steps=steps,
                            pin_memory=self.device.type == "cuda")

    def run_validation(self) -> dict:
        """The world's score of the current weights (EMA when on): each rank scores its own samples, one
        all-reduce sums them; the world's first ``val_images`` samples are drawn, gathered on rank 0 from the ranks
        that hold them (``summary["pictures"]``, rank 0 only)."""
        loader = val_loader(self.plan, self.cfg, pin_memory=self.device.type == "cuda")
        model = self.ema.module if self.ema is not None else self.model
        dist.broadcast_buffers(model)
        t0 = time.perf_counter()
        sums, pictures = validate(model, loader, self.device, self.autocast_dtype, self.channels_last,
                                  self.plan.picture_keys)
        total = dist.all_reduce_sum(sums, self.device)  # the validation's score: one all-reduce
        summary = summarize_sums(total)
        summary["seconds"] = time.perf_counter() - t0
        if self.cfg.data.val_images:  # every rank knows the setting, so every rank joins (host side, gloo)
            gathered = dist.gather_objects(pictures)
            summary["pictures"] = [row for rows in gathered for row in rows] if gathered is not None else []
        return summary

    def on_signal(self, signum: int, frame) -> None:
        self.stop_signal = signum

    def run(self) -> int:
        r = self.cfg.run
        if self.env.is_main:
            (self.run_dir / PREEMPTED).unlink(missing_ok=True)
            (self.run_dir / DONE).unlink(missing_ok=True)  # an extended run is not done until it ends again
        for sig in PREEMPT_SIGNALS:
            signal.signal(sig, self.on_signal)
        # the steps, ranks and samples: job.train's plan lines just before
        self.log.print(f"training: precision {self.precision}, compile {self.compile}, device {self.device}")
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
        pictures = summary.pop("pictures", None)
        if pictures:
            self.log.picture(self.step, picture_grid(pictures))
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
