"""runtime.cpus: the CPUs a process may use, from its affinity and its cgroup's CPU quota (read by
partitioner.cpu_limits, which also keys the profile cache)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from partitioner.profile import cpu_quota
from runtime.cpus import cgroup_cpu_quota, limited_threads, model_threads, usable_cpus

ROOT = Path(__file__).resolve().parents[1]
HOST = len(os.sched_getaffinity(0))


def _v1(tmp: Path, path: str, quotas: dict[str, tuple[int, int]]) -> tuple[Path, Path]:
    """A cgroup-v1 layout: /proc/self/cgroup naming ``path`` under the cpu controller, ``quotas`` per directory."""
    root = tmp / "cgroup"
    for where in ["", *quotas]:
        (root / "cpu,cpuacct" / where).mkdir(parents=True, exist_ok=True)
    for where, (quota, period) in quotas.items():
        (root / "cpu,cpuacct" / where / "cpu.cfs_quota_us").write_text(f"{quota}\n")
        (root / "cpu,cpuacct" / where / "cpu.cfs_period_us").write_text(f"{period}\n")
    (root / "cpu").symlink_to(root / "cpu,cpuacct")
    proc = tmp / "proc-cgroup"
    proc.write_text(f"12:memory:/other\n4:cpu,cpuacct:{path}\n0::/\n")
    return proc, root


def _v2(tmp: Path, path: str, cpu_max: dict[str, str]) -> tuple[Path, Path]:
    root = tmp / "cgroup2"
    root.mkdir()
    (root / "cgroup.controllers").write_text("cpu memory\n")
    for where, text in cpu_max.items():
        (root / where).mkdir(parents=True, exist_ok=True)
        (root / where / "cpu.max").write_text(text + "\n")
    proc = tmp / "proc-cgroup"
    proc.write_text(f"0::{path}\n")
    return proc, root


def test_a_v1_quota_of_a_tenth_of_a_core_means_one_thread(tmp_path: Path) -> None:
    proc, root = _v1(tmp_path, "/edge", {"edge": (10_000, 100_000), "": (-1, 100_000)})
    assert cgroup_cpu_quota(proc, root) == pytest.approx(0.1)
    assert usable_cpus(proc, root) == 1


def test_the_tightest_quota_of_the_cgroup_and_its_ancestors_counts(tmp_path: Path) -> None:
    proc, root = _v1(tmp_path, "/lab/edge", {"lab": (50_000, 100_000), "lab/edge": (400_000, 100_000)})
    assert cgroup_cpu_quota(proc, root) == pytest.approx(0.5)
    assert usable_cpus(proc, root) == 1


def test_v2_cpu_max(tmp_path: Path) -> None:
    proc, root = _v2(tmp_path, "/box/app", {"box": "150000 100000", "box/app": "max 100000"})
    assert cgroup_cpu_quota(proc, root) == pytest.approx(1.5)
    assert usable_cpus(proc, root) == min(HOST, 2)


def test_the_profile_cache_keys_a_parents_quota_too(tmp_path: Path) -> None:
    """A daemon in a child of a limited cgroup (a container's slice) is keyed as limited: a profile measured
    there is not reused by a process without the limit, nor the other way round."""
    proc, root = _v2(tmp_path, "/box/app", {"box": "10000 100000", "box/app": "max 100000"})
    assert cpu_quota(proc, root) == "0.100"
    (tmp_path / "free").mkdir()
    proc, root = _v2(tmp_path / "free", "/box/app", {"box": "max 100000", "box/app": "max 100000"})
    assert cpu_quota(proc, root) == "none"


@pytest.mark.parametrize("layout", ["none", "unlimited v1", "unlimited v2", "garbage"])
def test_no_quota_means_every_core_of_the_affinity_mask(tmp_path: Path, layout: str) -> None:
    if layout == "none":
        proc, root = tmp_path / "missing", tmp_path / "nothing"
    elif layout == "unlimited v1":
        proc, root = _v1(tmp_path, "/edge", {"edge": (-1, 100_000)})
    elif layout == "unlimited v2":
        proc, root = _v2(tmp_path, "/edge", {"edge": "max 100000"})
    else:
        proc, root = _v2(tmp_path, "/edge", {"edge": "lots of cpu"})
    assert cgroup_cpu_quota(proc, root) is None
    assert usable_cpus(proc, root) == HOST


def test_a_configured_thread_count_wins_and_no_limit_leaves_the_default(tmp_path: Path) -> None:
    assert model_threads(3) == 3
    proc, root = _v1(tmp_path, "/edge", {"edge": (-1, 100_000)})
    assert limited_threads(proc, root) is None  # unless this very process runs under a limit
    limited = _v1(tmp_path / "q", "/edge", {"edge": (10_000, 100_000)})
    assert limited_threads(*limited) == (1 if os.cpu_count() > 1 else None)


@pytest.mark.root
def test_a_process_started_in_a_real_quota_sees_it(tmp_path: Path) -> None:
    """The daemons' default, on the kernel's own files: a process put in a 0.1-core cgroup before it starts
    (as netlab and the placement benchmark start a weak edge) gets one thread; one outside it, every core."""
    from benchmarks.netlab import cpu_cgroup_parent

    parent = cpu_cgroup_parent()
    if os.geteuid() != 0 or not (parent / "cpu.cfs_quota_us").exists():
        pytest.skip("needs root and the cgroup-v1 cpu controller (as tests/test_netlab.py)")
    cg = parent / f"cleave-test-cpus-{os.getpid()}"
    cg.mkdir()
    try:
        (cg / "cpu.cfs_period_us").write_text("100000")
        (cg / "cpu.cfs_quota_us").write_text("10000")
        code = "from runtime.cpus import model_threads, cgroup_cpu_quota; print(model_threads(0), cgroup_cpu_quota())"
        run = [sys.executable, "-c", code]
        limited = subprocess.run(
            ["sh", "-c", 'echo $$ > "$0" && exec "$@"', str(cg / "cgroup.procs"), *run],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=60,
            check=True,
        ).stdout.split()
        free = subprocess.run(run, cwd=ROOT, capture_output=True, text=True, timeout=60, check=True).stdout.split()
    finally:
        cg.rmdir()
    assert limited == ["1", "0.1"]
    assert free[0] == ("None" if os.cpu_count() == HOST else str(HOST))
