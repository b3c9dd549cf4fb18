"""WebDataset pipelines for training (resampled, re-masked, exactly resumable) and validation (each sample once).

Training. Each rank draws shards with replacement (``wds.ResampledShards``) from its own part of the shard list
(explicit node split: shard ``i`` goes to rank ``i % world``; when some rank's part would hold fewer than a batch of
training samples, every rank draws from all shards, with its own seed). An epoch is a fixed number of batches per
rank, so ranks never run out at different times (no uneven-epoch hang). Batch ``i`` of an epoch belongs to lane
``i % W`` (``W`` = loader workers) as that lane's ``i // W``-th batch; a lane's stream (shard draws, shuffle buffer)
is seeded by (seed, epoch, rank, lane) and each sample's augmentation by (seed, epoch, rank, lane, sample index).
Nothing depends on wall time or process ids, so resuming at step ``s`` rebuilds the same batches: each lane skips
its first samples without decoding them. Resuming exactly needs the same world size and ``num_workers``.

Augmentation: horizontal flip, random crop to ``crop_size`` (optionally zoomed out: a window up to ``zoom_max`` times
larger, shrunk to ``crop_size``), and re-masking: with ``remask_prob`` the stored hole is replaced by a fresh one from
``shards.damage`` drawn on the ground truth's gray, so every epoch sees new holes.

Validation. Samples, not shards, are split over ranks: ``val_share`` gives each rank a contiguous block of the
validation keys in manifest order (the first ranks one more when the split is uneven, so rank 0 always holds the first
samples), for any number of ranks and shards; a rank with no sample still joins every collective. Each rank reads only
the shards that hold its keys and keeps only its keys (``KeyFilter``); its loader workers split those shards among
themselves, so each sample is read exactly once across all ranks and workers. The stored inputs and masks are used as
they are.
"""
from __future__ import annotations

import math
import signal
from dataclasses import dataclass
from itertools import islice
from typing import Iterator, Sequence

import cv2
import numpy as np
import torch
import webdataset as wds
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from .damage import apply_damage, random_fill, random_mask, to_gray
from .reader import decode_sample
from .schema import GT_EXT, decode_png


class ShardPlanError(ValueError):
    """The shards cannot feed this many ranks/workers (raised before any process waits on another)."""


# ------------------------------------------------------------------------------------------------------- key filters
@dataclass(frozen=True)
class KeyFilter:
    """Picklable predicate on raw samples: keep keys in ``only`` (when given) and not in ``exclude``."""

    only: frozenset[str] | None = None
    exclude: frozenset[str] = frozenset()

    def __call__(self, raw: dict) -> bool:
        key = raw["__key__"]
        return (self.only is None or key in self.only) and key not in self.exclude


