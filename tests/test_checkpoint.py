"""job.checkpoint: the file contract (weights_only), atomic writes, ``latest``, keep-last-k, best.pt, resume targets."""
from __future__ import annotations

import pytest
import torch

from job import checkpoint as ckpt
from restore.model import CHECKPOINT_FORMAT, ModelSpec, build_model, load_restorer

SPEC = ModelSpec(encoder="tu-test_efficientnet", decoder_channels=(16, 8, 8, 8, 8))


def make_state(step: int, model=None) -> dict:
    model = model or build_model(SPEC)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model(torch.rand(2, 1, 32, 32), torch.zeros(2, 1, 32, 32))[1].mean().backward()
    opt.step()
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    return {
        "format": CHECKPOINT_FORMAT, "model_spec": SPEC.to_dict(),
        "model": model.state_dict(), "ema": None, "discriminator": None,
        "optimizer": opt.state_dict(), "scheduler": sched.state_dict(),
        "scaler": torch.amp.GradScaler("cpu", enabled=False).state_dict(),
        "step": step, "epoch": 0, "rng": {"world_size": 1, "ranks": [ckpt.rng_state()]},
        "data_pos": {"epoch": 0, "batch_in_epoch": step}, "config": {"run": {"seed": 0}},
        "metrics": {"best_score": 0.5, "best_step": step},
    }


def test_roundtrip_with_weights_only_and_latest_pointer(tmp_path):
    model = build_model(SPEC)
    state = make_state(7, model)
    path = ckpt.save_checkpoint(tmp_path, state, keep_last=3)
    assert path == tmp_path / "checkpoints" / "step_00000007.pt"
    assert (tmp_path / "checkpoints" / "latest").read_text() == "step_00000007.pt\n"
    raw = torch.load(path, weights_only=True)  # plain tensors and primitives only
    assert raw["step"] == 7 and raw["format"] == CHECKPOINT_FORMAT
    loaded = ckpt.load_checkpoint(path)
    for k, v in model.state_dict().items():
        assert torch.equal(loaded["model"][k], v)
    assert loaded["optimizer"]["state"][0]["exp_avg"].shape == next(model.parameters()).shape
    assert ckpt.latest_checkpoint(tmp_path) == path
    assert ckpt.resolve_resume("auto", tmp_path) == path and ckpt.resolve_resume("never", tmp_path) is None
    assert ckpt.resolve_resume(str(tmp_path), tmp_path / "other") == path
    assert ckpt.resolve_resume(str(path), tmp_path / "other") == path


def test_keep_last_and_best_and_the_inference_loader(tmp_path):
    model = build_model(SPEC)
    for step in (10, 20, 30, 40):
        ckpt.save_checkpoint(tmp_path, make_state(step, model), keep_last=2)
    assert [s for s, _ in ckpt.step_checkpoints(tmp_path)] == [30, 40]
    best = ckpt.save_best(tmp_path, make_state(40, model))
    raw = torch.load(best, weights_only=True)
    assert not set(ckpt.TRAINING_ONLY) & set(raw) and raw["step"] == 40
    # restore.model reads what the job writes: a run dir resolves to best.pt
    restored, info = load_restorer(tmp_path)
    assert info["step"] == 40
    for k, v in model.state_dict().items():
        assert torch.equal(restored.state_dict()[k], v)
    with pytest.raises(ckpt.CheckpointError, match="not a training checkpoint"):
        ckpt.load_checkpoint(best)


def test_a_failed_write_leaves_the_previous_checkpoint(tmp_path):
    ckpt.save_checkpoint(tmp_path, make_state(1), keep_last=3)
    bad = make_state(2)
    bad["metrics"] = {"oops": lambda: None}  # not picklable: torch.save fails half-way
    with pytest.raises(Exception):
        ckpt.save_checkpoint(tmp_path, bad, keep_last=3)
    d = tmp_path / "checkpoints"
    assert sorted(p.name for p in d.iterdir()) == ["latest", "step_00000001.pt"]  # no temp file, no step 2
    assert ckpt.latest_checkpoint(tmp_path).name == "step_00000001.pt"


def test_errors_name_the_file(tmp_path):
    assert ckpt.latest_checkpoint(tmp_path) is None and ckpt.resolve_resume("auto", tmp_path) is None
    with pytest.raises(ckpt.CheckpointError, match="no such checkpoint"):
        ckpt.resolve_resume(str(tmp_path / "x.pt"), tmp_path)
    with pytest.raises(ckpt.CheckpointError, match="has no checkpoints/latest"):
        ckpt.resolve_resume(str(tmp_path), tmp_path / "other")
    (tmp_path / "checkpoints").mkdir()
    (tmp_path / "checkpoints" / "latest").write_text("step_00000009.pt\n")
    with pytest.raises(ckpt.CheckpointError, match="names 'step_00000009.pt'"):
        ckpt.latest_checkpoint(tmp_path)
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"not a checkpoint")
    with pytest.raises(ckpt.CheckpointError, match=f"{junk}: cannot read checkpoint"):
        ckpt.load_checkpoint(junk)
    torch.save({"format": "other/1"}, junk)
    with pytest.raises(ckpt.CheckpointError, match="format 'other/1'"):
        ckpt.load_checkpoint(junk)
