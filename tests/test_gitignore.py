"""The virtual environments stay out of git however they were made: `ln -s /elsewhere/.venv .venv` (a
second checkout sharing one environment) is a symlink, which a `.venv/` pattern (directories only) misses."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize("path", [".venv", ".venv-edge"])
def test_the_venvs_are_ignored_as_links_too(path: str) -> None:
    # --no-index asks about the rule itself; a path git has not seen as a directory is taken for a file,
    # as a symlink is.
    ignored = subprocess.run(["git", "check-ignore", "-q", "--no-index", path], cwd=ROOT, check=False)
    assert ignored.returncode == 0, f"{path} is not ignored by .gitignore"
