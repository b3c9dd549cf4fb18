"""Batch inference end to end: a real local Ray (one per module), real shards, real model actors and PNG writers.

Most runs call ``main()`` in this process, which drives the module's Ray (a fresh CLI process pays a new Ray job:
new worker processes that import torch again); one test runs the real CLI in its own process and joins the module's
Ray with ``--address``, as a SLURM user does.
"""
from __future__ import annotations

import io
import json
import os
import re
import shutil
import tarfile
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from restore import batch_infer, infer_summary, inputs, ray_pipeline
from restore.engine import Engine
from restore.composite import composite_luma
from restore.model import ModelSpec, build_model, inference_checkpoint
from restore.score import score_image, summarize
from shards.damage import to_gray
from shards.reader import iter_samples, read_manifest, shard_paths

from conftest import run_cli
from distributed import FAST_CPU_COMPILE

pytestmark = pytest.mark.ray

# The smallest encoder the model tests use: timm's test EfficientNet (~0.45M parameters for both stages).
TINY_SPEC = ModelSpec(encoder="tu-test_efficientnet", decoder_channels=(16, 8, 8, 8, 8), cbam=False)


@pytest.fixture(scope="module")
def actors_inductor_dir(tmp_path_factory) -> Path:
    """inductor's local cache for this module's actors: the compile-cache test empties it as another node's is."""
    return tmp_path_factory.mktemp("actors_inductor")


@pytest.fixture(scope="module")
def ray_address(actors_inductor_dir):
    import ray

    # Two CPUs: one for the model actor, one left for the read and write tasks (fewer would hang the pipeline).
    # The actors inherit the environment of the Ray processes this starts (cheaper than a runtime_env per job).
    with pytest.MonkeyPatch.context() as env:
        env.setenv("TORCHINDUCTOR_CACHE_DIR", str(actors_inductor_dir))
        for name, value in FAST_CPU_COMPILE.items():
            env.setenv(name, value)
        ctx = ray.init(address="local", num_cpus=2, include_dashboard=False, logging_level="WARNING")
    yield ctx.address_info["gcs_address"]
    ray.shutdown()


