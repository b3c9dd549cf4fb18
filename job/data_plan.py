"""The data plan of a run: which shards and samples each rank trains and validates on, from the manifests alone.

``DIR`` holds ``train/`` and optionally ``val/`` (packed by ``shards.pack``). Without ``val/``, fold ``fold`` of
``num_folds`` of train is held out (by the manifest's groups when present; recorded in ``RUN/folds.json``).

Training: shard ``i`` goes to rank ``i % world`` when every rank's part holds at least a batch of training samples;
otherwise (fewer shards than ranks, e.g. one shard) every rank draws from all shards with its own seed
(``shards.pipeline.split_train_shards``). Validation: samples, not shards, are split, in contiguous blocks of the
keys in manifest order (``shards.pipeline.val_share``), so any world size works with any number of shards and every
sample is scored exactly once; ranks without a sample still join the all-reduce.

``read_split`` reads the manifests once (no process group, no tar opened); ``rank_plan`` is one rank's share and
``world_plan`` every rank's (``python -m job.plan`` prints it; the job logs its summary).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from job.config import Config
from shards import pipeline
from shards.folds import assign_folds
from shards.reader import read_manifest, shard_paths


class InputError(Exception):
    """Bad input found before training (shards, folds, resume target): exit 2 with the message."""


# ---------------------------------------------------------------------------------------------- the split (any world)
@dataclass(frozen=True)
class Split:
    """What the manifests hold for training and validation, whatever the world size."""

    train_urls: tuple[str, ...]  # every training shard, in manifest order
    train_counts: tuple[int, ...]  # training samples per shard (the held-out fold and outliers left out)
    train_keys: frozenset[str]
    val_urls: tuple[str, ...]  # the shards that hold validation samples, in manifest order
    val_keys: tuple[str, ...]  # validation keys in manifest order (shard, then position in it)
    val_key_shard: tuple[int, ...]  # index into val_urls of each validation key
    val_source: str  # where validation comes from, for messages
    folds: dict | None = None  # what RUN/folds.json records when a fold of train is held out

    @property
    def num_train(self) -> int:
        return sum(self.train_counts)

    @property
    def num_val(self) -> int:
        return len(self.val_keys)


def _manifest_keys(manifest: dict) -> list[list[str]]:
    return [list(entry.get("keys", [])) for entry in manifest["shards"]]


def split_from_manifests(cfg: Config, train_dir: Path, train_manifest: dict, val_dir: Path | None = None,
                         val_manifest: dict | None = None) -> Split:
    """The split from manifest dicts alone (``read_split`` reads and checks the files): the held-out fold when
    there is no ``val/``, outliers left out, ``val_max_samples`` applied. ``InputError`` for what cannot train."""
    d = cfg.data
    outliers = set(train_manifest.get("outliers") or []) if d.exclude_outliers else set()
    per_shard = _manifest_keys(train_manifest)
    train_urls = [str(train_dir / entry["name"]) for entry in train_manifest["shards"]]
    folds = None
    if val_manifest is not None:
        train_keys = {k for keys in per_shard for k in keys} - outliers
        val_urls_all = [str(val_dir / entry["name"]) for entry in val_manifest["shards"]]
        val_shard_keys = _manifest_keys(val_manifest)
        val_keys = {k for keys in val_shard_keys for k in keys}
        source = f"{val_dir}"
    else:
        all_keys = [k for keys in per_shard for k in keys]
        try:
            assignment = assign_folds(all_keys, d.num_folds, d.fold_seed, groups=train_manifest.get("groups"),
                                      exclude=outliers)
        except ValueError as exc:
            raise InputError(f"{train_dir}: {exc}") from exc
        train_keys = {k for k, f in assignment.items() if f != d.fold}
        val_keys = {k for k, f in assignment.items() if f == d.fold}
        val_urls_all, val_shard_keys = train_urls, per_shard
        source = f"fold {d.fold} of {d.num_folds} held out of {train_dir}"
        folds = {"num_folds": d.num_folds, "fold": d.fold, "fold_seed": d.fold_seed,
                 "grouped": bool(train_manifest.get("groups")), "excluded": sorted(outliers & set(all_keys)),
                 "assignment": assignment}
    if d.val_max_samples:
        val_keys = set(sorted(val_keys)[: d.val_max_samples])
    counts = [sum(k in train_keys for k in keys) for keys in per_shard]
    if sum(counts) == 0:
        raise InputError(f"{train_dir}: no training samples left (after holding out fold {d.fold} and outliers)")
    if not val_keys:
        raise InputError(f"{val_dir if val_manifest is not None else train_dir}: the validation split is empty")

    ordered: list[str] = []
    key_shard: list[int] = []
    used_urls: list[str] = []
    seen: dict[str, str] = {}
    for url, keys in zip(val_urls_all, val_shard_keys):
        mine = [k for k in keys if k in val_keys]
        for k in mine:
            if k in seen:  # it would be read (and scored) twice
                raise InputError(f"validation key {k!r} is in two shards: {seen[k]} and {url}")
            seen[k] = url
        if mine:
            used_urls.append(url)
            ordered.extend(mine)
            key_shard.extend([len(used_urls) - 1] * len(mine))
    return Split(train_urls=tuple(train_urls), train_counts=tuple(counts), train_keys=frozenset(train_keys),
                 val_urls=tuple(used_urls), val_keys=tuple(ordered), val_key_shard=tuple(key_shard),
                 val_source=source, folds=folds)


def read_split(shards_dir: Path, cfg: Config) -> Split:
    """Read ``DIR/train`` (and ``DIR/val``) manifests, check that their shards exist, and plan the split."""
    train_dir, val_dir = shards_dir / "train", shards_dir / "val"
    try:
        train_manifest = read_manifest(train_dir)
        shard_paths(train_dir, train_manifest)
        val_manifest = None
        if val_dir.exists():
            val_manifest = read_manifest(val_dir)
            shard_paths(val_dir, val_manifest)
    except (OSError, ValueError) as exc:
        raise InputError(str(exc)) from exc
    return split_from_manifests(cfg, train_dir, train_manifest, val_dir if val_manifest is not None else None,
                                val_manifest)


def schedule_steps(cfg: Config, num_train: int, world: int) -> tuple[int, int]:
    """(steps per epoch, total steps): ``steps_per_epoch`` 0 = the training samples over the world's batch,
    rounded up; ``max_steps`` 0 = ``epochs`` x steps per epoch."""
    d, r = cfg.data, cfg.run
    per_epoch = d.steps_per_epoch or pipeline.default_steps_per_epoch(num_train, d.batch_size, world)
    return per_epoch, r.max_steps or r.epochs * per_epoch


# ---------------------------------------------------------------------------------------------------- one rank
@dataclass
class DataPlan:
    train_urls: list[str]  # this rank's shards to resample from
    train_keep: pipeline.KeyFilter
    num_train: int  # training samples in the world
    val_urls: list[str]  # the shards that hold this rank's validation samples
    val_keep: pipeline.KeyFilter  # this rank's validation keys
    num_val: int  # validation samples in the world
    val_workers: int  # loader workers for this rank's validation (at most its shards)
    folds: dict | None  # what RUN/folds.json records when a fold of train is held out
    val_keys: tuple[str, ...] = ()  # this rank's validation keys, in manifest order (rank 0: the first ones)
    picture_keys: tuple[str, ...] = ()  # those of its keys among the world's first ``val_images`` (the pictures)


def rank_plan(split: Split, cfg: Config, rank: int, world: int) -> DataPlan:
    share = pipeline.val_share(split.num_val, rank, world)
    val_keys = split.val_keys[share.start:share.stop]
    val_urls = [split.val_urls[i] for i in sorted({split.val_key_shard[j] for j in share})]
    train_urls = pipeline.split_train_shards(split.train_urls, split.train_counts, rank, world, cfg.data.batch_size)
    return DataPlan(
        train_urls=train_urls, train_keep=pipeline.KeyFilter(only=split.train_keys), num_train=split.num_train,
        val_urls=val_urls, val_keep=pipeline.KeyFilter(only=frozenset(val_keys)), num_val=split.num_val,
        val_workers=min(cfg.data.num_workers, len(val_urls)), folds=split.folds, val_keys=val_keys,
        picture_keys=val_keys[: max(0, cfg.data.val_images - share.start)])


def plan_data(shards_dir: Path, cfg: Config, rank: int, world: int) -> DataPlan:
    """Rank ``rank``'s share of the shards in ``shards_dir`` (``InputError`` for what cannot train)."""
    return rank_plan(read_split(shards_dir, cfg), cfg, rank, world)


