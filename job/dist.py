"""Process groups: who am I (rank, world, local rank, rendezvous) and the collectives the job needs.

torchrun's variables (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT) come first. SLURM's are the fallback
for one task per GPU without torchrun (submitit): SLURM_PROCID / SLURM_NTASKS / SLURM_LOCALID, the first host of the
step's node list as the rendezvous address and a port derived from the job id. With neither, a single process runs
without any process group. NCCL on GPUs, gloo on CPU; a second gloo group carries host-side control messages (the
preemption flag) so that agreeing on it never waits for the GPU stream.
"""
from __future__ import annotations

import os
import subprocess
from dataclasses import dataclass
from datetime import timedelta
from typing import Callable, Mapping

import torch
import torch.distributed as dist

PORT_BASE = 20000  # SLURM fallback: MASTER_PORT = PORT_BASE + job id % PORT_SPAN
PORT_SPAN = 20000


class DistEnvError(RuntimeError):
    """The environment describes an inconsistent process group."""


@dataclass(frozen=True)
class DistEnv:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    master_addr: str | None = None
    master_port: int | None = None
    source: str = "single"  # torchrun | slurm | single

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def _int(environ: Mapping[str, str], name: str) -> int:
    try:
        return int(environ[name])
    except ValueError:
        raise DistEnvError(f"{name}={environ[name]!r} is not an integer") from None


def slurm_hostnames(nodelist: str) -> list[str]:
    """Expand a SLURM node list (``node[01-03],gpu7``) with ``scontrol show hostnames`` (the one exact parser)."""
    if not any(c in nodelist for c in "[],"):
        return [nodelist]
    try:
        out = subprocess.run(["scontrol", "show", "hostnames", nodelist], check=True, capture_output=True, text=True)
    except (OSError, subprocess.CalledProcessError) as exc:
        raise DistEnvError(f"cannot expand SLURM node list {nodelist!r} with scontrol: {exc}") from exc
    hosts = out.stdout.split()
    if not hosts:
        raise DistEnvError(f"scontrol returned no hosts for node list {nodelist!r}")
    return hosts


def detect(environ: Mapping[str, str] | None = None,
           hostnames: Callable[[str], list[str]] = slurm_hostnames) -> DistEnv:
    """The process-group description from the environment: torchrun first, SLURM tasks as fallback, else single."""
    environ = os.environ if environ is None else environ
    if "RANK" in environ and "WORLD_SIZE" in environ:
        rank, world = _int(environ, "RANK"), _int(environ, "WORLD_SIZE")
        local = _int(environ, "LOCAL_RANK") if "LOCAL_RANK" in environ else 0
        port = _int(environ, "MASTER_PORT") if "MASTER_PORT" in environ else None
        env = DistEnv(rank, world, local, environ.get("MASTER_ADDR"), port, "torchrun")
        if world > 1 and (env.master_addr is None or env.master_port is None):
            raise DistEnvError("RANK/WORLD_SIZE are set but MASTER_ADDR/MASTER_PORT are not (start with torchrun)")
    # SLURM's task variables only describe us inside a step (srun / submitit), not in the batch script itself,
    # where SLURM_NTASKS is the allocation's task count and a plain `python` is still one process.
    elif "SLURM_PROCID" in environ and ("SLURM_STEP_ID" in environ or "SLURM_STEPID" in environ):
        world_name = "SLURM_STEP_NUM_TASKS" if "SLURM_STEP_NUM_TASKS" in environ else "SLURM_NTASKS"
        rank, world = _int(environ, "SLURM_PROCID"), _int(environ, world_name)
        local = _int(environ, "SLURM_LOCALID") if "SLURM_LOCALID" in environ else 0
        addr = environ.get("MASTER_ADDR")
        port = _int(environ, "MASTER_PORT") if "MASTER_PORT" in environ else None
        if world > 1 and addr is None:
            nodelist = environ.get("SLURM_STEP_NODELIST") or environ.get("SLURM_JOB_NODELIST")
            if not nodelist:
                raise DistEnvError("SLURM task without SLURM_STEP_NODELIST/SLURM_JOB_NODELIST: no rendezvous host")
            addr = hostnames(nodelist)[0]
        if world > 1 and port is None:
            job = environ.get("SLURM_JOB_ID") or environ.get("SLURM_JOBID")
            if job is None:
                raise DistEnvError("SLURM task without SLURM_JOB_ID: cannot derive MASTER_PORT (set it)")
            port = PORT_BASE + int(job) % PORT_SPAN
        env = DistEnv(rank, world, local, addr, port, "slurm")
    else:
        return DistEnv()
    if not (0 <= env.rank < env.world_size) or env.local_rank < 0:
        raise DistEnvError(f"inconsistent {env.source} environment: rank {env.rank}, world size {env.world_size}, "
                           f"local rank {env.local_rank}")
    return env


