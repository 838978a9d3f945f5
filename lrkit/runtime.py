"""CPU thread settings: how lrkit keeps a busy machine from stalling its CPU jobs.

OpenMP threads that finish their share of an operation spin, waiting for the others, before they sleep.
When other processes hold cores, one of torch's threads is often descheduled and the others spin through
their time slices waiting for it, so a job slows down far more than its share of the machine. lrkit
therefore (1) sets `OMP_WAIT_POLICY=PASSIVE` when it is imported before torch (OpenMP reads it once, when
torch loads it; the `lrkit` command always imports lrkit first), so waiting threads sleep and give the core
back, and (2) runs jobs on the small built-in bases with one intra-op thread (`cpu_threads_for`). Settings
the user made are kept. `bench/threads.py` measures both; bench/RESULTS.md has the figures.
"""

from __future__ import annotations

import math
import os
import sys
from contextlib import contextmanager
from pathlib import Path

# The user's own thread count, read before lrkit sets any (a value lrkit set in a parent process is not theirs).
_USER_THREADS = os.environ.get("OMP_NUM_THREADS") not in (None, os.environ.get("LRKIT_OMP_NUM_THREADS"))


def usable_cores() -> int:
    """CPUs this process may run on: its affinity mask, capped by a cgroup v2 CPU quota (containers)."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    try:
        quota, period = Path("/sys/fs/cgroup/cpu.max").read_text().split()[:2]
        if quota != "max":
            cores = min(cores, max(1, math.ceil(int(quota) / int(period))))
    except (OSError, ValueError):
        pass
    return max(1, cores)


def configure_cpu_threads() -> dict[str, str]:
    """Before torch loads: passive OpenMP waiting, and no more OpenMP threads than usable cores.

    Sets `OMP_WAIT_POLICY=PASSIVE` and, where fewer cores are usable than the machine has (a CPU set or
    quota), `OMP_NUM_THREADS` to that number; each only when the user has not set it and torch is not
    loaded yet. Returns what it set."""
    if "torch" in sys.modules:
        return {}
    chosen = {"OMP_WAIT_POLICY": "PASSIVE"}
    cores = usable_cores()
    if cores < (os.cpu_count() or cores):
        chosen["OMP_NUM_THREADS"] = str(cores)
    chosen = {k: v for k, v in chosen.items() if k not in os.environ}
    if "OMP_NUM_THREADS" in chosen:
        chosen["LRKIT_OMP_NUM_THREADS"] = chosen["OMP_NUM_THREADS"]  # marks the count as lrkit's, not the user's
    os.environ.update(chosen)
    return chosen


@contextmanager
def cpu_threads_for(base_id: str, device_type: str):
    """While a job runs a built-in base (`lrkit.models.BUILTIN_BASES`) on the CPU, torch uses one intra-op thread.

    Their operations are too small for several threads to pay off, and one thread never waits for another
    that a busy machine has descheduled. The count depends only on the base, so a run and its resumption
    compute alike. Other bases, GPUs, and a thread count the user set (`OMP_NUM_THREADS`) are left alone;
    the previous count comes back after."""
    import torch

    from lrkit.models import builtin_kind

    if device_type != "cpu" or builtin_kind(base_id) is None or _USER_THREADS or torch.get_num_threads() == 1:
        yield
        return
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


__all__ = ["configure_cpu_threads", "cpu_threads_for", "usable_cores"]
