"""A port is held by one daemon only, and an idle link survives the keepalive pings its two ends agree on."""

from __future__ import annotations

import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
import yaml
from grpc_health.v1 import health_pb2, health_pb2_grpc

from cleave_cli.client import EdgeClient
from cleave_cli.images import synthetic_images
from cleave_cli.launch import DaemonProcess, cloud_process, edge_process, free_port
from protos.cleave.v1 import edge_pb2
from runtime.serving import Daemon, Keepalive, PortInUse, open_channel
from tests.support import ROOT

from .conftest import MODEL
from .test_daemons import healthy

pytestmark = [pytest.mark.integration]


def run_second(module: str, args: list[str], timeout: float = 240.0) -> subprocess.CompletedProcess:
    """Start a daemon that should refuse to start; one still running after ``timeout`` fails the test."""
    proc = subprocess.Popen(
        [sys.executable, "-m", module, *args], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.communicate()
        pytest.fail(f"a second {module} started on a port another daemon holds")
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def test_second_cloud_on_the_same_port_exits_and_the_first_keeps_serving(
    cloud: DaemonProcess, daemon_dir: Path
) -> None:
    second = run_second("cloud_node.main", ["--config", str(daemon_dir / "cloud.yaml"), "--port", str(cloud.port)])
    assert second.returncode != 0
    assert f"port {cloud.port} is already in use" in second.stderr
    assert f"127.0.0.1:{cloud.port}" in second.stderr
    assert "Traceback" not in second.stderr
    assert cloud.proc is not None and cloud.proc.poll() is None
    assert healthy(cloud.address)


def test_second_edge_on_the_same_port_exits_and_the_first_keeps_serving(
    edge: DaemonProcess, cloud: DaemonProcess, daemon_dir: Path
) -> None:
    args = ["--config", str(daemon_dir / "edge.yaml"), "--port", str(edge.port), "--cloud", cloud.address]
    second = run_second("edge_node.main", args)
    assert second.returncode != 0
    assert f"port {edge.port} is already in use" in second.stderr
    assert edge.proc is not None and edge.proc.poll() is None
    assert healthy(edge.address)


def test_metrics_port_in_use_is_named(cloud: DaemonProcess, daemon_dir: Path) -> None:
    # The metrics endpoint binds first, so this fails before any model is loaded.
    args = ["--config", str(daemon_dir / "cloud.yaml"), "--port", str(free_port()), "--metrics", str(cloud.port)]
    second = run_second("cloud_node.main", args, timeout=120.0)
    assert second.returncode != 0
    assert f"metrics.listen 127.0.0.1:{cloud.port}: port {cloud.port} is already in use" in second.stderr
    assert "Traceback" not in second.stderr  # the message came inside an UnboundLocalError's traceback
    assert healthy(cloud.address)


def test_daemon_refuses_a_port_another_daemon_holds() -> None:
    first = Daemon("127.0.0.1:0", [])
    first.start()
    try:
        with pytest.raises(PortInUse, match=f"port {first.port} is already in use"):
            Daemon(f"127.0.0.1:{first.port}", [])
    finally:
        first.stop(0)


# Keepalive: 1 s pings, held 7 s, so a server that does not permit them has answered GOAWAY by then
# (gRPC's default of 2 ping strikes: the third early ping, ~3 s in).
FAST = Keepalive(interval_ms=1000, timeout_ms=5000)
HOLD_S = 7.0


@pytest.fixture
def idle_watch() -> Iterator[callable]:
    """Open a Health.Watch stream (idle until the status changes) from a FAST-pinging client to a
    server with the given keepalive; after HOLD_S, change the status and return what the stream got."""
    made: list = []

    def watch(server_keepalive: Keepalive) -> list:
        daemon = Daemon("127.0.0.1:0", [], keepalive=server_keepalive)
        daemon.start()
        channel = open_channel(f"127.0.0.1:{daemon.port}", keepalive=FAST)
        made.append((daemon, channel))
        stream = health_pb2_grpc.HealthStub(channel).Watch(health_pb2.HealthCheckRequest(service=""), timeout=60)
        seen = [next(stream).status]
        timer = threading.Timer(HOLD_S, daemon.health.set, ("", health_pb2.HealthCheckResponse.NOT_SERVING))
        timer.start()
        try:
            seen.append(next(stream).status)
        except grpc.RpcError as exc:
            seen.append(exc)
        timer.join()
        return seen

    yield watch
    for daemon, channel in made:
        channel.close()
        daemon.stop(0)


def test_idle_stream_outlives_many_keepalive_pings_when_both_ends_agree(idle_watch) -> None:
    started = time.monotonic()
    seen = idle_watch(FAST)
    assert seen == [health_pb2.HealthCheckResponse.SERVING, health_pb2.HealthCheckResponse.NOT_SERVING]
    assert time.monotonic() - started >= HOLD_S  # the stream sat idle through ~7 pings


def test_server_that_does_not_permit_the_pings_answers_goaway(idle_watch) -> None:
    # The mismatch this module guards against: a server permitting one ping per 5 minutes (gRPC's
    # default) and a client pinging every second. The test above would fail the same way.
    seen = idle_watch(Keepalive(interval_ms=600_000))
    assert seen[0] == health_pb2.HealthCheckResponse.SERVING
    assert isinstance(seen[1], grpc.RpcError), seen
    assert seen[1].code() == grpc.StatusCode.UNAVAILABLE
    assert "too many pings" in (seen[1].details() or "").lower()


def test_default_pair_agrees() -> None:
    from runtime.serving import KEEPALIVE

    assert KEEPALIVE.min_ping_interval_ms < KEEPALIVE.interval_ms
    server = dict(KEEPALIVE.server_options())
    client = dict(KEEPALIVE.client_options())
    assert server["grpc.keepalive_permit_without_calls"] == client["grpc.keepalive_permit_without_calls"] == 1
    assert server["grpc.http2.min_ping_interval_without_data_ms"] <= client["grpc.keepalive_time_ms"]
    with pytest.raises(ValueError, match="interval_ms"):
        Keepalive(interval_ms=0)


def edge_status_after_idle(
    tmp_path: Path, cloud_keepalive: dict, hold_s: float = 8.0
) -> tuple[int, int, edge_pb2.EdgeInferResponse]:
    """A real cloud with ``cloud_keepalive`` and an edge pinging every second, the edge's stream to
    the cloud open and idle for ``hold_s``: (sessions opened before, after, an inference after)."""
    fast = {"interval_ms": 1000, "timeout_ms": 5000}
    (tmp_path / "cloud.yaml").write_text(
        yaml.safe_dump({"models": [MODEL], "torch_threads": 1, "keepalive": cloud_keepalive})
    )
    edge_yaml = {
        "model": MODEL,
        "torch_threads": 1,
        "plan": {"cut": "cloud", "encoding": "fp32"},
        "reconnect": {"initial_s": 0.1, "max_s": 0.5, "connect_timeout_s": 3.0},
        "keepalive": fast,
    }
    (tmp_path / "edge.yaml").write_text(yaml.safe_dump(edge_yaml))
    cloud = cloud_process(tmp_path / "cloud.yaml", free_port(), tmp_path / "cloud.log").start()
    try:
        edge = edge_process(tmp_path / "edge.yaml", free_port(), cloud.port, tmp_path / "edge.log").start()
        client = EdgeClient(edge.address)
        try:
            x = synthetic_images(1, tuple(MODEL["input_shape"]), seed=1)
            client.infer(x)  # the stream to the cloud is up and has carried a request
            before = client.status().counters.sessions_opened
            time.sleep(hold_s)  # idle: only keepalive pings cross the link
            after = client.status().counters.sessions_opened
            return before, after, client.infer(x)
        finally:
            client.close()
            edge.stop()
    finally:
        cloud.stop()


def test_idle_edge_to_cloud_stream_is_not_reconnected_when_keepalives_agree(tmp_path: Path) -> None:
    before, after, reply = edge_status_after_idle(tmp_path, {"interval_ms": 1000, "timeout_ms": 5000})
    assert before >= 1 and after == before  # ~8 pings, no GOAWAY, no reconnect
    assert reply.placement == edge_pb2.CLOUD_ONLY
    assert "too_many_pings" not in (tmp_path / "edge.log").read_text()


def test_idle_edge_to_cloud_stream_breaks_when_the_cloud_does_not_permit_the_pings(tmp_path: Path) -> None:
    # The mismatch the defaults had: a cloud permitting one ping per 5 minutes (gRPC's default), an
    # edge pinging far more often. The test above is what catches it.
    before, after, _ = edge_status_after_idle(tmp_path, {"interval_ms": 600_000})
    assert after > before
    assert "too_many_pings" in (tmp_path / "edge.log").read_text()  # gRPC core logs the GOAWAY it got
