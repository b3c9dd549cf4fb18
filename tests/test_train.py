"""The training job on real process groups (gloo, CPU): learning, rank agreement, exact resume after SIGTERM,
early stopping, and clear errors (exit 2, never a hang) for bad input.

Tiny everything: the timm test encoder, 16..8 decoder channels, 32-64 px crops, batch 2, one thread per rank.
"""
from __future__ import annotations

import json
import math
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

    from job import dist
    from job.config import parse_overrides
    from job.data_plan import plan_data
    from job.step import model_spec
    from job.trainer import Trainer

    cfg = parse_overrides(TINY + ["crop_size=64", "remask_prob=0", "hflip=false", "max_steps=24",
                                  "steps_per_epoch=12", "val_every=1000", "lr=3e-3", "num_workers=0"])
    env = dist.detect()
    assert (env.world_size, env.source) == (2, "torchrun")
    plan = plan_data(Path(shards), cfg, env.rank, env.world_size)
    # 5 train shards over 2 ranks: explicit node split, disjoint shard lists.
    mine = set(plan.train_urls)
    other = dist.all_gather_objects(sorted(mine))[1 - env.rank]
    assert mine and not mine & set(other)
    trainer = Trainer(cfg, model_spec(cfg), plan, Path(run_dir), env, torch.device("cpu"), "fp32", None)
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
    # this run goes through the job's launcher (python -m job.torchrun): its exit code is the job's 75
    proc = start_torchrun(["job.train", "--shards", shards2, "--out", run, *RESUME_ARGS], log=log,
                          job_launcher=True)
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
    assert proc.returncode == 75 and "rerun the same command to continue (exit 75)" in out, out[-3000:]

    res = torchrun(["job.train", "--shards", shards2, "--out", run, *RESUME_ARGS], job_launcher=True)
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
    args = ["--shards", str(shards2), "--out", str(run), *TINY, "crop_size=32", "num_workers=0", "max_steps=40",
            "steps_per_epoch=40", "val_every=2", "patience=1", "lr=1e-12"]
    res = job(args)
    assert res.returncode == 0, res.stderr[-3000:]
    done = json.loads((run / "done.json").read_text())
    assert done["reason"] == "early_stop" and done["step"] == 4 and done["best_step"] == 2
    assert "early stop" in res.stdout
    assert json.loads((run / "config.json").read_text())["resolved"]["world_size"] == 1
    assert (run / "checkpoints" / "best.pt").is_file() and list((run / "tb").iterdir())
    # a finished run is not redone on requeue (the same command: an early stop is as final as the last step)
    from job.train import main

    assert main(args) == 0
    assert "this run already finished at step 4 (early_stop) of 40" in capsys.readouterr().out


