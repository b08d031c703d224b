"""Dynamic batching: the batcher on a tiny function, then through a real cloud daemon."""

from __future__ import annotations

import queue
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import grpc
import pytest
import torch

from cloud_node.batching import Batchers, BatchKey, BatchSettings, DirectRunner, DynamicBatcher
from cloud_node.config import CloudConfig
from cloud_node.main import batchers_for, build_daemon
from compressor import RAW_UNCOMPRESSED, Assembler, decode, encode
from partitioner.loaded import LoadedModel, as_tensor_list
from partitioner.models import ModelSpec, calibration_batch
from protos.cleave.v1 import split_inference_pb2 as si_pb2
from protos.cleave.v1 import split_inference_pb2_grpc as si_grpc
from protos.errors import ResourceExhausted
from runtime.settings import SettingsError

from .test_daemons import frames_for

LONG = 10_000.0  # ms: "never" within a test; a batch that goes early went for another reason


class Recorder:
    """A batched function: doubles its input and records the rows of every call."""

    def __init__(self, sleep_s: float = 0.0) -> None:
        self.sizes: list[int] = []
        self.threads: set[str] = set()
        self.sleep_s = sleep_s

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        self.sizes.append(x.shape[0])
        self.threads.add(threading.current_thread().name)
        if self.sleep_s:
            time.sleep(self.sleep_s)
        return x * 2


def settings(**kw: object) -> BatchSettings:
    return BatchSettings(enabled=True, **kw)


def row(value: float, width: int = 3, dtype: torch.dtype = torch.float32) -> list[torch.Tensor]:
    return [torch.full((1, width), value, dtype=dtype)]


@pytest.fixture
def make():
    batchers: list[DynamicBatcher] = []

    def build(fn, **kw: object) -> DynamicBatcher:
        batchers.append(DynamicBatcher(BatchKey("m", 1), fn, settings(**kw)).start())
        return batchers[-1]

    yield build
    for b in batchers:
        b.close()


def test_dispatches_as_soon_as_a_preferred_size_is_reached(make) -> None:
    fn = Recorder()
    b = make(fn, max_batch_size=8, preferred_batch_sizes=[4], max_queue_delay_ms=LONG)
    started = time.perf_counter()
    futures = [b.submit(row(i)) for i in range(4)]
    outs = [f.result(timeout=5) for f in futures]
    assert time.perf_counter() - started < 5
    assert fn.sizes == [4]
    for i, out in enumerate(outs):
        assert torch.equal(out[0], torch.full((1, 3), 2.0 * i))
    assert {f.batch_size for f in futures} == {4}


def test_dispatches_at_max_batch_size_without_preferred_sizes(make) -> None:
    fn = Recorder()
    b = make(fn, max_batch_size=3, max_queue_delay_ms=LONG)
    futures = [b.submit(row(i)) for i in range(3)]
    for f in futures:
        f.result(timeout=5)
    assert fn.sizes == [3]


def test_flushes_a_partial_batch_after_the_queue_delay(make) -> None:
    fn = Recorder()
    b = make(fn, max_batch_size=8, preferred_batch_sizes=[8], max_queue_delay_ms=150)
    futures = [b.submit(row(i)) for i in range(3)]
    for f in futures:
        f.result(timeout=5)
    assert fn.sizes == [3]
    assert futures[0].queue_ms >= 140  # the oldest waited the delay out
    assert all(f.queue_ms < 2000 for f in futures)


def test_zero_delay_never_waits_for_company(make) -> None:
    fn = Recorder()
    b = make(fn, max_batch_size=8, max_queue_delay_ms=0)
    assert torch.equal(b.submit(row(5)).result(timeout=5)[0], torch.full((1, 3), 10.0))
    assert fn.sizes == [1]


