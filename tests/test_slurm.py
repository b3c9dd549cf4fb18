"""The training job on a real SLURM: the local two-node cluster (slurm/local_cluster.sh), `sbatch slurm/train.sh`
and `python launch/submit.py`, each preempted mid-run and requeued, both ending with exactly the weights of an
uninterrupted run; 2 nodes x 2 tasks on a pack with one shard per split; and the errors a user gets at submission.

Needs root (the fixture installs and starts the cluster, and stops it at the end unless it was already up).
The three training runs (reference, sbatch, submitit) go at once so that the file stays within a few minutes.
"""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

from conftest import run_cli

pytestmark = [pytest.mark.slurm,
              pytest.mark.skipif(os.geteuid() != 0, reason="the local SLURM cluster needs root")]

REPO = Path(__file__).resolve().parents[1]
CLUSTER = REPO / "slurm" / "local_cluster.sh"
TRAIN_SH = REPO / "slurm" / "train.sh"
SUBMIT = REPO / "launch" / "submit.py"
MAX_STEPS = 24  # enough steps after the first that the notice lands mid-run on a fast machine too
TINY = ["encoder=tu-test_efficientnet", "decoder_channels=16,8,8,8,8", "cbam=false", "crop_size=64",
        "batch_size=2", "num_workers=0", f"max_steps={MAX_STEPS}", "val_every=12", "log_every=1"]
JOB_DEADLINE_S = 600  # for all three runs together (they go in parallel)


