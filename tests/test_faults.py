"""Fault tolerance under load: the cloud crashes, the link is cut, the cloud is too slow, limits are hit.

With concurrent edge requests in flight, every accepted request completes exactly once with a correct
output (split, or finished locally on the edge), the edge reconnects with backoff and goes back to split
mode, and limits answer RESOURCE_EXHAUSTED while the daemon keeps serving. Each scenario records its
numbers in ``tmp_path/report.json`` and prints them (``pytest -s`` shows them).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import ExitStack
from pathlib import Path

import pytest
import yaml

from benchmarks.netlab import NetLab
from cleave_cli.client import EdgeClient
from cleave_cli.launch import DaemonProcess, cloud_process, edge_process, free_port
from tests.support import ROOT
from tests.support.factories import TAIL_SLEEP_ENV
from tests.support.load import Load, Report, references

pytestmark = [pytest.mark.integration]

MODEL = {"name": "resnet18", "source": "resnet18", "input_shape": [1, 3, 64, 64]}
CUT = "layer2_0_relu"  # mid-network: a residual block's inner activation, so the live set is two tensors
RECONNECT = {"initial_s": 0.1, "max_s": 1.0, "connect_timeout_s": 2.0}


def write_yaml(path: Path, data: dict) -> Path:
    path.write_text(yaml.safe_dump(data))
    return path


def save(tmp_path: Path, name: str, numbers: dict, report: Report) -> None:
    """Keep the full report for diagnosis and print the numbers the README quotes."""
    (tmp_path / f"{name}.json").write_text(report.to_json())
    print(f"\n{name}: {json.dumps(numbers)}")


@pytest.fixture(scope="module")
def refs() -> tuple[list, list]:
    return references(MODEL)


def test_cloud_sigkill_under_load(tmp_path: Path, refs: tuple[list, list]) -> None:
    timeout_s = 2.0
    cloud_yaml = write_yaml(tmp_path / "cloud.yaml", {"models": [MODEL], "torch_threads": 1})
    edge_yaml = write_yaml(
        tmp_path / "edge.yaml",
        {
            "model": MODEL,
            "torch_threads": 1,
            "request_timeout_s": timeout_s,
            "plan": {"cut": CUT, "encoding": "int8"},
            "reconnect": RECONNECT,
        },
    )
    port = free_port()
    cloud = cloud_process(cloud_yaml, port, tmp_path / "cloud.log").start()
    edge = edge_process(edge_yaml, free_port(), port, tmp_path / "edge.log").start()
    load = Load(edge.address, *refs, unary=6, streams=2, pause_s=0.1)
    try:
        client = EdgeClient(edge.address)
        before = client.status().counters
        load.start()
        load.wait_until(lambda r: len(r.split()) >= 16, 30, "split replies before the kill")
        killed = time.monotonic()
        cloud.kill()
        load.wait_until(lambda r: any(x.sent > killed for x in r.local()), 15, "local replies after the kill")
        time.sleep(max(0.0, killed + 1.5 - time.monotonic()))
        cloud = cloud_process(cloud_yaml, port, tmp_path / "cloud2.log").start()
        back = time.monotonic()  # serving again
        resplit = load.wait_until(lambda r: any(x.sent > back for x in r.split()), 20, "split replies after restart")
        time.sleep(1.0)
        report = load.finish()
        after = client.status().counters
    finally:
        load._stop.set()
        edge.stop()
        cloud.stop()

    numbers = {
        **report.summary(),
        "local_during_outage": sum(1 for r in report.local() if killed <= r.sent <= back),
        "outage_s": round(back - killed, 2),
        "back_to_split_s": round(resplit - back, 2),
        "fallback_counter": after.fallback - before.fallback,
        "reconnects": after.reconnects - before.reconnects,
    }
    save(tmp_path, "sigkill", numbers, report)
    assert report.problems() == []
    assert numbers["local_during_outage"] > 0
    assert numbers["back_to_split_s"] < 15
    # Nobody waited on the dead cloud past the deadline (plus the local tail and a loaded machine's slack).
    assert numbers["max_latency_s"] < timeout_s + 3.0, numbers
    # The edge's counters agree with what the app saw, one for one.
    assert after.requests - before.requests == len(report.sent)
    assert after.fallback - before.fallback == len(report.local())
    assert after.split - before.split == len(report.split())
    assert after.errors == before.errors
    assert numbers["reconnects"] >= 1


# -- the link is cut --------------------------------------------------------------------------------------------
HEALTH = (
    "import grpc,sys;from grpc_health.v1 import health_pb2 as h,health_pb2_grpc as g;"
    "r=g.HealthStub(grpc.insecure_channel(sys.argv[1])).Check(h.HealthCheckRequest(),timeout=2);"
    "sys.exit(0 if r.status==1 else 1)"
)


def wait_healthy(lab: NetLab, ns: str, address: str, timeout: float = 120) -> None:
    """Poll ``address`` from inside ``ns`` until its health check says SERVING."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if lab.run(ns, [sys.executable, "-c", HEALTH, address], timeout=30, cwd=ROOT).returncode == 0:
            return
        time.sleep(0.5)
    raise TimeoutError(f"{address} in {ns} not serving after {timeout}s")


