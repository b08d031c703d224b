"""Which directories the job sandbox hides and what it binds back (``cloud_node.jobs.sandbox``).

A job runs as an unprivileged user; Python's files may sit under a directory that user cannot enter
(``/root``, or a CI checkout cloned into ``mktemp -d``, mode 0700). The sandbox hides such a directory
behind an empty tmpfs and binds back only what Python needs.
"""

from __future__ import annotations

import pwd
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from cloud_node.jobs.sandbox import _hidden_ancestors

pytestmark = pytest.mark.unit

NOBODY = pwd.getpwnam("nobody")


@pytest.fixture
def open_tmp() -> Iterator[Path]:
    """A scratch directory ``nobody`` can enter (pytest's own ``tmp_path`` sits under a closed one)."""
    root = Path(tempfile.mkdtemp(dir="/tmp"))
    root.chmod(0o755)
    yield root
    shutil.rmtree(root)


def _tree(root: Path) -> Path:
    checkout = root / "checkout"
    for name in ("cloud_node", "compressor", ".venv/lib"):
        (checkout / name).mkdir(parents=True)
    (checkout / "pyproject.toml").write_text("")
    return checkout


def test_a_closed_ancestor_exposes_only_the_child_on_the_way(open_tmp: Path) -> None:
    checkout = _tree(open_tmp)
    checkout.chmod(0o700)
    hidden = _hidden_ancestors([str(checkout / ".venv/lib")], NOBODY.pw_uid, NOBODY.pw_gid)
    assert hidden == {str(checkout): {str(checkout / ".venv")}}


def test_a_closed_needed_directory_exposes_all_its_entries(open_tmp: Path) -> None:
    # The project checkout itself is what the job needs (an editable install imports from it).
    checkout = _tree(open_tmp)
    checkout.chmod(0o700)
    hidden = _hidden_ancestors([str(checkout), str(checkout / ".venv/lib")], NOBODY.pw_uid, NOBODY.pw_gid)
    assert hidden == {
        str(checkout): {str(checkout / n) for n in ("cloud_node", "compressor", ".venv", "pyproject.toml")}
    }


def test_open_directories_hide_nothing(open_tmp: Path) -> None:
    checkout = _tree(open_tmp)
    checkout.chmod(0o755)
    assert _hidden_ancestors([str(checkout), str(checkout / ".venv/lib")], NOBODY.pw_uid, NOBODY.pw_gid) == {}
