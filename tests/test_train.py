"""The training job on real process groups (gloo, CPU): learning, rank agreement, exact resume after SIGTERM,
early stopping, and clear errors (exit 2, never a hang) for bad input.

Tiny everything: the timm test encoder, 16..8 decoder channels, 32-64 px crops, batch 2, one thread per rank.
"""
from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from distributed import FAST_CPU_COMPILE, REPO_ROOT, cpu_env, run_distributed_test, start_torchrun, torchrun

TINY = ["encoder=tu-test_efficientnet", "decoder_channels=16,8,8,8,8", "batch_size=2", "warmup_steps=0",
        "log_every=1", "val_batch_size=2"]


@pytest.fixture(scope="module")
def shards2(photo_dir, tmp_path_factory, cli) -> Path:
    """``photo_dir`` packed at 64x64 into 2-sample shards: train 9 samples / 5 shards, val 3 / 2 (two ranks' worth)."""
    out = tmp_path_factory.mktemp("train_shards") / "shards"
    cli(["shards.pack", "photos", photo_dir, out, "--size", 64, "--seed", 0, "--val-fraction", 0.25,
         "--shard-size", 2], check=True)
    return out


def read_metrics(run: Path, kind: str) -> list[dict]:
    return [r for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if r["kind"] == kind]


def job(args, timeout=240) -> subprocess.CompletedProcess:
    """Single-process ``python -m job.train`` (no torchrun)."""
    return subprocess.run([sys.executable, "-m", "job.train", *map(str, args)], cwd=REPO_ROOT, env=cpu_env(),
                          capture_output=True, text=True, timeout=timeout)


# ----------------------------------------------------------------------------------------- rank agreement + learning
def _overfit_on_ranks(shards: str, run_dir: str) -> None:
    import torch.distributed as tdist

    from job import dist, train
    from job.config import parse_overrides

    cfg = parse_overrides(TINY + ["crop_size=64", "remask_prob=0", "hflip=false", "max_steps=24",
                                  "steps_per_epoch=12", "val_every=1000", "lr=3e-3", "num_workers=0"])
    env = dist.detect()
    assert (env.world_size, env.source) == (2, "torchrun")
    plan = train.plan_data(Path(shards), cfg, env.rank, env.world_size)
    # 5 train shards over 2 ranks: explicit node split, disjoint shard lists.
    mine = set(plan.train_urls)
    other = dist.all_gather_objects(sorted(mine))[1 - env.rank]
    assert mine and not mine & set(other)
    trainer = train.Trainer(cfg, train.model_spec(cfg), plan, Path(run_dir), env, torch.device("cpu"), "fp32", None)
    init = [p.detach().clone() for p in trainer.model.parameters()]
    assert trainer.run() == 0
    state = trainer.model.state_dict()  # parameters, and BatchNorm buffers (synced from rank 0 for validation)
    gathered = dist.all_gather_objects(state)
    for k, v in gathered[0].items():
        assert torch.equal(v, gathered[1][k]), f"{k} differs between ranks after DDP steps"
    assert not all(torch.equal(a, b) for a, b in zip(init, trainer.model.parameters())), "nothing was trained"
    assert tdist.get_world_size() == 2