# ------------------------------------------------------------------------------------------------ extending a run
@pytest.mark.dist
def test_finished_run_extended_from_4_to_8_steps(shards2, tmp_path):
    """The same command with a larger max_steps continues a finished run at its last checkpoint; the added steps
    are a new phase with its own warmup and cosine; the run dir keeps every launch's config; each validation
    draws its picture into TensorBoard and RUN/val/ and logs the score terms as scalars."""
    run = tmp_path / "run"
    args = ["--shards", shards2, "--out", run, *TINY, "crop_size=32", "num_workers=0", "val_every=2",
            "steps_per_epoch=3"]
    first = job([*args, "max_steps=4"])
    assert first.returncode == 0, first.stderr[-3000:]
    again = job([*args, "max_steps=4"])  # unchanged: still finished, nothing trained or written
    assert again.returncode == 0 and "this run already finished at step 4 (finished) of 4" in again.stdout
    extended = job([*args, "max_steps=8"])
    assert extended.returncode == 0, extended.stderr[-3000:]
    assert f"resumed from {run / 'checkpoints' / 'step_00000004.pt'} at step 4" in extended.stdout
    assert "extended from 4 to 8 steps: steps 4..8 are a new joint phase with its own warmup and cosine" \
        in extended.stdout
    done = json.loads((run / "done.json").read_text())
    assert (done["step"], done["total_steps"], done["reason"]) == (8, 8, "finished")
    train = read_metrics(run, "train")
    assert [r["step"] for r in train] == list(range(1, 9))  # steps 5..8 trained once, after 1..4
    lr = {r["step"]: r["lr"] for r in train}
    cosine = [1e-4 * (0.01 + 0.99 * 0.5 * (1 + math.cos(math.pi * i / 4))) for i in range(5)]
    assert [lr[s] for s in (1, 2, 3, 4)] == pytest.approx(cosine[1:])  # the first 4 steps' cosine...
    assert [lr[s] for s in (5, 6, 7, 8)] == pytest.approx(cosine[1:])  # ...and again over the added 4 steps
    history = [json.loads(ln) for ln in (run / "config_history.jsonl").read_text().splitlines()]
    assert [(h["kind"], h["start_step"], h["total_steps"]) for h in history] == [("new", 0, 4), ("extend", 4, 8)]
    assert history[1]["config"]["run"]["max_steps"] == 8 and "max_steps=8" in history[1]["overrides"]
    ckpt8 = torch.load(run / "checkpoints" / "step_00000008.pt", weights_only=True)
    assert ckpt8["schedule"] == [["joint", 0, 4], ["joint", 4, 8]]

    # every validation's picture: RUN/val/step_N.png (4 samples of 64 px) and TensorBoard, with the score terms
    from PIL import Image
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    for step in (2, 4, 6, 8):
        assert Image.open(run / "val" / f"step_{step:08d}.png").size == (4 * 64, 18 + 3 * 64)  # val has 3 samples
    events = EventAccumulator(str(run / "tb"), size_guidance={"images": 0, "scalars": 0})
    events.Reload()
    images = events.Images("val/pictures")
    assert sorted({i.step for i in images}) == [2, 4, 6, 8]
    assert (images[-1].width, images[-1].height) == (4 * 64, 18 + 3 * 64)
    for term in ("score", "ssim", "masked_ssim", "hist_sim"):
        assert sorted({e.step for e in events.Scalars(f"val/{term}")}) == [2, 4, 6, 8], term
    assert events.Scalars("val/score")[-1].value == pytest.approx(done["last_val"]["score"])


# ----------------------------------------------------------------------------------------------------- bad input
@pytest.mark.dist
def test_four_ranks_on_one_shard_per_split_validate_every_sample_once(one_shard_shards, tmp_path):
    """4 ranks on a pack with ONE shard per split and 3 validation samples: training shares the shard (each rank its
    own seed), validation gives one sample to each of ranks 0-2 and none to rank 3, which still joins the
    all-reduce; the world's score is the single-process score of the same weights on the same samples."""
    from job import data_plan
    from job.config import parse_overrides
    from job.validation import validate
    from restore.model import load_restorer
    from restore.score import summarize_sums

    run = tmp_path / "run"
    args = [*TINY, "crop_size=32", "num_workers=1", "max_steps=4", "val_every=2", "val_images=2"]
    res = torchrun(["job.train", "--shards", one_shard_shards, "--out", run, *args], nproc=4)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "train: 1 shard(s) cannot give each of 4 ranks a batch of its own: every rank draws from all of them, " \
           "each with its own seed" in res.stdout
    assert "val: 3 samples over 4 ranks, each scored once (ranks 0-2: 1 each, rank 3: none); 1 rank(s) score " \
           "none and still join every all-reduce" in res.stdout
    done = json.loads((run / "done.json").read_text())
    assert done["reason"] == "finished" and done["step"] == 4
    val = read_metrics(run, "val")
    assert [(r["step"], r["n"]) for r in val] == [(2, 3), (4, 3)]
    assert json.loads((run / "config.json").read_text())["resolved"]["world_size"] == 4

    # The same weights in one process, the same memory format and batches of one image (as each rank had): the
    # same numbers up to the float sums' order.
    cfg = parse_overrides([*args, "val_batch_size=1"])
    plan = data_plan.plan_data(one_shard_shards, cfg, rank=0, world=1)
    model, _ = load_restorer(run / "checkpoints" / "step_00000004.pt")
    model = model.to(memory_format=torch.channels_last)
    sums, pictures = validate(model, data_plan.val_loader(plan, cfg, pin_memory=False), torch.device("cpu"), None,
                              True, plan.val_keys[:2])
    alone = summarize_sums(sums)
    assert alone["n"] == 3
    for term in ("score", "ssim", "masked_ssim", "hist_sim"):
        assert val[-1][term] == pytest.approx(alone[term], abs=1e-9), term
    # The picture's two rows are the world's first two samples, on ranks 0 and 1, gathered on rank 0: the same
    # pixels as the single process draws (64 px tiles under an 18 px title strip).
    import numpy as np
    from PIL import Image

    from job.validation import picture_grid

    drawn = np.asarray(Image.open(run / "val" / "step_00000004.png"))
    assert drawn.shape == (18 + 2 * 64, 4 * 64, 3) and len(pictures) == 2
    assert np.array_equal(drawn, picture_grid(pictures))


