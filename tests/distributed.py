"""Helpers for tests with real process groups: in-process functions on N spawned ranks, and the torchrun CLI.

``run_distributed_test(fn, world_size=2, backend="gloo", args=())`` starts ``world_size`` fresh processes (spawn), each
joins a real gloo group through the torchrun variables and runs ``fn(*args)``; an exception in any rank fails the
test with that rank's traceback, and a rank that hangs fails it after ``timeout`` seconds. ``fn`` must be a module-
level function (it is pickled by name).

``torchrun(args, nproc=2)`` / ``start_torchrun(...)`` run ``python -m torch.distributed.run --nproc-per-node N -m ...``
(``job_launcher=True``: the job's own ``python -m job.torchrun``) as a real subprocess with one CPU thread per rank
(2-core CI machines otherwise oversubscribe badly).
"""
from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import torch.distributed as dist
import torch.multiprocessing as mp

REPO_ROOT = Path(__file__).resolve().parents[1]
# For the tests that run inductor on the CPU: scalar C++ kernels build ~25% faster than vectorized ones, and what
# those tests check (which graphs are compiled or cached) does not depend on it.
FAST_CPU_COMPILE = {"TORCHINDUCTOR_VEC_ISA_OK": "0"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def cpu_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    """The environment for a CPU rank: one math thread, no GPU, the repo importable."""
    env = dict(os.environ)
    env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="",
               PYTHONPATH=str(REPO_ROOT) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else ""))
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "SLURM_PROCID", "SLURM_STEP_ID"):
        env.pop(name, None)
    env.update(extra or {})
    return env


def _rank_main(rank: int, fn: Callable, world_size: int, backend: str, port: int, args: tuple) -> None:
    import torch

    torch.set_num_threads(1)
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port), CUDA_VISIBLE_DEVICES="")
    dist.init_process_group(backend=backend, rank=rank, world_size=world_size)
    try:
        fn(*args)
        dist.barrier()
    finally:
        dist.destroy_process_group()


def run_distributed_test(fn: Callable, world_size: int = 2, backend: str = "gloo", args: Sequence[Any] = (),
                         timeout: float = 300.0) -> None:
    """Run ``fn(*args)`` on ``world_size`` real ranks of a ``backend`` process group; raise if any rank fails."""
    ctx = mp.start_processes(_rank_main, args=(fn, world_size, backend, free_port(), tuple(args)),
                             nprocs=world_size, join=False, start_method="spawn")
    deadline = time.monotonic() + timeout
    while not ctx.join(timeout=1):
        if time.monotonic() > deadline:
            for p in ctx.processes:
                if p.is_alive():
                    p.kill()
            raise TimeoutError(f"distributed test {fn.__name__} did not finish in {timeout:.0f}s")


def torchrun_cmd(module_args: Sequence[str], nproc: int = 2, job_launcher: bool = False) -> list[str]:
    """Plain torchrun, or (``job_launcher``) ``python -m job.torchrun``, whose first module arg must be job.train."""
    if job_launcher:
        assert module_args[0] == "job.train", module_args
        return [sys.executable, "-m", "job.torchrun", "--standalone", f"--nproc-per-node={nproc}",
                "--", *map(str, module_args[1:])]
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
            "-m", *map(str, module_args)]


def torchrun(module_args: Sequence[str], nproc: int = 2, timeout: float = 300.0,
             env: dict[str, str] | None = None, job_launcher: bool = False) -> subprocess.CompletedProcess:
    """``torchrun --nproc-per-node nproc -m module_args...`` to completion, output captured as text."""
    return subprocess.run(torchrun_cmd(module_args, nproc, job_launcher), cwd=REPO_ROOT, env=cpu_env(env),
                          capture_output=True, text=True, timeout=timeout)


def start_torchrun(module_args: Sequence[str], nproc: int = 2, env: dict[str, str] | None = None,
                   log: Path | None = None, job_launcher: bool = False) -> subprocess.Popen:
    """The same, started in the background (for signal tests); output goes to ``log`` when given."""
    out = open(log, "w") if log is not None else subprocess.DEVNULL
    return subprocess.Popen(torchrun_cmd(module_args, nproc, job_launcher), cwd=REPO_ROOT, env=cpu_env(env),
                            stdout=out, stderr=subprocess.STDOUT, text=True)
