"""CPU smoke run of bench/infer_throughput.py so it cannot rot (no timing assertions)."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

pytestmark = pytest.mark.ray


def test_infer_throughput_tiny_runs_both_paths_and_prints_the_ratio(repo_root, tmp_path):
    out = tmp_path / "bench.json"
    r = subprocess.run([sys.executable, str(repo_root / "bench" / "infer_throughput.py"), "--tiny", "--json", str(out)],
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