def test_resume_from_a_text_file_is_one_line_and_writes_nothing(shards2, tmp_path, capsys):
    from job.train import main

    notes = tmp_path / "notes.txt"
    notes.write_text("not a checkpoint\n")
    assert main(["--shards", str(shards2), "--out", str(tmp_path / "r"), f"resume={notes}"]) == 2
    out = capsys.readouterr()
    assert out.err.splitlines() == [f"job.train: error: {notes}: cannot read checkpoint: not a file written by "
                                    f"torch.save"] and out.out == ""
    assert not (tmp_path / "r").exists()
    # the same through the job's torchrun launcher: refused before any rank starts, nothing written
    res = subprocess.run([sys.executable, "-m", "job.torchrun", "--nproc-per-node", "2", "--shards", str(shards2),
                          "--out", str(tmp_path / "r"), f"resume={notes}"], cwd=REPO_ROOT, env=cpu_env(),
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 2, res.stderr
    assert res.stderr.splitlines() == [f"job.torchrun: error: {notes}: cannot read checkpoint: not a file written "
                                       f"by torch.save"]
    assert not (tmp_path / "r").exists()


@pytest.mark.dist
def test_bad_setting_under_torchrun_launchers(shards2, tmp_path):
    """``lr=abc``: the job's torchrun launcher prints one line and exits 2 without starting a rank; plain torchrun
    prints the job's line first (rank 0 only), then its own report, whose root cause repeats it, and exits 1."""
    cmd = ["--nproc-per-node", "2", "--shards", str(shards2), "--out", str(tmp_path / "r"), "lr=abc"]
    res = subprocess.run([sys.executable, "-m", "job.torchrun", *cmd], cwd=REPO_ROOT, env=cpu_env(),
                         capture_output=True, text=True, timeout=120)
    assert (res.returncode, res.stdout, res.stderr) == (2, "", "job.torchrun: error: lr='abc': expected a number\n")
    res = torchrun(["job.train", "--shards", shards2, "--out", tmp_path / "r", "lr=abc"], timeout=180)
    line = "job.train: error: lr='abc': expected a number"
    assert res.returncode == 1
    assert res.stderr.splitlines()[0] == line and res.stderr.splitlines().count(line) == 1, res.stderr
    root_cause = res.stderr[res.stderr.index("Root Cause"):]
    assert "rank      : 0" in root_cause and "exitcode  : 2" in root_cause, root_cause
    assert f"traceback : {line}" in root_cause  # torchrun's root cause names the job's message
    assert not (tmp_path / "r").exists()


def test_a_sample_that_fails_in_a_loader_worker_ends_the_job(shards2, tmp_path):
    """A crash in a loader worker (a crop larger than the 64 px images) ends the process with the sample's error:
    the workers ignore SIGTERM, and the exit used to wait for them forever."""
    res = job(["--shards", shards2, "--out", tmp_path / "run", *TINY, "crop_size=128", "num_workers=2",
               "max_steps=2"], timeout=120)
    assert res.returncode == 1, res.stderr[-3000:]
    assert res.stderr.rstrip().splitlines()[-1].endswith("is smaller than crop_size 128"), res.stderr[-3000:]
    assert "killed by signal" not in res.stderr


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

    from job.config import parse_overrides
    from job.data_plan import plan_data
    from shards.folds import assign_folds
    from shards.reader import read_manifest

    only_train = tmp_path / "only_train"
    only_train.mkdir()
    (only_train / "train").symlink_to(shards2 / "train")
    manifest = read_manifest(shards2 / "train")
    keys = [k for e in manifest["shards"] for k in e["keys"]]
    for fold in (0, 2):
        cfg = parse_overrides([f"fold={fold}", "num_folds=3", "batch_size=2"])
        plan = plan_data(only_train, cfg, rank=0, world=1)
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
