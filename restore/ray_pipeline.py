"""The Ray side of batch inference: the model actors, the PNG writers, the cluster and the streaming pipeline.

    from_items(one item per shard) -> flat_map(read_item)           one read task per shard, CPU (restore.inputs)
      -> map_batches(RestoreWorker, ActorPoolStrategy(size=N))      the model, loaded once per actor; GPU or CPU
      -> map_batches(write_outputs)                                  PNG encode + atomic write (+ score), CPU tasks
      -> the driver: progress bar and rows (``run_pipeline``)

PNG encoding is a separate CPU stage so a GPU actor never waits on zlib, and the encoders scale with the cluster's
CPUs independently of the number of model actors.
"""
from __future__ import annotations

import logging
import os
import socket
import sys
import time
from collections import defaultdict
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from restore.engine import Engine
from restore.inputs import _EMPTY_RGB, BAD, DONE, ROW_COLUMNS, TODO, BadInput, Plan, output_png, read_item
from restore.records import png_stamp
from shards import schema

SCORE_TERMS = ("score", "ssim", "masked_ssim", "hist_sim")


# ---------------------------------------------------------------------------------------------- the model (actors)
class RestoreWorker:
    """One Ray actor: the engine loaded once; restores the ``todo`` rows of each batch, passes the others on."""

    def __init__(self, checkpoints: Sequence[str], tta: bool, composite: bool, keep_gt: bool,
                 batch_size: int | None = None, compile: str = "off", compile_cache: str | None = None,
                 work_size: int | None = None, large_above: float | None = None, precision: str = "auto",
                 keep_images: bool = False) -> None:
        import torch

        if not torch.cuda.is_available():
            # Ray sets OMP_NUM_THREADS to the actor's num_cpus; make torch's intra-op pool follow it.
            torch.set_num_threads(max(1, int(os.environ.get("OMP_NUM_THREADS", "1"))))
        self.name = f"{socket.gethostname()}:{os.getpid()}"
        self.engine = Engine(checkpoints, tta=tta, composite=composite, batch_size=batch_size, compile=compile,
                             compile_cache=compile_cache, work_size=work_size, large_above=large_above,
                             large_log=lambda line: print(f"{self.name}: {line}", flush=True), precision=precision)
        self.keep_gt = keep_gt
        self.keep_images = keep_images  # the writers need the input and mask too (the gallery's thumbnails)
        self.name = f"{self.name}:{self.engine.device}"
        # The actor's clock (from the start of its first call) and its seconds in the model and in its calls, so far:
        # every row carries them, and the driver tells from them what the actor waited on (``actor_time_split``).
        self._clock_start: float | None = None
        self._model_s = 0.0
        self._calls_s = 0.0
        self._cache_lines_shown = 0
        self._show_cache_log()

    def _show_cache_log(self) -> None:
        """Print the engine's new compile-cache lines (Ray shows an actor's output in the driver's)."""
        for line in self.engine.cache_log[self._cache_lines_shown:]:
            print(f"{self.name}: {line}", flush=True)
        self._cache_lines_shown = len(self.engine.cache_log)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        call_start = time.perf_counter()
        if self._clock_start is None:
            self._clock_start = call_start
        n = len(batch["key"])
        rgb = [_EMPTY_RGB] * n
        infer_s = np.zeros(n, np.float64)
        todo = [i for i in range(n) if batch["status"][i] == TODO]
        by_shape: dict[tuple, list[int]] = defaultdict(list)
        for i in todo:
            shape = tuple(batch["input"][i].shape)
            # A large scan goes alone (the engine restores it in bounded memory); same-size small ones go together.
            by_shape[(shape, i) if self.engine.is_large(*shape) else shape].append(i)
        out = None
        for idx in by_shape.values():
            start = time.perf_counter()
            out = self.engine.restore(_stacked(batch["input"], idx), _stacked(batch["mask"], idx),
                                      [batch["key"][i] for i in idx])
            model_s = time.perf_counter() - start
            self._model_s += model_s
            per_image = model_s / len(idx)
            for j, i in enumerate(idx):
                rgb[i], infer_s[i] = out[j], per_image
        result = {k: batch[k] for k in ROW_COLUMNS}
        # The usual batch (every row restored, one size): the engine's array is the column as it is. Copying it into
        # a new one costs the actor ~10 ms per 32 images at 512x512, time in which its GPU would wait.
        result["rgb"] = out if len(todo) == n and len(by_shape) == 1 else _rgb_column(rgb, todo)
        result["precision"] = np.array([self.engine.precision if s == TODO else "" for s in batch["status"]],
                                       dtype=object)
        result["worker"] = np.array([self.name if s == TODO else "" for s in batch["status"]], dtype=object)
        result["infer_s"] = infer_s
        self._show_cache_log()
        graphs = self.engine.compile_counts()  # so far in this actor; the driver keeps each worker's last
        result["graphs_compiled"] = np.full(n, graphs["compiled"], np.int64)
        result["graphs_cached"] = np.full(n, graphs["cached"], np.int64)
        if self.keep_gt:
            result["gt"] = batch["gt"]
        if self.keep_gt or self.keep_images:
            result["mask"] = batch["mask"]
        if self.keep_images:
            result["input"] = batch["input"]
        end = time.perf_counter()
        self._calls_s += end - call_start
        result["actor_clock_s"] = np.full(n, end - self._clock_start)
        result["actor_model_s"] = np.full(n, self._model_s)
        result["actor_calls_s"] = np.full(n, self._calls_s)
        # The wall clock too: actors sharing a GPU (or spread over nodes) are pooled by the driver on one time axis.
        result["actor_end_unix"] = np.full(n, time.time())
        return result