def test_zero_delay_runs_a_lone_request_on_the_callers_thread(make) -> None:
    """Alone and with nothing to wait for, run() skips the worker (two thread hops); requests arriving
    while it runs still queue for the worker and go together once it is over, never beside it."""
    entered, release = threading.Event(), threading.Event()
    calls: list[tuple[str, int]] = []
    running = threading.Semaphore(1)  # held while fn runs: a second concurrent call would fail to take it

    def fn(x: torch.Tensor) -> torch.Tensor:
        assert running.acquire(blocking=False), "two batches of one key ran at once"
        try:
            calls.append((threading.current_thread().name, x.shape[0]))
            if x[0, 0] == 0:
                entered.set()
                release.wait(10)
            return x * 2
        finally:
            running.release()

    b = make(fn, max_batch_size=8, max_queue_delay_ms=0)
    with ThreadPoolExecutor(4) as pool:
        first = pool.submit(b.run, row(0))
        assert entered.wait(5)
        later = [pool.submit(b.run, row(v)) for v in (1, 2, 3)]
        deadline = time.monotonic() + 5
        while b.queue_depth() < 3 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert b.queue_depth() == 3  # queued behind the caller's own run, not run beside it
        release.set()
        results = [first.result(timeout=5), *(f.result(timeout=5) for f in later)]
    assert [float(r.outputs[0][0, 0]) for r in results] == [0.0, 2.0, 4.0, 6.0]
    assert calls[0][0].startswith("ThreadPoolExecutor") and calls[0][1] == 1  # the caller's thread, alone
    assert calls[1:] == [(f"batcher-{b.key}", 3)]  # the worker, the three that queued, together
    assert [r.batch_size for r in results] == [1, 3, 3, 3]
    stats = b.stats()
    assert (stats.batches, stats.requests, stats.sizes) == (2, 4, {1: 1, 3: 1})
    alone = b.run(row(5))  # idle again: the caller's thread
    assert float(alone.outputs[0][0, 0]) == 10.0 and calls[-1] == (threading.current_thread().name, 1)


def test_a_request_after_an_answer_finds_the_batcher_idle_while_the_worker_still_reports() -> None:
    """The worker hands out results and calls the metrics hook after the model is done; a request sent once
    an answer came back must not wait behind that (it used to queue for the worker until the hook returned)."""
    in_hook, leave_hook = threading.Event(), threading.Event()
    calls: list[str] = []

    def hook(key, size, wait_ms, run_ms) -> None:
        if threading.current_thread().name.startswith("batcher-"):
            in_hook.set()
            leave_hook.wait(10)

    def fn(x: torch.Tensor) -> torch.Tensor:
        calls.append(threading.current_thread().name)
        return x * 2

    b = DynamicBatcher(BatchKey("m", 1), fn, settings(max_queue_delay_ms=0), on_batch=hook).start()
    try:
        queued = b.submit(row(1))  # through the worker, whose hook then holds it
        assert float(queued.result(timeout=5)[0][0, 0]) == 2.0
        assert in_hook.wait(5)
        alone = b.run(row(5))  # the caller's thread: the worker is only reporting
        assert float(alone.outputs[0][0, 0]) == 10.0
        assert calls == ["batcher-m/1", threading.current_thread().name]
    finally:
        leave_hook.set()
        b.close()


def test_incompatible_requests_are_not_merged(make) -> None:
    fn = Recorder()
    b = make(fn, max_batch_size=8, max_queue_delay_ms=200)
    requests = [row(1), row(2, width=5), row(3), row(4, dtype=torch.float64), [torch.ones(2, 3)]]
    futures = [b.submit(r) for r in requests]
    outs = [f.result(timeout=5) for f in futures]
    for request, out in zip(requests, outs, strict=True):
        assert torch.equal(out[0], request[0] * 2) and out[0].dtype == request[0].dtype
    # width 3 float32 (rows 1 + 1 + 2) together; width 5 and float64 alone.
    assert sorted(fn.sizes) == [1, 1, 4]
    assert [f.batch_size for f in futures] == [4, 1, 4, 1, 4]