@pytest.mark.skipif(not NetLab.available()[0], reason=f"needs network namespaces: {NetLab.available()[1]}")
def test_link_cut_under_load(tmp_path: Path) -> None:
    timeout_s, cut_s = 1.0, 4.0
    port, edge_port = free_port(), free_port()
    env = {**os.environ, "CLEAVE_CACHE": str(tmp_path / "cache")}
    with ExitStack() as stack:
        lab = stack.enter_context(NetLab("cleave-faults"))
        cloud_address = f"{lab.cloud_ip}:{port}"
        cloud_yaml = write_yaml(
            tmp_path / "cloud.yaml",
            {"models": [MODEL], "torch_threads": 1, "listen": cloud_address, "allow_insecure_public": True},
        )
        edge_yaml = write_yaml(
            tmp_path / "edge.yaml",
            {
                "model": MODEL,
                "torch_threads": 1,
                "listen": f"127.0.0.1:{edge_port}",
                "cloud": cloud_address,
                "request_timeout_s": timeout_s,
                "plan": {"cut": CUT, "encoding": "int8"},
                "reconnect": RECONNECT,
            },
        )
        logs = {n: stack.enter_context(open(tmp_path / f"{n}.log", "wb")) for n in ("cloud", "edge", "load")}
        argv = [sys.executable, "-m", "cloud_node.main", "--config", str(cloud_yaml)]
        lab.popen(lab.cloud_ns, argv, stdout=logs["cloud"], stderr=logs["cloud"], cwd=ROOT, env=env)
        wait_healthy(lab, lab.edge_ns, cloud_address)  # across the veth
        argv = [sys.executable, "-m", "edge_node.main", "--config", str(edge_yaml)]
        lab.popen(lab.edge_ns, argv, stdout=logs["edge"], stderr=logs["edge"], cwd=ROOT, env=env)
        wait_healthy(lab, lab.edge_ns, f"127.0.0.1:{edge_port}")

        ready, resume = tmp_path / "ready", tmp_path / "resume"
        argv = [sys.executable, "-m", "tests.support.load", "--edge", f"127.0.0.1:{edge_port}"]
        argv += ["--model", json.dumps(MODEL)]
        argv += ["--seconds", "90", "--ready-file", str(ready), "--ready-split", "16", "--resume-file", str(resume)]
        argv += ["--pause", "0.1"]
        driver = lab.popen(lab.edge_ns, argv, stdout=subprocess.PIPE, stderr=logs["load"], cwd=ROOT, text=True, env=env)
        deadline = time.monotonic() + 60
        while not ready.exists() and driver.poll() is None and time.monotonic() < deadline:
            time.sleep(0.1)
        assert ready.exists(), "no split replies before the cut"
        down = time.monotonic()
        lab.set_link(False)
        time.sleep(cut_s)
        lab.set_link(True)
        up = time.monotonic()
        resume.write_text(repr(up))
        out, _ = driver.communicate(timeout=90)
    report = Report.from_json(out)
    (tmp_path / "report.json").write_text(out)
    first_split = min((r.done for r in report.split() if r.sent > up), default=None)
    numbers = {
        **report.summary(),
        "local_during_cut": sum(1 for r in report.local() if down <= r.sent <= up),
        "cut_s": round(up - down, 2),
        "back_to_split_s": round(first_split - up, 2) if first_split else None,
    }
    save(tmp_path, "link_cut", numbers, report)
    assert report.problems() == []
    assert numbers["local_during_cut"] > 0
    assert first_split is not None and numbers["back_to_split_s"] < 15, numbers
    # No request waited on the dead link past the deadline (plus the local tail and a loaded machine's slack).
    assert numbers["max_latency_s"] < timeout_s + 3.0, numbers
    assert max(r.edge_ms for r in report.ok()) < (timeout_s + 1.0) * 1e3
    reachable = [s["reachable"] for s in report.status if s["t"] > first_split + 0.5]
    assert reachable and all(reachable), report.status[-5:]


