"""CPU smoke run of bench/infer_throughput.py so it cannot rot (no timing assertions)."""
from __future__ import annotations

import json
import re
import subprocess
import sys

import pytest

pytestmark = pytest.mark.ray


def test_infer_throughput_tiny_runs_both_paths_and_prints_the_ratio(repo_root, tmp_path):
    out = tmp_path / "bench.json"
    # aot_eager: the compiled variant traces the real graph without inductor's minute of kernel generation on CPU.
    r = subprocess.run([sys.executable, str(repo_root / "bench" / "infer_throughput.py"), "--tiny", "--json", str(out),
                        "--model-variants", "eager,folded,benchmark,compile", "--compile-backend", "aot_eager", "--profile",
                        "--ray-actors", "1,2"],
                       cwd=repo_root, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "ratio ray/plain: wall " in r.stdout
    result = json.loads(out.read_text())
    assert result["images"] == 8 and result["size"] == 64 and result["device"] == "cpu"
    for path in ("plain", "ray"):
        assert result[path]["images"] == 8
        assert result[path]["wall_img_s"] > 0
    assert set(result["plain"]["profile_s_per_img"]) == {"read_decode", "model", "encode_write"}
    assert 0 <= result["identical_pngs"] <= 8
    (split,) = result["ray"]["actor_after_first_batch"]  # one actor; 8 images in batches of 4: two batches
    assert split["span_s"] > 0
    assert split["model"] + split["calls_other"] + split["outside_calls"] == pytest.approx(1, abs=1e-3)
    # the Ray path's steady rate is the actor's own: the second batch's 4 images over the span after the first
    assert split["images"] == 4 and split["img_s"] == pytest.approx(4 / split["span_s"], rel=0.02)  # span_s: to the ms
    # one actor: the pooled rate (wall clock) and the actor's own (its perf counter) cover the same span
    assert result["ray"]["steady_img_s"] == pytest.approx(split["img_s"], rel=0.05)
    assert "ray x1 actor after its first batch (" in r.stdout
    # --ray-actors 1,2: the Ray path again with two actors, all images restored once, the same bytes as with one
    one, two = result["ray_runs"]
    assert (one["actors"], two["actors"]) == (1, 2) and one == result["ray"]
    # (with two batches, Ray may hand both to one actor: the list holds the actors that restored images)
    assert two["images"] == 8 and two["model_busy_img_s"] is None and 1 <= len(two["actor_after_first_batch"]) <= 2
    assert two["identical_pngs"] == one["identical_pngs"]
    assert re.search(r"^ray x2 +[\d.]+ +([\d.]+|nan) +nan +([\d.]+|nan)$", r.stdout, re.M)
    assert result["ratio_wall"] == pytest.approx(result["ray"]["wall_img_s"] / result["plain"]["wall_img_s"])
    budget = result["cpu_budget"]
    assert budget["read_cpu_s"] > 0 and budget["target_img_s"] == 500
    assert set(budget["write"]) == {"fast", "none", "small"}
    for w in budget["write"].values():
        assert w["cores_at_target"] == pytest.approx(
            500 * (budget["read_cpu_s"] + budget["read_rows_to_block_cpu_s"] + w["write_cpu_s"]))
    assert budget["write"]["none"]["kib"] > 64 * 64 * 3 / 1024  # stored: the raw pixels and framing
    assert "cores per GPU at 500 img/s" in r.stdout
    assert set(budget["actor_output_ms_per_img"]) == {"object array", "dense (actor default)"}
    assert all(ms > 0 for ms in budget["actor_output_ms_per_img"].values())

    model = result["model"]
    assert set(model) == {"eager", "folded", "benchmark", "compile"}
    for name, r_ in model.items():
        assert r_["img_s"] > 0 and r_["ms_per_img"] == pytest.approx(1e3 / r_["img_s"])
        # Same numerics on CPU: fp32, and aot_eager runs the same aten ops. Folded BatchNorms (asked for, and a
        # compiled engine's default) round differently.
        assert r_["max_abs_diff_vs_first"] <= (1 if name in ("folded", "compile") else 0)
    assert "model alone (Engine.restore, batch 4, cpu)" in r.stdout
    prof = result["profile"]
    assert prof["device_time"] == "cpu" and prof["ms_per_unit"] > 0 and prof["kernels_per_unit"] is None
    assert 0 < sum(row["share"] for row in prof["top"]) <= 1 + 1e-9
    assert any("conv" in row["op"] for row in prof["top"][:3])  # a U-Net's time is in its convolutions


def test_infer_throughput_rejects_a_bad_actor_count(repo_root):
    r = subprocess.run([sys.executable, str(repo_root / "bench" / "infer_throughput.py"), "--tiny",
                        "--ray-actors", "1,0"], cwd=repo_root, capture_output=True, text=True, timeout=120)
    assert r.returncode == 2
    assert "--ray-actors: expected counts >= 1 separated by commas, e.g. 1,2" in r.stderr


def test_infer_throughput_rejects_unknown_model_variants(repo_root):
    r = subprocess.run([sys.executable, str(repo_root / "bench" / "infer_throughput.py"), "--tiny",
                        "--model-variants", "eager,turbo"], cwd=repo_root, capture_output=True, text=True, timeout=120)
    assert r.returncode == 2
    assert "--model-variants: unknown turbo; choose from eager, castweights, folded, nchw, benchmark, compile, cudagraphs, autotune" in r.stderr
