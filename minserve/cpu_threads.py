"""CPU threading defaults for torch's OpenMP pool: the wait policy (set when minserve is imported,
before torch loads libgomp) and the number of intra-op threads (the CPUs this process may really
use). The user's own OMP_WAIT_POLICY / GOMP_SPINCOUNT / OMP_NUM_THREADS always win. No torch here.

Why: torch's libgomp, unless told otherwise, busy-waits ~300,000 spins at the end of every
parallel region. With as many OpenMP threads as cores, any other runnable thread (another process,
a client on the same box) has to preempt a spinning worker, and the next region then waits a
scheduler time slice for it: on a loaded 2-core AVX2 EPYC a batch-16 decode step took 15-32 s.
Never spinning (PASSIVE) is safe under load but wakes every thread by futex at each of a step's
hundreds of regions: on an idle box it gave 0.4x the output rate of spinning at concurrency 16.
So minserve spins briefly: 10,000 spins cover the gap between a step's back-to-back regions and
cost little when a core is taken. bench/RESULTS.md, "OpenMP wait policy, side by side".
"""
from __future__ import annotations

import math
import os

from minserve import env

OMP_DEFAULTS = {"GOMP_SPINCOUNT": "10000"}
# (quota file, period file or None when the quota file holds both): cgroup v2, then v1
CGROUP_CPU_FILES = (("/sys/fs/cgroup/cpu.max", None),
                    ("/sys/fs/cgroup/cpu/cpu.cfs_quota_us", "/sys/fs/cgroup/cpu/cpu.cfs_period_us"))


def set_omp_defaults() -> bool:
    """Put OMP_DEFAULTS into the environment where the user set nothing. Returns False when torch
    is already imported, which makes it too late for libgomp to see them."""
    import sys

    if not env.omp_wait_policy_set():   # the user's policy wins
        os.environ.update(OMP_DEFAULTS)
    return "torch" not in sys.modules


def usable_cpus() -> int:
    """CPUs this process may run on: its affinity mask, capped by a cgroup CPU quota (a container
    limited to 2 CPUs on a 64-core host would otherwise run 64 threads)."""
    try:
        num = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        num = os.cpu_count() or 1
    quota = _cgroup_cpu_quota()
    return max(1, min(num, math.ceil(quota))) if quota else max(1, num)


def num_torch_threads() -> int | None:
    """The intra-op thread count minserve sets on CPU, or None to leave torch's (the user set
    OMP_NUM_THREADS)."""
    if env.omp_num_threads_set():
        return None
    return usable_cpus()


def _cgroup_cpu_quota() -> float | None:
    """CPUs allowed by cgroup v2 `cpu.max` or v1 `cpu.cfs_quota_us`; None when unlimited."""
    for path, period_path in CGROUP_CPU_FILES:
        try:
            with open(path) as f:
                fields = f.read().split()
            if period_path is None:
                quota, period = fields[0], fields[1]
            else:
                with open(period_path) as f:
                    quota, period = fields[0], f.read().split()[0]
        except (OSError, IndexError):
            continue
        if quota in ("max", "-1"):
            return None
        try:
            return int(quota) / int(period)
        except (ValueError, ZeroDivisionError):
            return None
    return None
