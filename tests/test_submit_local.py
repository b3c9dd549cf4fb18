"""`python launch/submit.py --local`: the submitit launcher without SLURM (submitit's local executor, real processes),
and the errors it gives before anything is submitted (no SLURM needed for those)."""
from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from launch import submit

SUBMIT = Path(__file__).resolve().parents[1] / "launch" / "submit.py"
TINY = ["encoder=tu-test_efficientnet", "decoder_channels=16,8,8,8,8", "cbam=false", "crop_size=64",
        "batch_size=2", "num_workers=0", "max_steps=3", "val_every=3", "log_every=1"]


def test_local_run_trains_and_reports_the_result(tiny_shards, tmp_path):
    # Run as users do: a script path, from another directory, with a relative --out.
    out = subprocess.run([sys.executable, str(SUBMIT), "--local", "--wait", "--shards", str(tiny_shards),
                          "--out", "run", *TINY], cwd=tmp_path, capture_output=True, text=True, timeout=420)
    assert out.returncode == 0, out.stdout + out.stderr
    run = tmp_path / "run"
    job_id = re.search(r"submitted job (\d+) locally: 1 node\(s\) x 1 task\(s\), run dir (\S+)", out.stdout)
    assert job_id and job_id.group(2) == str(run), out.stdout
    result = json.loads(re.search(r"^\{$.*^\}$", out.stdout, re.S | re.M).group(0))
    assert result["run_dir"] == str(run)
    assert result["done"] == json.loads((run / "done.json").read_text())
    assert result["done"]["step"] == 3 and result["done"]["reason"] == "finished"
    assert (run / "checkpoints" / "latest").read_text().strip() == "step_00000003.pt"
    assert (run / "checkpoints" / "step_00000003.pt").is_file()
    log = (run / "submitit" / f"{job_id.group(1)}_0_log.out").read_text()
    assert "global_rank=0(1)" in log and "done (finished) at step 3" in log


# The refusals run in-process: nothing is submitted, so nothing but the parser and the checks runs.
def refused(capsys, *argv) -> str:
    try:
        rc = submit.main([str(a) for a in argv])
    except SystemExit as exc:  # argparse's own refusals
        rc = exc.code
    assert rc == 2
    return capsys.readouterr().err


def test_bad_override_is_refused_before_submission(tiny_shards, tmp_path, capsys):
    err = refused(capsys, "--local", "--shards", tiny_shards, "--out", tmp_path / "run", "max_stepz=3")
    assert "unknown config key 'max_stepz'" in err and "max_steps" in err
    assert not (tmp_path / "run").exists()


def test_missing_shards_dir_is_refused_before_submission(tmp_path, capsys):
    missing = tmp_path / "no-shards"
    err = refused(capsys, "--local", "--shards", missing, "--out", tmp_path / "run")
    assert f"shards dir {missing} does not exist" in err
    assert not (tmp_path / "run").exists()


def test_any_number_of_tasks_is_accepted_and_a_bad_resume_target_refused(tiny_shards, tmp_path, capsys):
    # tiny_shards has one validation shard: 2 (or 64) tasks share its samples, nothing to refuse.
    opts, _, job_args = submit.parse(["--nodes", "2", "--shards", str(tiny_shards), "--out", str(tmp_path / "run"),
                                      *TINY])
    for world in (2, 64):
        launch = submit.check_job_input(opts, job_args, world)
        assert launch.trains and launch.world == world and launch.split.num_val >= 1
    # resume= on a file that is not a checkpoint: one line before submission, nothing written
    notes = tmp_path / "notes.txt"
    notes.write_text("not a checkpoint\n")
    err = refused(capsys, "--local", "--tasks-per-node", 2, "--shards", tiny_shards, "--out", tmp_path / "run",
                  *TINY, f"resume={notes}")
    assert err.splitlines() == [f"submit: error: {notes}: cannot read checkpoint: not a file written by torch.save "
                                f"(for 2 task(s))"]
    assert not (tmp_path / "run").exists()


def test_job_options_are_the_jobs_own(tmp_path, capsys):
    # The job's parser is part of the launcher's: its required options, its overrides and its help are there.
    err = refused(capsys, "--local", "--nodes", 1)
    assert "--shards" in err and "required" in err
    with pytest.raises(SystemExit) as helped:
        submit.main(["--help"])
    assert helped.value.code == 0
    text = capsys.readouterr().out
    assert "--gpus-per-node" in text and "training job options" in text and "key=value config overrides" in text
    err = refused(capsys, "--local", "--nodes", 2, "--shards", tmp_path, "--out", tmp_path / "run")
    assert "--local runs one node" in err
