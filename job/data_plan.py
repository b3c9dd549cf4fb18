"""The data plan of a run: which shards and samples each rank trains and validates on, read from the manifests.

``DIR`` holds ``train/`` and optionally ``val/`` (packed by ``shards.pack``). Without ``val/``, fold ``fold`` of
``num_folds`` of train is held out (by the manifest's groups when present; recorded in ``RUN/folds.json``).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from job.config import Config
from shards import pipeline
from shards.folds import assign_folds
from shards.reader import read_manifest, shard_paths


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
