"""The data plan (job.data_plan) and the plan check (python -m job.plan): every rank's share of the training and
validation samples for any world size, from the manifests alone (no process group, no tar opened for the plan).

The DACON-shaped case: the real training set (29,603 pairs) packs at the default 1,000 samples per shard into 30
shards; without val/ the job holds out fold 0 of 5 of them. Every world size from 1 to 256 must be planned, every
validation sample scored by exactly one rank.
"""
from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest
import torch

from job import data_plan, plan as plan_cli
from job.config import parse_overrides
from job.data_plan import InputError, rank_plan, split_from_manifests, world_plan

DACON_SHARDS, DACON_PER_SHARD = 30, 1000


def dacon_manifest(shards: int = DACON_SHARDS, per_shard: int = DACON_PER_SHARD, split: str = "train") -> dict:
    """A manifest shaped like ``shards.pack dacon``'s at the default shard size (no tar files behind it)."""
    entries = [{"name": f"{split}-{i:06d}.tar", "count": per_shard,
                "keys": [f"TRAIN_{i * per_shard + j:05d}" for j in range(per_shard)]} for i in range(shards)]
    return {"schema_version": 1, "split": split, "count": shards * per_shard, "shards": entries}


@pytest.mark.parametrize("world", [1, 8, 32, 64, 256])
def test_dacon_shaped_pack_plans_on_any_world_size(world):
    cfg = parse_overrides([])  # the defaults: batch 8 per rank, 50 epochs, fold 0 of 5 held out
    split = split_from_manifests(cfg, Path("/data/shards/train"), dacon_manifest())
    assert (split.num_train, split.num_val) == (24_000, 6_000)
    assert len(split.val_urls) == DACON_SHARDS  # the held-out fold is spread over every shard

    wp = world_plan(split, cfg, world)
    assert wp.effective_batch == 8 * world
    assert wp.steps_per_epoch == -(-24_000 // (8 * world)) and wp.total_steps == 50 * wp.steps_per_epoch
    assert [s.rank for s in wp.ranks] == list(range(world))

    # validation: every sample scored by exactly one rank, shares within one of each other, rank 0 never empty
    per_rank = [rank_plan(split, cfg, r, world).val_keys for r in range(world)]
    counts = Counter(k for keys in per_rank for k in keys)
    assert set(counts) == set(split.val_keys) and set(counts.values()) == {1}
    sizes = [len(k) for k in per_rank]
    assert sizes == [s.val_samples for s in wp.ranks]
    assert max(sizes) - min(sizes) <= 1 and sizes[0] >= 1 and sum(sizes) == 6_000
    assert per_rank[0] == split.val_keys[: sizes[0]]  # rank 0 holds the first samples (the pictures)
    # a rank reads only the shards that hold its samples: contiguous blocks touch one or two shards here
    assert all(s.val_shards <= -(-s.val_samples // 150) + 2 for s in wp.ranks)

    # training: shards split over ranks while each part holds a batch, else every rank draws from all of them
    train = [rank_plan(split, cfg, r, world).train_urls for r in range(world)]
    if world <= DACON_SHARDS:
        assert sorted(u for urls in train for u in urls) == sorted(split.train_urls)  # disjoint, complete
        assert not wp.train_shared
    else:
        assert all(urls == list(split.train_urls) for urls in train) and wp.train_shared
        assert all(s.train_samples == 24_000 for s in wp.ranks)

    lines = data_plan.summary_lines(wp)
    assert f"effective batch {8 * world:,}" in lines[0] and f"{wp.steps_per_epoch:,} steps per epoch" in lines[0]
    if world > DACON_SHARDS:
        assert "every rank draws from all of them, each with its own seed" in lines[1]
    table = data_plan.table_lines(wp)
    assert table[0].split() == ["ranks", "train", "shards", "train", "samples", "drawn", "from", "val", "samples",
                                "val", "shards", "read"]
    assert len(table) <= 1 + 2 * min(world, DACON_SHARDS)  # ranks with the same share on one line


def test_expected_shares_for_256_ranks():
    cfg = parse_overrides([])
    wp = world_plan(split_from_manifests(cfg, Path("/d/train"), dacon_manifest()), cfg, 256)
    assert wp.steps_per_epoch == 12 and wp.total_steps == 600 and wp.effective_batch == 2048
    # 6,000 = 112 x 24 + 144 x 23: the first ranks take the extra sample
    assert [s.val_samples for s in wp.ranks] == [24] * 112 + [23] * 144
    val_line = data_plan.summary_lines(wp)[2]
    assert "6,000 samples over 256 ranks, each scored once (ranks 0-111: 24 each, ranks 112-255: 23 each)" in val_line


def test_a_small_val_split_on_many_ranks_leaves_some_ranks_without_samples():
    """The hidden 48-pair set on the default pack: one val shard of 48 for 256 ranks is planned, not refused."""
    cfg = parse_overrides([])
    split = split_from_manifests(cfg, Path("/d/train"), dacon_manifest(), Path("/d/val"),
                                 dacon_manifest(1, 48, "val"))
    wp = world_plan(split, cfg, 256)
    assert [s.val_samples for s in wp.ranks] == [1] * 48 + [0] * 208
    assert [s.val_shards for s in wp.ranks] == [1] * 48 + [0] * 208
    assert rank_plan(split, cfg, 200, 256).val_workers == 0  # nothing to read: no loader workers
    assert "208 rank(s) score none and still join every all-reduce" in data_plan.summary_lines(wp)[2]
    assert split.val_source == "/d/val"


def test_refuses_only_what_cannot_train():
    cfg = parse_overrides([])
    with pytest.raises(InputError, match="the validation split is empty"):
        split_from_manifests(cfg, Path("/d/train"), dacon_manifest(2, 10), Path("/d/val"),
                             dacon_manifest(1, 0, "val"))
    outliers = dict(dacon_manifest(1, 3), outliers=[f"TRAIN_{i:05d}" for i in range(3)])
    with pytest.raises(InputError, match="no training samples left"):
        split_from_manifests(parse_overrides(["num_folds=2"]), Path("/d/train"), outliers, Path("/d/val"),
                             dacon_manifest(1, 2, "val"))
    with pytest.raises(InputError, match="cannot fill 5 folds"):
        split_from_manifests(cfg, Path("/d/train"), dacon_manifest(1, 3))
    twice = dacon_manifest(2, 2, "val")
    twice["shards"][1]["keys"][0] = twice["shards"][0]["keys"][0]
    with pytest.raises(InputError, match="validation key 'TRAIN_00000' is in two shards"):
        split_from_manifests(cfg, Path("/d/train"), dacon_manifest(2, 10), Path("/d/val"), twice)
    with pytest.raises(InputError, match="world size 0"):
        world_plan(split_from_manifests(cfg, Path("/d/train"), dacon_manifest()), cfg, 0)


# ------------------------------------------------------------------------------------------- the real pack, in-process
def test_plan_cli_on_a_one_shard_pack(one_shard_shards, capsys):
    assert plan_cli.main(["--shards", str(one_shard_shards), "--world-size", "256", "batch_size=2"]) == 0
    out = capsys.readouterr().out
    assert "plan: 256 rank(s)" in out
    assert "9 training samples in 1 shard(s), 3 validation samples in 1 shard(s)" in out
    assert "effective batch 512" in out and "1 steps per epoch" in out
    assert "every rank draws from all of them, each with its own seed" in out
    assert "ranks 0-2: 1 each, ranks 3-255: none" in out
    assert plan_cli.main(["--shards", str(one_shard_shards), "lr=abc"]) == 2
    assert capsys.readouterr().err.strip() == "job.plan: error: lr='abc': expected a number"


def test_validation_shares_score_like_one_rank(one_shard_shards):
    """Every rank's loader on the one-shard pack (4 ranks, 3 samples): each sample read once in the world, and the
    summed per-rank score sums (what the all-reduce adds) give the single-rank score of the same weights."""
    from job import step
    from job.validation import validate
    from restore.model import build_model
    from restore.score import summarize_sums

    cfg = parse_overrides(["encoder=tu-test_efficientnet", "decoder_channels=16,8,8,8,8", "val_batch_size=2",
                           "num_workers=2"])
    split = data_plan.read_split(one_shard_shards, cfg)
    torch.manual_seed(0)
    model = build_model(step.model_spec(cfg))

    def scores(world: int) -> tuple[list[str], list[float]]:
        keys, total = [], None
        for rank in range(world):
            plan = rank_plan(split, cfg, rank, world)
            keys += [k for b in data_plan.val_loader(plan, cfg, pin_memory=False) for k in b["key"]]
            sums, _ = validate(model, data_plan.val_loader(plan, cfg, pin_memory=False), torch.device("cpu"), None,
                               True)
            total = sums if total is None else [a + b for a, b in zip(total, sums)]
        return keys, total

    keys1, sums1 = scores(1)
    keys4, sums4 = scores(4)
    assert sorted(keys4) == sorted(keys1) == sorted(split.val_keys) and len(keys4) == 3
    one, four = summarize_sums(sums1), summarize_sums(sums4)
    assert four["n"] == one["n"] == 3
    for term in ("score", "ssim", "masked_ssim", "hist_sim"):
        assert four[term] == pytest.approx(one[term], abs=1e-6), term
    json.dumps(one)