def _stacked(column: np.ndarray, idx: list[int]) -> np.ndarray:
    """Rows ``idx`` of an image column as one [k,H,W] array. The usual batch (every row, one size) arrives from Ray
    as one dense array and is passed on as it is: stacking 32 images of 512x512 copies 8 MB per column (~1 ms)."""
    if len(idx) == len(column) and column.dtype != object and column.ndim == 3:
        return column
    return np.stack([column[i] for i in idx])


ACTOR_TIME_COLUMNS = ("actor_clock_s", "actor_model_s", "actor_calls_s")
# What every row carries from its actor, so far (cumulative): the writers pass them on to the driver's worker lines.
ACTOR_COLUMNS = ("graphs_compiled", "graphs_cached", *ACTOR_TIME_COLUMNS, "actor_end_unix")


def _rgb_column(rgb: list[np.ndarray], todo: list[int]) -> np.ndarray:
    """The batch's images as one dense uint8 [B,H,W,3] array when the restored ones share a size (rows not restored
    get zeros), else an object array. Ray turns both into the same tensor column, but an object array costs the actor
    0.14-0.22 ms of CPU per 512x512 photo (3 ms for noise-like images) against 0.004 ms for the dense array
    (bench/infer_throughput.py), time in which the actor is not feeding its GPU."""
    shapes = {rgb[i].shape for i in todo}
    if len(shapes) > 1:
        return _object_array(rgb)
    dense = np.zeros((len(rgb), *(shapes.pop() if shapes else _EMPTY_RGB.shape)), np.uint8)
    for i in todo:
        dense[i] = rgb[i]
    return dense


def _object_array(arrays: list[np.ndarray]) -> np.ndarray:
    out = np.empty(len(arrays), dtype=object)
    out[:] = arrays
    return out


# ---------------------------------------------------------------------------------------------- write stage (tasks)
def write_outputs(batch: dict[str, np.ndarray], *, png_dir: str, score: bool, compression: str = "fast",
                  gallery_dir: str | None = None) -> dict[str, np.ndarray]:
    """Encode and atomically write each restored image as ``png_dir/KEY.png`` and note its size and mtime (the
    records' stamp); score it against gt if asked; write its gallery thumbnails if asked (``restore.gallery``)."""
    n = len(batch["key"])
    encode_s = np.zeros(n, np.float64)
    png_size = np.zeros(n, np.int64)
    png_mtime_ns = np.zeros(n, np.int64)
    terms = {t: np.full(n, np.nan) for t in SCORE_TERMS}
    degenerate = np.array([""] * n, dtype=object)
    for i in range(n):
        status, key = batch["status"][i], batch["key"][i]
        path = output_png(Path(png_dir), key)
        pred = None
        if status == TODO:
            start = time.perf_counter()
            pred = np.asarray(batch["rgb"][i], dtype=np.uint8)
            schema.atomic_write_bytes(path, schema.encode_png(pred, "RGB", compression))
            png_size[i], png_mtime_ns[i] = png_stamp(path)
            encode_s[i] = time.perf_counter() - start
        elif status == DONE and (score or gallery_dir):
            pred = schema.decode_png(path.read_bytes(), "RGB", str(path))
        if score and pred is not None:
            from restore.score import score_image

            result = score_image(np.asarray(batch["gt"][i]), pred, np.asarray(batch["mask"][i]).astype(bool))
            for t in SCORE_TERMS:
                terms[t][i] = result[t]
            degenerate[i] = ",".join(result["degenerate"])
        if gallery_dir and pred is not None:
            from restore.gallery import write_thumbnails

            write_thumbnails(gallery_dir, key, np.asarray(batch["input"][i]), np.asarray(batch["mask"][i]), pred)
    out = {k: batch[k] for k in (*ROW_COLUMNS, "precision", "worker", "infer_s", *ACTOR_COLUMNS)}
    out["encode_s"] = encode_s
    out["png_size"], out["png_mtime_ns"] = png_size, png_mtime_ns
    out["degenerate"] = degenerate
    out.update(terms)
    return out