def device_for(env: DistEnv) -> torch.device:
    if torch.cuda.is_available():
        return torch.device("cuda", env.local_rank % torch.cuda.device_count())
    return torch.device("cpu")


_control_group = None


def init(env: DistEnv, device: torch.device, timeout_s: float = 600.0) -> None:
    """Join the process group (no-op for one process). Exports the torchrun variables for libraries that read them
    (webdataset's node splitter, DataLoader workers)."""
    global _control_group
    if dist.is_initialized():  # joined by the caller (tests, an embedding launcher): only add the control group
        if _control_group is None:
            _control_group = dist.group.WORLD if dist.get_backend() == "gloo" else dist.new_group(backend="gloo")
        return
    if not env.distributed:
        return
    os.environ.update(RANK=str(env.rank), WORLD_SIZE=str(env.world_size), LOCAL_RANK=str(env.local_rank),
                      MASTER_ADDR=str(env.master_addr), MASTER_PORT=str(env.master_port))
    backend = "nccl" if device.type == "cuda" else "gloo"
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group(backend=backend, init_method="env://", rank=env.rank, world_size=env.world_size,
                            timeout=timedelta(seconds=timeout_s),
                            device_id=device if device.type == "cuda" else None)
    _control_group = dist.new_group(backend="gloo") if backend != "gloo" else dist.group.WORLD


def shutdown() -> None:
    global _control_group
    if dist.is_initialized():
        dist.destroy_process_group()
    _control_group = None


def world_size() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def any_true(flag: bool) -> bool:
    """True on every rank if ``flag`` is true on any rank (host-side, over gloo: no GPU sync)."""
    if not dist.is_initialized():
        return flag
    t = torch.tensor([1 if flag else 0], dtype=torch.int32)
    dist.all_reduce(t, op=dist.ReduceOp.MAX, group=_control_group)
    return bool(t.item())


def all_reduce_sum(values: list[float], device: torch.device) -> list[float]:
    """Element-wise sum of ``values`` over ranks in ONE all-reduce (float64 so sums of scores stay exact enough)."""
    if not dist.is_initialized():
        return list(values)
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t.tolist()


def all_gather_objects(obj):
    """Every rank's ``obj`` (picklable), on every rank, in rank order."""
    if not dist.is_initialized():
        return [obj]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj, group=_control_group)
    return out


def gather_objects(obj, dst: int = 0) -> list | None:
    """Every rank's ``obj`` (picklable) on rank ``dst``, in rank order (None on the other ranks)."""
    if not dist.is_initialized():
        return [obj]
    out = [None] * dist.get_world_size() if dist.get_rank() == dst else None
    dist.gather_object(obj, out, dst=dst, group=_control_group)
    return out


def broadcast_buffers(module: torch.nn.Module, src: int = 0) -> None:
    """Overwrite every buffer (BatchNorm running statistics) with rank ``src``'s, in place.

    DDP runs with broadcast_buffers=False (no per-step broadcast): each rank's running statistics follow its own
    batches. Before validation the job makes all ranks evaluate rank 0's, the ones its checkpoints hold, so a
    resumed run validates exactly like an uninterrupted one.
    """
    if not dist.is_initialized():
        return
    for buf in module.buffers():
        dist.broadcast(buf, src=src)


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier(group=_control_group)


def broadcast_object(obj, src: int = 0):
    if not dist.is_initialized():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src, group=_control_group)
    return box[0]
