"""CPU smoke runs of the training and loader benchmarks (tiny sizes, no timing assertions), so they cannot rot."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

from distributed import FAST_CPU_COMPILE, REPO_ROOT, cpu_env


def bench(script: str, *args, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    res = subprocess.run([sys.executable, str(REPO_ROOT / "bench" / script), *map(str, args)], cwd=REPO_ROOT,
                         env=cpu_env(env), capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    return res


def test_train_throughput_tiny_reports_both_recipes_and_the_ratio(tiny_shards, tmp_path):
    res = bench("train_throughput.py", "--tiny", "--shards", tiny_shards, "--json", tmp_path / "t.json")
    out = json.loads((tmp_path / "t.json").read_text())
    assert json.loads(res.stdout.strip().splitlines()[-1]) == out
    assert {(r["source"], r["recipe"]) for r in out["rows"]} == {
        (s, r) for s in ("synthetic", "shards") for r in ("seed", "default")}
    for r in out["rows"]:
        assert r["img_per_s"] > 0 and r["step_ms"] > 0 and r["loss"] == r["loss"]  # not NaN
    assert all(r["profile"] is None for r in out["rows"])  # no --profile-steps, no profile
    seed = next(r for r in out["rows"] if r["recipe"] == "seed")
    assert (seed["precision"], seed["channels_last"], seed["compile"], seed["smp_padding"]) == ("fp32", False, False,
                                                                                                True)
    assert set(out["ratio"]) == {"synthetic", "shards"} and "ratio default/seed (shards):" in res.stdout


def test_loader_throughput_tiny_reports_per_worker_rate(tiny_shards, tmp_path):
    res = bench("loader_throughput.py", "--tiny", "--shards", tiny_shards, "--json", tmp_path / "l.json")
    out = json.loads((tmp_path / "l.json").read_text())
    assert [r["workers"] for r in out["loader"]] == [0, 1]
    assert out["per_worker_samples_s"] > 0 and out["workers_needed"] >= 1
    assert set(out["per_sample"]) >= {"decode_gt_pil_ms", "decode_gt_project_cpu_ms", "decode_sample_all_ms"}
    assert "samples/s per worker" in res.stdout


def test_png_codec_tiny_compares_every_setting_with_the_reference(tiny_shards, tmp_path):
    from shards.schema import PNG_COMPRESSION

    res = bench("png_codec.py", "--tiny", "--json", tmp_path / "p.json")
    out = json.loads((tmp_path / "p.json").read_text())
    assert set(out["rows"]) == {"pil-level1", "opencv-up-rle"} | {f"project-{name}" for name in PNG_COMPRESSION}
    assert out["rows"]["pil-level1"]["encode_speedup"] == 1.0
    for row in out["rows"].values():
        assert row["encode_ms"] > 0 and row["decode_opencv_ms"] > 0 and row["kib"] > 0
    # stored rows are the raw pixels plus framing, whatever the machine: larger than any deflated setting
    assert out["rows"]["project-none"]["kib"] > 64 * 64 * 3 / 1024 > out["rows"]["project-fast"]["kib"]
    res = bench("png_codec.py", "--tiny", "--shards", tiny_shards / "train", "--n", "3")
    assert json.loads(res.stdout.strip().splitlines()[-1])["images"] == 3


def test_pack_throughput_tiny_packs_both_modes():
    res = bench("pack_throughput.py", "--n", "4", "--size", "64", "--workers", "1")
    for mode in ("photos", "dacon"):
        line = next(x for x in res.stdout.splitlines() if x.strip().startswith(f"{mode} "))
        assert "workers=1:" in line and "samples/s wall" in line and "KiB/sample in the shards" in line


def test_detector_small_run_compares_old_and_new(tmp_path):
    res = bench("detector.py", "--photos", "bundled", "--limit", "3", "--damaged", "6", "--json", tmp_path / "d.json")
    rows = {line[:34].strip(): line[34:].split() for line in res.stdout.splitlines() if line.startswith(("clean", "dam"))}
    # "N / total" for old, new exact, new hinted, new auto: astronaut and camera gave the old one phantom holes.
    clean = rows["clean, false holes  png"]
    assert int(clean[0]) > 0 and clean[3] == clean[6] == clean[9] == "0", clean
    assert float(rows["damaged, recall / mean IoU  q75"][6]) >= 0.5  # new hinted finds JPEG damage (6 images)
    # the same numbers as JSON: the last stdout line and the file
    out = json.loads((tmp_path / "d.json").read_text())
    assert json.loads(res.stdout.strip().splitlines()[-1]) == out
    dets = out["bundled"]["detectors"]
    assert list(dets) == ["old", "new exact", "new hinted", "new auto"] and out["bundled"]["photos"] == 3
    assert dets["old"]["png"]["false_holes"] == int(clean[0]) and dets["new hinted"]["png"]["false_holes"] == 0
    assert dets["new hinted"]["q75"]["recall"] == pytest.approx(float(rows["damaged, recall / mean IoU  q75"][6]),
                                                                abs=5e-4)
    assert dets["new hinted"]["q75"]["damaged"] == 6 and dets["new hinted"]["png"]["cpu_ms"] > 0


def test_curate_speed_small_run_reports_timings_and_grouping(tmp_path):
    res = bench("curate_speed.py", "--n", "24", "--size", "64", "--keep", tmp_path / "data")
    out = json.loads(res.stdout.strip().splitlines()[-1])["speed"]
    assert out["images"] == 24 and set(out["sec_per_1000"]) == {"embed", "umap", "hdbscan", "total"}
    assert 0.0 <= out["grouping"]["pair_recall"] <= 1.0
    assert (tmp_path / "data" / "shards" / "train" / "manifest.json").is_file()


def test_train_throughput_variants_change_only_the_named_keys(tmp_path):
    res = bench("train_throughput.py", "--tiny", "--sources", "synthetic", "--variant", "b1=default,batch=1",
                "--variant", "nocl=default,channels_last=0", "--recipes", "b1,nocl", "--json", tmp_path / "v.json",
                "--profile-steps", "1")
    rows = {r["recipe"]: r for r in json.loads((tmp_path / "v.json").read_text())["rows"]}
    for row in rows.values():  # one extra step under torch.profiler: where a training step's time goes
        prof = row["profile"]
        assert prof["device_time"] == "cpu" and prof["ms_per_unit"] > 0 and prof["wall_ms_per_unit"] > 0
        assert any("convolution" in op["op"] for op in prof["top"][:3])
    assert "b1: 1 steps profiled" in res.stdout and "calls/step  aten::convolution_backward" in res.stdout
    assert (rows["b1"]["batch"], rows["b1"]["channels_last"]) == (1, True)
    assert (rows["nocl"]["batch"], rows["nocl"]["channels_last"]) == (4, False)  # tiny default batch, layout changed
    assert "ratio default/seed" not in res.stdout  # no seed row, so no ratio line



def test_train_throughput_refuses_bad_variants_and_recipes(capsys, monkeypatch):
    # In this process: the refusals come before any training, so a subprocess (and its torch import) is not needed.
    monkeypatch.syspath_prepend(str(REPO_ROOT / "bench"))
    import train_throughput

    for bad, message in ((["--variant", "x=nosuch"], "BASE in ['default', 'seed']"),
                         (["--variant", "x=seed,speed=2"], "'speed=2' is not KEY=VALUE"),
                         (["--recipes", "seed,zzz"], "not among ['default', 'seed']")):
        with pytest.raises(SystemExit) as exit_info:
            train_throughput.main(["--tiny", "--sources", "synthetic", *bad])
        assert exit_info.value.code != 0
        assert message in str(exit_info.value.code) + capsys.readouterr().err


@pytest.mark.dist
def test_recipe_quality_tiny_trains_both_recipes_with_the_real_job(tmp_path):
    # no --default-lr: the default recipe's lr is the seed's scaled with the batch (tiny: 4 vs 2, so 2e-4)
    res = bench("recipe_quality.py", "--tiny", "--lr", "1e-4", "--json", tmp_path / "q.json")
    out = json.loads((tmp_path / "q.json").read_text())
    runs = {r["recipe"]: r for r in out["runs"]}
    assert set(runs) == {"seed", "default"}
    for run in runs.values():
        assert set(run["val_score"]) == {"2", "4"}  # validations at every --val-every steps (JSON keys)
        assert all(0.0 < s < 1.0 for s in run["val_score"].values())
    assert "precision=fp32" in runs["seed"]["overrides"] and "batch_size=2" in runs["seed"]["overrides"]
    assert "batch_size=4" in runs["default"]["overrides"] and "lr=0.0002" in runs["default"]["overrides"]
    assert "lr=0.0001" in runs["seed"]["overrides"]
    assert "validation score (exact DACON metric) per step" in res.stdout
    assert "  seed: val step 2: score" in res.stdout and "  default: val step 4: score" in res.stdout  # progress


def test_roofline_counts_one_conv_exactly_and_orders_the_floors(tmp_path):
    import torch

    sys.path.insert(0, str(REPO_ROOT / "bench"))
    import roofline

    conv = torch.nn.Conv2d(4, 8, 3, padding=1).to("meta")
    x = torch.empty(2, 4, 16, 16, device="meta")
    trace = roofline.count(lambda: conv(x), peak_flops=1e12, bandwidth=1e11)
    row, bias = trace.by_op["conv 3x3"], trace.by_op["conv bias add (eager)"]
    assert len(trace.by_op) == 2 and row.calls == bias.calls == 1
    assert row.flops == 2 * 2 * 8 * 4 * 9 * 16 * 16  # multiply-adds of every output value
    assert row.bytes == 4 * (2 * 4 * 16 * 16 + 8 * 4 * 9 + 8 + 2 * 8 * 16 * 16)  # input, weight, bias, output
    # eager cuDNN adds the bias in a kernel of its own: the output read and written again
    assert bias.bytes == 4 * (2 * 2 * 8 * 16 * 16 + 8) and bias.flops == 0
    conv_s = max(row.flops / 1e12, row.bytes / 1e11)
    assert trace.seconds_eager == pytest.approx(conv_s + bias.bytes / 1e11)
    assert trace.seconds_fused == pytest.approx(conv_s)  # the bias add fused away

    # A depthwise conv's two gradients cost twice its forward (torch's own formula counts C times too many).
    dw = torch.nn.Conv2d(6, 6, 3, padding=1, groups=6, bias=False).to("meta")
    xin = torch.empty(2, 6, 16, 16, device="meta", requires_grad=True)
    trace = roofline.count(lambda: dw(xin).sum().backward(), peak_flops=1e12, bandwidth=1e11)
    forward = trace.by_op["conv depthwise"].flops
    assert forward == 2 * 2 * 6 * 9 * 16 * 16 and trace.by_op["conv depthwise backward"].flops == 2 * forward

    res = bench("roofline.py", "--tiny", "--infer-img-s", "100", "--train-img-s", "seed=10", "--json",
                tmp_path / "r.json")
    out = json.loads((tmp_path / "r.json").read_text())
    for s in (out["inference"], out["inference_unfused"], *out["training"].values()):
        f = s["floor_ms_per_image"]
        assert 0 < f["compute"] <= f["fused"] <= f["eager"] and s["kernels_per_pass"] > 0
    # Folding removes every BatchNorm kernel, not the FLOPs; eager, a bias add per conv takes its place (fewer bytes
    # only by the BatchNorms' parameters).
    names = {r["name"] for r in out["inference_unfused"]["by_op"]} - {r["name"] for r in out["inference"]["by_op"]}
    assert any("batch_norm" in n for n in names)
    assert out["inference"]["gb_per_image"] < out["inference_unfused"]["gb_per_image"]
    assert out["inference"]["gflop_per_image"] == pytest.approx(out["inference_unfused"]["gflop_per_image"], rel=1e-3)
    seed, default = out["training"]["seed"], out["training"]["default"]
    assert seed["precision"] == "fp32" and default["batch"] == 4
    assert seed["gflop_per_image"] == pytest.approx(default["gflop_per_image"])  # same model, per image
    assert seed["gb_per_image"] > default["gb_per_image"]  # fp32 moves twice the activation bytes of bf16
    assert "backward" in {r["name"] for r in seed["by_part"]} and seed["measured_img_s"] == 10
    assert "measured 10.0 img/s" in res.stdout
    bad = subprocess.run([sys.executable, str(REPO_ROOT / "bench" / "roofline.py"), "--tiny", "--train-img-s", "b32=9"],
                         cwd=REPO_ROOT, env=cpu_env(), capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "--train-img-s names ['b32'], not among the traced recipes" in bad.stderr


@pytest.mark.compile
def test_compile_warmup_tiny_compares_cold_node_and_loaded_restarts(tmp_path):
    res = bench("compile_warmup.py", "--tiny", "--json", tmp_path / "c.json", env=FAST_CPU_COMPILE)
    out = json.loads((tmp_path / "c.json").read_text())
    assert json.loads(res.stdout.strip().splitlines()[-1]) == out
    rows = {r["case"]: r for r in out["rows"]}
    assert list(rows) == ["cold", "node", "loaded"]
    cold, node, loaded = rows["cold"], rows["node"], rows["loaded"]
    assert cold["graph_misses"] == 2 and cold["graph_hits"] == 0  # forward + backward, compiled
    assert cold["saved"].startswith("compile cache: saved ") and out["artifact_mib"] > 0
    # A restart on the same node hits inductor's local cache; on an empty node, the saved artifacts.
    assert (node["graph_hits"], node["graph_misses"]) == (2, 0) and node["saved"] is None
    assert (loaded["graph_hits"], loaded["graph_misses"]) == (2, 0) and loaded["autograd_hits"] == 1
    assert len(loaded["loaded"]) == 1 and loaded["loaded"][0].startswith("compile cache: loaded 3 artifacts (")
    assert cold["loaded"] == [] and node["loaded"] == []
    for r in out["rows"]:
        assert r["first_step_s"] > 0 and r["step_ms"] > 0 and r["process_s"] > r["first_step_s"]
    assert set(out["ratio"]) == {"cold/node", "cold/loaded"} and all(v > 0 for v in out["ratio"].values())
    assert "compile time (first step minus one step) cold/loaded:" in res.stdout


def test_op_profile_sums_kernels_alone_and_keeps_cupti_overhead_apart(monkeypatch):
    """A GPU profile as torch.profiler gives it: each op and the kernel it launched carry the same device time, and
    CUPTI's "Command Buffer Full" record comes as a device event too. Only the kernels are GPU work."""
    from types import SimpleNamespace

    from torch.autograd import DeviceType

    monkeypatch.syspath_prepend(str(REPO_ROOT / "bench"))
    import report

    def event(key, us, count, device=DeviceType.CUDA):
        return SimpleNamespace(key=key, self_device_time_total=us, count=count, device_type=device)

    events = [event("aten::cudnn_convolution", 600, 10, DeviceType.CPU), event("sm90_conv_kernel", 600, 10),
              event("aten::cat", 300, 2, DeviceType.CPU), event("CatArrayBatchedCopy", 300, 2),
              event("Command Buffer Full", 250, 3)]
    summary = report.op_profile(SimpleNamespace(key_averages=lambda: events), cuda=True, units=2)
    assert summary["ms_per_unit"] == pytest.approx(0.45)  # (600 + 300) µs of kernels over 2 images
    assert summary["kernels_per_unit"] == 6
    assert summary["overhead_ms_per_unit"] == {"Command Buffer Full": pytest.approx(0.125)}
    assert [row["op"] for row in summary["top"]] == ["aten::cudnn_convolution", "sm90_conv_kernel", "aten::cat",
                                                     "CatArrayBatchedCopy"]
    assert summary["top"][1]["share"] == pytest.approx(600 / 900)