# ---------------------------------------------------------------------------------------------- the cluster
def start_ray(address: str | None) -> bool:
    """Connect to (or start) Ray; returns True when this call started it (so the caller shuts it down).

    Without ``--address`` a new local Ray is started (``address="local"``) even if another Ray runs on this machine:
    joining someone else's cluster silently would be a surprise.
    """
    import ray

    if ray.is_initialized():
        return False
    quiet = dict(include_dashboard=False, logging_level=logging.WARNING, configure_logging=True)
    if address:
        ray.init(address=address, logging_level=logging.WARNING)
    else:
        ray.init(address="local", num_cpus=os.cpu_count(), **quiet)
    return True


def configure_ray_data() -> None:
    import ray.data

    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False  # ours (tqdm over finished batches) replaces Ray's per-operator bars
    ctx.print_on_execution_start = False
    ctx.enable_auto_log_stats = False
    ctx.execution_options.preserve_order = False
    logging.getLogger("ray.data").setLevel(logging.WARNING)


def pool_resources(workers: int | None, gpus_per_worker: float | None, cpus_per_worker: float | None,
                   ) -> tuple[int, float, float]:
    """Default to one actor per GPU (or one CPU actor), and refuse what the cluster cannot place (no hang)."""
    import ray

    total = ray.cluster_resources()
    gpus, cpus = float(total.get("GPU", 0)), float(total.get("CPU", 1))
    nodes = [n["Resources"] for n in ray.nodes() if n.get("Alive")]
    node_cpus = max((float(r.get("CPU", 0)) for r in nodes), default=cpus)
    node_gpus = max((float(r.get("GPU", 0)) for r in nodes), default=gpus)
    if gpus_per_worker is None:
        gpus_per_worker = 1.0 if gpus >= 1 else 0.0
    if workers is None:
        workers = max(1, int(gpus // gpus_per_worker)) if gpus_per_worker > 0 else 1
    if cpus_per_worker is None:
        # GPU actors only feed the device; CPU actors get the CPUs but one (the read/write tasks need it), as many
        # as one node has.
        cpus_per_worker = 1.0 if gpus_per_worker > 0 else max(1.0, min(node_cpus, float(int((cpus - 1) // workers))))
    if workers * gpus_per_worker > gpus + 1e-9 or gpus_per_worker > node_gpus + 1e-9:
        raise BadInput(f"--workers {workers} x --gpus-per-worker {gpus_per_worker:g} does not fit: the Ray cluster "
                       f"has {gpus:g} GPUs, at most {node_gpus:g} on one node")
    if cpus_per_worker > node_cpus or workers * cpus_per_worker > cpus - 1 + 1e-9:
        raise BadInput(f"--workers {workers} x {cpus_per_worker:g} CPUs does not fit and leave a CPU for reading "
                       f"and writing: the Ray cluster has {cpus:g} CPUs, at most {node_cpus:g} on one node")
    return workers, gpus_per_worker, cpus_per_worker



# ---------------------------------------------------------------------------------------------- the pipeline (driver)
def run_pipeline(plan: Plan, checkpoints: Sequence[Path], args, *, png_dir: Path, cache_dir: Path | None,
                 pool: tuple[int, float, float], gallery_dir: Path | None = None,
                 on_batch: Callable[[list[dict]], object] | None = None,
                 ) -> tuple[list[dict], list[tuple[float, int]]]:
    """Stream ``plan`` through read tasks, model actors and PNG writers on the Ray this process is connected to
    (``start_ray``), with ``pool`` = (actors, GPUs and CPUs per actor) from ``pool_resources``. Returns the rows (one
    per key, as the writers hand them back) and, per arriving batch, (time, images restored). ``on_batch`` gets each
    batch's rows as they arrive (the driver records the outputs written). ``args``: the CLI's options
    (``restore.batch_infer.build_parser``). Raises ``BadInput`` for a bad key unless ``args.skip_bad``."""
    import ray.data

    workers, gpus_per_worker, cpus_per_worker = pool
    print(f"ray: {workers} worker(s) x ({gpus_per_worker:g} GPU, {cpus_per_worker:g} CPU), "
          f"batch {args.batch_size}, tta {'on' if args.tta else 'off'}, "
          f"composite {'on' if args.composite else 'off'}, compile {args.compile}, "
          f"{len(checkpoints)} checkpoint(s); images above {args.large_above:g} MP in bounded memory at work "
          f"size {args.work_size}")
    if args.compile != "off":
        print(f"compile: each actor compiles the model on its first batch (minutes on a GPU, unless the compile "
              f"cache has it) before its first images arrive; then every call runs a static batch of "
              f"{args.batch_size}; compile cache {cache_dir or 'off'}")
    ds = ray.data.from_items(plan.items, override_num_blocks=len(plan.items))
    ds = ds.flat_map(read_item, fn_kwargs={"with_gt": args.score, "load_done": gallery_dir is not None})
    ds = ds.map_batches(
        RestoreWorker,
        fn_constructor_kwargs={"checkpoints": [str(c) for c in checkpoints], "tta": args.tta,
                               "composite": args.composite, "keep_gt": args.score,
                               "batch_size": args.batch_size, "compile": args.compile,
                               "compile_cache": str(cache_dir) if cache_dir else None,
                               "work_size": args.work_size, "large_above": args.large_above,
                               "precision": args.precision, "keep_images": gallery_dir is not None},
        compute=ray.data.ActorPoolStrategy(size=workers),
        batch_size=args.batch_size, batch_format="numpy", num_gpus=gpus_per_worker, num_cpus=cpus_per_worker,
        zero_copy_batch=True,  # read-only views: neither stage writes its input (older Rays copy by default)
    )
    ds = ds.map_batches(write_outputs, fn_kwargs={"png_dir": str(png_dir.resolve()), "score": args.score,
                                                  "compression": args.png_compression,
                                                  "gallery_dir": str(gallery_dir.resolve()) if gallery_dir
                                                  else None},
                        batch_size=args.batch_size, batch_format="numpy", zero_copy_batch=True)
    return _consume(ds, len(plan.keys), skip_bad=args.skip_bad, on_batch=on_batch)


def _consume(ds, total: int, *, skip_bad: bool, on_batch: Callable[[list[dict]], object] | None = None,
             ) -> tuple[list[dict], list[tuple[float, int]]]:
    """Drain the pipeline with a progress bar; the first bad key aborts unless ``skip_bad``.

    Returns the rows and, per arriving batch, (time, images restored in it).
    """
    from tqdm import tqdm

    rows: list[dict] = []
    arrivals: list[tuple[float, int]] = []
    restored = 0
    with tqdm(total=total, unit="img", desc="restore", file=sys.stderr, mininterval=1.0, smoothing=0.1) as bar:
        for batch in ds.iter_batches(batch_size=None, batch_format="numpy"):
            batch_rows = [{k: (v[i].item() if hasattr(v[i], "item") else v[i]) for k, v in batch.items()}
                          for i in range(len(batch["key"]))]
            if on_batch is not None:  # before a bad row may stop the run: what was written is recorded
                on_batch(batch_rows)
            for row in batch_rows:
                if row["status"] == BAD and not skip_bad:
                    raise BadInput(f"{row['error']}\n(rerun with --skip-bad to restore the rest and list the "
                                   f"bad keys; finished images are kept and will not be redone)")
                rows.append(row)
                restored += row["status"] == TODO
            arrivals.append((time.perf_counter(), int(np.sum(batch["status"] == TODO))))
            bar.update(len(batch["key"]))
            bar.set_postfix(restored=restored, refresh=False)
    return rows, arrivals