# ------------------------------------------------------------------------------------------------------ loaders
def train_loader(plan: DataPlan, cfg: Config, *, epoch: int, rank: int, start: int, steps: int, pin_memory: bool):
    """Batches ``start .. steps-1`` of epoch ``epoch`` of rank ``rank`` (exactly resumable)."""
    d = cfg.data
    augment = pipeline.Augment(crop_size=d.crop_size, remask_prob=d.remask_prob,
                               hole_range=(d.hole_min, d.hole_max), fill_range=(d.fill_min, d.fill_max),
                               hflip=d.hflip, zoom_max=d.zoom_max)
    ds = pipeline.TrainBatches(plan.train_urls, augment=augment, batch_size=d.batch_size, seed=cfg.run.seed,
                               epoch=epoch, rank=rank, start=start, steps=steps, keep=plan.train_keep,
                               shuffle_buffer=d.shuffle_buffer)
    return pipeline.train_loader(ds, d.num_workers, pin_memory=pin_memory)


def val_loader(plan: DataPlan, cfg: Config, *, pin_memory: bool):
    """This rank's validation samples, each once (none: an empty loader)."""
    ds = pipeline.ValSamples(plan.val_urls, batch_size=cfg.data.val_batch_size, keep=plan.val_keep)
    return pipeline.val_loader(ds, plan.val_workers, pin_memory=pin_memory)


