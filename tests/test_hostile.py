"""Hostile clients against real daemons (issue 12, serving side): each test sends what an attacker on
loopback would, and asserts the status it gets, that the daemon's RSS grows by less than 300 MB,
that health answers within 2 s throughout, and that a normal request is still exact afterwards.

The cloud runs with bearer tokens, so the attacker and the legitimate client are different clients
for the per-client quotas, and with small budgets and timeouts so that every test is short.
"""

from __future__ import annotations

import threading
import time
import zlib
from collections.abc import Iterator
from contextlib import contextmanager

import grpc
import psutil
import pytest
import torch
import yaml
import zstandard
from grpc_health.v1 import health_pb2, health_pb2_grpc

from cleave_cli.launch import DaemonProcess, cloud_process, edge_process, free_port
from compressor import Assembler, EncodingSpec, decode, encode, to_chunks
from partitioner.loaded import LoadedModel
from partitioner.models import ModelSpec
from protos.cleave.v1 import edge_pb2, edge_pb2_grpc, tensor_pb2
from protos.cleave.v1 import split_inference_pb2 as si_pb2
from protos.cleave.v1 import split_inference_pb2_grpc as si_grpc
from runtime.serving import open_channel

pytestmark = [pytest.mark.integration]

MODEL = {"name": "resnet18", "source": "resnet18", "input_shape": [1, 3, 64, 64]}
ATTACKER, GOOD = "attacker-token-0123456789", "good-token-0123456789"
IDLE_S = 3.0  # limits.stream_idle_s
SESSION_IDLE_S = 6.0  # limits.session_idle_s
LIMITS = {
    "stream_idle_s": IDLE_S,
    "max_streams": 12,
    "max_streams_per_client": 6,
    "max_sessions": 40,
    "max_sessions_per_client": 10,
    "session_idle_s": SESSION_IDLE_S,
    "max_request_bytes": 1 << 20,
    "max_stream_bytes": 2 << 20,
    "max_buffered_bytes": 3 << 20,
    "max_batch": 8,
    "max_profile_batch": 64,
    "max_profile_repeats": 100,
    "max_profile_warmup": 2000,
}
RSS_GROWTH = 300 << 20
HEALTH_S = 2.0


# -- fixtures ----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def model() -> Iterator[LoadedModel]:
    # References computed as the daemons compute (torch_threads: 1): kernels differ in the last bit otherwise.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield LoadedModel.load(ModelSpec.from_dict(MODEL))
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def cloud(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DaemonProcess]:
    path = tmp_path_factory.mktemp("hostile")
    config = {"models": [MODEL], "torch_threads": 1, "auth": {"tokens": [ATTACKER, GOOD]}, "limits": LIMITS}
    (path / "cloud.yaml").write_text(yaml.safe_dump(config))
    proc = cloud_process(path / "cloud.yaml", free_port(), path / "cloud.log").start()
    yield proc
    proc.stop()


@pytest.fixture(scope="module")
def edge(tmp_path_factory: pytest.TempPathFactory, cloud: DaemonProcess) -> Iterator[DaemonProcess]:
    path = tmp_path_factory.mktemp("hostile-edge")
    config = {
        "model": MODEL,
        "torch_threads": 1,
        "plan": {"cut": "edge", "encoding": "fp32"},  # the input checks are the edge's own
        "cloud_auth": {"token": GOOD},
        "limits": {"max_batch": 8, "stream_idle_s": IDLE_S},
    }
    (path / "edge.yaml").write_text(yaml.safe_dump(config))
    proc = edge_process(path / "edge.yaml", free_port(), cloud.port, path / "edge.log").start()
    yield proc
    proc.stop()


def channel(daemon: DaemonProcess, token: str | None = None) -> grpc.Channel:
    return open_channel(daemon.address, token=token)


# -- what every test watches -------------------------------------------------------------------------


