"""Shared fixtures (one cloud and one edge daemon, real processes on loopback, per test session) and the
test layers.

Layers are pytest markers, declared per module with ``pytestmark``:

- ``integration``: starts daemons, servers or subprocesses (real gRPC on loopback); every test that
  uses the ``cloud`` or ``edge`` fixture is marked here;
- ``root``: needs root for network namespaces, ``tc`` or cgroups;
- ``slow``: trains a model or runs for tens of seconds;
- ``unit``: everything else. Added here to every test that has none of the three above, so
  ``pytest -m unit`` (``make test-fast``) runs exactly the tests that need nothing but the process.

Each layer has its own per-test timeout (a test's own ``@pytest.mark.timeout`` wins).

``make test`` runs the suite on two pytest-xdist workers (``--dist loadgroup``): each worker is a process
with its own session fixtures (its own cloud and edge daemons, on free ports). What the workers would
share is kept apart or safe to share: network namespaces carry the worker's pid in their names
(``benchmarks.netlab``), a process writes a cache entry to a file of its own and renames it into place,
and every test that uses the one local Ray instance is in the ``ray`` xdist group, so one worker runs
them all, in order, and shuts Ray down after the last.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
import yaml

from cleave_cli.launch import DaemonProcess, cloud_process, edge_process, free_port
from partitioner.loaded import LoadedModel
from partitioner.models import ModelSpec

# Before any test module imports ray: a Serve handle left over from a Ray test module must not start
# a whole new local Ray cluster (Ray's auto-connect) that then runs beside the rest of the suite.
os.environ.setdefault("RAY_ENABLE_AUTO_CONNECT", "0")
# Profiles are cached whatever the load (partitioner.profile.busy_load): tests that read a profile back, in
# this process or in a daemon they start, must not depend on how busy the machine is.
os.environ.setdefault("CLEAVE_PROFILE_MAX_LOAD", "inf")


def pytest_configure(config: pytest.Config) -> None:
    # The daemons under test run with torch_threads: 1. Reference outputs computed in this process
    # must come from the same kernels to compare bit-exactly: oneDNN picks its convolution algorithm
    # (and so its summation order) by thread count, and on this machine 1 and 2 threads differ in the
    # last bit.
    torch.set_num_threads(1)


LAYER_TIMEOUTS_S = {"unit": 120, "integration": 300, "slow": 600, "root": 600}


DAEMON_FIXTURES = frozenset({"cloud", "edge"})


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        fixtures = set(getattr(item, "fixturenames", ()))
        if DAEMON_FIXTURES & fixtures:
            item.add_marker(pytest.mark.integration)
        if "ray_instance" in fixtures:  # `make test` runs pytest-xdist's loadgroup: one worker holds Ray
            item.add_marker(pytest.mark.xdist_group("ray"))
        layers = [name for name in ("integration", "root", "slow") if item.get_closest_marker(name)]
        if not layers:
            item.add_marker(pytest.mark.unit)
            layers = ["unit"]
        if item.get_closest_marker("timeout") is None:
            item.add_marker(pytest.mark.timeout(max(LAYER_TIMEOUTS_S[name] for name in layers)))


# One local Ray instance for every test module that needs one (test_ray_jobs, test_ray_serving): starting
# and stopping Ray costs seconds each time. Started by the first test that asks for ``ray_instance``,
# shut down right after the last one (not at the end of the session: the modules after it run without
# Ray's processes beside them).
RAY_CPUS = 2
LAST_RAY_USER = pytest.StashKey[bool]()


def stop_shared_ray() -> None:
    """Shut Serve (if a test started it) and the shared Ray instance down; a no-op when none is up."""
    import sys

    ray = sys.modules.get("ray")
    if ray is None or not ray.is_initialized():
        return
    if "ray.serve" in sys.modules:
        sys.modules["ray.serve"].shutdown()
    ray.shutdown()


@pytest.fixture(scope="session")
def ray_instance() -> Iterator[object]:
    """The ``ray`` module, initialised on a local instance with bounded resources (2 CPUs, a 200 MB
    object store, no dashboard). Tests delete what they deploy on it. Skipped, saying why, without Ray."""
    ray = pytest.importorskip("ray", reason="Ray is not installed (pip install 'cleave[ray]')")
    ray.init(num_cpus=RAY_CPUS, object_store_memory=200 << 20, include_dashboard=False, log_to_driver=False)
    try:
        yield ray
    finally:
        stop_shared_ray()


def pytest_collection_finish(session: pytest.Session) -> None:
    # The items that will run, in order: after -k/-m deselection (which happens in modifyitems hooks).
    ray_users = [item for item in session.items if "ray_instance" in getattr(item, "fixturenames", ())]
    if ray_users:
        ray_users[-1].stash[LAST_RAY_USER] = True


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_teardown(item: pytest.Item, nextitem: pytest.Item | None) -> Iterator[None]:
    yield
    if item.stash.get(LAST_RAY_USER, False):
        stop_shared_ray()


MODEL = {"name": "resnet18", "source": "resnet18", "input_shape": [1, 3, 64, 64]}


@pytest.fixture(scope="session")
def daemon_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("daemons")
    (path / "cloud.yaml").write_text(yaml.safe_dump({"models": [MODEL], "torch_threads": 1}))
    (path / "edge.yaml").write_text(
        yaml.safe_dump(
            {
                "model": MODEL,
                "torch_threads": 1,
                "request_timeout_s": 20.0,
                # Tests pin their own plans; a fixed start keeps a background planner off the CPU.
                "plan": {"cut": "cloud", "encoding": "fp32"},
                "reconnect": {"initial_s": 0.1, "max_s": 0.5, "connect_timeout_s": 2.0},
            }
        )
    )
    return path


@pytest.fixture(scope="session")
def local_model() -> LoadedModel:
    """The model as the daemons build it, loaded in the test process for reference outputs."""
    return LoadedModel.load(ModelSpec.from_dict(MODEL))


@pytest.fixture(scope="session")
def cloud(daemon_dir: Path) -> Iterator[DaemonProcess]:
    proc = cloud_process(daemon_dir / "cloud.yaml", free_port(), daemon_dir / "cloud.log").start()
    yield proc
    proc.stop()


@pytest.fixture(scope="session")
def edge(daemon_dir: Path, cloud: DaemonProcess) -> Iterator[DaemonProcess]:
    proc = edge_process(daemon_dir / "edge.yaml", free_port(), cloud.port, daemon_dir / "edge.log").start()
    yield proc
    proc.stop()