@pytest.mark.dist
def test_two_ranks_learn_and_stay_identical(shards2, tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    run_distributed_test(_overfit_on_ranks, world_size=2, backend="gloo", args=(str(shards2), str(run)))
    train = read_metrics(run, "train")
    assert [r["step"] for r in train] == list(range(1, 25))
    loss = [r["s1_l1"] + r["s1_ssim"] + r["s2_l1"] + r["s2_ssim"] + 0.1 * r["s2_hue"] for r in train]
    first, last = sum(loss[:5]) / 5, sum(loss[-5:]) / 5
    assert last < 0.85 * first, f"loss did not fall: first 5 steps {first:.4f}, last 5 {last:.4f}"
    done = json.loads((run / "done.json").read_text())
    assert done["reason"] == "finished" and done["step"] == 24
    val = read_metrics(run, "val")
    assert len(val) == 1 and val[0]["n"] == 3  # each of the 3 val samples scored once across the two ranks


# ----------------------------------------------------------------------------------------------- exact resume
RESUME_ARGS = TINY + ["crop_size=32", "max_steps=8", "steps_per_epoch=3", "val_every=4", "num_workers=2",
                      "lr=1e-3", "ema=0.9", "keep_last=2", "gan=true"]


def _final_state(run: Path) -> dict:
    return torch.load(run / "checkpoints" / "step_00000008.pt", weights_only=True)


@pytest.mark.dist
def test_sigterm_checkpoints_and_resume_is_exact(shards2, tmp_path):
    ref = tmp_path / "ref"
    res = torchrun(["job.train", "--shards", shards2, "--out", ref, *RESUME_ARGS])
    assert res.returncode == 0, res.stderr[-3000:]
    assert json.loads((ref / "done.json").read_text())["step"] == 8

    run = tmp_path / "killed"
    log = tmp_path / "killed.log"
    proc = start_torchrun(["job.train", "--shards", shards2, "--out", run, *RESUME_ARGS], log=log)
    deadline = time.monotonic() + 180
    try:
        while True:  # wait for the second optimizer step, then preempt (SIGTERM to torchrun, forwarded to ranks)
            assert proc.poll() is None, f"run ended before the signal:\n{log.read_text()[-3000:]}"
            assert time.monotonic() < deadline, "no training progress"
            metrics = run / "metrics.jsonl"
            if metrics.exists() and any(r["step"] >= 2 for r in read_metrics(run, "train")):
                break
            time.sleep(0.05)
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=120)
    finally:
        proc.kill()
    out = log.read_text()
    preempted = json.loads((run / "preempted.json").read_text())
    stopped = preempted["step"]
    assert 2 <= stopped < 8, out[-3000:]
    assert preempted["signal"] == "SIGTERM"
    assert preempted["checkpoint"] == f"step_{stopped:08d}.pt"
    assert (run / "checkpoints" / "latest").read_text().strip() == preempted["checkpoint"]
    assert f"exiting 75" in out and not (run / "done.json").exists()

    res = torchrun(["job.train", "--shards", shards2, "--out", run, *RESUME_ARGS])
    assert res.returncode == 0, res.stderr[-3000:]
    assert f"resumed from" in res.stdout and not (run / "preempted.json").exists()
    a, b = _final_state(ref), _final_state(run)
    for part in ("model", "ema", "discriminator"):
        assert a[part].keys() == b[part].keys()
        for k in a[part]:
            assert torch.equal(a[part][k], b[part][k]), f"{part}.{k} differs after resume (bitwise)"
    assert a["metrics"]["last_val"] == b["metrics"]["last_val"]
    # metrics.jsonl holds each step once, as if the run had not been interrupted
    assert [r["step"] for r in read_metrics(run, "train")] == list(range(1, 9))
    assert "gan_d" in read_metrics(run, "train")[-1]
    assert sorted(p.name for p in (run / "checkpoints").glob("step_*.pt"))[-1] == "step_00000008.pt"
    assert len(list((run / "checkpoints").glob("step_*.pt"))) <= 2  # keep_last=2


# ---------------------------------------------------------------------------------------------- early stopping
@pytest.mark.dist
def test_early_stopping_single_process(shards2, tmp_path, capsys):
    run = tmp_path / "run"
    # lr so small that the uint8 predictions, hence the score, cannot change: the 2nd validation is not better.
    res = job(["--shards", shards2, "--out", run, *TINY, "crop_size=32", "num_workers=0", "max_steps=40",
               "steps_per_epoch=40", "val_every=2", "patience=1", "lr=1e-12"])
    assert res.returncode == 0, res.stderr[-3000:]
    done = json.loads((run / "done.json").read_text())
    assert done["reason"] == "early_stop" and done["step"] == 4 and done["best_step"] == 2
    assert "early stop" in res.stdout
    assert json.loads((run / "config.json").read_text())["resolved"]["world_size"] == 1
    assert (run / "checkpoints" / "best.pt").is_file() and list((run / "tb").iterdir())
    # a finished run is not redone on requeue
    from job.train import main

    assert main(["--shards", str(shards2), "--out", str(run), *TINY]) == 0
    assert "already finished" in capsys.readouterr().out


