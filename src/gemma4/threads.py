"""How many cores this process may use, for PyTorch's CPU threads (and the C kernels', which take the same count)."""

from __future__ import annotations

import math
import os

import torch


def available_cores() -> int:
    """The CPUs this process may run on (its affinity mask), capped by a container's CPU quota (cgroup v2 `cpu.max`,
    or v1 `cpu.cfs_quota_us`): `docker run --cpus 2` on a 64-core host gives 2."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    quota = _cgroup_quota()
    return max(1, min(cores, math.ceil(quota))) if quota else cores


def _cgroup_quota() -> float | None:
    """The CPU quota in cores, or None where there is none (or no cgroup file to say so)."""
    try:
        with open("/sys/fs/cgroup/cpu.max") as file:
            quota, period = file.read().split()[:2]
        return None if quota == "max" else int(quota) / int(period)
    except (OSError, ValueError):
        pass
    try:
        with open("/sys/fs/cgroup/cpu/cpu.cfs_quota_us") as quota:
            value = int(quota.read())
        with open("/sys/fs/cgroup/cpu/cpu.cfs_period_us") as period:
            return value / int(period.read()) if value > 0 else None
    except (OSError, ValueError):
        return None


def fit_threads_to_cores() -> None:
    """Fewer PyTorch threads where it would start more than the cores available (its default counts the host's
    cores, not a container's quota): a decode step's threads would wait for each other's time slices. A count the
    user chose (`OMP_NUM_THREADS`) is kept."""
    if "OMP_NUM_THREADS" not in os.environ and torch.get_num_threads() > (cores := available_cores()):
        torch.set_num_threads(cores)