def _save_checkpoint(path: Path, seed: int, spec: ModelSpec = TINY_SPEC) -> Path:
    torch.manual_seed(seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(inference_checkpoint(build_model(spec)), path)
    return path


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> Path:
    return _save_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny.pt", seed=0)


class Result:
    def __init__(self, returncode: int, stdout: str, stderr: str) -> None:
        self.returncode, self.stdout, self.stderr = returncode, stdout, stderr


@pytest.fixture
def infer(ray_address, capsys):
    """``main()`` on the module's Ray; returns the exit code and what it printed."""

    def call(*args) -> Result:
        capsys.readouterr()
        code = batch_infer.main(["--batch-size", "2", *map(str, args)])
        captured = capsys.readouterr()
        return Result(code, captured.out, captured.err)

    return call


def _keys(split_dir: Path) -> list[str]:
    return [k for shard in read_manifest(split_dir)["shards"] for k in shard["keys"]]


def _pil_l(rgb: np.ndarray) -> np.ndarray:
    return np.asarray(Image.fromarray(rgb).convert("L"))


def _zip_images(path: Path) -> dict[str, np.ndarray]:
    with zipfile.ZipFile(path) as zf:
        out = {}
        for name in zf.namelist():
            with Image.open(io.BytesIO(zf.read(name))) as img:
                assert img.mode == "RGB", name
                out[name] = np.asarray(img)
        return out


def test_restores_test_split_into_a_flat_verified_zip_and_resumes_without_redoing_work(
        infer, ckpt, tiny_dacon_shards, tmp_path):
    split = tiny_dacon_shards / "test"
    keys = _keys(split)
    out = tmp_path / "sub.zip"
    r = infer("--shards", split, "--checkpoint", ckpt, "--out", out)
    assert r.returncode == 0, r.stderr
    assert f"done: {len(keys)} restored, 0 already done, 0 bad" in r.stdout
    # the actor's time after its first batch, split three ways (one actor, batches of 2: several batches)
    (split_line,) = re.findall(r"after its first batch \((\d+) images in ([\d.]+) s, ([\d.]+) img/s\): in the model "
                               r"(\d+)%, in the rest of its calls (\d+)%, outside its calls (\d+)%", r.stdout)
    images_after, span, rate = int(split_line[0]), float(split_line[1]), float(split_line[2])
    assert span > 0 and len(keys) - 2 <= images_after < len(keys)  # all but the first batch (of at most 2)
    assert images_after / (span + 0.006) <= rate <= images_after / max(span - 0.006, 1e-3)  # span printed to 0.01 s
    assert 99 <= sum(map(int, split_line[3:])) <= 101
    # one actor: the pooled steady rate on the wall clock covers the same images as the actor's own clock
    (steady,) = re.findall(r"; steady ([\d.]+) img/s \((\d+) images after the first batch, ([\d.]+) s\)", r.stdout)
    assert int(steady[1]) == images_after and float(steady[0]) > 0

    images = _zip_images(out)
    assert sorted(images) == sorted(f"{k}.png" for k in keys)  # flat, exactly the manifest's names
    samples = {s.key: s for s in iter_samples(shard_paths(split))}
    for key in keys:
        rgb, sample = images[f"{key}.png"], samples[key]
        assert rgb.shape == (*sample.input.shape, 3)
        # compositing: outside the hole the PIL luminance is the input's, bit for bit
        known = ~sample.mask
        assert np.array_equal(_pil_l(rgb)[known], sample.input[known])
    assert not (tmp_path / "sub.bad.json").exists()

    # A crash: two PNGs never got written, one temp file and a half-written zip temp were left behind.
    png_dir = tmp_path / "sub_png"
    lost = keys[:2]
    for key in lost:
        (png_dir / f"{key}.png").unlink()
    (png_dir / f".{lost[0]}.png.abc123.tmp").write_bytes(b"half a png")
    (tmp_path / ".sub.zip.xyz.tmp").write_bytes(b"half a zip")
    out.unlink()
    kept = {k: (png_dir / f"{k}.png").stat().st_mtime_ns for k in keys[2:]}

    r = infer("--shards", split, "--checkpoint", ckpt, "--out", out)
    assert r.returncode == 0, r.stderr
    assert f"reuse: {len(keys) - 2} of {len(keys)} images have a finished PNG made the same way" in r.stdout
    assert "removed 1 leftover temp files" in r.stdout
    assert f"done: 2 restored, {len(keys) - 2} already done, 0 bad" in r.stdout
    assert {k: (png_dir / f"{k}.png").stat().st_mtime_ns for k in keys[2:]} == kept  # not redone
    assert sorted(p.name for p in png_dir.iterdir()) == sorted([f"{k}.png" for k in keys] + [
        ".restore.lock", ".restore_records.jsonl"])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["sub.zip", "sub_png"]
    again = _zip_images(out)
    assert sorted(again) == sorted(images)
    for key in lost:  # the same model on the same input: the redone images are identical
        assert np.array_equal(again[f"{key}.png"], images[f"{key}.png"])


def _corrupt_copy(split: Path, dest: Path) -> tuple[str, str]:
    """Copy ``split`` with one input PNG garbled and one mask member removed; returns (corrupt key, maskless key)."""
    shutil.copytree(split, dest)
    first = sorted(dest.glob("*.tar"))[0]
    with tarfile.open(first) as tar:
        members = [(m, tar.extractfile(m).read()) for m in tar.getmembers()]
    keys = sorted({m.name.split(".", 1)[0] for m, _ in members})
    corrupt, maskless = keys[0], keys[1]
    with tarfile.open(first, "w") as tar:
        for member, data in members:
            if member.name == f"{maskless}.mask.png":
                continue
            if member.name == f"{corrupt}.input.png":
                data = data[:40] + b"\0" * 64  # a PNG header followed by garbage
            member.size = len(data)
            tar.addfile(member, io.BytesIO(data))
    return corrupt, maskless


def test_bad_samples_exit_2_naming_them_and_skip_bad_restores_the_rest(infer, ckpt, tiny_dacon_shards, tmp_path):
    split = tmp_path / "test"
    corrupt, maskless = _corrupt_copy(tiny_dacon_shards / "test", split)
    keys = _keys(split)
    out = tmp_path / "out" / "sub.zip"

    r = infer("--shards", split, "--checkpoint", ckpt, "--out", out)
    assert r.returncode == 2
    assert "error:" in r.stderr and "test-000000.tar" in r.stderr and "--skip-bad" in r.stderr
    assert corrupt in r.stderr or maskless in r.stderr
    assert not out.exists()

    r = infer("--shards", split, "--checkpoint", ckpt, "--out", out, "--skip-bad")
    assert r.returncode == 0, r.stderr
    assert "skipped 2 bad input(s)" in r.stdout
    assert f"{corrupt}: " in r.stdout and "cannot decode PNG" in r.stdout
    assert f"{maskless}: " in r.stdout and f"missing member {maskless}.mask.png" in r.stdout
    listing = json.loads((out.parent / "sub.bad.json").read_text())  # named after the zip: this job's own
    assert sorted(b["key"] for b in listing["bad"]) == sorted([corrupt, maskless])
    assert listing["zip_holds"] == len(keys) - 2 and listing["expected"] == len(keys)
    good = sorted(f"{k}.png" for k in keys if k not in (corrupt, maskless))
    assert sorted(_zip_images(out)) == good
    with zipfile.ZipFile(out) as zf:
        assert b"2 bad inputs left out" in zf.comment
    assert "WITHOUT the 2 bad keys" in r.stdout


def test_images_folder_detects_masks_on_the_fly(infer, ckpt, tiny_dacon_truth, tmp_path):
    root, truth = tiny_dacon_truth
    images = tmp_path / "scans"
    shutil.copytree(root / "test_input", images)
    stems = sorted(p.stem for p in images.glob("*.png"))
    out = tmp_path / "restored.zip"
    r = infer("--images", images, "--checkpoint", ckpt, "--out", out, "--png-dir", tmp_path / "pngs",
              "--png-compression", "none")
    assert r.returncode == 0, r.stderr
    restored = _zip_images(out)
    assert sorted(restored) == [f"{s}.png" for s in stems]
    for png in (tmp_path / "pngs").glob("*.png"):  # stored rows: the pixels, a filter byte per row, and framing
        h, w = restored[png.name].shape[:2]
        assert h * (w * 3 + 1) < png.stat().st_size < h * (w * 3 + 1) + 200, png
    for stem in stems:
        gray = np.asarray(Image.open(images / f"{stem}.png"))
        hole = truth["masks"][stem]
        lum = _pil_l(restored[f"{stem}.png"])
        assert np.array_equal(lum[~hole], gray[~hole])
        # The detected hole was treated as a hole: the model's own values stand there, not the fill gray.
        assert (lum[hole] != gray[hole]).mean() > 0.5, stem


def test_cli_process_joins_the_cluster_scores_and_uses_the_newest_run(ray_address, ckpt, tiny_dacon_shards,
                                                                       tmp_path):
    split = tiny_dacon_shards / "train"  # has gt
    runs = tmp_path / "runs"
    old = runs / "old" / "checkpoints" / "best.pt"
    old.parent.mkdir(parents=True)
    old.write_bytes(b"not a checkpoint")  # would fail if it were chosen
    os.utime(old, (1_000_000_000, 1_000_000_000))
    new = runs / "new" / "checkpoints"
    new.mkdir(parents=True)
    shutil.copy(ckpt, new / "step_00000010.pt")
    (new / "latest").write_text("step_00000010.pt\n")
    out = tmp_path / "val.zip"
    r = run_cli(["restore.batch_infer", "--address", ray_address, "--shards", split, "--runs-dir", runs,
                 "--out", out, "--score", "--tta", "--batch-size", 3], cwd=tmp_path, timeout=240)
    assert r.returncode == 0, r.stderr
    assert f"using the newest run {runs / 'new'}" in r.stdout

    images = _zip_images(out)
    expected = summarize(score_image(s.gt, images[f"{s.key}.png"], s.mask) for s in iter_samples(shard_paths(split)))
    line = next(l for l in r.stdout.splitlines() if l.startswith("score "))
    printed = dict(zip(line.split()[0::2], line.split()[1::2]))
    for term in ("score", "ssim", "masked_ssim", "hist_sim"):
        assert float(printed[term]) == pytest.approx(expected[term], abs=1e-4), term
    assert f"(n={expected['n']}," in line


def test_engine_averages_checkpoints_and_flips_and_composites(ckpt, tmp_path):
    second = _save_checkpoint(tmp_path / "b.pt", seed=1)
    rng = np.random.default_rng(0)
    gray = rng.integers(0, 256, (2, 64, 64), dtype=np.uint8)
    mask = np.zeros((2, 64, 64), bool)
    mask[:, 10:30, 20:40] = True
    engine = Engine([ckpt, second], tta=True, composite=True, device="cpu")
    got = engine.restore(gray, mask)
    assert engine.forward_passes == 2 * 2 * 2  # images x checkpoints x views

    x = torch.from_numpy(gray).float()[:, None] / 255
    m = torch.from_numpy(mask).float()[:, None]
    total = 0
    with torch.inference_mode():
        for model in engine.models:
            total = total + model(x, m)[1] + model(x.flip(-1), m.flip(-1))[1].flip(-1)
    mean = ((total / 4).clamp(0, 1) * 255).round().to(torch.uint8)
    want = composite_luma(mean, torch.from_numpy(gray), ~torch.from_numpy(mask)).permute(0, 2, 3, 1).numpy()
    assert np.array_equal(got, want)
    assert np.array_equal(got[mask], mean.permute(0, 2, 3, 1).numpy()[mask])  # the hole is the prediction
    for i in range(2):
        assert np.array_equal(_pil_l(got[i])[~mask[i]], gray[i][~mask[i]])


def test_compiled_engine_pads_to_one_static_batch_and_matches_eager(ckpt):
    import torch._dynamo
    from torch._dynamo.utils import counters

    rng = np.random.default_rng(2)
    gray = rng.integers(0, 256, (7, 64, 64), dtype=np.uint8)
    mask = np.zeros((7, 64, 64), bool)
    mask[:, 8:28, 16:40] = True
    want = Engine([ckpt], device="cpu", fuse_bn=True).restore(gray, mask)  # folded, as compiled ones are

    torch._dynamo.reset()
    counters.clear()
    # aot_eager: dynamo traces the real graph (what inductor would compile) without generating kernels.
    engine = Engine([ckpt], device="cpu", batch_size=3, compile="default", compile_backend="aot_eager")
    got = engine.restore(gray, mask)  # calls of 3, 3 and 1 padded to 3
    # The traced graph decomposes some ops (bilinear resampling in the prefill), so the float results may differ in
    # the last bits; after rounding to 8 bits that is at most one level on a handful of pixels.
    diff = np.abs(got.astype(np.int16) - want)
    assert diff.max() <= 1 and (diff > 0).mean() < 1e-3
    assert engine.padded_images == 2 and engine.forward_passes == 9
    assert np.array_equal(engine.restore(gray[4:5], mask[4:5]), want[4:5])
    assert engine.padded_images == 4
    assert counters["stats"]["unique_graphs"] == 1  # one static shape: no recompilation for the short batches


def test_engine_folds_batchnorms_runs_channels_last_and_restores_the_same_images(ckpt):
    rng = np.random.default_rng(3)
    gray = rng.integers(0, 256, (3, 64, 64), dtype=np.uint8)
    mask = np.zeros((3, 64, 64), bool)
    mask[:, 10:30, 5:45] = True
    fused = Engine([ckpt], device="cpu", fuse_bn=True)
    plain = Engine([ckpt], device="cpu")  # eager: the BatchNorms as trained, by default
    (report,) = fused.fuse_reports
    assert report.pairs == report.batchnorms == 68 and report.max_abs_diff < 1e-4
    assert plain.fuse_reports == []
    assert any(isinstance(m, torch.nn.BatchNorm2d) for m in plain.models[0].modules())
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in fused.models[0].modules())
    # a compiled engine folds by default (aot_eager: wrapping only, nothing compiles before the first call)
    compiled = Engine([ckpt], device="cpu", batch_size=3, compile="default", compile_backend="aot_eager")
    assert len(compiled.fuse_reports) == 1
    got, want = fused.restore(gray, mask), plain.restore(gray, mask)
    assert np.abs(got.astype(np.int16) - want).max() <= 1  # float rounding may move a value across a .5
    # NHWC on the CPU too (oneDNN's fast layout): the same images up to rounding.
    assert fused.channels_last and fused.models[0].inpainter.net.encoder.model.conv_stem.weight.is_contiguous(
        memory_format=torch.channels_last)
    nchw = Engine([ckpt], device="cpu", fuse_bn=True, channels_last=False).restore(gray, mask)
    assert np.abs(got.astype(np.int16) - nchw).max() <= 1