class Watch:
    """Samples a daemon's RSS and health-check latency in the background while a test attacks it."""

    def __init__(self, daemon: DaemonProcess) -> None:
        assert daemon.proc is not None
        self.process = psutil.Process(daemon.proc.pid)
        self.daemon = daemon
        self.base_rss = self.process.memory_info().rss
        self.peak_rss = self.base_rss
        self.worst_health_s = 0.0
        self.health_failures: list[str] = []
        self.checks = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        with channel(self.daemon) as ch:
            stub = health_pb2_grpc.HealthStub(ch)
            next_check = 0.0
            while True:
                self.peak_rss = max(self.peak_rss, self.process.memory_info().rss)
                if time.monotonic() >= next_check:
                    started = time.monotonic()
                    try:
                        reply = stub.Check(health_pb2.HealthCheckRequest(), timeout=HEALTH_S)
                        if reply.status != health_pb2.HealthCheckResponse.SERVING:
                            self.health_failures.append(f"status {reply.status}")
                    except grpc.RpcError as exc:
                        self.health_failures.append(f"{exc.code().name}: {exc.details()}")
                    self.worst_health_s = max(self.worst_health_s, time.monotonic() - started)
                    self.checks += 1
                    next_check = time.monotonic() + 0.25
                if self._stop.wait(0.05) and self.checks:
                    return

    def __enter__(self) -> Watch:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(10)

    def check(self) -> None:
        growth = self.peak_rss - self.base_rss
        print(f"\nRSS growth {growth / 2**20:.1f} MiB, worst health {self.worst_health_s:.3f} s over {self.checks}")
        assert growth < RSS_GROWTH, f"RSS grew by {growth / 2**20:.0f} MiB"
        assert not self.health_failures, self.health_failures[:3]
        assert self.checks >= 1 and self.worst_health_s < HEALTH_S


@contextmanager
def watched(daemon: DaemonProcess) -> Iterator[Watch]:
    with Watch(daemon) as watch:
        yield watch
    watch.check()


# -- requests ----------------------------------------------------------------------------------------


def residual_cut(model: LoadedModel) -> str:
    return next(c.name for c in model.graph.cuts if c.target.startswith("layer2") and len(c.live) == 2)


def open_session(stub: si_grpc.SplitInferenceStub, model: LoadedModel, cut: str, client: str = "test") -> str:
    request = si_pb2.OpenSessionRequest(model=model.name, fingerprint=model.fingerprint, cut=cut, client=client)
    return stub.OpenSession(request, timeout=10).session_id


def frames_for(session_id: str, request_id: int, tensors: list, last: bool = True) -> list[si_pb2.InferFrame]:
    groups = list(to_chunks(tensors, 1 << 20))
    return [
        si_pb2.InferFrame(session_id=session_id, request_id=request_id, chunks=g, last=last and i == len(groups) - 1)
        for i, g in enumerate(groups)
    ]


def assert_exact(cloud: DaemonProcess, model: LoadedModel) -> None:
    """A legitimate client's request at a residual cut gives exactly the local tail's output."""
    cut, head, tail = model.parts(residual_cut(model))
    x = torch.randn(model.input_shape, generator=torch.Generator().manual_seed(5))
    with torch.inference_mode():
        features = head(x)
        expected = tail(*features)
    with channel(cloud, GOOD) as ch:
        stub = si_grpc.SplitInferenceStub(ch)
        sid = open_session(stub, model, cut.name, "legit")
        try:
            tensors = [encode(f, EncodingSpec(encoding="raw")) for f in features]
            (result,) = stub.Infer(iter(frames_for(sid, 1, tensors)), timeout=30)
        finally:
            stub.CloseSession(si_pb2.CloseSessionRequest(session_id=sid), timeout=10)
    assert not result.HasField("error"), result.error.message
    assembler = Assembler()
    assembler.add(result.chunks)
    (out,) = [decode(t) for t in assembler.finish()]
    assert torch.equal(out, expected if isinstance(expected, torch.Tensor) else expected[0])


