"""The CPU quota a cgroup puts on this process: v1's ``cpu.cfs_quota_us`` / ``cpu.cfs_period_us`` and v2's
``cpu.max``, at the process's own cgroup and every ancestor (a parent's quota limits its children too); the
tightest one counts. Anything unreadable counts as no quota.

Read by the profiler (a profile measured under a quota is cached apart from one measured without) and by
:mod:`runtime.cpus`, which sizes the daemons' model threads by it. Standard library only: the torch-free
edge reads it too.
"""

from __future__ import annotations

from pathlib import Path

CGROUP_ROOT = Path("/sys/fs/cgroup")


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