def test_an_error_fails_exactly_the_requests_of_its_batch(make) -> None:
    def fn(x: torch.Tensor) -> torch.Tensor:
        if (x < 0).any():
            raise RuntimeError("negative input")
        return x + 1

    b = make(fn, max_batch_size=2, max_queue_delay_ms=LONG)
    bad, same_batch = b.submit(row(-1)), b.submit(row(1))
    other = [b.submit(row(2)), b.submit(row(3))]
    for f in (bad, same_batch):
        with pytest.raises(RuntimeError, match="negative input"):
            f.result(timeout=5)
    assert [float(f.result(timeout=5)[0][0, 0]) for f in other] == [3.0, 4.0]
    # The worker survived and goes on serving.
    later = [b.submit(row(7)), b.submit(row(8))]
    assert [float(f.result(timeout=5)[0][0, 0]) for f in later] == [8.0, 9.0]
    stats = b.stats()
    assert (stats.batches, stats.failed_batches, stats.requests) == (3, 1, 6)


def test_a_full_queue_answers_resource_exhausted(make) -> None:
    entered, release = threading.Event(), threading.Event()

    def fn(x: torch.Tensor) -> torch.Tensor:
        entered.set()
        release.wait(10)
        return x

    b = make(fn, max_batch_size=2, max_queue_delay_ms=0, max_queue_size=2)
    running = b.submit(row(0))
    assert entered.wait(5)
    queued = [b.submit(row(1)), b.submit(row(2))]
    assert b.queue_depth() == 2
    with pytest.raises(ResourceExhausted, match="2 requests already waiting"):
        b.submit(row(3))
    release.set()
    for f in [running, *queued]:
        f.result(timeout=5)
    assert b.queue_depth() == 0
    assert b.stats().max_queue_depth == 2


def test_outputs_reach_the_right_caller_under_concurrency(make) -> None:
    fn = Recorder(sleep_s=0.003)
    b = make(fn, max_batch_size=8, max_queue_delay_ms=1)

    def client(c: int) -> int:
        mismatches = 0
        for i in range(20):
            rows = 1 + (c + i) % 2
            x = torch.arange(rows * 4, dtype=torch.float32).reshape(rows, 4) + 1000 * c + 10 * i
            out = b.submit([x]).result(timeout=10)[0]
            mismatches += not torch.equal(out, x * 2)
        return mismatches

    with ThreadPoolExecutor(8) as pool:
        assert sum(pool.map(client, range(8))) == 0
    stats = b.stats()
    assert stats.requests == 160 and stats.rows == sum(fn.sizes)
    assert max(fn.sizes) > 2  # requests piled up behind running batches and went together
    assert max(fn.sizes) <= 8


def test_outputs_without_a_batch_dimension_fail_the_batch_not_the_worker(make) -> None:
    b = make(lambda x: x.sum(), max_batch_size=4, max_queue_delay_ms=LONG)
    futures = [b.submit(row(i)) for i in range(4)]
    for f in futures:
        with pytest.raises(ValueError, match="cannot be batched"):
            f.result(timeout=5)
    alone = make(lambda x: x.sum(), max_batch_size=4, max_queue_delay_ms=0)
    assert float(alone.submit(row(1)).result(timeout=5)[0]) == 3.0  # a batch of one is the request itself


def test_close_runs_what_is_queued_and_refuses_more() -> None:
    fn = Recorder()
    b = DynamicBatcher("k", fn, settings(max_batch_size=8, max_queue_delay_ms=LONG)).start()
    futures = [b.submit(row(i)) for i in range(3)]
    b.close()
    assert [float(f.result(timeout=1)[0][0, 0]) for f in futures] == [0.0, 2.0, 4.0]
    with pytest.raises(Exception, match="shutting down"):
        b.submit(row(1))


def test_batchers_off_is_a_direct_call_on_the_callers_thread() -> None:
    fn = Recorder()
    for off in (BatchSettings(enabled=False), BatchSettings(enabled=True, max_batch_size=1)):
        runner = Batchers(off).runner("m", 3, fn)
        assert isinstance(runner, DirectRunner)
        result = runner.run(row(4))
        assert torch.equal(result.outputs[0], torch.full((1, 3), 8.0)) and result.queue_ms == 0.0
    assert fn.threads == {threading.current_thread().name}


