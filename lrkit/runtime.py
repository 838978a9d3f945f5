"""Process-wide CPU settings lrkit makes when it is imported before torch.

OpenMP threads that finish their share of an operation spin, waiting for the others, before they sleep.
On a machine whose cores are busy with other work, one of torch's threads is often descheduled and the
others spin through their time slices waiting for it: training of a small model on two cores beside one
CPU-bound process drops to a tenth of its idle speed. With `OMP_WAIT_POLICY=PASSIVE` waiting threads sleep
and give the core back, so a busy machine slows lrkit down in proportion (`bench/threads.py` measures it;
README "CPU threads"). OpenMP reads the policy once, when torch loads it, so this only takes effect when
lrkit is imported first (the `lrkit` command always is); a policy the user set is kept.
"""

from __future__ import annotations

import math
import os
import sys
from pathlib import Path


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
    os.environ.update(chosen)
    return chosen


__all__ = ["configure_cpu_threads", "usable_cores"]