# ---------------------------------------------------------------------------------------------------------- training
@dataclass(frozen=True)
class Augment:
    crop_size: int
    remask_prob: float = 1.0
    hole_range: tuple[float, float] = (0.01, 0.15)
    fill_range: tuple[int, int] = (0, 100)
    hflip: bool = True
    # Scale augmentation of re-masked samples: the window cut from the image is up to zoom_max times crop_size on a
    # side (log-uniform, never beyond the image), then shrunk to crop_size. 1.0: plain crops at the stored scale.
    # Small crops of a large image show only texture; zoomed-out ones show the layout (sky above, ground below) that
    # colors depend on, the view a full image gives at inference.
    zoom_max: float = 1.0

    def __call__(self, raw: dict, rng: np.random.Generator) -> dict[str, np.ndarray]:
        """Raw webdataset sample -> uint8 ``input`` [c,c], ``mask`` [c,c] (1 = hole), ``gt`` [c,c,3], ``gt_gray``."""
        where = f"sample {raw.get('__key__', '?')!r} in {raw.get('__url__', '?')}"
        remask = rng.random() < self.remask_prob
        if remask:
            # Only the ground truth is needed: skip decoding the stored input and mask (about a third of the work).
            if GT_EXT not in raw:
                raise ValueError(f"{where}: no {GT_EXT}; training needs the ground truth")
            gt, gray, mask = decode_png(raw[GT_EXT], "RGB", f"{where}: {GT_EXT}"), None, None
        else:
            sample = decode_sample(raw)
            if sample.gt is None:
                raise ValueError(f"{where}: no {GT_EXT}; training needs the ground truth")
            gt, gray, mask = sample.gt, sample.input, sample.mask
        h, w = gt.shape[:2]
        c = self.crop_size
        if h < c or w < c:
            raise ValueError(f"{where}: image {h}x{w} is smaller than crop_size {c}")
        side = c
        if remask and self.zoom_max > 1.0:  # a stored hole's hard edge would be blurred by the resize: plain crops
            most = min(self.zoom_max, min(h, w) / c)
            side = int(round(c * math.exp(rng.uniform(0.0, math.log(most))))) if most > 1.0 else c
        top, left = int(rng.integers(0, h - side + 1)), int(rng.integers(0, w - side + 1))
        flip = self.hflip and rng.random() < 0.5
        win = (slice(top, top + side), slice(left, left + side, None))

        def view(a: np.ndarray) -> np.ndarray:
            a = a[win]
            if not flip:
                return np.ascontiguousarray(a)
            # One SIMD pass: numpy's copy of a reversed-stride HWC crop takes 2.6 ms at 512x512, cv2.flip 0.08 ms.
            return cv2.flip(a.view(np.uint8), 1).view(a.dtype)

        gt = view(gt)
        if side != c:
            gt = cv2.resize(gt, (c, c), interpolation=cv2.INTER_AREA)
        gt_gray = to_gray(gt)
        if remask:
            mask, _ = random_mask(rng, c, c, area_range=self.hole_range)
            gray = apply_damage(gt_gray, mask, random_fill(rng, self.fill_range))
        else:
            gray, mask = view(gray), view(mask)
        return {"input": gray, "mask": mask.astype(np.uint8), "gt": gt, "gt_gray": gt_gray}


def collate(samples: Sequence[dict[str, np.ndarray]]) -> dict[str, torch.Tensor]:
    """uint8 batch: ``input``/``mask``/``gt_gray`` [B,1,H,W], ``gt`` [B,H,W,3] (NHWC = channels_last once permuted)."""
    out = {}
    for name in samples[0]:
        arr = np.stack([s[name] for s in samples])
        out[name] = torch.from_numpy(arr[:, None] if arr.ndim == 3 else arr)
    return out


def lane_seed(seed: int, epoch: int, rank: int, lane: int, *extra: int) -> int:
    return int(np.random.SeedSequence([seed, epoch, rank, lane, *extra]).generate_state(1)[0])


def split_train_shards(urls: Sequence[str], counts: Sequence[int], rank: int, world: int,
                       batch_size: int) -> list[str]:
    """This rank's shards to resample from: ``urls[rank::world]`` when every rank's part has at least a batch of
    training samples (``counts``: training samples per shard), else all shards (ranks differ by seed)."""
    if world > 1 and all(sum(counts[r::world]) >= batch_size for r in range(world)):
        return list(urls[rank::world])
    return list(urls)


class TrainBatches(IterableDataset):
    """Batches ``start .. steps-1`` of one epoch of one rank (see the module doc for the lane scheme)."""

    def __init__(self, urls: Sequence[str], *, augment: Augment, batch_size: int, seed: int, epoch: int, rank: int,
                 start: int, steps: int, keep: KeyFilter = KeyFilter(), shuffle_buffer: int = 64) -> None:
        super().__init__()
        if not urls:
            raise ShardPlanError("no training shards")
        self.urls, self.augment, self.batch_size = list(urls), augment, batch_size
        self.seed, self.epoch, self.rank, self.start, self.steps = seed, epoch, rank, start, steps
        self.keep, self.shuffle_buffer = keep, shuffle_buffer

    def lane_samples(self, lane: int) -> Iterator[dict]:
        """The endless raw-sample stream of one lane (deterministic)."""
        shard_seed = lane_seed(self.seed, self.epoch, self.rank, lane, 0)
        import random

        pipeline = wds.DataPipeline(
            wds.ResampledShards(self.urls, deterministic=True, worker_seed=lambda: shard_seed),
            wds.tarfile_to_samples(),
            wds.select(self.keep),
            wds.shuffle(self.shuffle_buffer, initial=self.shuffle_buffer,
                        rng=random.Random(lane_seed(self.seed, self.epoch, self.rank, lane, 1))),
        )
        return iter(pipeline)

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        first = self.start + worker
        if first >= self.steps:
            return
        lane, skip_batches = first % workers, first // workers
        count = len(range(first, self.steps, workers))
        index = skip_batches * self.batch_size
        samples = islice(self.lane_samples(lane), index, None)  # skipped samples are read, never decoded
        for _ in range(count):
            batch = []
            for raw in islice(samples, self.batch_size):
                rng = np.random.default_rng([self.seed, self.epoch, self.rank, lane, index])
                batch.append(self.augment(raw, rng))
                index += 1
            yield collate(batch)