def _parameter_casts(engine, gray, mask) -> int:
    """How many casts of the model's own parameters one ``engine.restore`` makes (autocast's per-call weight casts)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    params = {p.data_ptr() for model in engine.models for p in model.parameters()}

    class Casts(TorchDispatchMode):
        count = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            # autocast casts with aten.to (a no-op returning the tensor itself when the dtype is already right)
            casts = func in (torch.ops.aten.to.dtype, torch.ops.aten._to_copy.default)
            if casts and args[0].data_ptr() in params:
                out = func(*args, **(kwargs or {}))
                Casts.count += out is not args[0]
                return out
            return func(*args, **(kwargs or {}))

    with Casts():
        engine.restore(gray, mask)
    return Casts.count


def test_bf16_engine_holds_its_conv_weights_in_bf16_so_autocast_casts_none_per_call(ckpt):
    rng = np.random.default_rng(4)
    gray = rng.integers(0, 256, (2, 64, 64), dtype=np.uint8)
    mask = np.zeros((2, 64, 64), bool)
    mask[:, 12:40, 8:30] = True
    held = Engine([ckpt], device="cpu", precision="bf16")
    cast = Engine([ckpt], device="cpu", precision="bf16", bf16_weights=False)
    convs = [m for m in held.models[0].modules() if isinstance(m, torch.nn.Conv2d)]
    assert convs and all(c.weight.dtype == torch.bfloat16 for c in convs)
    assert all(c.bias is None or c.bias.dtype == torch.bfloat16 for c in convs)
    norms = [m for m in held.models[0].modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    assert all(n.weight.dtype == torch.float32 for n in norms)  # as autocast leaves them (none left once folded)
    # autocast casts each conv's weight and bias on every call, unless they are bf16 already
    assert _parameter_casts(cast, gray, mask) >= len(convs)
    assert _parameter_casts(held, gray, mask) == 0
    # the same bf16 values reach the convolutions either way: the same images
    assert np.array_equal(held.restore(gray, mask), cast.restore(gray, mask))
    # bf16 is not the CPU's default: there the engine stays fp32, without autocast
    default = Engine([ckpt], device="cpu")
    assert default.precision == "fp32" and all(p.dtype == torch.float32 for p in default.models[0].parameters())
    assert _parameter_casts(default, gray, mask) == 0
    with pytest.raises(ValueError, match="precision=fp16 needs a CUDA device"):
        Engine([ckpt], device="cpu", precision="fp16")
    with pytest.raises(ValueError, match="precision='half': must be one of auto, bf16, fp16, fp32"):
        Engine([ckpt], device="cpu", precision="half")
    # one rule for training and inference (restore.precision): auto is bf16 only on a GPU whose tensor cores do
    # bf16 (Ampere and later), fp16 on a T4 or V100, fp32 on the CPU
    from job.train import resolve_precision
    from restore.precision import resolve

    assert resolve("auto", "cuda", native_bf16=True) == "bf16"
    assert resolve("auto", "cuda", native_bf16=False) == "fp16"
    assert resolve("auto", "cpu", native_bf16=False) == "fp32"
    assert resolve("bf16", "cpu", native_bf16=False) == "bf16"  # asked for: as on the CPU above
    assert resolve("fp32", "cuda", native_bf16=True) == "fp32"
    assert resolve_precision("auto", torch.device("cpu")) == default.precision == "fp32"


def test_engine_rejects_bad_settings_and_tunes_cudnn_only_for_recurring_shapes(ckpt):
    with pytest.raises(ValueError, match="compile='fast': must be one of off, default, reduce-overhead"):
        Engine([ckpt], device="cpu", compile="fast")
    with pytest.raises(ValueError, match="a compiled engine needs batch_size"):
        Engine([ckpt], device="cpu", compile="default")
    with pytest.raises(ValueError, match="batch_size=0: must be >= 1"):
        Engine([ckpt], device="cpu", batch_size=0)

    engine = Engine([ckpt], device="cpu")
    calls = [engine._benchmark_this_call((4, 512, 512)) for _ in range(4)]
    assert calls == [False, False, True, True]  # the autotuner's search pays only for a shape that recurs
    assert engine._benchmark_this_call((4, 600, 400)) is False
    off = Engine([ckpt], device="cpu", cudnn_benchmark=False)
    assert not any(off._benchmark_this_call((4, 512, 512)) for _ in range(4))

    # The CLI's setting reaches each actor's engine (wrapping only: nothing compiles before the first batch).
    worker = ray_pipeline.RestoreWorker([str(ckpt)], tta=False, composite=True, keep_gt=False, batch_size=4,
                                       compile="reduce-overhead")
    assert (worker.engine.compile, worker.engine.batch_size) == ("reduce-overhead", 4)
    assert batch_infer.build_parser().parse_args(["--shards", "x", "--compile", "default"]).compile == "default"


def test_composite_matches_pil_luma_exactly_even_where_channels_clip():
    rng = np.random.default_rng(1)
    rgb = rng.integers(0, 256, (3, 40, 40, 3), dtype=np.uint8)
    gray = rng.integers(0, 256, (3, 40, 40), dtype=np.uint8)  # far from the prediction: clipping everywhere
    known = rng.random((3, 40, 40)) > 0.2
    out = composite_luma(torch.from_numpy(rgb).permute(0, 3, 1, 2), torch.from_numpy(gray),
                         torch.from_numpy(known)).permute(0, 2, 3, 1).numpy()
    for i in range(3):
        assert np.array_equal(_pil_l(out[i])[known[i]], gray[i][known[i]])
        assert np.array_equal(out[i][~known[i]], rgb[i][~known[i]])
    # the fallback to neutral gray is rare even for this adversarial input
    neutral = (out[..., 0] == out[..., 1]) & (out[..., 1] == out[..., 2]) & known
    assert neutral.mean() < 0.02
    # a near-right prediction only moves by the luminance error
    near = np.stack([to_gray(c) for c in rgb])
    same = composite_luma(torch.from_numpy(rgb).permute(0, 3, 1, 2), torch.from_numpy(near),
                          torch.ones(3, 40, 40, dtype=torch.bool)).permute(0, 2, 3, 1).numpy()
    assert np.array_equal(same, rgb)


def graph_counts(stdout: str) -> list[tuple[int, int]]:
    """(compiled, from the cache) of each worker line in a compiled run's summary."""
    return [(int(a), int(b)) for a, b in re.findall(r"graphs (\d+) compiled, (\d+) from the compile cache", stdout)]


