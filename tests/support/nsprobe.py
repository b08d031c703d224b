"""Probing daemons inside a :class:`benchmarks.netlab.NetLab` namespace: run a short client script there
until its output says what a test waits for. Standard library only (the torch-free edge's tests use it)."""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from pathlib import Path

from benchmarks.netlab import NetLab
from tests.support import ROOT

#: Exits 0 when the gRPC health service at ``sys.argv[1]`` answers SERVING.
HEALTH = (
    "import grpc,sys;from grpc_health.v1 import health_pb2 as h,health_pb2_grpc as g;"
    "r=g.HealthStub(grpc.insecure_channel(sys.argv[1])).Check(h.HealthCheckRequest(),timeout=2);"
    "sys.exit(0 if r.status==1 else 1)"
)


def poll(
    lab: NetLab,
    ns: str,
    script: str,
    address: str,
    done: Callable[[str], bool],
    timeout: float,
    log: Path | None = None,
    interval: float = 0.5,
) -> str:
    """Run ``script`` in ``ns`` until ``done(stdout)``, every ``interval`` seconds; returns the last stdout.

    ``log``: the daemon's log file, whose tail the TimeoutError quotes (what the daemon was doing
    when the condition did not come is the first thing a CI failure needs)."""
    deadline, out = time.monotonic() + timeout, ""
    while time.monotonic() < deadline:
        result = lab.run(ns, [sys.executable, "-c", script, address], timeout=30, cwd=ROOT)
        out = result.stdout
        if result.returncode == 0 and done(out):
            return out
        time.sleep(interval)
    tail = ""
    if log is not None:
        lines = log.read_text(errors="replace").splitlines()[-40:]
        tail = f"\n--- last lines of {log.name} ---\n" + "\n".join(lines)
    raise TimeoutError(f"{ns}: condition not met after {timeout}s; last output: {out!r}{tail}")