def ignore_stop_signals(worker_id: int = 0) -> None:
    """Loader workers ignore SIGTERM/SIGUSR1: launchers signal the whole process group (torchrun's killpg, SLURM),
    and a worker dying of it would abort the step the main process is finishing before its checkpoint. The main
    process still ends them (and they exit by themselves when it dies)."""
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGUSR1, signal.SIG_IGN)


def train_loader(dataset: TrainBatches, num_workers: int, pin_memory: bool) -> DataLoader:
    return DataLoader(dataset, batch_size=None, num_workers=num_workers, pin_memory=pin_memory,
                      persistent_workers=False, prefetch_factor=4 if num_workers > 0 else None,
                      worker_init_fn=ignore_stop_signals)


def default_steps_per_epoch(num_train_samples: int, batch_size: int, world: int) -> int:
    return max(1, math.ceil(num_train_samples / (batch_size * world)))


# -------------------------------------------------------------------------------------------------------- validation
def val_share(num_samples: int, rank: int, world: int) -> range:
    """Rank ``rank``'s positions among ``num_samples`` validation samples: contiguous blocks, the first
    ``num_samples % world`` ranks one more (empty for the last ranks when there are fewer samples than ranks)."""
    if world < 1 or not 0 <= rank < world:
        raise ValueError(f"rank {rank} of world size {world}")
    base, extra = divmod(num_samples, world)
    start = rank * base + min(rank, extra)
    return range(start, start + base + (rank < extra))


class ValSamples(IterableDataset):
    """This rank's validation samples: the shards ``urls`` (those holding its keys), the samples ``keep`` passes,
    decoded as stored, batched by equal image size. Loader workers take every ``workers``-th shard."""

    def __init__(self, urls: Sequence[str], *, batch_size: int, keep: KeyFilter = KeyFilter()) -> None:
        super().__init__()
        self.urls = list(urls)
        self.batch_size, self.keep = batch_size, keep

    def __iter__(self) -> Iterator[dict]:
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        urls = self.urls[worker::workers]
        if not urls:
            return
        pipeline = wds.DataPipeline(wds.SimpleShardList(urls), wds.tarfile_to_samples(), wds.select(self.keep))
        batch: list = []
        for raw in pipeline:
            s = decode_sample(raw)
            if s.gt is None:
                raise ValueError(f"sample {s.key!r} in {raw.get('__url__', '?')}: validation needs {GT_EXT}")
            if batch and (len(batch) == self.batch_size or batch[0].input.shape != s.input.shape):
                yield _val_batch(batch)
                batch = []
            batch.append(s)
        if batch:
            yield _val_batch(batch)


def _val_batch(samples: list) -> dict:
    return {
        "key": [s.key for s in samples],
        "input": torch.from_numpy(np.stack([s.input for s in samples])[:, None]),
        "mask": torch.from_numpy(np.stack([s.mask for s in samples]).astype(np.uint8)[:, None]),
        "gt": torch.from_numpy(np.stack([s.gt for s in samples])),
    }


def val_loader(dataset: ValSamples, num_workers: int, pin_memory: bool) -> DataLoader:
    return DataLoader(dataset, batch_size=None, num_workers=num_workers, pin_memory=pin_memory,
                      worker_init_fn=ignore_stop_signals)