# ----------------------------------------------------------------------------------------------------- bad input
@pytest.mark.dist
def test_too_few_val_shards_for_two_ranks(tiny_shards, tmp_path):
    res = torchrun(["job.train", "--shards", tiny_shards, "--out", tmp_path / "run", *TINY], timeout=120)
    assert res.returncode != 0
    assert "1 validation shard(s) for 2 ranks" in res.stderr, res.stderr[-2000:]


def test_cli_bad_override_exits_2(shards2, tmp_path):
    res = job(["--shards", shards2, "--out", tmp_path / "r", "epochz=3"])
    assert res.returncode == 2 and "unknown config key 'epochz' (did you mean epochs?)" in res.stderr
    assert not (tmp_path / "r").exists()


@pytest.mark.parametrize("args, message", [
    (["precision=fp8", "batch_size=0"], ["precision='fp8'", "batch_size=0: must be >= 1"]),
    (["epochs=ten"], ["epochs='ten': expected an integer"]),
    (["precision=fp16"], ["precision=fp16 needs a CUDA device"]),
    (["encoder=no-such-net"], ["encoder 'no-such-net' is not an smp encoder name"]),
    (["resume=/no/such/file.pt"], ["resume=/no/such/file.pt: no such checkpoint file or run dir"]),
    (["encoder_weights=/no/such.pth"], ["encoder_weights=/no/such.pth: no such file"]),
])
def test_bad_config_exits_2_in_process(shards2, tmp_path, capsys, args, message):
    from job.train import main

    assert main(["--shards", str(shards2), "--out", str(tmp_path / "r"), *args]) == 2
    err = capsys.readouterr().err
    assert all(m in err for m in message), err
    assert not (tmp_path / "r").exists()


def test_bad_shards_exit_2_in_process(shards2, tmp_path, capsys):
    from job.train import main

    assert main(["--shards", str(tmp_path / "nope"), "--out", str(tmp_path / "r")]) == 2
    assert f"shard directory {tmp_path / 'nope' / 'train'} does not exist" in capsys.readouterr().err
    empty = tmp_path / "empty"
    (empty / "train").mkdir(parents=True)
    assert main(["--shards", str(empty), "--out", str(tmp_path / "r")]) == 2
    assert "no manifest" in capsys.readouterr().err
    # a fold larger than the groups can fill, with no val/ split
    only_train = tmp_path / "only_train"
    only_train.mkdir()
    (only_train / "train").symlink_to(shards2 / "train")
    assert main(["--shards", str(only_train), "--out", str(tmp_path / "r"), "num_folds=20"]) == 2
    assert "cannot fill 20 folds" in capsys.readouterr().err


def test_resume_never_refuses_a_run_dir_with_checkpoints(shards2, tmp_path, capsys):
    from job import checkpoint
    from job.train import main

    (tmp_path / "r" / "checkpoints").mkdir(parents=True)
    (tmp_path / "r" / "checkpoints" / checkpoint.step_file_name(5)).write_bytes(b"x")
    assert main(["--shards", str(shards2), "--out", str(tmp_path / "r"), "resume=never"]) == 2
    assert "already has checkpoints" in capsys.readouterr().err


