"""How many CPUs this process may really use: the cores its affinity mask allows, and no more than a
CPU quota on its cgroup (a container's ``--cpus``, a CFS quota on a weak edge) rounds up to.

torch and ONNX Runtime size their thread pools by the host's cores. Inside a quota of a fraction of a
core, two threads wait on each other at every period's end: an edge limited to 0.1 core took 167 s to
profile resnet18 with torch's default of 2 threads on a 2-core host, 19-22 s with 1. The daemons
therefore default their model threads (``torch_threads: 0``) to :func:`usable_cpus` when it is below the
host's cores (:func:`model_threads`), and otherwise leave the libraries' defaults.

Both cgroup versions are read: v1's ``cpu.cfs_quota_us`` / ``cpu.cfs_period_us`` and v2's ``cpu.max``,
at the process's own cgroup and every ancestor (a parent's quota limits its children too); the
tightest one counts. Anything unreadable counts as no quota.
"""

from __future__ import annotations

import logging
import math
import os
from pathlib import Path

log = logging.getLogger(__name__)

CGROUP_ROOT = Path("/sys/fs/cgroup")


def usable_cpus(proc_cgroup: Path = Path("/proc/self/cgroup"), root: Path = CGROUP_ROOT) -> int:
    """The CPUs this process may use: its affinity mask's count, at most its cgroup quota rounded up; >= 1."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    quota = cgroup_cpu_quota(proc_cgroup, root)
    if quota is not None:
        cores = min(cores, math.ceil(quota))
    return max(1, cores)


def cgroup_cpu_quota(proc_cgroup: Path = Path("/proc/self/cgroup"), root: Path = CGROUP_ROOT) -> float | None:
    """The tightest CPU quota (in CPUs: 0.1 is a tenth of a core) over this process's cgroup and its
    ancestors, or None when there is none (or none can be read)."""
    try:
        lines = proc_cgroup.read_text().splitlines()
    except OSError:
        return None
    quotas = []
    for line in lines:
        parts = line.split(":", 2)
        if len(parts) != 3:
            continue
        _, controllers, path = parts
        if controllers == "":  # cgroup v2: one unified hierarchy
            mounts = [root] if (root / "cgroup.controllers").exists() else [root / "unified"]
            read = _v2_quota
        elif "cpu" in controllers.split(","):  # cgroup v1: the cpu controller's own hierarchy
            mounts = [root / name for name in ("cpu", "cpu,cpuacct", controllers)]
            read = _v1_quota
        else:
            continue
        for mount in mounts:
            if mount.is_dir():
                quotas += [q for q in map(read, _self_and_ancestors(mount, path)) if q is not None]
                break
    return min(quotas) if quotas else None


def _self_and_ancestors(mount: Path, path: str) -> list[Path]:
    parts = [p for p in path.strip("/").split("/") if p and p not in (".", "..")]
    return [mount.joinpath(*parts[:n]) for n in range(len(parts), -1, -1)]


def _v1_quota(cgroup: Path) -> float | None:
    try:
        quota = int((cgroup / "cpu.cfs_quota_us").read_text())
        period = int((cgroup / "cpu.cfs_period_us").read_text())
    except (OSError, ValueError):
        return None
    return quota / period if quota > 0 and period > 0 else None


def _v2_quota(cgroup: Path) -> float | None:
    try:
        quota, period = (cgroup / "cpu.max").read_text().split()
        quota_us, period_us = int(quota), int(period)  # "max 100000" (no quota) fails here
    except (OSError, ValueError):
        return None
    return quota_us / period_us if quota_us > 0 and period_us > 0 else None


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