# -- the cloud is slower than the deadline ----------------------------------------------------------------------
SLOW = {"name": "slow", "source": "tests.support.factories:slow_tail_cnn", "input_shape": [1, 3, 16, 16]}
CLOUD_SLEEP_S = 2.0


@pytest.fixture(scope="module")
def slow_cloud(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DaemonProcess]:
    """A cloud whose tail sleeps CLOUD_SLEEP_S per request (the edge's copy of the model does not)."""
    path = tmp_path_factory.mktemp("slow")
    config = write_yaml(path / "cloud.yaml", {"models": [SLOW], "torch_threads": 1})
    port = free_port()
    args = ["--config", str(config), "--port", str(port)]
    proc = DaemonProcess("cloud_node.main", args, port, path / "cloud.log", env={TAIL_SLEEP_ENV: str(CLOUD_SLEEP_S)})
    yield proc.start()
    proc.kill()  # its streams hold seconds of abandoned work; nothing to drain


def slow_edge(tmp_path: Path, cloud: DaemonProcess, **config) -> DaemonProcess:
    data = {"model": SLOW, "torch_threads": 1, "plan": {"cut": "relu", "encoding": "int8"}, "reconnect": RECONNECT}
    edge_yaml = write_yaml(tmp_path / "edge.yaml", {**data, **config})
    return edge_process(edge_yaml, free_port(), cloud.port, tmp_path / "edge.log").start()


def test_slow_cloud_falls_back_within_the_deadline(tmp_path: Path, slow_cloud: DaemonProcess) -> None:
    timeout_s = 0.5
    edge = slow_edge(tmp_path, slow_cloud, request_timeout_s=timeout_s)
    load = Load(edge.address, *references(SLOW), unary=3, streams=1, pause_s=0.05)
    try:
        client = EdgeClient(edge.address)
        before = client.status().counters
        load.start()
        # Several times the cloud's sleep: late answers come back while requests are still being sent.
        time.sleep(3 * CLOUD_SLEEP_S)
        report = load.finish()
        after = client.status().counters
    finally:
        load._stop.set()
        edge.stop()
    slowest_edge_ms = max((r.edge_ms for r in report.ok()), default=0.0)
    numbers = {**report.summary(), "deadline_s": timeout_s, "slowest_edge_ms": round(slowest_edge_ms, 1)}
    save(tmp_path, "slow_cloud", numbers, report)
    assert report.problems() == []
    assert len(report.sent) >= 8
    assert len(report.local()) == len(report.sent), "a reply came from a cloud slower than the deadline"
    # The deadline plus the local tail (a tiny CNN: milliseconds) plus scheduling slack.
    assert slowest_edge_ms < timeout_s * 1e3 + 250, numbers
    assert numbers["max_latency_s"] < timeout_s + 1.5, numbers
    # Late cloud answers were dropped: the edge counted each request once, and none as split.
    assert after.requests - before.requests == len(report.sent)
    assert after.fallback - before.fallback == len(report.sent)
    assert after.split == before.split and after.errors == before.errors