def zstd_zeros(nbytes: int) -> bytes:
    """A zstd frame of ``nbytes`` zeros, declaring its size, built without holding them."""
    out = zstandard.ZstdCompressor(write_content_size=True).compressobj(size=nbytes)
    block = bytes(1 << 20)
    parts = [out.compress(block[: min(len(block), nbytes - i)]) for i in range(0, nbytes, len(block))]
    return b"".join(parts) + out.flush()


def bomb_tensor(shape: list[int]) -> tensor_pb2.Tensor:
    """A raw float32 tensor of zeros at ``shape``, zstd-compressed: a few KiB that decode to all of it."""
    raw = 4 * int(torch.tensor(shape).prod())
    payload = zstd_zeros(raw)
    return tensor_pb2.Tensor(
        dtype=tensor_pb2.FLOAT32,
        shape=shape,
        encoding=tensor_pb2.RAW,
        codec=tensor_pb2.ZSTD,
        raw_size=raw,
        payload=payload,
        payload_size=len(payload),
        crc32=zlib.crc32(payload),
    )


def infer_errors(stub: si_grpc.SplitInferenceStub, frames: list[si_pb2.InferFrame]) -> dict[int, si_pb2.RequestError]:
    results = list(stub.Infer(iter(frames), timeout=30))
    return {r.request_id: r.error for r in results if r.last}


RESOURCE_EXHAUSTED = grpc.StatusCode.RESOURCE_EXHAUSTED.value[0]
INVALID_ARGUMENT = grpc.StatusCode.INVALID_ARGUMENT.value[0]


# -- finding 3: idle streams -------------------------------------------------------------------------


class IdleStream:
    """A client-streaming call (``Infer`` by default) that sends nothing until told; its final status is kept."""

    def __init__(self, stub: si_grpc.SplitInferenceStub | edge_pb2_grpc.EdgeStub, method: str = "Infer") -> None:
        self.release = threading.Event()
        self.code: grpc.StatusCode | None = None
        self.details = ""
        self.ended_at = 0.0
        self._call = getattr(stub, method)(self._nothing(), timeout=60)
        self.thread = threading.Thread(target=self._wait, daemon=True)
        self.thread.start()

    def _nothing(self) -> Iterator[si_pb2.InferFrame]:
        self.release.wait(60)
        return
        yield

    def _wait(self) -> None:
        try:
            for _ in self._call:
                pass
            self.code = grpc.StatusCode.OK
        except grpc.RpcError as exc:
            self.code, self.details = exc.code(), exc.details() or ""
        self.ended_at = time.monotonic()


def test_idle_streams_cannot_take_the_workers(cloud: DaemonProcess, model: LoadedModel) -> None:
    with watched(cloud), channel(cloud, ATTACKER) as ch, channel(cloud, GOOD) as good_ch:
        stub, good = si_grpc.SplitInferenceStub(ch), si_grpc.SplitInferenceStub(good_ch)
        opened = time.monotonic()
        streams = [IdleStream(stub) for _ in range(32)]
        time.sleep(1.0)
        # The attacker's streams beyond its quota were refused at once; the rest sit idle.
        refused = [s for s in streams if s.code == grpc.StatusCode.RESOURCE_EXHAUSTED]
        idle = [s for s in streams if s.code is None]
        assert len(idle) == LIMITS["max_streams_per_client"], [(s.code, s.details) for s in streams]
        assert len(refused) == 32 - len(idle) and "max_streams_per_client" in refused[0].details
        assert_exact(cloud, model)  # another client is still served
        # That client's stream slot is free by the time it has its status (runtime.admission frees it when the
        # handler ends, not in gRPC's done-callback, which may run later), so all the slots below are free.
        # Another client takes the other stream slots: now every one is busy, and one more is refused. The calls
        # start together, so which one arrives last is up to the network: count them.
        theirs = [IdleStream(good) for _ in range(LIMITS["max_streams"] - len(idle) + 1)]
        time.sleep(1.0)
        over = [s for s in theirs if s.code is not None]
        assert len(over) == 1 and over[0].code == grpc.StatusCode.RESOURCE_EXHAUSTED, [s.code for s in theirs]
        assert "(max_streams)" in over[0].details
        # GetInfo answers within 2 s (health too: the watch checks it throughout), and unary calls are served.
        started = time.monotonic()
        good.GetInfo(si_pb2.GetInfoRequest(), timeout=HEALTH_S)
        assert time.monotonic() - started < HEALTH_S
        sid = open_session(good, model, residual_cut(model))
        good.CloseSession(si_pb2.CloseSessionRequest(session_id=sid), timeout=HEALTH_S)
        # The idle streams are ended after stream_idle_s, with DEADLINE_EXCEEDED naming the reason.
        for s in streams + theirs:
            s.thread.join(IDLE_S + 10)
            s.release.set()
        assert all(s.code == grpc.StatusCode.DEADLINE_EXCEEDED and "no message" in s.details for s in idle)
        assert all(s.code == grpc.StatusCode.DEADLINE_EXCEEDED for s in theirs if s is not over[0])
        assert all(IDLE_S <= s.ended_at - opened < IDLE_S + 5 for s in idle)
        # Their slots are free again.
        again = IdleStream(stub)
        time.sleep(0.5)
        assert again.code is None
        again.release.set()
        again.thread.join(10)
    assert_exact(cloud, model)