def sh(*args, timeout=120, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([str(a) for a in args], capture_output=True, text=True, timeout=timeout, **kw)


def job_fields(job_id: str) -> dict[str, str]:
    out = sh("scontrol", "show", "job", "-o", job_id)
    assert out.returncode == 0, f"scontrol show job {job_id}: {out.stderr}"
    return dict(f.split("=", 1) for f in out.stdout.split() if "=" in f)


def wait_job(job_id: str, deadline: float) -> dict[str, str]:
    """SLURM's record of the job once it is over (no accounting here: scontrol keeps it for MinJobAge)."""
    while True:
        fields = job_fields(job_id)
        if fields["JobState"] in ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY"):
            return fields
        if time.monotonic() > deadline:
            sh("scancel", job_id)
            pytest.fail(f"job {job_id} still {fields['JobState']} at the deadline")
        time.sleep(1)


def first_train_line(run_dir: Path) -> bool:
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        return False
    return any(json.loads(ln).get("kind") == "train" for ln in path.read_text().splitlines() if ln.strip())


def final_weights(run_dir: Path) -> dict[str, torch.Tensor]:
    latest = (run_dir / "checkpoints" / "latest").read_text().strip()
    assert latest == f"step_{MAX_STEPS:08d}.pt"
    return torch.load(run_dir / "checkpoints" / latest, map_location="cpu", weights_only=True)["model"]


def assert_same_weights(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    different = [k for k in a if not torch.equal(a[k], b[k])]
    assert not different, f"{len(different)} tensors differ from the uninterrupted run, e.g. {different[:3]}"


class Proc:
    """A launcher process whose output is collected as it comes (so that its job id can be read early)."""

    def __init__(self, args: list, cwd: Path) -> None:
        self.p = subprocess.Popen([str(a) for a in args], cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                  text=True)
        self.lines: list[str] = []
        self.reader = threading.Thread(target=lambda: self.lines.extend(iter(self.p.stdout.readline, "")),
                                       daemon=True)
        self.reader.start()

    @property
    def text(self) -> str:
        return "".join(self.lines)

    def job_id(self) -> str | None:
        m = re.search(r"submitted job (\d+) to SLURM", self.text)
        return m.group(1) if m else None

    def wait(self, deadline: float) -> int:
        try:
            rc = self.p.wait(timeout=max(1.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            self.p.kill()
            pytest.fail(f"{self.p.args[:3]} did not finish in time; output:\n{self.text[-3000:]}")
        self.reader.join(10)
        return rc


# ------------------------------------------------------------------------------------------------ fixtures
@pytest.fixture(scope="module")
def cluster():
    was_up = sh("bash", CLUSTER, "status").returncode == 0
    up = sh("bash", CLUSTER, "up", timeout=900)
    assert up.returncode == 0, f"local_cluster.sh up failed:\n{up.stdout}\n{up.stderr}"
    yield
    if not was_up:
        down = sh("bash", CLUSTER, "down", timeout=300)
        assert down.returncode == 0, down.stderr
        status = sh("bash", CLUSTER, "status")
        assert status.returncode == 3 and "running" not in status.stdout, status.stdout


@pytest.fixture(scope="module")
def shards(photo_dir, tmp_path_factory) -> Path:
    """Tiny shards at the default shard size: ONE shard per split (train 9 samples, val 3), fewer than the ranks."""
    out = tmp_path_factory.mktemp("slurm_shards") / "shards"
    run_cli(["shards.pack", "photos", photo_dir, out, "--size", 64, "--seed", 0, "--val-fraction", 0.25],
            check=True)
    return out


@pytest.fixture(scope="module")
def runs(cluster, shards, tmp_path_factory):
    """Start the three runs, preempt the two SLURM ones once they train (a background thread), and return handles.

    - ref: `submit.py --local` with 2 tasks, never interrupted: the weights the others must end with;
    - sbatch: `sbatch --nodes 2 slurm/train.sh`, sent the time-limit notice (USR1 to the batch shell, like
      `--signal=B:USR1@...`); the script forwards it, the job checkpoints, the script requeues the job;
    - submitit: `submit.py --nodes 2 --wait`, sent USR1 on its tasks (like submitit's `--signal=USR1@...`);
      submitit requeues a fresh copy of the callable.
    """
    root = tmp_path_factory.mktemp("slurm_runs")
    out = {name: root / name for name in ("ref", "sbatch", "submitit")}
    deadline = time.monotonic() + JOB_DEADLINE_S
    ref = Proc([sys.executable, SUBMIT, "--local", "--tasks-per-node", 2, "--wait", "--shards", shards,
                "--out", out["ref"], *TINY], cwd=root)
    # resume=never on the first run: the requeued run must still continue its own checkpoint.
    sb = sh("sbatch", "--parsable", "--nodes", 2, "--output", root / "sbatch-%j.out", TRAIN_SH,
            "--shards", shards, "--out", out["sbatch"], *TINY, "resume=never", cwd=root)
    assert sb.returncode == 0, sb.stderr
    sbatch_id = sb.stdout.strip().split(";")[0]
    sub = Proc([sys.executable, SUBMIT, "--nodes", 2, "--wait", "--shards", shards, "--out", out["submitit"],
                *TINY, "resume=never"], cwd=root)
    signalled: dict[str, float] = {}

    def preempt() -> None:
        while len(signalled) < 2 and time.monotonic() < deadline:
            if "sbatch" not in signalled and first_train_line(out["sbatch"]):
                sh("scancel", "--signal=USR1", "--batch", sbatch_id)
                signalled["sbatch"] = time.monotonic()
            sub_id = sub.job_id()
            if "submitit" not in signalled and sub_id and first_train_line(out["submitit"]):
                sh("scancel", "--signal=USR1", sub_id)
                signalled["submitit"] = time.monotonic()
            time.sleep(0.2)

    thread = threading.Thread(target=preempt, daemon=True)
    thread.start()
    yield {"out": out, "root": root, "ref": ref, "sbatch_id": sbatch_id, "submitit": sub, "signalled": signalled,
           "thread": thread, "deadline": deadline}
    for proc in (ref, sub):
        if proc.p.poll() is None:
            proc.p.kill()
    sh("scancel", sbatch_id)
    if sub.job_id():
        sh("scancel", sub.job_id())


@pytest.fixture(scope="module")
def reference(runs):
    rc = runs["ref"].wait(runs["deadline"])
    assert rc == 0, runs["ref"].text[-3000:]
    done = json.loads((runs["out"]["ref"] / "done.json").read_text())
    assert done["step"] == MAX_STEPS and done["reason"] == "finished"
    return {"weights": final_weights(runs["out"]["ref"]), "done": done}


def assert_same_result(run_dir: Path, reference: dict) -> None:
    """Exactly the uninterrupted run's weights and validation scores."""
    assert_same_weights(final_weights(run_dir), reference["weights"])
    done = json.loads((run_dir / "done.json").read_text())
    assert done["step"] == MAX_STEPS and done["reason"] == "finished"
    for key in ("last_val", "best_score", "best_step"):
        assert done[key] == reference["done"][key], key


def resumed_step(log: str) -> int:
    """The step the job stopped at on the notice, checked against where the requeued run resumed."""
    stopped = re.search(r"preempted at step (\d+): checkpoint written", log)
    assert stopped, f"the job never checkpointed on the notice:\n{log[-3000:]}"
    k = int(stopped.group(1))
    assert 0 < k < MAX_STEPS, f"stopped at step {k}: the notice came too late to test a resume"
    assert re.search(rf"resumed from \S+step_{k:08d}\.pt at step {k}\b", log), log[-3000:]
    return k


# --------------------------------------------------------------------------------------------------- tests
def test_cluster_is_up_with_two_idle_capable_nodes(cluster):
    again = sh("bash", CLUSTER, "up", timeout=300)  # idempotent: a second `up` just confirms
    assert again.returncode == 0, again.stderr
    nodes = dict(ln.split() for ln in sh("sinfo", "-h", "-N", "-p", "debug", "-o", "%N %t").stdout.splitlines())
    assert set(nodes) == {"node1", "node2"}
    assert all(state in ("idle", "mix", "alloc") for state in nodes.values()), nodes
    hosts = sh("srun", "--nodes=2", "--ntasks-per-node=1", "--time=1", "printenv", "SLURMD_NODENAME", timeout=300)
    assert hosts.returncode == 0, hosts.stderr
    assert sorted(hosts.stdout.split()) == ["node1", "node2"]


def test_sbatch_wrong_partition_is_refused_at_submission(cluster, shards, tmp_path):
    out = sh("sbatch", "--partition", "no-such-partition", TRAIN_SH, "--shards", shards, "--out", tmp_path / "run",
             cwd=tmp_path)
    assert out.returncode != 0
    assert "invalid partition" in out.stderr.lower()


def test_sbatch_missing_shards_fails_before_srun_with_the_path(cluster, tmp_path):
    missing = tmp_path / "no-shards-here"
    # Site settings come from the env file (here named by RESTORE_SITE_ENV), sourced before anything else.
    site = tmp_path / "site.env"
    site.write_text('SITE_GREETING="site file sourced"\necho "$SITE_GREETING" >&2\n')
    sb = sh("sbatch", "--parsable", "--output", tmp_path / "log-%j.out", TRAIN_SH, "--shards", missing,
            "--out", tmp_path / "run", *TINY, cwd=tmp_path, env={**os.environ, "RESTORE_SITE_ENV": str(site)})
    assert sb.returncode == 0, sb.stderr
    job_id = sb.stdout.strip()
    fields = wait_job(job_id, time.monotonic() + 120)
    assert fields["JobState"] == "FAILED" and fields["ExitCode"] == "2:0", fields
    log = (tmp_path / f"log-{job_id}.out").read_text()
    assert f"shards dir {missing} does not exist" in log
    assert f"site settings from {site}" in log and "site file sourced" in log
    assert "torchrun" not in log  # refused before any srun step
    assert not (tmp_path / "run").exists()


def test_sbatch_bad_setting_is_one_line_before_srun(cluster, shards, tmp_path):
    # The README's command with a bad value: job.plan refuses it on the first node before any srun, exit 2.
    sb = sh("sbatch", "--parsable", "--output", tmp_path / "log-%j.out", TRAIN_SH, "--shards", shards,
            "--out", tmp_path / "run", *TINY, "lr=abc", cwd=tmp_path)
    assert sb.returncode == 0, sb.stderr
    job_id = sb.stdout.strip()
    fields = wait_job(job_id, time.monotonic() + 120)
    assert fields["JobState"] == "FAILED" and fields["ExitCode"] == "2:0", fields
    log = (tmp_path / f"log-{job_id}.out").read_text()
    assert log.splitlines() == ["job.plan: error: lr='abc': expected a number",
                                f"train.sh[{job_id}]: error: the job refused its command (the line above); nothing "
                                f"was started or written"], log
    assert not (tmp_path / "run").exists()


def test_submit_wrong_partition_is_refused_at_submission(cluster, shards, tmp_path, capsys):
    from launch import submit

    rc = submit.main(["--nodes", "2", "--partition", "no-such-partition", "--shards", str(shards),
                      "--out", str(tmp_path / "run"), *TINY])
    out = capsys.readouterr()
    assert rc == 2, out
    assert "partition 'no-such-partition' does not exist" in out.err and "debug" in out.err
    assert "submitted job" not in out.out
    assert not (tmp_path / "run").exists()


def test_submit_missing_shards_is_refused_at_submission(cluster, tmp_path, capsys):
    from launch import submit

    missing = tmp_path / "nothing"
    rc = submit.main(["--nodes", "2", "--shards", str(missing), "--out", str(tmp_path / "run"), *TINY])
    err = capsys.readouterr().err
    assert rc == 2
    assert f"shards dir {missing} does not exist" in err
    assert not (tmp_path / "run").exists()


def test_submit_wait_exits_with_the_jobs_status(cluster, shards, tmp_path):
    # fp16 needs a GPU: the submit host cannot know the nodes' devices, the job refuses it there (exit 2, at start).
    out = sh(sys.executable, SUBMIT, "--nodes", 2, "--wait", "--shards", shards, "--out", tmp_path / "run",
             *TINY, "precision=fp16", cwd=tmp_path, timeout=400)
    assert out.returncode == 2, out.stdout + out.stderr
    job_id = re.search(r"submitted job (\d+) to SLURM: 2 node\(s\) x 1 task\(s\)", out.stdout).group(1)
    assert f"job {job_id}: FAILED" in out.stdout
    assert f"job {job_id} ended FAILED (exit code 2)" in out.stderr
    assert "job.train: error: precision=fp16 needs a CUDA device" in out.stderr  # the log's tail, shown
    assert "Traceback" not in out.stderr


def test_sbatch_train_sh_preempted_on_two_nodes_resumes_and_matches_uninterrupted(runs, reference):
    fields = wait_job(runs["sbatch_id"], runs["deadline"])
    run_dir = runs["out"]["sbatch"]
    log = (runs["root"] / f"sbatch-{runs['sbatch_id']}.out").read_text()
    assert "sbatch" in runs["signalled"], "the job never reached its first step"
    assert fields["JobState"] == "COMPLETED" and fields["ExitCode"] == "0:0", (fields, log[-3000:])
    assert fields["Restarts"] == "1", fields
    # Both nodes ran torchrun, rendezvous on the first; the notice was forwarded, then the job requeued itself.
    assert re.search(r"node node1 \(0/2\): torchrun nproc-per-node=1", log)
    assert re.search(r"node node2 \(1/2\): torchrun nproc-per-node=1", log)
    assert "USR1 (time limit or preemption notice)" in log
    assert f"requeueing job {runs['sbatch_id']}" in log
    assert "restart 1" in log
    resumed_step(log)
    assert json.loads((run_dir / "config.json").read_text())["resolved"]["world_size"] == 2
    assert (run_dir / "checkpoints" / "best.pt").is_file()
    assert_same_result(run_dir, reference)


def test_submit_py_preempted_on_two_nodes_resumes_and_matches_uninterrupted(runs, reference):
    sub = runs["submitit"]
    rc = sub.wait(runs["deadline"])
    text = sub.text
    job_id = sub.job_id()
    assert job_id, text
    assert "submitit" in runs["signalled"], "the job never reached its first step"
    assert rc == 0, text[-3000:]
    # --wait printed the job's result: the finished run.
    result = json.loads(re.search(r"^\{$.*^\}$", text, re.S | re.M).group(0))
    assert result["done"]["step"] == MAX_STEPS and result["run_dir"] == str(runs["out"]["submitit"])
    fields = job_fields(job_id)
    assert fields["JobState"] == "COMPLETED" and fields["Restarts"] == "1", fields
    folder = runs["out"]["submitit"] / "submitit"
    log0 = (folder / f"{job_id}_0_log.out").read_text() + (folder / f"{job_id}_0_log.err").read_text()
    log1 = (folder / f"{job_id}_1_log.out").read_text() + (folder / f"{job_id}_1_log.err").read_text()
    assert "global_rank=0(2)" in log0 and "global_rank=1(2)" in log1  # one task per node, 2 nodes
    assert f"Requeued job {job_id}" in log0  # submitit requeued checkpoint()'s fresh copy
    resumed_step(log0)
    assert_same_result(runs["out"]["submitit"], reference)


def test_sbatch_two_nodes_two_tasks_each_on_a_one_shard_pack(cluster, shards, tmp_path):
    """`sbatch --nodes 2 --ntasks-per-node 2 slurm/train.sh`: 4 gloo ranks on a pack with ONE shard per split train
    (every rank draws from the one shard), validate each of the 3 samples once (rank 3 has none and still joins the
    all-reduce) and finish. Last in the file: it needs both nodes' CPUs, so it runs after the runs above."""
    run = tmp_path / "run"
    sb = sh("sbatch", "--parsable", "--nodes", 2, "--ntasks-per-node", 2, "--output", tmp_path / "log-%j.out",
            TRAIN_SH, "--shards", shards, "--out", run, *TINY, "max_steps=4", "val_every=2", cwd=tmp_path)
    assert sb.returncode == 0, sb.stderr
    job_id = sb.stdout.strip()
    fields = wait_job(job_id, time.monotonic() + JOB_DEADLINE_S)
    log = (tmp_path / f"log-{job_id}.out").read_text()
    assert fields["JobState"] == "COMPLETED" and fields["ExitCode"] == "0:0", (fields, log[-3000:])
    assert re.search(r"node node1 \(0/2\): torchrun nproc-per-node=2", log), log[-3000:]
    assert re.search(r"node node2 \(1/2\): torchrun nproc-per-node=2", log), log[-3000:]
    assert "train: 1 shard(s) cannot give each of 4 ranks a batch of its own" in log
    assert "val: 3 samples over 4 ranks, each scored once (ranks 0-2: 1 each, rank 3: none)" in log
    assert f"train.sh[{job_id}]: finished: {run}/done.json" in log
    done = json.loads((run / "done.json").read_text())
    assert (done["step"], done["reason"]) == (4, "finished")
    assert json.loads((run / "config.json").read_text())["resolved"]["world_size"] == 4
    val = [json.loads(ln) for ln in (run / "metrics.jsonl").read_text().splitlines()]
    assert [(r["step"], r["n"]) for r in val if r["kind"] == "val"] == [(2, 3), (4, 3)]