@pytest.mark.dist
def test_quality_tiny_scores_each_model_beside_the_three_baselines(tmp_path):
    from PIL import Image

    from shards.sample_photos import load_photo

    held = tmp_path / "held"
    held.mkdir()
    for name in ("hubble_deep_field", "retina"):  # not among the demo's training photos
        Image.fromarray(load_photo(name)).save(held / f"{name}.png")
    nature = tmp_path / "nature"
    nature.mkdir()
    Image.fromarray(load_photo("immunohistochemistry")).save(nature / "ihc.png")
    res = bench("quality.py", "--tiny", "--held-dir", held, "--nature-dir", nature, "--work", tmp_path / "work",
                "--recipes", "demo", "--variant", "noprefill=demo:prefill=none,max_steps=3", "--json", tmp_path / "q.json")
    out = json.loads((tmp_path / "q.json").read_text())
    assert json.loads(res.stdout.strip().splitlines()[-1]) == out
    assert out["held"]["crops"] == 4  # two crops of each held-out photo
    assert list(out["scores"]) == ["gray copy", "OpenCV Telea fill, gray", "harmonic fill (stage 1's start), gray",
                                   "demo", "noprefill"]
    for s in out["scores"].values():
        assert s["n"] == 4 and 0 <= s["score"] <= 1
    # the second held-out set gets its own table, the same rows (no model trained on it), two crops of its photo
    assert list(out["scores_nature"]) == list(out["scores"]) and out["held_nature"]["crops"] == 2
    assert all(s["n"] == 2 for s in out["scores_nature"].values())
    assert (tmp_path / "work" / "quality_grid_nature.png").is_file() and "second held-out set" in res.stdout
    assert [m["overrides"] for m in out["models"]] == [[], ["prefill=none", "max_steps=3"]]
    cfg = json.loads((tmp_path / "work" / "noprefill" / "run" / "config.json").read_text())
    assert cfg["model"]["prefill"] == "none"
    assert [m["steps"] for m in out["models"]] == [2, 3] and "noprefill: recipe demo, 3 steps" in res.stdout
    assert "gray copy" in res.stdout and (tmp_path / "work" / "quality_grid.png").is_file()
    # --reuse scores a finished run of the same command again; a changed command retrains
    weights = tmp_path / "work" / "demo" / "run" / "checkpoints" / "best.pt"
    stamp = weights.stat().st_mtime_ns
    again = bench("quality.py", "--tiny", "--held-dir", held, "--work", tmp_path / "work", "--recipes", "",
                  "--variant", "demo=demo:", "--variant", "noprefill=demo:prefill=harmonic", "--reuse")
    assert "reusing demo:" in again.stdout and "training noprefill" in again.stdout
    assert weights.stat().st_mtime_ns == stamp
    redo = json.loads(again.stdout.strip().splitlines()[-1])
    assert redo["scores"]["demo"] == out["scores"]["demo"]

    # bench/hue_prior.py on the same work folder: the models' hue terms beside a fixed histogram's correlation
    bench("hue_prior.py", "--work", tmp_path / "work", "--within", "--json", tmp_path / "hue.json")
    hue = json.loads((tmp_path / "hue.json").read_text())
    assert list(hue) == ["lomiri (4 crops)", "nature (2 crops)"]
    lomiri = hue["lomiri (4 crops)"]
    assert lomiri["restored: demo"] == out["scores"]["demo"]["hist_sim"]
    assert "prior: the set itself, leave one photo out" in lomiri  # two photos; the nature set has one: no such row
    assert "prior: the set itself, leave one photo out" not in hue["nature (2 crops)"]
    import cv2
    import numpy as np

    from launch.demo import TRAIN_PHOTOS
    from shards.reader import iter_samples, shard_paths

    def hist(rgb):
        return cv2.calcHist([cv2.cvtColor(rgb, cv2.COLOR_RGB2HSV)[:, :, 0]], [0], None, [180], [0, 180]).ravel()

    def unit(h):
        return (h - h.mean()) / np.linalg.norm(h - h.mean())

    prior = np.mean([unit(hist(load_photo(n))) for n in TRAIN_PHOTOS], axis=0)
    truths = [s.gt for s in iter_samples(shard_paths(tmp_path / "work" / "held_shards" / "train"))]
    expected = np.mean([np.corrcoef(hist(gt), prior)[0, 1] for gt in truths])  # Pearson, as the score's compareHist
    assert abs(lomiri["prior: demo's bundled photos"] - expected) < 1e-6


