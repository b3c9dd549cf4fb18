"""torch.compile's artifacts kept in a folder beside a run, so a restarted process loads them instead of compiling.

inductor already caches on the local disk (``/tmp/torchinductor_$USER``), but a requeued SLURM job usually lands on
another node, where that cache is empty: every restart then pays the full compile again (~290 s for the two
EfficientNet-B4 stages on an H100, see bench/RESULTS.md). ``torch.compiler.save_cache_artifacts`` serializes what
this process compiled or used (inductor graphs with their Triton kernels, AOTAutograd graphs, autotuning results)
into bytes that ``load_cache_artifacts`` puts back into the local caches of another process on another machine.

Files are named for the torch build and the device (``torch-2.14.1+cu130-cuda-sm90-<hash>.bin``), so a cluster with
mixed GPUs or a torch upgrade keeps files per combination instead of swapping ones that cannot hit. torch serializes
only the artifacts a process used or made, not everything it loaded, so a process that compiles something new (a
later training phase, another image size) writes a new file and removes the older ones it covers, rather than
overwriting a file with a smaller set. A cache must never stop a run: a file that cannot be read or loaded, or a
folder that cannot be written, is reported in a warning line and the run goes on (compiling what it must).
"""
from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass, field
from pathlib import Path

from shards.schema import atomic_write_bytes

# torch is imported where it is used: job.config validates the setting below on a login node without it.
NOT_A_FOLDER = ("true", "false", "on", "none", "no", "yes", "0", "1")  # a boolean meant, not a path


def setting_error(setting: str, option: str = "compile_cache=") -> str | None:
    """Why a compile-cache setting (``auto``, ``off`` or a folder) is refused, or None when it is fine. ``option``
    names it as the user wrote it: ``compile_cache=`` (the job's config), ``--compile-cache `` (batch inference)."""
    if not setting or setting.lower() in NOT_A_FOLDER:
        return f"{option}{setting!r}: must be auto, off or a folder"
    return None


def folder_for(setting: str, auto: Path) -> Path | None:
    """The folder a valid ``compile_cache`` setting names: ``auto`` is ``auto``, ``off`` is None (no cache)."""
    return {"auto": auto, "off": None}.get(setting, Path(setting))


def cache_prefix(device) -> str:
    """The file-name prefix for this torch build on ``device``'s (a ``torch.device``) kind of chip."""
    import torch

    if device.type == "cuda":
        major, minor = torch.cuda.get_device_capability(device)
        chip = f"cuda-sm{major}{minor}"
    else:
        chip = device.type
    return re.sub(r"[^A-Za-z0-9.+_-]", "_", f"torch-{torch.__version__}-{chip}")


@dataclass
class CompileCache:
    """A folder of artifact files for one torch build and chip, as one process sees it."""

    directory: Path
    prefix: str
    files: dict[Path, frozenset[str]] = field(default_factory=dict)  # file -> artifact keys it holds
    misses_at_save: int | None = None  # this process's compile count when save() last looked

    @classmethod
    def for_device(cls, directory: str | Path, device) -> "CompileCache":
        return cls(Path(directory), cache_prefix(device))

    def load(self) -> list[str]:
        """Load every file of this build and chip into torch's caches, before the first compiled call.

        Returns lines for the log.
        """
        import torch

        paths = sorted(self.directory.glob(f"{self.prefix}-*.bin"))
        if not paths:
            return [f"compile cache: nothing in {self.directory} for {self.prefix} yet; compiling from scratch"]
        lines = []
        for path in paths:
            try:
                data = path.read_bytes()
                keys = _keys(torch.compiler.load_cache_artifacts(data))
                if not keys:  # torch logs and skips what it cannot parse
                    raise ValueError("torch found no artifacts in it")
            except Exception as exc:  # noqa: BLE001 - any failure here only costs compile time
                lines.append(f"warning: compile cache {path} could not be loaded ({type(exc).__name__}: {exc}); "
                             f"its graphs will be compiled")
                continue
            self.files[path] = keys
            lines.append(f"compile cache: loaded {len(keys)} artifacts ({len(data) / 2**20:.1f} MiB) "
                         f"from {path}")
        return lines

    def save(self, only_if_compiled: bool = False) -> str | None:
        """Write what this process compiled or used, if the folder lacks any of it (temp name, then rename).

        ``only_if_compiled``: skip serializing everything (tens of MiB on a GPU) unless this process compiled a graph
        since the last look, e.g. at every checkpoint. Returns a line for the log (a warning when it could not be
        written), or None when there was nothing new.
        """
        import torch

        misses = sum(v for k, v in counts().items() if k.endswith("_misses"))
        if only_if_compiled and misses == self.misses_at_save:
            return None
        self.misses_at_save = misses
        try:
            result = torch.compiler.save_cache_artifacts()
        except Exception as exc:  # noqa: BLE001 - a cache must not stop the run that fills it
            return f"warning: compile artifacts could not be serialized ({type(exc).__name__}: {exc}); not saved"
        if result is None:  # nothing compiled, or torch's caches are off (TORCHINDUCTOR_FX_GRAPH_CACHE=0)
            return None
        data, info = result
        keys = _keys(info)
        known = frozenset().union(*self.files.values())
        if keys <= known:
            return None
        digest = hashlib.sha256("\n".join(sorted(keys)).encode()).hexdigest()[:12]
        path = self.directory / f"{self.prefix}-{digest}.bin"
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
            atomic_write_bytes(path, data)
        except OSError as exc:
            return f"warning: compile cache {path} could not be written ({type(exc).__name__}: {exc}); not saved"
        covered = [p for p, k in self.files.items() if p != path and k <= keys]
        for old in covered:  # everything in it is in the new file
            old.unlink(missing_ok=True)
            del self.files[old]
        self.files[path] = keys
        return (f"compile cache: saved {len(keys)} artifacts ({len(keys - known)} new, {len(data) / 2**20:.1f} MiB) "
                f"to {path}" + (f", replacing {len(covered)} older file(s)" if covered else ""))


def _keys(info) -> frozenset[str]:
    """The artifact keys of a ``CacheInfo`` as ``kind/key`` strings."""
    if info is None:
        return frozenset()
    return frozenset(f"{kind}/{key}" for kind, keys in info.artifacts.items() for key in keys)


def counts() -> dict[str, int]:
    """Cache hits and misses of this process so far (inductor graphs and AOTAutograd graphs), for the log."""
    from torch._dynamo.utils import counters

    ind, aot = counters["inductor"], counters["aot_autograd"]
    return {"graph_hits": ind.get("fxgraph_cache_hit", 0), "graph_misses": ind.get("fxgraph_cache_miss", 0),
            "autograd_hits": aot.get("autograd_cache_hit", 0), "autograd_misses": aot.get("autograd_cache_miss", 0)}
