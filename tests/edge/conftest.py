"""Fixtures of the torch-free edge's tests. Imports no torch: ``make test-edge`` runs this directory in
``.venv-edge``, which has none, with ``--confcutdir tests/edge`` (tests/conftest.py imports torch).

The edge daemon always runs with torch blocked (``sys.modules['torch'] = None``), so these tests
prove the edge needs no torch in the full environment too. The cloud, and the bundle it serves,
come from an interpreter that has torch: ``CLEAVE_CLOUD_PYTHON`` (the Makefile sets it to
``.venv/bin/python``), else this interpreter when it has torch, else ``.venv/bin/python``.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

#: The edge daemon, with torch and torchvision made unimportable before anything loads.
LIGHT_EDGE = [
    sys.executable,
    "-c",
    "import sys; sys.modules['torch'] = None; sys.modules['torchvision'] = None; "
    "from edge_node.main import main; sys.exit(main(sys.argv[1:]))",
]

MODEL = {"name": "resnet18", "source": "resnet18", "input_shape": [1, 3, 64, 64]}
# As in tests/conftest.py: profiles (the cloud's, the bundle's) are cached whatever the load.
os.environ.setdefault("CLEAVE_PROFILE_MAX_LOAD", "inf")


def pytest_configure(config: pytest.Config) -> None:
    # Registered in pyproject.toml too; repeated here for a run whose rootdir config is not read.
    config.addinivalue_line("markers", "edge: the torch-free edge's own tests (make test-edge)")


def cloud_python() -> str:
    """An interpreter with torch, for the cloud daemon and for building bundles."""
    explicit = os.environ.get("CLEAVE_CLOUD_PYTHON")
    if explicit:
        return explicit
    if importlib.util.find_spec("torch") is not None:
        return sys.executable
    candidate = ROOT / ".venv" / "bin" / "python"
    if candidate.exists():
        return str(candidate)
    pytest.fail("no interpreter with torch for the cloud: set CLEAVE_CLOUD_PYTHON (make test-edge does)")


def child_env(cache: Path) -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(ROOT), "CLEAVE_CACHE": str(cache)}


@pytest.fixture(scope="session")
def edge_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("edge-cache")


def build_bundle(out: Path, cache: Path, input_shape: list[int], max_cuts: int = 3) -> Path:
    """resnet18 at ``input_shape`` with ``max_cuts`` candidate cuts, built by the cloud's interpreter."""
    argv = [cloud_python(), "-m", "cleave_cli.main", "bundle", "--model", "resnet18"]
    argv += ["--input-shape", ",".join(map(str, input_shape)), "--max-cuts", str(max_cuts)]
    argv += ["--calibration", "synthetic", "--out", str(out)]
    done = subprocess.run(argv, cwd=ROOT, env=child_env(cache), capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return out


@pytest.fixture(scope="session")
def edge_bundle(tmp_path_factory: pytest.TempPathFactory, edge_cache: Path) -> Path:
    """resnet18 at 64x64 (:data:`MODEL`) with three candidate cuts (``cleave bundle``)."""
    return build_bundle(tmp_path_factory.mktemp("bundle") / "resnet18", edge_cache, MODEL["input_shape"])