def test_quality_never_scores_a_model_on_a_held_out_set_it_trained_on(tmp_path):
    """The quality recipe records the photos it trained on; a second held-out set holding them leaves that model out
    of its table (the demo recipe, which never saw them, stays in)."""
    from PIL import Image

    from shards.sample_photos import load_photo

    held, nature = tmp_path / "held", tmp_path / "nature"
    for folder, names in ((held, ("hubble_deep_field",)), (nature, ("retina", "immunohistochemistry"))):
        folder.mkdir()
        for name in names:
            Image.fromarray(load_photo(name)).save(folder / f"{name}.png")
    bench("quality.py", "--tiny", "--held-dir", held, "--nature-dir", nature, "--extra-photos", nature,
          "--work", tmp_path / "work", "--recipes", "demo,quality", "--json", tmp_path / "q.json")
    out = json.loads((tmp_path / "q.json").read_text())
    quality = next(m for m in out["models"] if m["name"] == "quality")
    assert sorted(quality["train_photos"]) == sorted(str(p.resolve()) for p in nature.iterdir())
    assert next(m for m in out["models"] if m["name"] == "demo")["train_photos"] == []
    assert {"demo", "quality"} <= set(out["scores"])
    assert "demo" in out["scores_nature"] and "quality" not in out["scores_nature"]
    crops = sorted(p.name for p in (tmp_path / "work" / "quality" / "photos" / "train").iterdir())
    assert [c for c in crops if c.startswith("extra")] == ["extra0_immunohistochemistry_00.png", "extra0_retina_00.png"]