def test_fold_held_out_of_train_when_there_is_no_val_split(shards2, tmp_path):
    import json as _json

    from job import train
    from job.config import parse_overrides
    from shards.folds import assign_folds
    from shards.reader import read_manifest

    only_train = tmp_path / "only_train"
    only_train.mkdir()
    (only_train / "train").symlink_to(shards2 / "train")
    manifest = read_manifest(shards2 / "train")
    keys = [k for e in manifest["shards"] for k in e["keys"]]
    for fold in (0, 2):
        cfg = parse_overrides([f"fold={fold}", "num_folds=3", "batch_size=2"])
        plan = train.plan_data(only_train, cfg, rank=0, world=1)
        expected = assign_folds(keys, 3, 0, groups=manifest.get("groups"))
        val = {k for k, f in expected.items() if f == fold}
        assert plan.val_keep.only == val and plan.train_keep.only == set(keys) - val
        assert plan.num_val == len(val) and plan.num_train == len(keys) - len(val)
        assert plan.folds["assignment"] == expected and plan.folds["fold"] == fold
        _json.dumps(plan.folds)  # what RUN/folds.json holds
        # only shards holding a held-out key are read for validation
        assert all(any(k in val for k in e["keys"]) for e in manifest["shards"]
                   if str(shards2 / "train" / e["name"]) in plan.val_urls)


def test_staged_phases_schedule_and_frozen_stage():
    from job import step
    from job.config import parse_overrides
    from restore.losses import Stage1Loss, Stage2Loss
    from restore.model import build_model

    cfg = parse_overrides(TINY + ["stages=staged"])
    plan = step.phases(cfg, 100)
    assert plan == [("stage1", 0, 40), ("stage2", 40, 80), ("joint", 80, 100)]
    assert step.phases(parse_overrides(["stages=joint"]), 100) == [("joint", 0, 100)]
    lr = step.lr_lambda_for(plan, warmup=4, min_ratio=0.0)
    assert lr(0) == 0.25 and lr(3) == 1.0 and lr(39) < 0.01  # warmup, then cosine to ~0 at the phase end
    assert [lr(s) for s in (40, 43, 80, 83)] == [0.25, 1.0, 0.25, 1.0]  # every phase restarts its warmup
    assert step.lr_lambda_for(plan, warmup=10, min_ratio=0.0)(0) == 1 / 8  # short phase: warmup <= 1/5 of it

    model = build_model(step.model_spec(cfg))
    gray = torch.rand(2, 1, 32, 32)
    mask = torch.zeros(2, 1, 32, 32)
    mask[:, :, 8:20, 8:20] = 1
    for phase, trained, untouched in (("stage1", "inpainter", "colorizer"), ("stage2", "colorizer", "inpainter")):
        model.zero_grad(set_to_none=True)
        for p in model.parameters():
            p.requires_grad_(True)
        total, terms, fake = step.StageLoss(model, Stage1Loss(), Stage2Loss(), phase)(
            gray, mask, gray, torch.rand(2, 3, 32, 32))
        total.backward()
        assert fake is None and all(k.startswith("s1" if phase == "stage1" else "s2") for k in terms)
        assert all(p.grad is not None for p in getattr(model, trained).parameters())
        assert all(p.grad is None for p in getattr(model, untouched).parameters())


# ---------------------------------------------------------------------------------------------- compile cache
COMPILED_ARGS = ["encoder=tu-test_efficientnet", "decoder_channels=8,8,8", "cbam=false", "crop_size=32",
                 "batch_size=2", "warmup_steps=0", "log_every=1", "val_batch_size=2", "num_workers=0",
                 "max_steps=400", "steps_per_epoch=400", "val_every=1000", "compile=on",
                 "stages=staged", "stage_split=0.9,0.05"]  # stage 1 alone first: half the graph to compile