# ---------------------------------------------------------------------------------------------------- every rank
@dataclass(frozen=True)
class RankShare:
    rank: int
    train_shards: int  # shards this rank draws training samples from
    train_samples: int  # training samples in those shards
    val_samples: int  # validation samples this rank scores
    val_shards: int  # shards it reads for them


@dataclass
class WorldPlan:
    world: int
    batch_size: int
    steps_per_epoch: int
    total_steps: int
    num_train: int
    num_val: int
    train_shards: int
    val_shards: int
    val_source: str
    train_shared: bool
    ranks: list[RankShare] = field(default_factory=list)

    @property
    def effective_batch(self) -> int:
        return self.batch_size * self.world


def world_plan(split: Split, cfg: Config, world: int) -> WorldPlan:
    """Every rank's share (cheap: manifests only, no process group), for ``python -m job.plan`` and the job's log."""
    if world < 1:
        raise InputError(f"world size {world}: must be >= 1")
    per_epoch, total = schedule_steps(cfg, split.num_train, world)
    count = dict(zip(split.train_urls, split.train_counts))
    ranks = []
    for r in range(world):
        p = rank_plan(split, cfg, r, world)
        ranks.append(RankShare(r, len(p.train_urls), sum(count[u] for u in p.train_urls), len(p.val_keys),
                               len(p.val_urls)))
    shared = world > 1 and all(s.train_shards == len(split.train_urls) for s in ranks)
    return WorldPlan(world=world, batch_size=cfg.data.batch_size, steps_per_epoch=per_epoch, total_steps=total,
                     num_train=split.num_train, num_val=split.num_val, train_shards=len(split.train_urls),
                     val_shards=len(split.val_urls), val_source=split.val_source, train_shared=shared, ranks=ranks)


def _ranks(first: int, last: int) -> str:
    return f"rank {first}" if first == last else f"ranks {first}-{last}"


def _groups(ranks: list[RankShare], key) -> list[tuple[int, int, tuple]]:
    """Consecutive ranks with the same ``key``: (first, last, key)."""
    out: list[tuple[int, int, tuple]] = []
    for s in ranks:
        k = key(s)
        if out and out[-1][2] == k:
            out[-1] = (out[-1][0], s.rank, k)
        else:
            out.append((s.rank, s.rank, k))
    return out


def summary_lines(wp: WorldPlan) -> list[str]:
    """How training and validation samples are shared (what the job logs at its start)."""
    lines = [f"data: {wp.num_train:,} training samples in {wp.train_shards} shard(s), {wp.num_val:,} validation "
             f"samples in {wp.val_shards} shard(s) ({wp.val_source}); {wp.world} rank(s) x batch {wp.batch_size} = "
             f"effective batch {wp.effective_batch:,}, {wp.steps_per_epoch:,} steps per epoch, "
             f"{wp.total_steps:,} steps"]
    if wp.world == 1:
        lines.append("train: one rank draws from every shard")
    elif wp.train_shared:
        lines.append(f"train: {wp.train_shards} shard(s) cannot give each of {wp.world} ranks a batch of its own: "
                     f"every rank draws from all of them, each with its own seed")
    else:
        parts = ", ".join(f"{_ranks(a, b)}: {k[0]} shard(s), {k[1]:,} samples"
                          for a, b, k in _groups(wp.ranks, lambda s: (s.train_shards, s.train_samples)))
        lines.append(f"train: shards split over ranks ({parts})")
    val = _groups(wp.ranks, lambda s: (s.val_samples,))
    if len(val) == 1:
        lines.append(f"val: {wp.num_val:,} samples, {val[0][2][0]:,} on each rank, each scored once")
    else:
        parts = ", ".join(f"{_ranks(a, b)}: " + (f"{k[0]:,}" + (" each" if b > a else "") if k[0] else "none")
                          for a, b, k in val)
        idle = sum(s.val_samples == 0 for s in wp.ranks)
        lines.append(f"val: {wp.num_val:,} samples over {wp.world} ranks, each scored once ({parts})"
                     + (f"; {idle} rank(s) score none and still join every all-reduce" if idle else ""))
    drawn = wp.steps_per_epoch * wp.effective_batch
    if drawn > 2 * wp.num_train:
        lines.append(f"note: an epoch draws {drawn:,} samples, {drawn / wp.num_train:.1f}x the training split "
                     f"(resampled: each sample is seen about that many times per epoch)")
    return lines


def table_lines(wp: WorldPlan) -> list[str]:
    """Every rank's share, consecutive ranks with the same share on one line."""
    rows = [("ranks", "train shards", "train samples drawn from", "val samples", "val shards read")]
    for a, b, _ in _groups(wp.ranks, lambda s: (s.train_shards, s.train_samples, s.val_samples)):
        group = wp.ranks[a:b + 1]
        lo, hi = min(s.val_shards for s in group), max(s.val_shards for s in group)
        first = group[0]
        rows.append((f"{a}" if a == b else f"{a}-{b}", f"{first.train_shards}", f"{first.train_samples:,}",
                     f"{first.val_samples:,}", f"{lo}" if lo == hi else f"{lo}-{hi}"))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return ["  ".join(c.rjust(w) for c, w in zip(r, widths)) for r in rows]