def test_quality_copy_photos_makes_a_cache_that_needs_no_archive(tmp_path):
    """--copy-photos copies exactly the listed photos out of an unpacked-package cache, in its layout; the copy then
    serves as --cache (no apt-get), and a cache missing a listed photo is one line naming it."""
    sys.path.insert(0, str(REPO_ROOT / "bench"))
    from quality import HELD_PACKAGES, NATURE_PACKAGES, TRAIN_PACKAGES, fetch_packages

    cache = tmp_path / "cache"
    listed = []
    for package, members in {**HELD_PACKAGES, **NATURE_PACKAGES, **TRAIN_PACKAGES}.items():
        for member in members:
            path = cache / package / (member + "leaf.jpg" if member.endswith("/") else member)
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(package.encode() + member.encode())
            listed.append(path.relative_to(cache))
    (cache / "lomiri-wallpapers-16.04" / "usr" / "share" / "backgrounds" / "render.png").write_bytes(b"not listed")
    res = bench("quality.py", "--cache", cache, "--copy-photos", tmp_path / "slim")
    assert f"{len(listed)} photos copied" in res.stdout
    copied = sorted(p.relative_to(tmp_path / "slim") for p in (tmp_path / "slim").rglob("*") if p.is_file())
    assert copied == sorted(listed)
    assert all((tmp_path / "slim" / p).read_bytes() == (cache / p).read_bytes() for p in listed)
    n_held = sum(len(members) for members in HELD_PACKAGES.values())
    assert len(fetch_packages(HELD_PACKAGES, tmp_path / "slim")) == n_held
    assert len(fetch_packages(TRAIN_PACKAGES, tmp_path / "slim")) == 11  # Plasma's photographs
    assert len(fetch_packages(NATURE_PACKAGES, tmp_path / "slim")) == len(listed) - n_held - 11  # one mate photo here
    (tmp_path / "slim" / listed[0]).unlink()
    bad = subprocess.run([sys.executable, str(REPO_ROOT / "bench" / "quality.py"), "--cache", tmp_path / "slim",
                          "--copy-photos", tmp_path / "again"], cwd=REPO_ROOT, capture_output=True, text=True)
    assert bad.returncode == 1 and f"has no {listed[0].relative_to(listed[0].parts[0])}" in bad.stderr