def _run_until_compiled(cmd: list[str], run: Path, log: Path, inductor_dir: Path, n_compiles: int) -> str:
    """Start the job, SIGTERM it once its ``n_compiles``-th compile record is written, expect exit 75; the log."""
    with open(log, "w") as f:
        proc = subprocess.Popen(cmd, cwd=REPO_ROOT, stdout=f, stderr=subprocess.STDOUT,
                                env=cpu_env({"TORCHINDUCTOR_CACHE_DIR": str(inductor_dir), **FAST_CPU_COMPILE}))
    deadline = time.monotonic() + 400
    try:
        while not ((run / "metrics.jsonl").exists() and len(read_metrics(run, "compile")) >= n_compiles):
            assert proc.poll() is None, f"run ended before the signal:\n{log.read_text()[-3000:]}"
            assert time.monotonic() < deadline, f"no compiled step:\n{log.read_text()[-3000:]}"
            time.sleep(0.05)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=120) == 75, log.read_text()[-3000:]
    finally:
        proc.kill()
    return log.read_text()


@pytest.mark.dist
@pytest.mark.compile
def test_requeued_compiled_run_loads_the_compile_cache_instead_of_compiling(shards2, tmp_path):
    """A compiled run saves its artifacts in RUN/compile_cache; preempted and requeued onto a node whose inductor
    cache lacks its graphs, it loads them: every graph comes from the file, none is compiled, nothing new is written,
    and a broken file or another build's file beside it changes nothing but a warning."""
    run = tmp_path / "run"
    cmd = [sys.executable, "-m", "job.train", "--shards", str(shards2), "--out", str(run), *COMPILED_ARGS]
    first = _run_until_compiled(cmd, run, tmp_path / "first.log", tmp_path / "inductor_node1", 1)
    cache_dir = run / "compile_cache"
    files = list(cache_dir.glob("torch-*-cpu-*.bin"))
    assert len(files) == 1, first[-3000:]
    assert f"compile cache: nothing in {cache_dir} for " in first
    assert "compile cache: saved " in first and f"to {files[0]}" in first
    [c1] = read_metrics(run, "compile")
    assert c1["step"] == 0 and c1["phase"] == "stage1" and c1["graph_misses"] >= 2 and c1["graph_hits"] == 0
    assert c1["first_step_s"] > 0
    stopped = json.loads((run / "preempted.json").read_text())["step"]
    assert 1 <= stopped < 360  # still in stage 1

    # The next node's inductor cache has none of the graphs (those must come from the file) but does have the built
    # C++ kernels: on a GPU the file carries the Triton kernels too; on a CPU they would only cost build time here.
    node1, node2 = tmp_path / "inductor_node1", tmp_path / "inductor_node2"
    graph_caches = {"fxgraph", "aotautograd"}
    assert graph_caches <= {p.name for p in node1.iterdir()}, sorted(p.name for p in node1.iterdir())
    shutil.copytree(node1, node2, ignore=lambda d, names: graph_caches & set(names) if Path(d) == node1 else [])
    broken = files[0].with_name(files[0].name[:-len("0123456789ab.bin")] + "000000000000.bin")
    broken.write_bytes(b"cut short")
    other_build = cache_dir / "torch-0.0.0-cuda-sm90-000000000000.bin"
    other_build.write_bytes(b"")
    second = _run_until_compiled(cmd, run, tmp_path / "second.log", node2, 2)
    assert f"resumed from {run / 'checkpoints'}" in second
    assert f"warning: compile cache {broken} could not be loaded (" in second
    assert "compile cache: loaded " in second and f"from {files[0]}" in second and str(other_build) not in second
    c2 = read_metrics(run, "compile")[-1]
    assert c2["step"] == stopped and c2["phase"] == "stage1", c2
    assert c2["graph_misses"] == 0 and c2["graph_hits"] == c1["graph_misses"], c2
    assert c2["autograd_misses"] == 0 and c2["autograd_hits"] == c1["autograd_misses"], c2
    assert "compile cache: saved" not in second  # nothing new to keep, at the first step or the checkpoint
    assert sorted(cache_dir.iterdir()) == sorted([files[0], broken, other_build])
