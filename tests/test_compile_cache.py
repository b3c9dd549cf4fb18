"""restore.compile_cache in a real process: a broken file is reported by name and skipped; what the process compiles
is written once (temp name, then rename); graphs compiled later add a file that replaces the one it covers; a folder
that cannot be written gives a warning line, not an exception.

That another process with an empty inductor cache loads the file and compiles nothing is shown by the training job's
requeue test (tests/test_train.py), on the job's own graphs.
"""
from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from distributed import FAST_CPU_COMPILE, REPO_ROOT, cpu_env
from restore.compile_cache import cache_prefix

CHILD = r"""
import json, sys, torch
from restore.compile_cache import CompileCache, counts
cache = CompileCache.for_device(sys.argv[1], torch.device("cpu"))
out = {"load": cache.load(), "saves": []}
torch.manual_seed(0)
model = torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3, padding=1), torch.nn.SiLU(), torch.nn.Conv2d(4, 1, 3, padding=1))
step = torch.compile(model, dynamic=False)  # one graph per image size (inference: no backward graph)
for size in (16, 16, 24):
    with torch.no_grad():
        step(torch.randn(2, 1, size, size))
    out["saves"].append(cache.save())
    out["files"] = out.get("files", []) + [sorted(p.name for p in cache.directory.iterdir())]
cache.directory = cache.directory.parent / "not_a_folder"  # a file where the folder should be: cannot write
cache.directory.write_text("")
with torch.no_grad():
    step(torch.randn(2, 1, 8, 8))
out["unwritable"] = cache.save()
out["counts"] = counts()
print(json.dumps(out))
"""


@pytest.mark.compile
def test_saves_once_grows_by_replacement_and_skips_a_broken_file(tmp_path):
    cache_dir = tmp_path / "run" / "compile_cache"
    prefix = cache_prefix(torch.device("cpu"))
    assert prefix == f"torch-{torch.__version__}-cpu"
    cache_dir.mkdir(parents=True)
    broken = cache_dir / f"{prefix}-000000000000.bin"
    broken.write_bytes(b"not a cache")
    other_build = cache_dir / "torch-0.0.0-cuda-sm90-000000000000.bin"  # another torch or chip: not read
    other_build.write_bytes(b"")

    env = cpu_env({"TORCHINDUCTOR_CACHE_DIR": str(tmp_path / "inductor"), **FAST_CPU_COMPILE})
    proc = subprocess.run([sys.executable, "-c", CHILD, str(cache_dir)], cwd=REPO_ROOT, env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])

    assert out["load"] == [f"warning: compile cache {broken} could not be loaded (ValueError: torch found no "
                           f"artifacts in it); its graphs will be compiled"]
    first, again, grown = out["saves"]
    assert out["unwritable"].startswith(f"warning: compile cache {tmp_path / 'run' / 'not_a_folder'}/{prefix}-")
    assert "could not be written (FileExistsError" in out["unwritable"], out["unwritable"]  # a warning, no exception
    assert out["unwritable"].endswith("; not saved")
    files_first = [n for n in out["files"][0] if n not in (broken.name, other_build.name)]
    assert len(files_first) == 1 and files_first[0].startswith(prefix + "-") and files_first[0].endswith(".bin")
    assert first.startswith("compile cache: saved ") and first.endswith(f"to {cache_dir / files_first[0]}"), first
    n_first = int(first.split()[3])
    assert n_first >= 1 and f"({n_first} new," in first
    assert again is None and out["files"][1] == out["files"][0]  # the same graphs again: nothing new to write
    assert grown.startswith("compile cache: saved ") and grown.endswith(", replacing 1 older file(s)"), grown
    n_grown = int(grown.split()[3])
    assert n_grown > n_first and f"({n_grown - n_first} new," in grown
    left = out["files"][2]
    assert broken.name in left and other_build.name in left and files_first[0] not in left and len(left) == 3
    assert out["counts"]["graph_misses"] == 3 and out["counts"]["graph_hits"] == 0  # one graph per size
    assert not [n for n in left if n.endswith(".tmp") or n.startswith(".")]  # no temp files left behind