@pytest.mark.compile
def test_compiled_actors_save_their_graphs_and_actors_on_another_node_load_them(
        infer, ckpt, tiny_dacon_shards, actors_inductor_dir, tmp_path):
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    shutil.copy(ckpt, run / "checkpoints" / "best.pt")
    split = tiny_dacon_shards / "test"
    cache = run / "compile_cache" / "inference"  # --compile-cache auto: beside the training run's own cache

    cold = infer("--shards", split, "--checkpoint", run, "--compile", "default", "--out", tmp_path / "cold.zip")
    assert cold.returncode == 0, cold.stderr
    assert f"compile cache {cache}" in cold.stdout
    (compiled, cached), = graph_counts(cold.stdout)  # one actor
    assert compiled >= 1 and cached == 0
    saved = sorted(cache.iterdir())
    assert len(saved) == 1 and saved[0].name.startswith(f"torch-{torch.__version__}-cpu-")

    # New actors, as on another node: inductor's local graph caches are gone (its built C++ kernels stay: on a GPU
    # the file carries the Triton kernels, on a CPU it cannot carry them).
    for sub in ("fxgraph", "aotautograd"):
        shutil.rmtree(actors_inductor_dir / sub, ignore_errors=True)
    again = infer("--shards", split, "--checkpoint", run, "--compile", "default", "--out", tmp_path / "again.zip")
    assert again.returncode == 0, again.stderr
    assert graph_counts(again.stdout) == [(0, compiled)]
    assert sorted(cache.iterdir()) == saved  # nothing new to add
    keys = [k for shard in read_manifest(split)["shards"] for k in shard["keys"]]
    assert len(keys) == 4
    for key in keys:  # the loaded graphs compute what the compiled ones did
        assert ((tmp_path / "again_png" / f"{key}.png").read_bytes()
                == (tmp_path / "cold_png" / f"{key}.png").read_bytes()), key


@pytest.mark.parametrize("case", ["mismatched", "missing", "text_file", "empty_dir", "no_runs", "png_dir_is_input",
                                  "compile_cache_bool"])
def test_bad_checkpoint_or_source_exits_2_before_any_work(case, ckpt, tiny_dacon_shards, tmp_path, capsys):
    split = tiny_dacon_shards / "test"
    args = ["--shards", str(split), "--checkpoint", str(ckpt), "--out", str(tmp_path / "s.zip")]
    if case == "mismatched":
        state = inference_checkpoint(build_model(TINY_SPEC))
        state["model_spec"] = {**TINY_SPEC.to_dict(), "decoder_channels": [32, 16, 8, 8, 8]}
        bad = tmp_path / "mismatched.pt"
        torch.save(state, bad)
        args[3], needle = str(bad), f"checkpoint {bad}"
    elif case == "missing":
        args[3], needle = str(tmp_path / "nope.pt"), str(tmp_path / "nope.pt")
    elif case == "text_file":
        (tmp_path / "notes.pt").write_text("101 photos from the attic\n")
        args[3] = str(tmp_path / "notes.pt")
        needle = f"checkpoint {tmp_path / 'notes.pt'} is not a checkpoint (torch.save writes a zip or a pickle): it is a text file"
    elif case == "empty_dir":
        (tmp_path / "empty").mkdir()
        args[1], needle = str(tmp_path / "empty"), str(tmp_path / "empty")
    elif case == "no_runs":
        args = args[:2] + args[4:] + ["--runs-dir", str(tmp_path / "runs")]
        needle = "no --checkpoint given and no run with checkpoints"
    elif case == "compile_cache_bool":  # a boolean meant, not a folder named "false"; refused even without --compile
        args += ["--compile-cache", "false"]
        needle = "--compile-cache 'false': must be auto, off or a folder"
    else:
        scans = tmp_path / "scans"
        scans.mkdir()
        Image.fromarray(np.zeros((16, 16), np.uint8)).save(scans / "a.png")
        args = ["--images", str(scans), "--checkpoint", str(ckpt), "--png-dir", str(scans), "--out",
                str(tmp_path / "s.zip")]
        needle = "is the input folder"
    assert batch_infer.main(args) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and needle in err
    if case == "mismatched":
        assert "does not match its model_spec" in err
    assert not (tmp_path / "s.zip").exists() and not (tmp_path / "s_png").exists()
    if case == "png_dir_is_input":
        assert sorted(p.name for p in (tmp_path / "scans").iterdir()) == ["a.png"]


@pytest.mark.slurm
@pytest.mark.skipif(os.geteuid() != 0, reason="the local SLURM cluster needs root")
def test_slurm_ray_cluster_runs_batch_infer_over_two_nodes_and_stops_ray(ckpt, tiny_dacon_shards, tmp_path):
    """slurm/ray_cluster.sh on the local two-node SLURM: head + worker node, the job's zip, no Ray left behind."""
    import random
    import subprocess

    repo = Path(__file__).resolve().parents[1]
    cluster = repo / "slurm" / "local_cluster.sh"
    was_up = subprocess.run(["bash", cluster, "status"], capture_output=True).returncode == 0
    up = subprocess.run(["bash", cluster, "up"], capture_output=True, text=True, timeout=900)
    assert up.returncode == 0, up.stderr
    port = random.randint(20000, 29999)  # not 6379: other Ray clusters may run on this machine
    try:
        split = tiny_dacon_shards / "test"
        job = subprocess.run(
            ["sbatch", "--wait", "--nodes", "2", "--output", str(tmp_path / "job.out"),
             str(repo / "slurm" / "ray_cluster.sh"), "--shards", str(split), "--checkpoint", str(ckpt),
             "--out", str(tmp_path / "sub.zip"), "--batch-size", "2"],
            cwd=tmp_path, capture_output=True, text=True, timeout=300, env={**os.environ, "RAY_PORT": str(port)})
        log = (tmp_path / "job.out").read_text()
        assert job.returncode == 0, log[-4000:]
        assert "ray_cluster: 2 node(s) up" in log and "batch_infer exited 0" in log
        assert sorted(_zip_images(tmp_path / "sub.zip")) == sorted(f"{k}.png" for k in _keys(split))
        ps = subprocess.run(["ps", "-eo", "args"], capture_output=True, text=True).stdout
        assert f"--gcs_server_port={port}" not in ps and f"127.0.0.1:{port}" not in ps
    finally:
        if not was_up:
            subprocess.run(["bash", cluster, "down"], capture_output=True, timeout=300)


def test_actor_output_is_dense_when_sizes_agree_and_ray_sees_the_same_column():
    from ray.data.block import BlockAccessor

    a, b = np.full((4, 6, 3), 7, np.uint8), np.full((4, 6, 3), 9, np.uint8)
    empty = inputs._EMPTY_RGB
    dense = ray_pipeline._rgb_column([a, empty, b], todo=[0, 2])  # row 1 was done already: zeros
    assert dense.dtype == np.uint8 and dense.shape == (3, 4, 6, 3)
    assert (dense[0] == 7).all() and (dense[1] == 0).all() and (dense[2] == 9).all()
    as_objects = ray_pipeline._object_array([a, np.zeros_like(a), b])
    assert (BlockAccessor.batch_to_block({"rgb": dense}).schema.field("rgb").type
            == BlockAccessor.batch_to_block({"rgb": as_objects}).schema.field("rgb").type)
    mixed = ray_pipeline._rgb_column([a, np.zeros((2, 2, 3), np.uint8)], todo=[0, 1])
    assert mixed.dtype == object and [m.shape for m in mixed] == [(4, 6, 3), (2, 2, 3)]
    assert ray_pipeline._rgb_column([empty, empty], todo=[]).shape == (2, 0, 0, 3)