def test_batchers_share_per_model_and_part_and_report_every_batch() -> None:
    seen: list[tuple] = []
    per_model = {"a": settings(max_batch_size=2, max_queue_delay_ms=LONG), "b": BatchSettings()}
    batchers = Batchers(per_model.__getitem__, on_batch=lambda *a: seen.append(a))
    batchers.add_listener(lambda *a: 1 / 0)  # a broken hook is logged, not fatal
    try:
        fn = Recorder()
        assert batchers.runner("a", 5, fn) is batchers.runner("a", 5, fn)
        assert batchers.runner("a", 6, fn) is not batchers.runner("a", 5, fn)
        assert isinstance(batchers.runner("b", 5, fn), DirectRunner)
        with ThreadPoolExecutor(2) as pool:
            results = list(pool.map(lambda v: batchers.run("a", "whole", fn, row(v)), [1, 2]))
        assert [r.batch_size for r in results] == [2, 2]
        assert sorted(float(r.outputs[0][0, 0]) for r in results) == [2.0, 4.0]
        key, size, wait_ms, run_ms = seen[-1]
        assert (key, size) == (BatchKey("a", "whole"), 2) and wait_ms >= 0 and run_ms >= 0
        assert batchers.stats()[BatchKey("a", "whole")].sizes == {2: 1}
        assert batchers.queue_depth() == 0 and batchers.queue_depth("a") == 0
    finally:
        batchers.close()


def test_config_defaults_overrides_and_errors() -> None:
    models = [{"name": "r", "source": "resnet18"}, {"name": "m", "source": "mobilenet_v2"}]
    config = CloudConfig.from_dict(
        {
            "models": models,
            "batching": {
                "enabled": True,
                "max_queue_delay_ms": 2,
                "models": [{"model": "m", "max_batch_size": 16, "preferred_batch_sizes": [8, 16]}],
            },
        }
    )
    assert not CloudConfig().batching.active  # off unless asked for
    assert config.batching.for_model("r") == BatchSettings(True, 8, [], 2.0, 128)
    assert config.batching.for_model("m") == BatchSettings(True, 16, [8, 16], 2.0, 128)
    for bad, message in [
        ({"max_batch_sise": 4}, "batching.max_batch_sise: unknown key"),
        ({"max_batch_size": 0}, "batching.max_batch_size: 0 must be >= 1"),
        ({"models": [{"model": "r", "preferred_batch_sizes": [9]}]}, r"batching.models\[0\].preferred_batch_sizes"),
        ({"models": [{"model": "nope"}]}, r"batching.models\[0\].model: 'nope'"),
    ]:
        with pytest.raises(SettingsError, match=message):
            batchers_for(CloudConfig.from_dict({"models": models, "batching": bad}))


# -- through a real cloud daemon -------------------------------------------------------------------

MODEL = {"name": "resnet18", "source": "resnet18", "input_shape": [1, 3, 64, 64]}
CUT = "layer3_0_relu"
STREAMS, ROUNDS = 4, 3


def read_result(replies) -> tuple[int, torch.Tensor, si_pb2.CloudTiming]:
    """The next whole result on a stream: its request id, first output and timing."""
    assembler = Assembler()
    while True:
        result = next(replies)
        assert not result.HasField("error"), result.error.message
        assembler.add(result.chunks)
        if result.last:
            return result.request_id, decode(assembler.finish()[0]), result.timing


