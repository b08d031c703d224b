"""Start and stop the daemons as real processes: ``make demo`` runs on this (the tests and benchmarks too).

The children run ``python -m cloud_node.main`` / ``edge_node.main`` from the directory that holds
the packages this module was imported from (a checkout, or site-packages), so they run the same code.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from runtime.security import ClientTLS
from runtime.serving import open_channel

_CODE_ROOT = Path(__file__).resolve().parent.parent  # holds cleave_cli/, cloud_node/, edge_node/


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class DaemonProcess:
    """A ``cleave-cloud`` or ``cleave-edge`` child process with its log in a file.

    ``tls``: how to reach a daemon that serves TLS (the health check needs no token).
    """

    def __init__(
        self,
        module: str,
        args: list[str],
        port: int,
        log_path: Path,
        env: dict | None = None,
        tls: ClientTLS | None = None,
        command: list[str] | None = None,
    ) -> None:
        """``command``: what runs before ``args`` (default ``[sys.executable, "-m", module]``): another
        interpreter, e.g. the torch-free edge's virtual environment."""
        self.module = module
        self.command = command or [sys.executable, "-m", module]
        self.args = args
        self.port = port
        self.address = f"127.0.0.1:{port}"
        self.log_path = log_path
        self.env = {**os.environ, **(env or {})}
        self.tls = tls
        self.proc: subprocess.Popen | None = None

    def start(self, ready_timeout: float = 120.0) -> DaemonProcess:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                [*self.command, *self.args],
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=_CODE_ROOT,
                env=self.env,
            )
        self.wait_serving(ready_timeout)
        return self

    def wait_serving(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        with open_channel(self.address, tls=self.tls) as channel:
            stub = health_pb2_grpc.HealthStub(channel)
            while time.monotonic() < deadline:
                if self.proc is not None and self.proc.poll() is not None:
                    raise RuntimeError(f"{self.module} exited with {self.proc.returncode}:\n{self.log_tail()}")
                try:
                    reply = stub.Check(health_pb2.HealthCheckRequest(), timeout=1.0)
                    if reply.status == health_pb2.HealthCheckResponse.SERVING:
                        return
                except grpc.RpcError:
                    pass
                time.sleep(0.2)
        raise TimeoutError(f"{self.module} not serving on {self.address} after {timeout}s:\n{self.log_tail()}")

    def stop(self, timeout: float = 30.0) -> int:
        """SIGTERM (drain), then SIGKILL if it does not exit in ``timeout``."""
        if self.proc is None or self.proc.poll() is not None:
            return self.proc.returncode if self.proc else 0
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return self.proc.wait()

    def kill(self) -> None:
        """SIGKILL: the crash case."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()

    def log_tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""


def cloud_process(
    config: Path,
    port: int,
    log_path: Path,
    threads: int | None = None,
    tls: ClientTLS | None = None,
    env: dict | None = None,
) -> DaemonProcess:
    args = ["--config", str(config), "--port", str(port)]
    if threads:
        args += ["--threads", str(threads)]
    return DaemonProcess("cloud_node.main", args, port, log_path, env=env, tls=tls)


def edge_process(
    config: Path,
    port: int,
    cloud_port: int,
    log_path: Path,
    extra: list[str] | None = None,
    threads: int | None = None,
    tls: ClientTLS | None = None,
    env: dict | None = None,
) -> DaemonProcess:
    args = [
        "--config",
        str(config),
        "--port",
        str(port),
        "--cloud",
        f"127.0.0.1:{cloud_port}",
        *(extra or []),
    ]
    if threads:
        args += ["--threads", str(threads)]
    return DaemonProcess("edge_node.main", args, port, log_path, env=env, tls=tls)
