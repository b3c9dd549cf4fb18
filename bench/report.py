"""The bench scripts' last step: the result as one JSON line on stdout and, when asked, the same line in a file."""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from shards.schema import atomic_write_bytes  # noqa: E402


def emit(result: dict, json_path: str | os.PathLike | None) -> None:
    line = json.dumps(result)
    print(line)
    if json_path:
        atomic_write_bytes(Path(json_path), (line + "\n").encode())


# CUPTI's overhead records (CUpti_ActivityOverheadKind) reach torch.profiler as device events but are no kernels:
# "Command Buffer Full" is the host blocked on a full launch queue (the GPU had work queued), "Activity Buffer
# Request" the profiler's own bookkeeping. The H100 profile of 2026-11-26 (cf3f1d9) counted 0.25 ms/img of the first
# as GPU time.
CUPTI_OVERHEAD = frozenset({
    "Unknown", "Driver Compiler", "Buffer Flush", "Instrumentation", "Resource", "Runtime Triggered Module Loading",
    "Lazy Function Loading", "Command Buffer Full", "Activity Buffer Request", "UVM Activity Init"})


def op_profile(prof, cuda: bool, units: int, rows: int = 15) -> dict:
    """A torch.profiler run summarised per unit (image or step): the ops by self time on the device (CPU time when
    ``cuda`` is False), their share, and on a GPU the kernels per unit, whose count against the device time says
    whether the work is launch-bound (many kernels of a few µs) or bound by the kernels themselves. CUPTI's overhead
    records are kept apart (``overhead_ms_per_unit``): time the host waited, not time the GPU worked."""
    from torch.autograd import DeviceType

    attr = "self_device_time_total" if cuda else "self_cpu_time_total"
    events = sorted(prof.key_averages(), key=lambda e: getattr(e, attr), reverse=True)
    overhead = [e for e in events if cuda and e.key in CUPTI_OVERHEAD]
    events = [e for e in events if not (cuda and e.key in CUPTI_OVERHEAD)]
    # On a GPU an op (aten::add_) and the kernel it launched both carry the kernel's time; the kernels alone sum to
    # the device's time (summing both counted it twice: the profiles of 2026-11-26 and before).
    timed = [e for e in events if e.device_type == DeviceType.CUDA] if cuda else events
    total_us = sum(getattr(e, attr) for e in timed)
    kernels = sum(e.count for e in timed) if cuda else 0
    top = [{"op": e.key, "calls_per_unit": e.count / units, "ms_per_unit": getattr(e, attr) / units / 1e3,
            "share": getattr(e, attr) / total_us if total_us else 0.0} for e in events[:rows]]
    return {"device_time": "cuda" if cuda else "cpu", "ms_per_unit": total_us / units / 1e3,
            "events_per_unit": sum(e.count for e in events) / units,
            "kernels_per_unit": kernels / units if cuda else None, "top": top,
            "overhead_ms_per_unit": {e.key: getattr(e, attr) / units / 1e3 for e in overhead}}


def print_op_profile(summary: dict, unit: str) -> None:
    kernels = summary["kernels_per_unit"]
    print(f"profile: {summary['ms_per_unit']:.3f} ms of {summary['device_time']} time and "
          f"{summary['events_per_unit']:.0f} profiled events per {unit}"
          + (f" ({kernels:.0f} GPU kernels)" if kernels is not None else "") + "; top by self time:")
    for row in summary["top"]:
        print(f"  {row['share']:6.1%}  {row['ms_per_unit']:8.3f} ms/{unit}  {row['calls_per_unit']:7.2f} calls/{unit}  "
              f"{row['op'][:90]}")
    for name, ms in summary.get("overhead_ms_per_unit", {}).items():
        print(f"  not GPU work (CUPTI overhead record): {name} {ms:.3f} ms/{unit}"
              + (": the host waited on a full launch queue, so the GPU had work queued"
                 if name == "Command Buffer Full" else ""))