def test_actor_hands_the_engines_array_on_when_every_row_was_restored(ckpt):
    worker = ray_pipeline.RestoreWorker([str(ckpt)], tta=False, composite=True, keep_gt=False, batch_size=4)
    returned = []
    restore = worker.engine.restore

    def spy(gray, mask, names=None):  # the real engine, its result recorded
        returned.append(restore(gray, mask, names))
        return returned[-1]

    worker.engine.restore = spy
    rng = np.random.default_rng(5)
    gray = rng.integers(0, 256, (3, 32, 32), dtype=np.uint8)
    mask = np.zeros((3, 32, 32), np.uint8)
    mask[:, 4:12, 8:20] = 1

    def batch(statuses):
        n = len(statuses)
        return {"key": np.array([f"k{i}" for i in range(n)], dtype=object), "where": np.array(["s"] * n, dtype=object),
                "status": np.array(statuses, dtype=object), "error": np.array([""] * n, dtype=object),
                "note": np.array([""] * n, dtype=object), "height": np.full(n, 32), "width": np.full(n, 32),
                "input": gray[:n], "mask": mask[:n], "hole_frac": np.zeros(n),
                **{c: np.array([""] * n, dtype=object) for c in ("input_sha", "mask_sha", "mask_source", "redo")}}

    all_todo = worker(batch([inputs.TODO] * 3))
    assert all_todo["rgb"] is returned[-1]  # no copy: the usual batch
    assert all_todo["rgb"].shape == (3, 32, 32, 3)
    partly = worker(batch([inputs.TODO, inputs.DONE, inputs.TODO]))
    assert partly["rgb"] is not returned[-1] and partly["rgb"].shape == (3, 32, 32, 3)
    assert (partly["rgb"][1] == 0).all()  # the finished row holds no image
    assert np.array_equal(partly["rgb"][[0, 2]], returned[-1])
    assert np.array_equal(partly["rgb"][0], all_todo["rgb"][0])
    # every row carries the actor's clock and its model and call seconds so far, cumulative
    marks = [tuple(float(r[k][0]) for k in ray_pipeline.ACTOR_TIME_COLUMNS) for r in (all_todo, partly)]
    for clock, model, calls in marks:
        assert 0 < model <= calls <= clock
    assert all(a < b for a, b in zip(*marks))
    assert all(len(set(r[k])) == 1 for r in (all_todo, partly) for k in ray_pipeline.ACTOR_TIME_COLUMNS)


def test_actor_time_split_covers_the_span_after_the_first_batch():
    # (clock, model, calls) at the end of each batch; the first batch (compilation, say) is left out
    marks = [(30.0, 29.0, 29.5), (32.0, 30.5, 31.1), (34.0, 32.0, 32.7), (32.0, 30.5, 31.1)]  # a batch's rows repeat
    split = infer_summary.actor_time_split(marks)
    # one mark per restored image: the images after the first batch are the batch at 32 s (two) and the one at 34 s
    assert split == {"span_s": 4.0, "model": 0.75, "calls_other": 0.05, "outside_calls": 0.2, "images": 3,
                     "img_s": 0.75}
    assert infer_summary.actor_time_split(marks[:1]) is None  # one batch: nothing after it
    assert infer_summary.actor_time_split([]) is None


def test_rate_after_first_batch_counts_the_batches_after_the_first_any_actor_finished():
    # two actors on one clock: A's batches end at 10, 12, 14 s (2 images each), B's at 11 and 15 s (3 images each)
    ends = [10.0] * 2 + [12.0] * 2 + [14.0] * 2 + [11.0] * 3 + [15.0] * 3
    assert infer_summary.rate_after_first_batch(ends) == {"images": 10, "span_s": 5.0, "img_s": 2.0}
    assert infer_summary.rate_after_first_batch([7.0, 7.0]) is None  # one batch: no span after it
    assert infer_summary.rate_after_first_batch([]) is None


def test_engine_reads_rays_read_only_columns_quietly_and_leaves_them_as_they_were(ckpt):
    engine = Engine([ckpt], tta=False)
    rng = np.random.default_rng(3)
    gray = rng.integers(0, 256, (2, 32, 32), dtype=np.uint8)
    mask = np.zeros((2, 32, 32), np.uint8)
    mask[:, 5:15, 10:20] = 1
    expected = engine.restore(gray.copy(), mask.copy())
    gray.flags.writeable = mask.flags.writeable = False  # what Ray 2.x hands an actor (zero-copy batches)
    before = gray.copy(), mask.copy()
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # torch's "not writable" UserWarning would fail here
        got = engine.restore(gray, mask)
    assert np.array_equal(got, expected)
    assert np.array_equal(gray, before[0]) and np.array_equal(mask, before[1])


def test_actor_passes_rays_dense_columns_to_the_engine_without_stacking():
    dense = np.zeros((3, 8, 8), np.uint8)
    assert ray_pipeline._stacked(dense, [0, 1, 2]) is dense
    part = ray_pipeline._stacked(dense, [0, 2])
    assert part is not dense and part.shape == (2, 8, 8)
    ragged = ray_pipeline._object_array([np.ones((8, 8), np.uint8), np.ones((4, 4), np.uint8)])
    assert ray_pipeline._stacked(ragged, [0]).shape == (1, 8, 8)


def test_a_large_scan_is_restored_at_its_size_through_the_bounded_memory_path(infer, ckpt, tmp_path):
    from skimage import data

    from shards.damage import detect_mask

    scans = tmp_path / "scans"
    scans.mkdir()
    gray = np.array(Image.fromarray(data.camera()).resize((1000, 800), Image.BILINEAR))
    hole = np.zeros(gray.shape, bool)
    hole[300:380, 400:520] = True
    gray[hole] = 30
    Image.fromarray(gray).save(scans / "big.png")
    out = tmp_path / "big.zip"
    r = infer("--images", scans, "--checkpoint", ckpt, "--out", out, "--large-above", "0.5", "--work-size", "128")
    assert r.returncode == 0, r.stderr
    assert "images above 0.5 MP in bounded memory at work size 128" in r.stdout
    rgb = _zip_images(out)["big.png"]
    assert rgb.shape == (800, 1000, 3)
    lum = _pil_l(rgb)
    detected, _ = detect_mask(gray)  # the hole and a few bordering pixels of the photo that happen to be 30
    assert detected[hole].all() and detected.sum() < hole.sum() + 50
    assert np.array_equal(lum[~detected], gray[~detected])
    assert (lum[hole] != 30).mean() > 0.9


# ------------------------------------------------------------------------------------------- an archivist's folder
def _photo(name: str, size: tuple[int, int]) -> np.ndarray:
    """A real photo (scikit-image's bundled ones), shrunk to ``size`` (W, H): gray uint8, or RGB for color ones."""
    from skimage import data

    return np.array(Image.fromarray(getattr(data, name)()).resize(size, Image.BILINEAR))


def _damage(gray: np.ndarray, box: tuple[int, int, int, int], fill: int) -> np.ndarray:
    y0, y1, x0, x1 = box
    out = gray.copy()
    out[y0:y1, x0:x1] = fill
    return out