def test_limits_answer_resource_exhausted_and_the_daemon_keeps_serving() -> None:
    """Sessions, requests in assembly and message size each have a limit; past it, RESOURCE_EXHAUSTED."""
    import grpc
    import torch

    from cloud_node.config import CloudConfig
    from cloud_node.main import build_daemon
    from compressor import RAW_UNCOMPRESSED, decode, encode, to_chunks
    from partitioner.loaded import LoadedModel, as_tensor_list
    from partitioner.models import ModelSpec, calibration_batch
    from protos.cleave.v1 import split_inference_pb2 as si_pb2
    from protos.cleave.v1 import split_inference_pb2_grpc as si_grpc

    tiny = {"name": "tiny", "source": "tests.support.factories:tiny_cnn", "input_shape": [1, 3, 16, 16]}
    limits = {"max_sessions": 2, "max_pending_requests": 2, "max_message_bytes": 64 << 10}
    config = CloudConfig.from_dict({"listen": "127.0.0.1:0", "models": [tiny], "limits": limits})
    daemon = build_daemon(config)
    port = daemon.start()
    local = LoadedModel.load(ModelSpec.from_dict(tiny))
    cut = local.graph.cuts[len(local.graph.cuts) // 2]
    _, head, tail = local.parts(cut.name)
    x = calibration_batch(tiny["input_shape"], 1, seed=5)
    with torch.inference_mode():
        features = head(x)
        expected = as_tensor_list(tail(*features))[0]
    open_request = si_pb2.OpenSessionRequest(model="tiny", fingerprint=local.fingerprint, cut=cut.name)
    try:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = si_grpc.SplitInferenceStub(channel)
            first, _second = (stub.OpenSession(open_request, timeout=10).session_id for _ in range(2))
            with pytest.raises(grpc.RpcError) as err:
                stub.OpenSession(open_request, timeout=10)
            assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert "limit of 2" in err.value.details()

            # A message over max_message_bytes is refused by gRPC before any handler runs.
            big = si_pb2.OpenSessionRequest(model="tiny", client="x" * (128 << 10))
            with pytest.raises(grpc.RpcError) as err:
                stub.OpenSession(big, timeout=10)
            assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED

            # Three requests left half-sent on one stream: the third is refused, the stream goes on.
            chunks = [c for group in to_chunks([encode(t, RAW_UNCOMPRESSED) for t in features], 1 << 20) for c in group]
            frames = [si_pb2.InferFrame(session_id=first, request_id=rid, chunks=chunks[:1]) for rid in (1, 2, 3)]
            frames.append(si_pb2.InferFrame(request_id=1, chunks=chunks[1:], last=True))  # 1 completes
            frames.append(si_pb2.InferFrame(session_id=first, request_id=4, chunks=chunks, last=True))  # room again
            replies = [r for r in stub.Infer(iter(frames), timeout=30) if r.last]
            refused = [r for r in replies if r.HasField("error")]
            assert [(r.request_id, r.error.code) for r in refused] == [(3, grpc.StatusCode.RESOURCE_EXHAUSTED.value[0])]
            assert "more than 2 requests in assembly" in refused[0].error.message
            assert sorted(r.request_id for r in replies if not r.HasField("error")) == [1, 4]

            # Within the limits everything still works: closing a session frees its slot.
            stub.CloseSession(si_pb2.CloseSessionRequest(session_id=first), timeout=10)
            third = stub.OpenSession(open_request, timeout=10).session_id
            frame = si_pb2.InferFrame(session_id=third, request_id=9, chunks=chunks, last=True)
            (result,) = [r for r in stub.Infer(iter([frame]), timeout=30) if r.last]
            assert not result.HasField("error"), result.error.message
            (header,) = [c.header for c in result.chunks if c.HasField("header")]
            header.payload = b"".join(c.data for c in result.chunks)
            torch.testing.assert_close(decode(header), expected)
    finally:
        daemon.stop(grace=1)
