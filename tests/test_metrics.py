"""Prometheus metrics: the RPC interceptor on an in-process server, the /metrics endpoint and its
guards, the cloud's job and batch gauges, and both real daemons counting what they served."""

from __future__ import annotations

import threading
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
import torch
import yaml
from prometheus_client import CollectorRegistry
from prometheus_client.parser import text_string_to_metric_families

from cleave_cli.client import EdgeClient
from cleave_cli.launch import DaemonProcess, cloud_process, edge_process, free_port
from cloud_node.jobs.store import FAILED, QUEUED, RUNNING, JobStore
from cloud_node.metrics import CloudMetrics
from protos.cleave.v1 import edge_pb2, tensor_pb2
from protos.cleave.v1 import split_inference_pb2 as si_pb2
from protos.cleave.v1 import split_inference_pb2_grpc as si_grpc
from protos.errors import InvalidArgument, NotFound, maps_errors
from runtime.metrics import MetricsConfig, RpcMetrics, parse_listen, serve_metrics
from runtime.serving import Daemon, Service
from runtime.settings import SettingsError

pytestmark = [pytest.mark.integration]

SERVICE = si_pb2.DESCRIPTOR.services_by_name["SplitInference"]
SI = "cleave.v1.SplitInference"


# -- helpers --------------------------------------------------------------------------------------


def scrape(url: str) -> list[tuple[str, dict[str, str], float]]:
    """Every sample of a /metrics page, parsed by prometheus_client's own parser."""
    with urllib.request.urlopen(url, timeout=10) as reply:
        text = reply.read().decode()
    return [(s.name, s.labels, s.value) for f in text_string_to_metric_families(text) for s in f.samples]


def total(samples: list[tuple[str, dict[str, str], float]], name: str, **labels: str) -> float:
    """Sum of ``name``'s samples whose labels include ``labels`` (0 when there is none)."""
    return sum(v for n, lab, v in samples if n == name and all(lab.get(k) == w for k, w in labels.items()))


def has(samples: list[tuple[str, dict[str, str], float]], name: str, **labels: str) -> bool:
    return any(n == name and all(lab.get(k) == w for k, w in labels.items()) for n, lab, _ in samples)