@pytest.mark.parametrize("heartbeat_s", [IDLE_S / 4, IDLE_S * 10])
def test_an_idle_edge_stream_lives_on_heartbeats(
    cloud: DaemonProcess, model: LoadedModel, heartbeat_s: float, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The edge's Infer stream sends an empty frame when idle: the cloud's idle limit ends attackers'
    silent streams, not a quiet edge's. Without heartbeats the same stream is ended."""
    from edge_node import cloud_link

    monkeypatch.setattr(cloud_link, "HEARTBEAT_S", heartbeat_s)
    cut = residual_cut(model)
    with channel(cloud, GOOD) as ch:
        stub = si_grpc.SplitInferenceStub(ch)
        broken = threading.Event()
        stream = cloud_link.InferStream(
            ch, open_session(stub, model, cut), model.graph.cut(cut).index, 1 << 20, on_broken=lambda s: broken.set()
        ).start()
        try:
            time.sleep(IDLE_S * 2.5)
            if heartbeat_s > IDLE_S:
                assert broken.wait(IDLE_S), "an idle stream without heartbeats was not ended"
                return
            assert not broken.is_set()
            x = torch.rand(1, *MODEL["input_shape"][1:])
            _, head, tail = model.parts(model.graph.cut(cut).index)
            with torch.no_grad():
                features = head(x)
                reference = tail(*features)
            reply = stream.submit(1, [encode(f, EncodingSpec.parse("fp32")) for f in features]).result(timeout=30)
            assert torch.equal(decode(reply.outputs[0]), reference)
        finally:
            stream.close()


def test_idle_streams_cannot_take_the_edge(edge: DaemonProcess) -> None:
    per_client = 8  # the edge's default max_streams_per_client
    with watched(edge), channel(edge) as ch:
        stub = edge_pb2_grpc.EdgeStub(ch)
        streams = [IdleStream(stub, "InferStream") for _ in range(32)]
        time.sleep(1.0)
        idle = [s for s in streams if s.code is None]
        assert len(idle) == per_client, [(s.code, s.details) for s in streams]
        assert all(s.code == grpc.StatusCode.RESOURCE_EXHAUSTED for s in streams if s not in idle)
        started = time.monotonic()
        stub.GetStatus(edge_pb2.GetStatusRequest(), timeout=HEALTH_S)
        assert time.monotonic() - started < HEALTH_S
        for s in streams:
            s.thread.join(IDLE_S + 10)
            s.release.set()
        assert all(s.code == grpc.StatusCode.DEADLINE_EXCEEDED for s in idle), [(s.code, s.details) for s in idle]


# -- finding 4: decompression bombs ------------------------------------------------------------------


def test_decompression_bombs_are_refused_from_the_header(cloud: DaemonProcess, model: LoadedModel) -> None:
    cut, head, _ = model.parts(residual_cut(model))
    features = head(torch.randn(model.input_shape))
    good = [encode(f, EncodingSpec(encoding="raw")) for f in features]
    big_batch = [bomb_tensor([8192, *f.shape[1:]]) for f in features]  # 2 x 256 MiB from a few KiB
    wrong_shape = [bomb_tensor([1, 1 << 26]), good[1]]  # 256 MiB in a shape the cut does not take
    assert sum(t.payload_size for t in big_batch + wrong_shape) < 256 << 10
    lying = [encode(f, EncodingSpec(encoding="raw", codec="zstd")) for f in features]
    lying[0].raw_size *= 64  # the frame declares its real size, the header 64 times more
    with watched(cloud), channel(cloud, ATTACKER) as ch:
        stub = si_grpc.SplitInferenceStub(ch)
        sid = open_session(stub, model, cut.name)
        errors = infer_errors(
            stub, frames_for(sid, 1, big_batch) + frames_for(sid, 2, wrong_shape) + frames_for(sid, 3, lying)
        )
        stub.CloseSession(si_pb2.CloseSessionRequest(session_id=sid), timeout=10)
    assert errors[1].code == RESOURCE_EXHAUSTED and "limits.max_batch" in errors[1].message, errors[1]
    assert errors[2].code == INVALID_ARGUMENT and "shape" in errors[2].message, errors[2]
    assert errors[3].code == INVALID_ARGUMENT and "raw_size" in errors[3].message, errors[3]
    assert_exact(cloud, model)


def test_edge_input_bombs_are_refused_from_the_header(edge: DaemonProcess, model: LoadedModel) -> None:
    x = torch.randn(model.input_shape, generator=torch.Generator().manual_seed(3))
    with watched(edge), channel(edge) as ch:
        stub = edge_pb2_grpc.EdgeStub(ch)
        cases = [
            (bomb_tensor([8192, 3, 64, 64]), grpc.StatusCode.RESOURCE_EXHAUSTED, "limits.max_batch"),  # 384 MiB
            (bomb_tensor([1, 3, 8192, 8192]), grpc.StatusCode.INVALID_ARGUMENT, "inputs[0].shape"),  # 768 MiB
        ]
        for tensor, code, needle in cases:
            with pytest.raises(grpc.RpcError) as info:
                stub.Infer(edge_pb2.EdgeInferRequest(inputs=[tensor]), timeout=30)
            assert info.value.code() == code and needle in info.value.details(), info.value.details()
        reply = stub.Infer(edge_pb2.EdgeInferRequest(inputs=[encode(x, EncodingSpec(encoding="raw"))]), timeout=30)
    with torch.inference_mode():
        expected = model.module(x)
    assert torch.equal(decode(reply.outputs[0]), expected)


# -- finding 5: memory held by unfinished requests ----------------------------------------------------


def test_unfinished_requests_are_bounded_by_byte_budgets(cloud: DaemonProcess, model: LoadedModel) -> None:
    # At the input cut one request of batch 8 is 384 KiB: a stream's 2 MiB holds five, the daemon's 3 MiB seven.
    cut = model.graph.cuts[0]
    request = [encode(torch.zeros(8, *cut.shapes[0][1:]), EncodingSpec(encoding="raw", codec="none"))]
    first = next(iter(to_chunks(request, 1 << 20)))[0]
    assert first.header.payload_size == 8 * 3 * 64 * 64 * 4
    partial = [tensor_pb2.TensorChunk(index=0, header=first.header, data=first.data[:1024])]  # 1 KiB of it
    with watched(cloud), channel(cloud, ATTACKER) as ch:
        stub = si_grpc.SplitInferenceStub(ch)
        sid = open_session(stub, model, str(cut.index))
        release = threading.Event()
        answers: list[si_pb2.InferResult] = []
        ends: list[grpc.StatusCode] = []

        def unfinished(start: int, count: int) -> Iterator[si_pb2.InferFrame]:
            for rid in range(start, start + count):
                yield si_pb2.InferFrame(session_id=sid, request_id=rid, chunks=partial, last=False)
            release.wait(30)

        def hold(start: int, count: int) -> threading.Thread:
            call = stub.Infer(unfinished(start, count), timeout=60)

            def read() -> None:
                try:
                    for answer in call:
                        answers.append(answer)
                    ends.append(grpc.StatusCode.OK)
                except grpc.RpcError as exc:  # an idle stream is ended after stream_idle_s
                    ends.append(exc.code())

            thread = threading.Thread(target=read, daemon=True)
            thread.start()
            return thread

        def wait_for(count: int) -> list[int]:
            deadline = time.monotonic() + 20
            while len(answers) < count and time.monotonic() < deadline:
                time.sleep(0.05)
            time.sleep(0.3)  # nothing more should come
            return sorted(a.request_id for a in answers)

        def refused_by(budget: str) -> bool:
            return all(a.error.code == RESOURCE_EXHAUSTED and budget in a.error.message for a in answers)

        # One stream, 32 unfinished requests: the sixth and later pass limits.max_stream_bytes.
        threads = [hold(100, 32)]
        assert wait_for(27) == list(range(105, 132)) and refused_by("limits.max_stream_bytes"), answers[:1]
        # A second stream: two more fit in the daemon's budget, the third passes limits.max_buffered_bytes.
        answers.clear()
        threads.append(hold(200, 5))
        assert wait_for(3) == [202, 203, 204] and refused_by("limits.max_buffered_bytes"), answers[:1]
        release.set()
        for thread in threads:
            thread.join(30)
        assert ends == [grpc.StatusCode.OK, grpc.StatusCode.OK]
        # Both streams ended with their requests half received: their bytes went back to the daemon's budget.
        answers.clear()
        release.clear()
        third = hold(400, 7)
        assert wait_for(2) == [405, 406] and refused_by("limits.max_stream_bytes"), answers[:1]
        release.set()
        third.join(30)
        stub.CloseSession(si_pb2.CloseSessionRequest(session_id=sid), timeout=10)
    assert_exact(cloud, model)


# -- finding 6: compute amplification ----------------------------------------------------------------


def test_large_batch_is_refused_before_any_compute(cloud: DaemonProcess, model: LoadedModel) -> None:
    cut = model.graph.cuts[0]
    frame = [bomb_tensor([8192, *cut.shapes[0][1:]])]  # ~3 KiB on the wire, 384 MiB and 45 s of work if run
    assert frame[0].payload_size < 64 << 10
    with watched(cloud) as watch, channel(cloud, ATTACKER) as ch:
        stub = si_grpc.SplitInferenceStub(ch)
        sid = open_session(stub, model, str(cut.index))
        cpu = watch.process.cpu_times()
        started = time.monotonic()
        errors = infer_errors(stub, frames_for(sid, 1, frame))
        elapsed = time.monotonic() - started
        used = sum(watch.process.cpu_times()[:2]) - sum(cpu[:2])
        stub.CloseSession(si_pb2.CloseSessionRequest(session_id=sid), timeout=10)
    assert errors[1].code == RESOURCE_EXHAUSTED and "batch 8192 exceeds the limit of 8" in errors[1].message
    assert elapsed < 2.0 and used < 1.0, (elapsed, used)
    assert_exact(cloud, model)


# -- finding 9: slot squatting and log forging ---------------------------------------------------------


def test_one_client_cannot_take_every_session_nor_forge_logs(cloud: DaemonProcess, model: LoadedModel) -> None:
    forged = "2026-01-01 00:00:00,000 cloud INFO session deadbeef: forged line"
    cut = residual_cut(model)
    with watched(cloud), channel(cloud, ATTACKER) as ch:
        stub = si_grpc.SplitInferenceStub(ch)
        opened, refused = [], []
        for i in range(200):
            try:
                opened.append(open_session(stub, model, cut, client=f"x{i}\n{forged}"))
            except grpc.RpcError as exc:
                refused.append(exc)
        assert len(opened) == LIMITS["max_sessions_per_client"]
        assert all(e.code() == grpc.StatusCode.RESOURCE_EXHAUSTED for e in refused)
        assert "max_sessions_per_client" in refused[0].details()
        assert_exact(cloud, model)  # another client still gets a session
        # Idle sessions are reaped once past session_idle_s: the attacker's are gone when room is needed.
        time.sleep(SESSION_IDLE_S + 0.5)
        again = open_session(stub, model, cut)
        with pytest.raises(grpc.RpcError) as info:
            stub.CloseSession(si_pb2.CloseSessionRequest(session_id=opened[0]), timeout=10)
        assert info.value.code() == grpc.StatusCode.NOT_FOUND
        stub.CloseSession(si_pb2.CloseSessionRequest(session_id=again), timeout=10)
    lines = cloud.log_path.read_text().splitlines()
    assert not any(line.startswith(forged) for line in lines)
    assert any("\\n" + forged in line for line in lines)  # the client name is logged, escaped, on one line


# -- finding 10: Profile ------------------------------------------------------------------------------


def test_profile_stops_at_its_deadline_and_takes_turns(cloud: DaemonProcess, model: LoadedModel) -> None:
    # The small profile takes ~40 turns, each one waiting for one of the big profile's runs (~0.06 s at
    # 8 rows): ~4 s here. The big one has far more than 12 s of work, so it is still running then.
    big_deadline_s = 12.0
    with watched(cloud) as watch, channel(cloud, ATTACKER) as ch, channel(cloud, GOOD) as good:
        stub = si_grpc.SplitInferenceStub(ch)
        with pytest.raises(grpc.RpcError) as info:
            stub.Profile(si_pb2.ProfileRequest(model=model.name, batch=1024, repeats=1000), timeout=5)
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "limits.max_profile" in info.value.details()
        # Far over big_deadline_s of work on any CPU: 8 rows (~1.2 GFLOP a run), 2000 untimed runs on one
        # thread (~0.06 s each here, 120 s in all) before any timed one. The warm-up is what makes the work: the
        # timed rounds stop early once their medians hold still, and 50 untimed plus 100 timed runs (at 64 rows)
        # finished inside a 25 s deadline on CI's faster CPU.
        big = si_pb2.ProfileRequest(model=model.name, batch=8, repeats=100, warmup=2000, refresh=True)
        outcome: dict[str, object] = {}

        def run_big() -> None:
            try:
                stub.Profile(big, timeout=big_deadline_s)
                outcome["big"] = "OK"
            except grpc.RpcError as exc:
                outcome["big"] = exc.code()

        thread = threading.Thread(target=run_big, daemon=True)
        deadline = time.monotonic() + big_deadline_s
        thread.start()
        time.sleep(1.0)
        small = si_pb2.ProfileRequest(model=model.name, batch=1, repeats=1, warmup=1, refresh=True)
        started = time.monotonic()
        reply = si_grpc.SplitInferenceStub(good).Profile(small, timeout=60)
        small_s = time.monotonic() - started
        big_still_running = "big" not in outcome
        thread.join(big_deadline_s + 10)
        assert reply.nodes and reply.batch == 1
        assert outcome["big"] == grpc.StatusCode.DEADLINE_EXCEEDED
        # The small profile took turns with the big one instead of waiting for all of it.
        assert big_still_running, f"the small profile took {small_s:.1f} s: it waited for the big one"
        # Once its caller's deadline has passed, the big profile stops within a run.
        time.sleep(max(0.0, deadline + 2.0 - time.monotonic()))
        cpu = sum(watch.process.cpu_times()[:2])
        time.sleep(3.0)
        used = sum(watch.process.cpu_times()[:2]) - cpu
    print(f"small profile {small_s:.2f} s beside a big one; {used:.2f} CPU s in 3 s after the deadline")
    assert used < 0.5, f"the daemon burned {used:.2f} CPU s after the caller's deadline"
    assert_exact(cloud, model)
