"""runtime.memory: a daemon keeps the pages of its freed buffers for the next request (glibc)."""

from __future__ import annotations

import os
import platform
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

# Allocate and free 3 MB buffers (a large message and its copy, as a request does) and count the page
# faults they cost per round once the process is warm.
CHURN = """
import resource, sys
from runtime.memory import keep_freed_memory
print(keep_freed_memory() if sys.argv[1] == "keep" else "untouched")
def faults():
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(20):
    a = bytearray(3 << 20); b = bytes(a); del a, b
before = faults()
for _ in range(100):
    a = bytearray(3 << 20); b = bytes(a); del a, b
print((faults() - before) / 100)
"""

glibc = pytest.mark.skipif(
    platform.system() != "Linux" or platform.libc_ver()[0] != "glibc", reason="the thresholds are glibc's"
)


def churn(mode: str, **env: str) -> tuple[str, float]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}
    out = subprocess.run(
        [sys.executable, "-c", CHURN, mode],
        capture_output=True,
        text=True,
        check=True,
        cwd=ROOT,
        env={**clean, "PYTHONPATH": str(ROOT), **env},
        timeout=120,
    ).stdout.split()
    return out[0], float(out[1])


@glibc
def test_freed_buffers_are_reused_without_page_faults() -> None:
    assert churn("untouched")[1] > 100  # glibc's defaults hand 3 MB blocks back and fault them in again
    state, faults = churn("keep")
    assert state == "True"
    assert faults < 10


@glibc
def test_the_operators_own_malloc_settings_win() -> None:
    state, faults = churn("keep", MALLOC_TRIM_THRESHOLD_="131072")
    assert state == "False"
    assert faults > 100  # still glibc's behaviour, as the operator asked