def wait_for(check, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        time.sleep(0.05)


# -- the interceptor, in process ------------------------------------------------------------------


class Scripted(si_grpc.SplitInferenceServicer):
    """GetInfo: OK or NOT_FOUND. Probe: echoes; seq 99 fails the stream; seq 7 blocks until cancelled;
    seq 8 replies until cancelled."""

    def __init__(self) -> None:
        self.blocked = threading.Event()

    @maps_errors
    def GetInfo(self, request, context):
        if request.model == "missing":
            raise NotFound("model 'missing' is not served here")
        return si_pb2.GetInfoResponse(version="test")

    @maps_errors
    def Probe(self, request_iterator, context):
        for message in request_iterator:
            if message.seq == 99:
                raise InvalidArgument("seq: 99 is refused")
            if message.seq == 8:  # replies until the client goes away
                while True:
                    yield si_pb2.ProbeMessage(seq=8)
                    time.sleep(0.01)
            if message.seq == 7:
                self.blocked.set()
                while context.is_active():
                    time.sleep(0.01)
                return
            yield si_pb2.ProbeMessage(seq=message.seq, echo=True)


@pytest.fixture()
def served() -> Iterator[tuple[CollectorRegistry, grpc.Channel, Scripted]]:
    registry = CollectorRegistry()
    servicer = Scripted()
    daemon = Daemon("127.0.0.1:0", [Service(servicer, SERVICE)], max_workers=4, interceptors=[RpcMetrics(registry)])
    daemon.start()
    channel = grpc.insecure_channel(f"127.0.0.1:{daemon.port}")
    yield registry, channel, servicer
    channel.close()
    daemon.stop(0)


def handled(registry: CollectorRegistry, method: str, code: str, kind: str) -> float:
    labels = {"grpc_type": kind, "grpc_service": SI, "grpc_method": method, "grpc_code": code}
    return registry.get_sample_value("grpc_server_handled_total", labels) or 0.0


def test_unary_calls_count_by_status_and_are_timed(served) -> None:
    registry, channel, _ = served
    stub = si_grpc.SplitInferenceStub(channel)
    for _ in range(3):
        stub.GetInfo(si_pb2.GetInfoRequest(), timeout=5)
    with pytest.raises(grpc.RpcError) as err:
        stub.GetInfo(si_pb2.GetInfoRequest(model="missing"), timeout=5)
    assert err.value.code() == grpc.StatusCode.NOT_FOUND
    with pytest.raises(grpc.RpcError) as err:  # bytes that are not a GetInfoRequest
        channel.unary_unary(f"/{SI}/GetInfo")(b"\x0a\xff\xff\xff\xff\x0f", timeout=5)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    with pytest.raises(grpc.RpcError) as err:  # the generated base class: set_code + raise
        stub.Profile(si_pb2.ProfileRequest(model="x"), timeout=5)
    assert err.value.code() == grpc.StatusCode.UNIMPLEMENTED

    assert handled(registry, "GetInfo", "OK", "unary") == 3
    assert handled(registry, "GetInfo", "NOT_FOUND", "unary") == 1
    assert handled(registry, "GetInfo", "INVALID_ARGUMENT", "unary") == 1
    assert handled(registry, "Profile", "UNIMPLEMENTED", "unary") == 1
    labels = {"grpc_type": "unary", "grpc_service": SI, "grpc_method": "GetInfo"}
    assert registry.get_sample_value("grpc_server_started_total", labels) == 5
    assert registry.get_sample_value("grpc_server_handling_seconds_count", labels) == 5
    assert registry.get_sample_value("grpc_server_handling_seconds_sum", labels) > 0
    assert registry.get_sample_value("grpc_server_msg_sent_total", labels) == 3  # only the answered ones


def test_streams_count_once_with_their_final_status(served) -> None:
    registry, channel, servicer = served
    stub = si_grpc.SplitInferenceStub(channel)
    labels = {"grpc_type": "bidi_stream", "grpc_service": SI, "grpc_method": "Probe"}

    replies = list(stub.Probe(iter([si_pb2.ProbeMessage(seq=i, echo=True) for i in range(4)]), timeout=5))
    assert [r.seq for r in replies] == [0, 1, 2, 3]
    # While a stream is open it has started but not been handled.
    opened = stub.Probe(iter([si_pb2.ProbeMessage(seq=7)]), timeout=10)
    assert servicer.blocked.wait(5)
    assert registry.get_sample_value("grpc_server_started_total", labels) == 2
    assert registry.get_sample_value("grpc_server_handling_seconds_count", labels) == 1
    opened.cancel()
    wait_for(lambda: handled(registry, "Probe", "CANCELLED", "bidi_stream") == 1)
    # Cancelled while the handler is still producing: gRPC drops the generator mid-stream.
    endless = stub.Probe(iter([si_pb2.ProbeMessage(seq=8)]), timeout=10)
    assert [next(endless).seq for _ in range(2)] == [8, 8]
    endless.cancel()
    wait_for(lambda: handled(registry, "Probe", "CANCELLED", "bidi_stream") == 2)

    with pytest.raises(grpc.RpcError) as err:
        list(stub.Probe(iter([si_pb2.ProbeMessage(seq=1, echo=True), si_pb2.ProbeMessage(seq=99)]), timeout=5))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT

    assert handled(registry, "Probe", "OK", "bidi_stream") == 1
    assert handled(registry, "Probe", "INVALID_ARGUMENT", "bidi_stream") == 1
    assert registry.get_sample_value("grpc_server_started_total", labels) == 4
    assert registry.get_sample_value("grpc_server_handling_seconds_count", labels) == 4
    assert registry.get_sample_value("grpc_server_msg_received_total", labels) == 4 + 1 + 1 + 2
    assert registry.get_sample_value("grpc_server_msg_sent_total", labels) >= 4 + 2 + 1


class Echo(si_grpc.SplitInferenceServicer):
    """Infer: one result per frame, carrying the frame's chunks back."""

    @maps_errors
    def Infer(self, request_iterator, context):
        for frame in request_iterator:
            yield si_pb2.InferResult(request_id=frame.request_id, chunks=frame.chunks, last=frame.last)


def test_cloud_counts_the_infer_bytes_that_crossed_the_wire() -> None:
    registry = CollectorRegistry()
    metrics = CloudMetrics(registry)
    daemon = Daemon("127.0.0.1:0", [Service(Echo(), SERVICE, metrics.wire_bytes())], max_workers=4)
    daemon.start()

    def counted() -> tuple[float, float]:
        return (
            registry.get_sample_value("cleave_cloud_received_bytes_total"),
            registry.get_sample_value("cleave_cloud_sent_bytes_total"),
        )

    try:
        with grpc.insecure_channel(f"127.0.0.1:{daemon.port}") as channel:
            infer = channel.stream_stream(f"/{SI}/Infer")  # bytes both ways: what crossed the wire, exactly
            frames = [
                si_pb2.InferFrame(
                    session_id="s", request_id=i, chunks=[tensor_pb2.TensorChunk(data=bytes(n))], last=True
                ).SerializeToString()
                for i, n in enumerate((0, 1000, 300_000))
            ]
            # request_id 1 as a 2-byte varint: valid, but re-encoding the parsed frame gives 2 bytes, not 3.
            frames.append(b"\x10\x81\x00")
            assert len(si_pb2.InferFrame.FromString(frames[-1]).SerializeToString()) == 2
            results = list(infer(iter(frames), timeout=10))
            assert len(results) == len(frames) and len(results[2]) > 300_000
            assert counted() == (sum(map(len, frames)), sum(map(len, results)))

            # Bytes that are not an InferFrame arrived too: counted, and the stream is refused.
            received, sent = counted()
            with pytest.raises(grpc.RpcError) as err:
                list(infer(iter([b"\x0a\xff\xff\xff\xff\x0f"]), timeout=10))
            assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert counted() == (received + 6, sent)
    finally:
        daemon.stop(0)


# -- the endpoint and its configuration -----------------------------------------------------------


def test_listen_forms_and_guards() -> None:
    assert parse_listen("") is None and parse_listen("0") is None and parse_listen("127.0.0.1:0") is None
    assert parse_listen("9464") == ("127.0.0.1", 9464)
    assert parse_listen("0.0.0.0:9464") == ("0.0.0.0", 9464)
    assert parse_listen("[::1]:9000") == ("::1", 9000)
    for bad in ("host", "localhost:http", "127.0.0.1:70000"):
        with pytest.raises(ValueError, match="metrics.listen"):
            parse_listen(bad)
    with pytest.raises(ValueError, match="allow_insecure_public"):
        serve_metrics("0.0.0.0:9464", CollectorRegistry())
    assert serve_metrics("", CollectorRegistry()) is None
    assert MetricsConfig().enabled is False  # off unless asked for


def test_config_key_and_cli_flag() -> None:
    from cloud_node.config import CloudConfig
    from edge_node.config import EdgeConfig
    from edge_node.main import build_config as edge_config
    from edge_node.main import parse_args as edge_args

    assert CloudConfig.from_dict({"metrics": {"listen": "127.0.0.1:9100"}}).metrics.enabled
    with pytest.raises(SettingsError, match="metrics.lisen: unknown key"):
        CloudConfig.from_dict({"metrics": {"lisen": "9100"}})
    with pytest.raises(ValueError, match="metrics.listen"):
        EdgeConfig.from_dict({"model": {"name": "m", "source": "resnet18"}, "metrics": {"listen": "nine"}})
    config = edge_config(edge_args(["--model", "resnet18", "--metrics", "9200"]))
    assert parse_listen(config.metrics.listen) == ("127.0.0.1", 9200)


def test_endpoint_serves_its_registry_only() -> None:
    mine, other = CollectorRegistry(), CollectorRegistry()
    RpcMetrics(mine).started.labels("unary", "a.B", "C").inc(3)
    RpcMetrics(other).started.labels("unary", "a.B", "C").inc(5)
    endpoint = serve_metrics(f"127.0.0.1:{free_port()}", mine)
    try:
        samples = scrape(endpoint.url)
        assert total(samples, "grpc_server_started_total", grpc_method="C") == 3
    finally:
        endpoint.stop()


# -- cloud gauges ---------------------------------------------------------------------------------


class FakeBatchers:
    def __init__(self) -> None:
        self.listeners = []

    def add_listener(self, on_batch) -> None:
        self.listeners.append(on_batch)

    def queue_depth(self, model: str | None = None) -> int:
        return 5 if model == "m" else 0


class FakeSessions:
    def __init__(self) -> None:
        self.batchers = FakeBatchers()
        self.registry = type("Registry", (), {"models": {"m": None}})()

    def __len__(self) -> int:
        return 2


def test_cloud_gauges_read_jobs_sessions_and_batches(tmp_path: Path) -> None:
    store = JobStore(tmp_path / "jobs")
    jobs = [store.insert_job(b"", "prune") for _ in range(4)]
    store.update(jobs[0].id, state=RUNNING)
    store.update(jobs[1].id, state=FAILED)
    registry, sessions = CollectorRegistry(), FakeSessions()
    CloudMetrics(registry, sessions, store)
    for listener in sessions.batchers.listeners:  # what the batcher calls after each batch
        listener(type("Key", (), {"model": "m"})(), 3, 1.0, 2.0)

    value = registry.get_sample_value
    assert value("cleave_jobs", {"state": QUEUED}) == 2
    assert value("cleave_jobs", {"state": RUNNING}) == 1
    assert value("cleave_jobs", {"state": FAILED}) == 1
    assert value("cleave_cloud_sessions") == 2
    assert value("cleave_cloud_queue_depth", {"model": "m"}) == 5
    assert value("cleave_cloud_batch_size_count", {"model": "m"}) == 1
    assert value("cleave_cloud_batch_size_sum", {"model": "m"}) == 3
    store.close()
    assert value("cleave_jobs", {"state": QUEUED}) is None  # a closed store: the scrape still works


# -- both daemons, real processes -----------------------------------------------------------------

MODEL = {"name": "tiny", "source": "tests.support.factories:tiny_cnn", "input_shape": [1, 3, 16, 16]}


@pytest.fixture(scope="module")
def daemons(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[DaemonProcess, str, DaemonProcess, str]]:
    path = tmp_path_factory.mktemp("metrics")
    cloud_metrics, edge_metrics = free_port(), free_port()
    cloud_yaml = {"models": [MODEL], "torch_threads": 1, "metrics": {"listen": f"127.0.0.1:{cloud_metrics}"}}
    (path / "cloud.yaml").write_text(yaml.safe_dump(cloud_yaml))
    edge_yaml = {
        "model": MODEL,
        "torch_threads": 1,
        "request_timeout_s": 20.0,
        "plan": {"cut": "cloud", "encoding": "fp32"},
        "reconnect": {"initial_s": 0.1, "max_s": 0.5, "connect_timeout_s": 2.0},
    }
    (path / "edge.yaml").write_text(yaml.safe_dump(edge_yaml))
    cloud = cloud_process(path / "cloud.yaml", free_port(), path / "cloud.log").start()
    edge = None
    try:
        extra = ["--metrics", str(edge_metrics)]  # the flag form; the cloud uses the YAML key
        edge = edge_process(path / "edge.yaml", free_port(), cloud.port, path / "edge.log", extra=extra).start()
        yield cloud, f"http://127.0.0.1:{cloud_metrics}/metrics", edge, f"http://127.0.0.1:{edge_metrics}/metrics"
    finally:
        if edge is not None:
            edge.stop()
        cloud.stop()


def test_daemons_count_what_they_served(daemons) -> None:
    cloud, cloud_url, edge, edge_url = daemons
    client = EdgeClient(edge.address)
    x = torch.rand(1, 3, 16, 16)
    try:
        assert all(client.infer(x).placement == edge_pb2.CLOUD_ONLY for _ in range(3))
        with pytest.raises(grpc.RpcError) as err:
            client.infer(torch.rand(1, 3, 8, 8))
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        client.pin(3, "int8")
        assert all(client.infer(x).placement == edge_pb2.SPLIT for _ in range(2))
        client.pin("edge", "int8")
        assert client.infer(x).placement == edge_pb2.EDGE_ONLY

        # Straight to the cloud: a bad OpenSession, and a stream whose one request names no session.
        with grpc.insecure_channel(cloud.address) as channel:
            stub = si_grpc.SplitInferenceStub(channel)
            with pytest.raises(grpc.RpcError) as err:
                stub.OpenSession(si_pb2.OpenSessionRequest(), timeout=5)
            assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            frame = si_pb2.InferFrame(session_id="nope", request_id=1, last=True)
            (result,) = list(stub.Infer(iter([frame]), timeout=10))
            assert result.error.code == grpc.StatusCode.NOT_FOUND.value[0]

        e = scrape(edge_url)
        edge_rpc = {"grpc_service": "cleave.v1.Edge", "grpc_method": "Infer"}
        assert total(e, "grpc_server_handled_total", **edge_rpc, grpc_code="OK") == 6
        assert total(e, "grpc_server_handled_total", **edge_rpc, grpc_code="INVALID_ARGUMENT") == 1
        assert total(e, "grpc_server_started_total", **edge_rpc) == 7
        assert total(e, "grpc_server_handling_seconds_count", **edge_rpc) == 7
        assert total(e, "grpc_server_handled_total", grpc_method="Replan", grpc_code="OK") == 2
        for placement, count in (("cloud", 3), ("split", 2), ("edge", 1), ("local", 0)):
            assert total(e, "cleave_edge_requests_total", placement=placement) == count, placement
            assert total(e, "cleave_edge_request_seconds_count", placement=placement) == count, placement
        for stage, count in (("head", 5), ("encode", 5), ("transfer", 5), ("cloud", 5), ("whole_model", 1)):
            assert total(e, "cleave_edge_stage_seconds_count", stage=stage) == count, stage
        assert total(e, "cleave_edge_plan_switches_total") == 3  # from config, then two pins
        assert total(e, "cleave_edge_inflight") == 0
        assert has(e, "cleave_edge_plan_info", placement="edge")
        sent, received = total(e, "cleave_edge_sent_bytes_total"), total(e, "cleave_edge_received_bytes_total")
        assert sent > 0 and received > 0
        assert total(e, "process_resident_memory_bytes") > 0  # the per-daemon registry has process metrics

        def closed_old_session() -> bool:  # the edge closes the cut-0 session in the background
            return total(scrape(cloud_url), "cleave_cloud_sessions") == 1

        wait_for(closed_old_session)
        c = scrape(cloud_url)
        assert total(c, "cleave_cloud_tail_requests_total", code="OK") == 5
        assert total(c, "cleave_cloud_tail_requests_total", code="NOT_FOUND") == 1
        for stage in ("decode", "compute", "encode"):
            assert total(c, "cleave_cloud_stage_seconds_count", stage=stage) == 5, stage
        # Both sides count serialized frames, so what the edge sent is what the cloud received
        # (the one bad frame sent straight to the cloud aside).
        frame_bytes = si_pb2.InferFrame(session_id="nope", request_id=1, last=True).ByteSize()
        assert total(c, "cleave_cloud_received_bytes_total") == sent + frame_bytes
        assert total(c, "cleave_cloud_sent_bytes_total") == received + result.ByteSize()
        opened = total(c, "grpc_server_handled_total", grpc_method="OpenSession", grpc_code="OK")
        assert opened == total(e, "cleave_edge_sessions_opened_total") >= 2
        assert total(e, "cleave_edge_reconnects_total") == 0  # every session so far opened for a new cut
        assert total(c, "grpc_server_handled_total", grpc_method="OpenSession", grpc_code="INVALID_ARGUMENT") == 1
        assert total(c, "grpc_server_handled_total", grpc_method="CloseSession", grpc_code="OK") == 1
        assert total(c, "grpc_server_handled_total", grpc_method="Infer", grpc_code="OK") >= 1  # my stream ended
        assert total(c, "grpc_server_started_total", grpc_method="Infer") >= 3  # two edge sessions and mine
        assert total(c, "cleave_cloud_queue_depth", model="tiny") == 0

        # The cloud dies: the next split request finishes here and is counted as a fallback.
        client.pin(3, "int8")
        cloud.kill()
        assert client.infer(x).placement == edge_pb2.LOCAL_FALLBACK
        e = scrape(edge_url)
        assert total(e, "cleave_edge_requests_total", placement="local") == 1
        assert total(e, "cleave_edge_fallbacks_total") == 1
        assert total(e, "cleave_edge_stage_seconds_count", stage="local_tail") == 1
        assert total(e, "cleave_edge_stage_seconds_count", stage="head") == 6
    finally:
        client.close()
