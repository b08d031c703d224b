"""How many CPUs this process may really use: the cores its affinity mask allows, and no more than a
CPU quota on its cgroup (a container's ``--cpus``, a CFS quota on a weak edge) rounds up to.

torch and ONNX Runtime size their thread pools by the host's cores. Inside a quota of a fraction of a
core, two threads wait on each other at every period's end: an edge limited to 0.1 core took 167 s to
profile resnet18 with torch's default of 2 threads on a 2-core host, 19-22 s with 1. The daemons
therefore default their model threads (``torch_threads: 0``) to :func:`usable_cpus` when it is below the
host's cores (:func:`model_threads`), and otherwise leave the libraries' defaults.

The quota is read by :func:`partitioner.cpu_limits.cgroup_cpu_quota` (both cgroup versions, the
process's own cgroup and every ancestor; the profiler keys its cache by it too).
"""

from __future__ import annotations

import logging
import math
import os
from pathlib import Path

from partitioner.cpu_limits import CGROUP_ROOT, cgroup_cpu_quota

__all__ = ["CGROUP_ROOT", "cgroup_cpu_quota", "limited_threads", "model_threads", "usable_cpus"]

log = logging.getLogger(__name__)


def usable_cpus(proc_cgroup: Path = Path("/proc/self/cgroup"), root: Path = CGROUP_ROOT) -> int:
    """The CPUs this process may use: its affinity mask's count, at most its cgroup quota rounded up; >= 1."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    quota = cgroup_cpu_quota(proc_cgroup, root)
    if quota is not None:
        cores = min(cores, math.ceil(quota))
    return max(1, cores)


def limited_threads(proc_cgroup: Path = Path("/proc/self/cgroup"), root: Path = CGROUP_ROOT) -> int | None:
    """The model threads a limit calls for: :func:`usable_cpus` when an affinity mask or a CPU quota leaves
    this process fewer CPUs than the host has, else None (nothing limits it: torch's and ONNX Runtime's
    own defaults, one thread per physical core, are right)."""
    usable = usable_cpus(proc_cgroup, root)
    return usable if usable < (os.cpu_count() or 1) else None


def model_threads(configured: int) -> int | None:
    """The threads a daemon's model runs on: ``configured`` when set (> 0), else :func:`limited_threads`
    (None: leave the library's default)."""
    if configured > 0:
        return configured
    threads = limited_threads()
    if threads is not None:
        log.info(
            "model threads: %d, the CPUs this process may use (of %d cores; CPU quota %s); torch_threads sets them",
            threads,
            os.cpu_count() or 1,
            cgroup_cpu_quota(),
        )
    return threads
