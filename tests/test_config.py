"""job.config overrides and validation; job.dist environment detection (torchrun first, SLURM as fallback)."""
from __future__ import annotations

import pytest

from job import dist
from job.config import KEYS, Config, ConfigError, parse_overrides

ISSUE_KEYS = ("epochs", "steps_per_epoch", "max_steps", "batch_size", "crop_size", "encoder", "num_workers",
              "precision", "fold", "num_folds", "stages", "val_every", "seed", "resume")


def test_defaults_are_the_seed_recipe():
    c = Config()
    assert (c.optim.lr, c.data.batch_size, c.run.epochs, c.model.encoder, c.data.crop_size) == (
        1e-4, 8, 50, "efficientnet-b4", 512)
    assert c.model.encoder_weights is None and c.run.precision == "auto" and c.run.stages == "joint"
    assert c.run.patience == 7 and not c.optim.gan


def test_issue_keys_are_spelled_exactly():
    assert set(ISSUE_KEYS) <= set(KEYS)


def test_overrides_parse_every_type():
    c = parse_overrides(["epochs=3", "lr=3e-4", "encoder_weights=none", "decoder_channels=32,16,8",
                         "precision=bf16", "hflip=false", "stages=staged", "stage_split=0.5,0.3", "resume=never",
                         "encoder=resnet18"])
    assert c.run.epochs == 3 and c.optim.lr == 3e-4 and c.model.encoder_weights is None
    assert c.model.decoder_channels == (32, 16, 8) and c.data.hflip is False
    assert c.run.stage_split == (0.5, 0.3) and c.run.resume == "never" and c.model.encoder == "resnet18"
    flat = c.flat()
    assert flat["decoder_channels"] == [32, 16, 8] and flat["precision"] == "bf16"
    assert Config.from_dict(c.to_dict()) == c  # the resolved config (config.json, checkpoints) round-trips


@pytest.mark.parametrize("item, message", [
    ("epochz=3", "unknown config key 'epochz' (did you mean epochs?)"),
    ("epochs", "override 'epochs' is not key=value"),
    ("epochs=x", "epochs='x': expected an integer"),
    ("lr=fast", "lr='fast': expected a number"),
    ("hflip=maybe", "hflip='maybe': expected a boolean"),
    ("precision=fp8", "precision='fp8': must be one of auto, bf16, fp16, fp32"),
    ("stages=both", "stages='both': must be one of joint, staged"),
    ("fold=5", "fold=5: must be in 0..num_folds-1 (4)"),
    ("crop_size=50", "crop_size=50: must be a multiple of 32"),
    ("batch_size=0", "batch_size=0: must be >= 1"),
    ("stage_split=0.7,0.5", "stage_split=(0.7, 0.5): two positive fractions"),
    ("ema=1", "ema=1.0: must be in [0, 1)"),
    ("compile=yes", "compile='yes': must be one of auto, on, off"),
    ("compile_min_steps=-1", "compile_min_steps=-1: must be >= 0"),
    ("compile_cache=false", "compile_cache='false': must be auto, off or a folder"),
    ("compile_cache=", "compile_cache='': must be auto, off or a folder"),
])
def test_bad_overrides_name_the_key(item, message):
    with pytest.raises(ConfigError) as err:
        parse_overrides([item])
    assert message in str(err.value)


def test_all_problems_reported_at_once():
    with pytest.raises(ConfigError) as err:
        parse_overrides(["batch_size=0", "num_workers=-1"])
    assert "batch_size=0" in str(err.value) and "num_workers=-1" in str(err.value)


# ------------------------------------------------------------------------------------------------------ job.dist
def test_single_process_without_any_launcher():
    env = dist.detect({})
    assert (env.rank, env.world_size, env.local_rank, env.source) == (0, 1, 0, "single") and not env.distributed


def test_torchrun_variables_come_first():
    env = dist.detect({"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1", "MASTER_ADDR": "n1", "MASTER_PORT": "29500",
                       "SLURM_PROCID": "0", "SLURM_STEP_ID": "0", "SLURM_NTASKS": "2"})
    assert env == dist.DistEnv(3, 4, 1, "n1", 29500, "torchrun")


def test_slurm_fallback_derives_the_rendezvous():
    seen = []

    def hostnames(nodelist):
        seen.append(nodelist)
        return ["gpu07", "gpu08"]

    env = dist.detect({"SLURM_PROCID": "5", "SLURM_STEP_ID": "0", "SLURM_STEP_NUM_TASKS": "8", "SLURM_NTASKS": "99",
                       "SLURM_LOCALID": "1", "SLURM_STEP_NODELIST": "gpu[07-08]", "SLURM_JOB_ID": "123456"},
                      hostnames=hostnames)
    assert env == dist.DistEnv(5, 8, 1, "gpu07", dist.PORT_BASE + 123456 % dist.PORT_SPAN, "slurm")
    assert seen == ["gpu[07-08]"]
    # a single host needs no scontrol
    env = dist.detect({"SLURM_PROCID": "0", "SLURM_STEPID": "0", "SLURM_NTASKS": "2", "SLURM_JOB_NODELIST": "n1",
                       "SLURM_JOB_ID": "7"})
    assert (env.master_addr, env.master_port) == ("n1", dist.PORT_BASE + 7)


def test_slurm_batch_script_is_not_a_step():
    # In the batch script SLURM_NTASKS is the allocation's; without a step id a plain python is one process.
    env = dist.detect({"SLURM_PROCID": "0", "SLURM_NTASKS": "8", "SLURM_JOB_ID": "1", "SLURM_JOB_NODELIST": "n1"})
    assert env.source == "single" and env.world_size == 1


@pytest.mark.parametrize("environ, message", [
    ({"RANK": "2", "WORLD_SIZE": "2", "MASTER_ADDR": "a", "MASTER_PORT": "1"}, "rank 2, world size 2"),
    ({"RANK": "0", "WORLD_SIZE": "2"}, "MASTER_ADDR/MASTER_PORT are not"),
    ({"RANK": "x", "WORLD_SIZE": "2"}, "RANK='x' is not an integer"),
    ({"SLURM_PROCID": "0", "SLURM_STEP_ID": "0", "SLURM_NTASKS": "2", "SLURM_JOB_NODELIST": "n1"}, "SLURM_JOB_ID"),
])
def test_inconsistent_environments_are_errors(environ, message):
    with pytest.raises(dist.DistEnvError) as err:
        dist.detect(environ)
    assert message in str(err.value)


@pytest.mark.parametrize("setting, device, steps, expected", [
    ("auto", "cuda", 5000, True),   # long enough to pay the compile time back
    ("auto", "cuda", 4999, False),  # a short run stays eager
    ("auto", "cpu", 10**6, False),
    ("on", "cpu", 1, True),
    ("off", "cuda", 10**6, False),
])
def test_compile_auto_pays_only_on_long_cuda_runs(setting, device, steps, expected):
    import torch

    from job.step import resolve_compile

    assert resolve_compile(setting, torch.device(device), steps, Config().run.compile_min_steps) is expected


def test_compile_cache_setting_names_the_folder(tmp_path):
    from job.step import compile_cache_dir

    run = tmp_path / "run"
    assert compile_cache_dir("auto", run) == run / "compile_cache"
    assert compile_cache_dir("off", run) is None
    assert compile_cache_dir(str(tmp_path / "shared"), run) == tmp_path / "shared"  # e.g. shared by K-fold runs
    assert parse_overrides([f"compile_cache={tmp_path / 'shared'}"]).run.compile_cache == str(tmp_path / "shared")