def test_quality_gpus_without_a_gpu_is_one_line_before_any_work(tmp_path):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    res = subprocess.run([sys.executable, str(REPO_ROOT / "bench" / "quality.py"), "--gpus", "1", "--work",
                          str(tmp_path / "work")], cwd=REPO_ROOT, capture_output=True, text=True, timeout=120)
    assert res.returncode == 1 and res.stderr.strip() == (
        "--gpus 1: this machine has 0 CUDA GPU(s); use --gpus 0 (the CPU recipe) here")
    assert not (tmp_path / "work").exists()


def test_color_study_tiny_trains_every_formulation_and_scores_it_beside_gray(tmp_path):
    from PIL import Image

    from shards.sample_photos import load_photo

    held = tmp_path / "held"
    held.mkdir()
    Image.fromarray(load_photo("retina")).save(held / "retina.png")
    nature = tmp_path / "nature"
    nature.mkdir()
    Image.fromarray(load_photo("hubble_deep_field")).save(nature / "hubble.png")
    res = bench("color_study.py", "--tiny", "--held-dir", held, "--nature-dir", nature, "--work", tmp_path / "work",
                "--json", tmp_path / "c.json")
    out = json.loads((tmp_path / "c.json").read_text())
    assert json.loads(res.stdout.strip().splitlines()[-1]) == out
    assert list(out["scores"]) == ["gray copy", "rgb", "chroma", "colorful", "classes", "classes_flat"]
    assert all(s["n"] == 2 and -1 <= s["hist_sim"] <= 1 for s in out["scores"].values())
    assert all(s["nature"]["n"] == 2 for s in out["scores"].values())  # the second held-out set, every row
    with Image.open(tmp_path / "work" / "color_grid.png") as grid:
        assert grid.size == (6 * 64, 2 * 64)  # truth + 5 formulations, 2 crops


def test_large_scan_tiny_measures_both_paths_in_fresh_processes(tmp_path):
    bench("large_scan.py", "--tiny", "--threads", "1", "--json", tmp_path / "l.json")
    rows = {r["path"]: r for r in json.loads((tmp_path / "l.json").read_text())}
    assert set(rows) == {"large", "full"}
    for r in rows.values():
        assert r["status"] == "ok" and r["shape"] == [600, 800, 3] and r["known_luma_exact"], r
        assert r["seconds"] > 0 and r["peak_rss_gib"] > r["grew_gib"] >= 0
    assert rows["large"]["detail"]["crops"] >= 2  # the hole and the scratch