def test_concurrent_streams_are_batched_through_the_daemon() -> None:
    local = LoadedModel.load(ModelSpec.from_dict(MODEL))
    cut, head, tail = local.parts(CUT)
    # Preferred size = the number of streams and a long delay: every round of STREAMS closed-loop
    # requests forms exactly one batch, whatever the machine's load.
    config = CloudConfig.from_dict(
        {
            "listen": "127.0.0.1:0",
            "models": [MODEL],
            "torch_threads": 1,
            "batching": {"enabled": True, "max_batch_size": 8, "preferred_batch_sizes": [STREAMS]},
        }
    )
    config.batching.max_queue_delay_ms = 20_000
    daemon = build_daemon(config)
    port = daemon.start()  # the bound port
    batchers = next(s.servicer for s in daemon.services if hasattr(s.servicer, "sessions")).sessions.batchers
    inputs = calibration_batch(MODEL["input_shape"], STREAMS * ROUNDS, seed=7)
    with torch.inference_mode():
        features = [head(inputs[i : i + 1]) for i in range(len(inputs))]
        expected = [as_tensor_list(tail(*f))[0] for f in features]  # unbatched, one request at a time

    def stream(s: int) -> list[tuple[int, torch.Tensor, si_pb2.CloudTiming]]:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = si_grpc.SplitInferenceStub(channel)
            sid = stub.OpenSession(
                si_pb2.OpenSessionRequest(model=local.name, fingerprint=local.fingerprint, cut=CUT), timeout=30
            ).session_id
            outbox: queue.Queue = queue.Queue()
            replies = stub.Infer(iter(outbox.get, None), timeout=60)
            got = []
            for r in range(ROUNDS):
                index = r * STREAMS + s
                raw = [encode(t, RAW_UNCOMPRESSED) for t in features[index]]
                for frame in frames_for(sid, index, raw):
                    outbox.put(frame)
                got.append(read_result(replies))
            outbox.put(None)
            return got

    try:
        with ThreadPoolExecutor(STREAMS) as pool:
            replies = [item for got in pool.map(stream, range(STREAMS)) for item in got]
        stats = batchers.stats()
    finally:
        daemon.stop(grace=1)
        batchers.close()
    key = BatchKey(local.name, cut.index)
    assert list(stats) == [key]  # every session at this cut shares one batcher
    assert stats[key].sizes == {STREAMS: ROUNDS}
    for request_id, output, timing in replies:
        # Conv kernels block differently per batch size: equal up to float rounding, not bit-exact.
        torch.testing.assert_close(output, expected[request_id], rtol=1e-5, atol=1e-5)
        assert timing.queue_ms >= 0 and timing.compute_ms > 0
    assert max(t.queue_ms for _, _, t in replies) > 0  # the first of each batch waited for the others


def test_whole_model_requests_of_concurrent_clients_share_batches() -> None:
    """KServe's ModelInfer goes through the same batchers, keyed by the whole model."""
    from cloud_node.batching import WHOLE_MODEL
    from cloud_node.config import CloudLimits
    from cloud_node.openinference import InferRequest, InputTensor, OpenInference

    spec = ModelSpec.from_dict(
        {"name": "tiny", "source": "tests.support.factories:tiny_cnn", "input_shape": [1, 3, 16, 16]}
    )
    local = LoadedModel.load(spec)
    batchers = Batchers(settings(max_batch_size=4, preferred_batch_sizes=[4], max_queue_delay_ms=LONG))
    backend = OpenInference(lambda _name: local, ["tiny"], CloudLimits(), batchers)
    inputs = calibration_batch([4, 3, 16, 16], 4, seed=3)

    def infer(i: int) -> torch.Tensor:
        array = inputs[i : i + 1].numpy()
        request = InferRequest("tiny", [InputTensor("input", "FP32", array.shape)], raw_inputs=[array.tobytes()])
        return torch.from_numpy(backend.infer(request).outputs[0].data)

    try:
        with ThreadPoolExecutor(4) as pool:
            outputs = list(pool.map(infer, range(4)))
        stats = batchers.stats()
    finally:
        batchers.close()
    assert stats[BatchKey("tiny", WHOLE_MODEL)].sizes == {4: 1}
    with torch.inference_mode():
        expected = local.module(inputs)
    torch.testing.assert_close(torch.cat(outputs), expected, rtol=1e-5, atol=1e-5)