def _archive(root: Path) -> dict:
    """A folder as an archivist has it: a gray JPEG, a 16-bit PNG, a TIFF, a sepia JPEG (taken sideways: EXIF
    orientation 6), a palette PNG, a subfolder, a clean photo, a scratched scan with a user mask, a text file and a
    corrupt JPEG. Every image has its own size. Returns what the test needs: the key of each case."""
    images, masks = root / "scans", root / "masks"
    (images / "box1").mkdir(parents=True)
    masks.mkdir()
    camera = _photo("camera", (96, 80))
    Image.fromarray(_damage(camera, (20, 44, 30, 60), 25)).save(images / "gray.jpg", quality=92)
    deep = _damage(_photo("camera", (90, 70)).astype(np.uint16) * 257 + 100, (10, 30, 40, 70), 30 * 257)
    Image.fromarray(deep).save(images / "deep16.png")  # mode I;16
    Image.fromarray(_damage(_photo("moon", (88, 72)), (40, 60, 10, 40), 60)).save(images / "scan.tif")
    astronaut = _photo("astronaut", (84, 76)).astype(np.float32)
    luma = astronaut @ np.array([0.299, 0.587, 0.114], np.float32)
    sepia = np.clip(luma[..., None] * np.array([1.07, 0.74, 0.43], np.float32) + [20, 10, 0], 0, 255).astype(np.uint8)
    sideways = Image.fromarray(sepia)
    exif = sideways.getexif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to view: the restoration is 76 wide, 84 high
    sideways.save(images / "sepia.jpg", quality=92, exif=exif)
    Image.fromarray(_photo("coffee", (78, 66))).quantize(64).save(images / "palette.png")
    Image.fromarray(_damage(_photo("camera", (70, 74)), (30, 50, 20, 40), 5)).save(images / "box1" / "inner.png")
    Image.fromarray(_photo("camera", (82, 68))).save(images / "clean.png")
    scratched = _photo("camera", (92, 78))
    line = np.zeros(scratched.shape, bool)
    for x in range(10, 80):  # a thin diagonal scratch, not one constant region a detector would find
        line[int(10 + x * 0.7):int(12 + x * 0.7), x] = True
    scratched[line] = 250
    Image.fromarray(scratched).save(images / "scratch.png")
    Image.fromarray(line.astype(np.uint8) * 255).save(masks / "scratch.png")
    (images / "notes.txt").write_text("box 1, shelf 3\n")
    (images / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0" + b"not really a jpeg" * 4)
    return {"images": images, "masks": masks, "scratch_line": line}


def _used_mask(path: Path, user_mask: Path | None = None, dilate: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(the luma the pipeline reads from ``path``, the hole it uses): the read stage's own functions."""
    gray, _, lossy = inputs.load_gray(str(path))
    if user_mask is not None:
        return gray, inputs.load_mask(str(user_mask), gray.shape, str(path), dilate)
    mask, _, _ = inputs._detect(gray, lossy)
    return gray, mask


def test_an_archive_folder_of_any_format_with_user_masks_subfolders_and_a_gallery(infer, ckpt, tmp_path):
    case = _archive(tmp_path)
    images, out, gallery = case["images"], tmp_path / "restored.zip", tmp_path / "review"
    r = infer("--images", images, "--recursive", "--masks", case["masks"], "--checkpoint", ckpt, "--out", out,
              "--skip-bad", "--gallery", gallery)
    assert r.returncode == 0, r.stderr
    keys = ["box1/inner", "clean", "deep16", "gray", "palette", "scan", "scratch", "sepia"]
    assert "images: " in r.stdout and "9 images; ignored 1 non-image files (notes.txt)" in r.stdout
    assert "masks: 1 given in" in r.stdout and "(grown 3 px); 8 images without one get the detector" in r.stdout
    assert "done: 8 restored, 0 already done, 1 bad, 1 non-image files ignored" in r.stdout
    # the corrupt JPEG: listed with its reason in this job's bad list (named after the zip), not skipped silently
    assert "broken: " in r.stdout and "broken.jpg: cannot read as an image" in r.stdout
    listing = json.loads((tmp_path / "restored.bad.json").read_text())
    assert [b["key"] for b in listing["bad"]] == ["broken"] and "cannot read as an image" in listing["bad"][0]["error"]
    # what each file needed, said per file
    assert re.search(r"note: sepia: EXIF orientation 6 applied; color image \(mode RGB\) converted to luma", r.stdout)
    assert re.search(r"note: palette: color image \(mode P\) converted to luma", r.stdout)
    assert re.search(r"note: deep16: 16-bit gray scaled to 8-bit; damage: ", r.stdout)
    assert re.search(r"note: clean: no damage found \(.*\); colorized only", r.stdout)
    assert re.search(r"note: scratch: user mask [\d.]+% of the image \(grown 3 px\)", r.stdout)

    restored = _zip_images(out)
    assert sorted(restored) == [f"{k}.png" for k in keys]  # the subfolder's key keeps its path in the zip
    assert (tmp_path / "restored_png" / "box1" / "inner.png").is_file()
    sources = {"box1/inner": "box1/inner.png", "clean": "clean.png", "deep16": "deep16.png", "gray": "gray.jpg",
               "palette": "palette.png", "scan": "scan.tif", "scratch": "scratch.png", "sepia": "sepia.jpg"}
    for key, name in sources.items():
        user = case["masks"] / "scratch.png" if key == "scratch" else None
        gray, hole = _used_mask(images / name, user, dilate=3)
        rgb = restored[f"{key}.png"]
        assert rgb.shape == (*gray.shape, 3), key  # 8-bit RGB at the input's own (upright) size
        lum = _pil_l(rgb)
        assert np.array_equal(lum[~hole], gray[~hole]), key  # outside the damage, the input's luma bit for bit
    assert restored["sepia.png"].shape == (84, 76, 3)  # turned upright
    with Image.open(images / "deep16.png") as img16:  # the documented 16 -> 8 bit rule: round(v * 255 / 65535)
        want = np.round(np.asarray(img16).astype(np.float64) * 255 / 65535).astype(np.uint8)
    assert np.array_equal(_used_mask(images / "deep16.png")[0], want)
    for key in ("deep16", "scan", "box1/inner", "gray"):  # the constant fills were found, PNG, TIFF and JPEG alike
        assert _used_mask(images / sources[key])[1].mean() > 0.05, key
    # the clean photo: nothing invented, its luma untouched everywhere (only colorized)
    clean = np.asarray(Image.open(images / "clean.png"))
    assert np.array_equal(_pil_l(restored["clean.png"]), clean)
    # the scratch under the user's mask was filled: its pixels moved away from the scratch's 250
    scratch_lum = _pil_l(restored["scratch.png"])[case["scratch_line"]]
    assert (np.abs(scratch_lum.astype(int) - 250) > 30).mean() > 0.9

    _check_gallery(gallery, keys, tmp_path / "restored_png")


def _check_gallery(gallery: Path, keys: list[str], png_dir: Path) -> None:
    """The gallery's HTML parses, every page links its neighbours, every referenced file exists, every key is shown
    with its note, and a damaged image's before thumbnail has the red outline."""
    from html.parser import HTMLParser
    from urllib.parse import unquote

    class Links(HTMLParser):
        def __init__(self):
            super().__init__()
            self.refs, self.rel, self.text, self.figures = [], {}, [], []

        def handle_starttag(self, tag, attrs):
            a = dict(attrs)
            for name in ("src", "href"):
                if a.get(name):
                    self.refs.append(a[name])
            if tag == "a" and a.get("rel"):
                self.rel[a["rel"]] = a["href"]
            if tag == "figure":
                self.figures.append(a["id"])

        def handle_data(self, data):
            self.text.append(data)

    index = gallery / "index.html"
    pages = sorted(gallery.glob("page_*.html"))
    assert index.is_file() and [p.name for p in pages] == ["page_001.html"]
    shown = []
    for page in [index, *pages]:
        parser = Links()
        parser.feed(page.read_text())
        parser.close()
        for ref in parser.refs:
            assert (page.parent / unquote(ref)).is_file(), (page.name, ref)
        shown += parser.figures
        text = " ".join(parser.text)
        if page == index:
            assert "8 restored, 0 reused, 1 not restored" in text and "broken" in text and "notes.txt" in text
        else:
            assert "no damage found: colorized only" in text and "converted to luma" in text
            assert "mask: given" in text and "mask: detected" in text
    assert sorted(shown) == sorted(keys)
    before = np.asarray(Image.open(gallery / "thumbs" / "scan.before.jpg").convert("RGB")).astype(int)
    red = (before[..., 0] > 180) & (before[..., 1] < 90) & (before[..., 2] < 90)
    assert red.sum() > 40  # the outline of the 20x30 hole
    clean = np.asarray(Image.open(gallery / "thumbs" / "clean.before.jpg").convert("RGB")).astype(int)
    assert not ((clean[..., 0] > 180) & (clean[..., 1] < 90) & (clean[..., 2] < 90)).any()  # nothing outlined
    with Image.open(gallery / "thumbs" / "box1" / "inner.after.jpg") as after:
        assert after.size == (70, 74)  # small images keep their size (thumbnails are at most 320 px)


def _pngs(png_dir: Path) -> dict[str, tuple[int, bytes]]:
    return {p.relative_to(png_dir).as_posix(): (p.stat().st_mtime_ns, p.read_bytes()) for p in png_dir.rglob("*.png")}


def test_a_rerun_reuses_only_what_the_same_checkpoint_and_options_made(infer, ckpt, tmp_path):
    scans = tmp_path / "scans"
    scans.mkdir()
    for i, size in enumerate([(64, 56), (72, 60)]):
        Image.fromarray(_damage(_photo("camera", size), (10, 30, 12, 40), 20 + i)).save(scans / f"s{i}.png")
    png_dir = tmp_path / "out"
    common = ("--images", scans, "--no-zip", "--png-dir", png_dir)
    first = infer(*common, "--checkpoint", ckpt)
    assert first.returncode == 0, first.stderr
    assert "done: 2 restored, 0 already done" in first.stdout
    made = _pngs(png_dir)

    same = infer(*common, "--checkpoint", ckpt)
    assert "done: 0 restored, 2 already done" in same.stdout and _pngs(png_dir) == made  # untouched

    tta = infer(*common, "--checkpoint", ckpt, "--tta")
    assert "redo 2: tta changed (False -> True) (s0, s1)" in tta.stdout
    assert "done: 2 restored, 0 already done, 0 bad, 2 redone" in tta.stdout
    with_tta = _pngs(png_dir)
    assert all(with_tta[k][0] != made[k][0] for k in made)  # rewritten

    other = _save_checkpoint(tmp_path / "other.pt", seed=3)
    r = infer(*common, "--checkpoint", other, "--tta")
    assert "redo 2: checkpoint changed" in r.stdout and "done: 2 restored, 0 already done" in r.stdout
    assert all(_pngs(png_dir)[k][1] != with_tta[k][1] for k in made)  # another model, other pixels

    # An output edited (or replaced) after it was recorded is not the one recorded: redone whatever the options.
    (png_dir / "s0.png").write_bytes((png_dir / "s1.png").read_bytes())
    r = infer(*common, "--checkpoint", other, "--tta", "--no-composite")
    assert "redo 1: PNG not the one recorded (s0); 1: composite changed (True -> False) (s1)" in r.stdout


def test_two_folders_with_the_same_file_names_never_share_a_restoration(infer, ckpt, tmp_path):
    box_a, box_b, copy_of_b = tmp_path / "box_a", tmp_path / "box_b", tmp_path / "copy_of_b"
    for folder, photo in ((box_a, "camera"), (box_b, "moon")):
        folder.mkdir()
        Image.fromarray(_damage(_photo(photo, (64, 64)), (8, 30, 8, 30), 40)).save(folder / "scan_0001.png")
    shutil.copytree(box_b, copy_of_b)
    png_dir = tmp_path / "restored"

    def run(folder):
        r = infer("--images", folder, "--no-zip", "--png-dir", png_dir, "--checkpoint", ckpt)
        assert r.returncode == 0, r.stderr
        return r, _pil_l(np.asarray(Image.open(png_dir / "scan_0001.png")))

    _, from_a = run(box_a)
    r, from_b = run(box_b)  # same name, other photo: redone and overwritten, and the log says why
    assert "redo 1: input changed (scan_0001)" in r.stdout and "done: 1 restored, 0 already done" in r.stdout
    gray_b, hole_b = _used_mask(box_b / "scan_0001.png")
    assert np.array_equal(from_b[~hole_b], gray_b[~hole_b]) and not np.array_equal(from_a, from_b)
    r, _ = run(copy_of_b)  # the same bytes in another folder: provably the same restoration, reused
    assert "done: 0 restored, 1 already done" in r.stdout
    # Back to box_a (with a broken file now): redone from its own bytes, the same pixels as its first run; each
    # job's list of failures is its own, named after its input folder (no zip), never one file per folder.
    (box_a / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    r = infer("--images", box_a, "--no-zip", "--png-dir", png_dir, "--checkpoint", ckpt, "--skip-bad")
    assert r.returncode == 0, r.stderr
    assert "redo 1: input changed" in r.stdout
    assert np.array_equal(_pil_l(np.asarray(Image.open(png_dir / "scan_0001.png"))), from_a)
    (listing,) = png_dir.glob("box_a-*.bad.json")
    assert [b["key"] for b in json.loads(listing.read_text())["bad"]] == ["broken"]
    assert run(box_b)[0].returncode == 0 and listing.exists()  # box_b's clean run leaves box_a's list alone


def test_a_mask_of_another_size_stops_the_run_naming_both_files(infer, ckpt, tmp_path):
    scans, masks = tmp_path / "scans", tmp_path / "masks"
    scans.mkdir()
    masks.mkdir()
    Image.fromarray(_photo("camera", (64, 48))).save(scans / "a.png")
    Image.fromarray(np.zeros((40, 64), np.uint8)).save(masks / "a.png")
    r = infer("--images", scans, "--masks", masks, "--checkpoint", ckpt, "--out", tmp_path / "a.zip")
    assert r.returncode == 2
    assert (f"error: mask {masks / 'a.png'} is 64x40 but its image {scans / 'a.png'} is 64x48: a mask must have "
            f"its image's size") in r.stderr
    assert not (tmp_path / "a.zip").exists() and not list((tmp_path / "a_png").glob("*.png"))


def test_exit_codes_another_job_on_the_folder_is_2_and_an_internal_failure_is_1(ckpt, tmp_path, capsys,
                                                                                monkeypatch):
    from restore.records import job_lock

    scans = tmp_path / "scans"
    scans.mkdir()
    Image.fromarray(np.zeros((16, 16), np.uint8)).save(scans / "a.png")
    args = ["--images", str(scans), "--checkpoint", str(ckpt), "--no-zip", "--png-dir", str(tmp_path / "out")]
    with job_lock(tmp_path / "out"):
        assert batch_infer.main(args) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {tmp_path / 'out'}: another restore job is writing this folder (pid {os.getpid()}")

    def broken(_args):
        raise RuntimeError("a bug")

    monkeypatch.setattr(batch_infer, "run", broken)
    assert batch_infer.main(args) == 1
    err = capsys.readouterr().err
    assert "Traceback" in err and err.rstrip().splitlines()[-1].startswith(
        "error: internal failure (RuntimeError: a bug)")


def test_records_name_the_first_difference_and_survive_a_torn_line(tmp_path):
    from restore import records

    png_dir = tmp_path / "out"
    (png_dir / "box").mkdir(parents=True)
    for key in ("a", "box/b", "c"):
        (png_dir / f"{key}.png").write_bytes(b"png of " + key.encode())
    current = records.recipe(["ck1"], {"tta": False, "device": "cpu"}, code={"restore/model.py": "1"})
    book = records.Records(png_dir)

    def row(key, source="detected", size=(64, 64)):
        size_, mtime = records.png_stamp(png_dir / f"{key}.png")
        return {"key": key, "status": "todo", "input_sha": "in-" + key, "mask_sha": "", "mask_source": source,
                "png_size": size_, "png_mtime_ns": mtime, "height": size[0], "width": size[1], "where": key}

    assert book.add([row("a"), row("box/b", "user"), row("c", size=(2000, 1500))], current, mask_dilate=3,
                    large_above=2.0, work_size=768) == 3
    with open(png_dir / records.RECORDS_NAME, "a") as f:
        f.write('{"key": "a", "recipe_id"')  # a crash mid-line
    book = records.Records(png_dir)
    assert book.torn == 1 and sorted(book.keys) == ["a", "box/b", "c"]

    def why(key, recipe=current, **kw):
        kw = {"user_mask": key == "box/b", "mask_dilate": 3, "large_above": 2.0, "work_size": 768, **kw}
        return book.reusable(key, recipe, **kw)

    assert why("a") == ({"input": "in-a", "mask": ""}, "")
    assert why("zzz") == (None, "")  # nothing finished: no reason to give
    assert why("a", records.recipe(["ck2"], current["options"], code=current["code"]))[1] == "checkpoint changed"
    assert why("a", records.recipe(["ck1"], {"tta": True, "device": "cpu"}, code=current["code"]))[1] == \
        "tta changed (False -> True)"
    assert why("a", records.recipe(["ck1"], current["options"], code={"restore/model.py": "2"}))[1] == \
        "code changed (restore/model.py)"
    assert why("box/b", mask_dilate=5)[1] == "mask_dilate changed (3 -> 5)"
    assert why("box/b", user_mask=False)[1] == "no mask given now"
    assert why("a", user_mask=True)[1] == "mask given now"
    assert why("c", work_size=1024)[1] == "work_size changed (768 -> 1024)"  # 3 MP: the large path
    assert why("a", work_size=1024)[0] is not None  # a small image does not take it: the work size is moot
    assert why("c", large_above=5.0)[1] == "large_above changed (the large-image path now off)"
    (png_dir / "box" / "b.png").write_bytes(b"edited")
    assert why("box/b")[1] == "PNG not the one recorded"
    (png_dir / "d.png").write_bytes(b"made elsewhere")
    assert why("d")[1] == "no record of how it was made"
    book.compact()  # one line per key and the recipe they use, the torn line gone
    lines = (png_dir / records.RECORDS_NAME).read_text().splitlines()
    assert len(lines) == 4 and all(json.loads(line) for line in lines)
    # comments and docstrings are not code: the identity of the pixel code ignores them
    assert records.code_identity() == records.code_identity()
    tree = records._strip_docstrings(__import__("ast").parse('def f():\n    """doc"""\n    return 1  # why\n'))
    assert __import__("ast").dump(tree) == __import__("ast").dump(__import__("ast").parse("def f():\n    return 1\n"))


def test_inputs_read_every_mode_and_plan_says_what_it_leaves_out(tmp_path):
    from restore.inputs import load_gray, plan_images, to_luma

    ramp = np.arange(0, 256, dtype=np.uint8)[None].repeat(4, 0)
    assert np.array_equal(to_luma(Image.fromarray(ramp), "x")[0], ramp)
    assert np.array_equal(to_luma(Image.fromarray(ramp.astype(np.int32) * 257, "I"), "x")[0], ramp)
    bits, notes = to_luma(Image.fromarray(ramp > 127), "x")
    assert set(np.unique(bits)) == {0, 255} and notes == ["1-bit image read as 0/255"]
    la = Image.merge("LA", [Image.fromarray(ramp), Image.fromarray(np.full_like(ramp, 128))])
    luma, notes = to_luma(la, "x")
    assert np.array_equal(luma, ramp) and notes == ["alpha channel ignored"]
    gray_rgb = Image.fromarray(np.stack([ramp] * 3, -1))
    assert to_luma(gray_rgb, "x")[1] == []  # R == G == B: gray, nothing converted
    with pytest.raises(inputs.UnreadableImage, match="x: 32-bit float image"):
        to_luma(Image.fromarray(ramp.astype(np.float32)), "x")

    scans = tmp_path / "scans"
    (scans / "sub").mkdir(parents=True)
    (scans / ".hidden").mkdir()
    Image.fromarray(ramp).save(scans / "a.png")
    Image.fromarray(ramp).save(scans / "sub" / "b.webp")
    Image.fromarray(ramp).save(scans / ".hidden" / "c.png")
    (scans / "readme.md").write_text("x")
    flat = plan_images(scans)
    assert flat.keys == ["a"] and flat.ignored == ["readme.md"] and flat.unsearched_dirs == 2
    deep = plan_images(scans, recursive=True, exclude=[scans / "sub"])  # an output folder inside: never read
    assert deep.keys == ["a"]
    deep = plan_images(scans, recursive=True)
    assert deep.keys == ["a", "sub/b"] and deep.unsearched_dirs == 0
    assert load_gray(str(scans / "sub" / "b.webp"))[2] is None  # WebP may be lossy or not: the detector tries both
    masks = tmp_path / "masks"
    masks.mkdir()
    Image.fromarray(ramp).save(masks / "a.jpg")
    Image.fromarray(ramp).save(masks / "zzz.png")
    planned = plan_images(scans, masks_dir=masks)
    assert planned.masked == {"a"} and planned.unused_masks == ["zzz"]
    assert planned.items[0]["masks"] == [str(masks / "a.jpg")]
    Image.fromarray(ramp).save(scans / "a.tif")
    with pytest.raises(inputs.BadInput, match=r"a\.png and a\.tif have the same name 'a'"):
        plan_images(scans)
    with pytest.raises(inputs.BadInput, match="is the image folder"):
        plan_images(scans, masks_dir=scans)


def test_gallery_pages_link_each_other_and_drop_stale_pages(tmp_path):
    from restore.gallery import write_pages, write_thumbnails

    png_dir, gallery = tmp_path / "png", tmp_path / "gallery"
    entries = []
    for i in range(5):
        key = f"k{i}"
        gray = np.full((40, 30), 100, np.uint8)
        mask = np.zeros_like(gray)
        mask[10:20, 5:15] = 1
        write_thumbnails(gallery, key, gray, mask, np.zeros((40, 30, 3), np.uint8))
        (png_dir).mkdir(exist_ok=True)
        Image.fromarray(np.zeros((40, 30, 3), np.uint8)).save(png_dir / f"{key}.png")
        entries.append({"key": key, "height": 40, "width": 30, "mask_source": "detected", "hole_frac": 0.083,
                        "note": f"note <{i}>"})
    (gallery / "page_009.html").write_text("an older, longer run's page")
    write_pages(gallery, entries, png_dir=png_dir, title="t", per_page=2)
    assert sorted(p.name for p in gallery.glob("page_*.html")) == ["page_001.html", "page_002.html", "page_003.html"]
    middle = (gallery / "page_002.html").read_text()
    assert '<a rel="prev" href="page_001.html">' in middle and '<a rel="next" href="page_003.html">' in middle
    assert "note &lt;2&gt;" in middle and "mask: detected, 8.30% of the image" in middle
    assert 'rel="next"' not in (gallery / "page_003.html").read_text()
