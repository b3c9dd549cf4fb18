"""shards.pipeline on real shards read by the stock webdataset readers: augmentation and re-masking, determinism,
exact mid-epoch restart with several loader workers, and validation coverage (each sample once over ranks x workers,
for any number of ranks)."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from shards import pipeline
from shards.damage import to_gray
from shards.reader import iter_samples, read_manifest, shard_paths


@pytest.fixture(scope="module")
def split(tiny_shards) -> tuple[list[str], list[str]]:
    train = [str(p) for p in shard_paths(tiny_shards / "train")]
    val = [str(p) for p in shard_paths(tiny_shards / "val")]
    return train, val


def batches(urls, *, start=0, steps=6, workers=0, remask=1.0, crop=32, epoch=0, seed=0, rank=0):
    aug = pipeline.Augment(crop_size=crop, remask_prob=remask)
    ds = pipeline.TrainBatches(urls, augment=aug, batch_size=2, seed=seed, epoch=epoch, rank=rank, start=start,
                               steps=steps, shuffle_buffer=4)
    return list(pipeline.train_loader(ds, workers, pin_memory=False))


def same(a: list[dict], b: list[dict]) -> bool:
    return len(a) == len(b) and all(torch.equal(x[k], y[k]) for x, y in zip(a, b) for k in x)


def test_batches_are_remasked_crops_of_the_ground_truth(split):
    out = batches(split[0], steps=4)
    assert len(out) == 4
    for b in out:
        assert b["input"].shape == (2, 1, 32, 32) and b["gt"].shape == (2, 32, 32, 3)
        assert all(t.dtype == torch.uint8 for t in b.values())
        for i in range(2):
            gt, gray, mask = b["gt"][i].numpy(), b["input"][i, 0].numpy(), b["mask"][i, 0].numpy().astype(bool)
            assert np.array_equal(b["gt_gray"][i, 0].numpy(), to_gray(gt))
            assert mask.any() and np.array_equal(gray[~mask], to_gray(gt)[~mask])  # known pixels pass through
            assert len(np.unique(gray[mask])) == 1 and gray[mask][0] <= 100  # one constant fill in 0..100


def test_stored_masks_when_not_remasking(tiny_shards, split):
    stored = {s.key: s for s in iter_samples(shard_paths(tiny_shards / "train"))}
    out = batches(split[0], steps=3, remask=0.0, crop=64)
    for b in out:
        for i in range(2):
            gt = b["gt"][i].numpy()
            # full-size crop: the sample is the stored one, possibly flipped
            match = [s for s in stored.values() if np.array_equal(s.gt, gt) or np.array_equal(s.gt[:, ::-1], gt)]
            assert len(match) == 1
            s = match[0]
            flipped = not np.array_equal(s.gt, gt)
            view = (lambda a: a[:, ::-1]) if flipped else (lambda a: a)
            assert np.array_equal(b["input"][i, 0].numpy(), view(s.input))
            assert np.array_equal(b["mask"][i, 0].numpy().astype(bool), view(s.mask))


def test_streams_are_deterministic_and_differ_by_rank_epoch_seed(split):
    a = batches(split[0])
    assert same(a, batches(split[0]))
    for other in (dict(rank=1), dict(epoch=1), dict(seed=1)):
        assert not same(a, batches(split[0], **other)), other


def test_mid_epoch_restart_with_two_workers_is_exact(split):
    full = batches(split[0], steps=7, workers=2)
    assert len(full) == 7
    for start in (1, 2, 5):
        assert same(batches(split[0], start=start, steps=7, workers=2), full[start:]), start
    # one worker is a different (but equally deterministic) lane layout
    assert same(batches(split[0], steps=7, workers=0), batches(split[0], steps=7, workers=1))


def test_node_split_of_training_shards():
    urls = [f"s{i}" for i in range(5)]
    assert pipeline.split_train_shards(urls, [2] * 5, 0, 2, batch_size=2) == ["s0", "s2", "s4"]
    assert pipeline.split_train_shards(urls, [2] * 5, 1, 2, batch_size=2) == ["s1", "s3"]
    # rank 1's part would hold one sample, less than a batch: everyone resamples from everything
    assert pipeline.split_train_shards(urls, [2, 1, 2, 0, 2], 1, 2, batch_size=2) == urls
    assert pipeline.split_train_shards(urls, [2] * 5, 0, 1, batch_size=2) == urls


@pytest.mark.parametrize("n", [0, 1, 3, 7, 1000, 6000])
def test_val_share_gives_every_sample_to_exactly_one_rank(n):
    for world in (1, 2, 3, 8, 32, 64, 256):
        shares = [pipeline.val_share(n, r, world) for r in range(world)]
        assert [i for s in shares for i in s] == list(range(n))  # contiguous blocks, in order, each sample once
        sizes = [len(s) for s in shares]
        assert max(sizes) - min(sizes) <= 1 and sizes == sorted(sizes, reverse=True)
        assert n == 0 or sizes[0] >= 1  # rank 0 always holds the first samples (the validation pictures)
    with pytest.raises(ValueError, match="rank 2 of world size 2"):
        pipeline.val_share(5, 2, 2)


@pytest.mark.parametrize("world, workers", [(1, 0), (1, 2), (2, 1), (3, 2), (4, 2), (12, 1)])
def test_validation_sees_every_sample_once(tiny_shards, world, workers):
    """Samples split over ranks (any world size, even more ranks than samples or shards), then each rank's shards
    over its loader workers: every sample once."""
    manifest = read_manifest(tiny_shards / "train")  # 3 shards of 3
    ordered = [(str(tiny_shards / "train" / e["name"]), k) for e in manifest["shards"] for k in e["keys"]]
    seen = []
    for rank in range(world):
        mine = ordered[pipeline.val_share(len(ordered), rank, world).start:
                       pipeline.val_share(len(ordered), rank, world).stop]
        urls = sorted({u for u, _ in mine})
        ds = pipeline.ValSamples(urls, batch_size=2, keep=pipeline.KeyFilter(only=frozenset(k for _, k in mine)))
        got = []
        for b in pipeline.val_loader(ds, min(workers, len(urls)), pin_memory=False):
            assert b["gt"].shape[1:] == (64, 64, 3) and b["mask"].shape[1:] == (1, 64, 64)
            got.extend(b["key"])
        assert sorted(got) == sorted(k for _, k in mine)
        seen.extend(got)
    assert sorted(seen) == sorted(k for _, k in ordered)


def test_validation_key_filter(tiny_shards):
    urls = [str(p) for p in shard_paths(tiny_shards / "train")]
    keys = sorted(k for e in read_manifest(tiny_shards / "train")["shards"] for k in e["keys"])
    keep = pipeline.KeyFilter(only=frozenset(keys[:4]))
    ds = pipeline.ValSamples(urls, batch_size=3, keep=keep)
    assert sorted(k for b in pipeline.val_loader(ds, 0, False) for k in b["key"]) == keys[:4]
    assert list(pipeline.val_loader(pipeline.ValSamples([], batch_size=3), 0, False)) == []  # a rank with none


def test_bad_sample_error_names_key_and_shard(tmp_path, split):
    import webdataset as wds

    bad = tmp_path / "bad-000000.tar"
    with wds.TarWriter(str(bad)) as w:
        w.write({"__key__": "BROKEN", "gt.png": b"not a png", "input.png": b"", "mask.png": b"", "json": b"{}"})
    with pytest.raises(ValueError, match=f"sample 'BROKEN' in {bad}"):
        batches([str(bad)], steps=1)
    with pytest.raises(ValueError, match="smaller than crop_size 128"):
        batches(split[0], steps=1, crop=128)


def test_offset_crops_and_flips_are_exact_views_of_the_stored_images(tiny_shards):
    import webdataset as wds

    raw = next(iter(wds.DataPipeline(wds.SimpleShardList([str(shard_paths(tiny_shards / "train")[0])]),
                                     wds.tarfile_to_samples())))
    stored = next(iter_samples(shard_paths(tiny_shards / "train")))
    augment = pipeline.Augment(crop_size=40, remask_prob=0.0)
    flips = 0
    for seed in range(12):
        out = augment(raw, np.random.default_rng(seed))
        rng = np.random.default_rng(seed)  # replay the augmentation's draws: remask?, top, left, flip
        rng.random()
        top, left = int(rng.integers(0, 64 - 40 + 1)), int(rng.integers(0, 64 - 40 + 1))
        flip = rng.random() < 0.5
        flips += flip
        for name, full in (("gt", stored.gt), ("input", stored.input), ("mask", stored.mask.astype(np.uint8))):
            want = full[top:top + 40, left:left + 40]
            want = want[:, ::-1] if flip else want
            assert np.array_equal(out[name], want) and out[name].flags["C_CONTIGUOUS"], (seed, name)
    assert 0 < flips < 12  # both branches ran


def test_zoomed_out_windows_are_shrunk_views_of_the_whole_image(tiny_shards):
    import cv2
    import webdataset as wds

    raw = next(iter(wds.DataPipeline(wds.SimpleShardList([str(shard_paths(tiny_shards / "train")[0])]),
                                     wds.tarfile_to_samples())))
    stored = next(iter_samples(shard_paths(tiny_shards / "train")))
    augment = pipeline.Augment(crop_size=32, remask_prob=1.0, zoom_max=2.0, hflip=False)
    sides = set()
    for seed in range(12):
        out = augment(raw, np.random.default_rng(seed))
        rng = np.random.default_rng(seed)  # replay the draws: remask?, the window's side, top, left
        rng.random()
        side = int(round(32 * np.exp(rng.uniform(0.0, np.log(2.0)))))
        top, left = int(rng.integers(0, 64 - side + 1)), int(rng.integers(0, 64 - side + 1))
        sides.add(side)
        want = stored.gt[top:top + side, left:left + side]
        want = cv2.resize(want, (32, 32), interpolation=cv2.INTER_AREA) if side != 32 else want
        assert np.array_equal(out["gt"], want), seed
        assert out["input"].shape == out["mask"].shape == (32, 32)
        mask = out["mask"].astype(bool)
        assert mask.any() and np.array_equal(out["input"][~mask], to_gray(out["gt"])[~mask])  # a fresh hole
    assert len(sides) > 3 and max(sides) > 48  # windows of many sizes, up to twice the crop
    # zoom_max=1 (the default) draws nothing more: remask?, top, left, flip as before, so existing runs are unchanged
    rng = np.random.default_rng(5)
    rng.random()
    top, left = int(rng.integers(0, 64 - 32 + 1)), int(rng.integers(0, 64 - 32 + 1))
    flip = rng.random() < 0.5
    want = stored.gt[top:top + 32, left:left + 32]
    out = pipeline.Augment(crop_size=32, remask_prob=1.0)(raw, np.random.default_rng(5))["gt"]
    assert np.array_equal(out, want[:, ::-1] if flip else want)
