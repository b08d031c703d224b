"""The edge's threads under fire at once: Replan and pins, requests (unary and streamed), link changes
and the autoplanner re-planning on them, against the real cloud daemon.

The edge runs in this process behind a real gRPC server, so every thread is a real one: gRPC handler
threads, per-stream pools, the autoplanner, the cloud link's supervisor, stream receivers and drain
threads. Checked: no request lost or answered with another input's output (every reply against the
reference for its own input), no exception on any thread (``threading.excepthook``) and no error
logged, and the quantized-head cache built each head once however many pins raced for it.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from itertools import cycle

import grpc
import pytest
import torch
import torch.nn.functional as F

from cleave_cli.client import EdgeClient, outputs_of
from cleave_cli.images import synthetic_images
from cleave_cli.launch import DaemonProcess
from edge_node import torch_backend as backend_module  # where the torch edge builds its quantized heads
from edge_node.autoplan import AutoPlanner
from edge_node.cloud_link import CloudLink
from edge_node.config import AutoPlanSettings, Reconnect
from edge_node.link import LinkMonitor
from edge_node.runtime import EdgeRuntime, Inflight
from edge_node.servicer import EdgeServicer
from partitioner.costmodel import CostModel, CutCost, Link
from partitioner.loaded import LoadedModel
from partitioner.planner import Planner
from protos.cleave.v1 import edge_pb2, edge_pb2_grpc

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]

HAMMER_S = 6.0  # how long every thread hammers at once
CUT_A, CUT_B = "layer2_0_relu", "layer3_0_relu"
# Link regimes the link thread flips between, and where the synthetic cost model puts the best plan.
FAST, MID, SLOW = (1000.0, 1.0), (1.0, 1.0), (0.01, 1.0)  # (Mbit/s both ways, RTT ms)


def cost_model(model: LoadedModel) -> CostModel:
    """Costs over the real model's cuts, shaped so each link regime has another best plan:
    fast: cloud-only; mid: split at CUT_A; slow: edge-only. Every candidate is lossless (fp32)."""
    input_cut = model.graph.cuts[0]
    a, b = model.graph.cut(CUT_A), model.graph.cut(CUT_B)
    cuts = []
    for cut, edge_ms, cloud_ms, nbytes, enc in (
        (input_cut, 0.0, 10.0, 50_000, "raw+none"),
        (a, 10.0, 5.0, 1_000, "raw"),
        (b, 60.0, 1.0, 500, "raw"),
    ):
        cost = CutCost(cut.index, cut.name, edge_ms, cloud_ms, nbytes, 1_000_000)
        cost.feature_bytes[enc], cost.encode_ms[enc], cost.decode_ms[enc] = nbytes, 0.1, 0.1
        cuts.append(cost)
    return CostModel(model.name, cuts, edge_total_ms=100.0, edge_model_memory=2_000_000, output_bytes=4_000)


class LinkDrivenPlanner(AutoPlanner):
    """The real planning thread, with a synthetic cost model and the link taken from the monitor
    (which the test's link thread moves) instead of profiles and probes over the network."""

    def prepare(self) -> Planner:
        return Planner(cost_model(self.model))

    def measure_link(self) -> Link:
        e = self.monitor.snapshot()
        return Link(max(e.up_mbps, 1e-3), max(e.down_mbps, 1e-3), e.rtt_ms)


def cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(F.cosine_similarity(a.flatten(), b.flatten(), dim=0))


def test_replan_requests_and_link_changes_at_once(
    cloud: DaemonProcess, local_model: LoadedModel, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Every failure on any thread lands here.
    failures: list[str] = []
    monkeypatch.setattr(threading, "excepthook", lambda args: failures.append(f"{args.thread}: {args.exc_value!r}"))

    class Errors(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            failures.append(f"logged {record.levelname}: {record.getMessage()}")

    errors = Errors(logging.ERROR)
    logging.getLogger().addHandler(errors)

    # The quantized-head cache: count builds per (cut, bits), slowly, so that racing pins overlap.
    builds: Counter = Counter()
    real_build = backend_module.build_quantized_head

    def counting_build(head, calib, per_layer):
        builds[(id(head), tuple(sorted(per_layer.items())))] += 1
        time.sleep(0.3)
        return real_build(head, calib, per_layer)

    monkeypatch.setattr(backend_module, "build_quantized_head", counting_build)

    inputs = [synthetic_images(1, local_model.input_shape, seed=100 + i) for i in range(4)]
    with torch.inference_mode():
        refs = [local_model.module(x) for x in inputs]

    monitor = LinkMonitor()
    monitor.record_probe(MID[1], MID[0], MID[0])
    inflight = Inflight(64)
    link = CloudLink(
        cloud.address,
        local_model,
        monitor,
        Reconnect(0.05, 0.5, 5.0),
        1 << 20,
        1 << 26,
        drain_s=5.0,
        in_use=inflight.in_use,
    ).start()
    runtime = EdgeRuntime(local_model, link, request_timeout_s=30.0, inflight=inflight)
    settings = AutoPlanSettings(check_interval_s=0.05, probe_interval_s=1e9, min_gain=0.0, min_gain_ms=0.0)
    settings.confirmations = 1
    auto = LinkDrivenPlanner(local_model, runtime, link.stub, monitor, settings)
    server = grpc.server(ThreadPoolExecutor(max_workers=16, thread_name_prefix="grpc"))
    edge_pb2_grpc.add_EdgeServicer_to_server(EdgeServicer(runtime, cloud.address, 4, auto, max_batch=8), server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    auto.start()
    client = EdgeClient(f"127.0.0.1:{port}")
    stop = threading.Event()
    try:
        deadline = time.monotonic() + 30
        while runtime.counters.plan_switches == 0 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert runtime.plan.reason.startswith("planned"), (runtime.plan.reason, auto.error)
        assert runtime.plan.cut is not None and runtime.plan.cut.name == CUT_A  # the mid link's best

        def quantized_pin() -> edge_pb2.Plan:
            wanted = edge_pb2.Plan(placement=edge_pb2.SPLIT, cut_name=CUT_B, reason="int8 head")
            wanted.weight_bits["*"] = 8
            return client.stub.Replan(edge_pb2.ReplanRequest(plan=wanted), timeout=60)

        # Four pins of the same quantized head at once: one build, four plans with it.
        with ThreadPoolExecutor(4) as pool:
            raced = [f.result(timeout=60) for f in [pool.submit(quantized_pin) for _ in range(4)]]
        assert all(p.cut_name == CUT_B and set(p.weight_bits.values()) == {8} for p in raced)

        answered: list[tuple[int, edge_pb2.EdgeInferResponse]] = []
        sent = Counter()
        answered_lock = threading.Lock()

        def unary_client(worker: int) -> None:
            for n in cycle(range(len(inputs))):
                if stop.is_set():
                    return
                with answered_lock:
                    sent[worker] += 1
                reply = client.infer(inputs[n], request_id=n, timeout=60)
                with answered_lock:
                    answered.append((n, reply))

        def stream_client() -> None:
            while not stop.is_set():
                order = [n % len(inputs) for n in range(8)]
                with answered_lock:
                    sent["stream"] += len(order)
                for reply in client.infer_stream([inputs[n] for n in order], timeout=60):
                    with answered_lock:
                        answered.append((order[reply.request_id - 1], reply))

        def replanner(offset: int) -> None:
            pins = [
                lambda: client.stub.Replan(edge_pb2.ReplanRequest(), timeout=60),  # the planner's choice, now
                lambda: client.pin(CUT_A, "raw"),
                lambda: client.pin("edge", "fp32"),
                lambda: client.pin("cloud", "raw+none"),
                quantized_pin,
                lambda: client.stub.Replan(edge_pb2.ReplanRequest(), timeout=60),
            ]
            calls = cycle(pins[offset:] + pins[:offset])
            while not stop.is_set():
                next(calls)()
                stop.wait(0.05)

        def link_changer() -> None:
            for mbps, rtt in cycle((FAST, MID, SLOW, MID)):
                if stop.is_set():
                    return
                monitor.record_probe(rtt, mbps, mbps)
                stop.wait(0.03)

        def guarded(fn, *args) -> None:
            try:
                fn(*args)
            except Exception as exc:  # noqa: BLE001 - reported with the thread's name below
                failures.append(f"{threading.current_thread().name}: {exc!r}")
                stop.set()

        jobs = [(unary_client, w) for w in range(3)] + [(stream_client,), (replanner, 0), (replanner, 3)]
        jobs.append((link_changer,))
        threads = [threading.Thread(target=guarded, args=job, name=f"hammer-{i}") for i, job in enumerate(jobs)]
        for t in threads:
            t.start()
        stop.wait(HAMMER_S)
        stop.set()
        for t in threads:
            t.join(60)
        assert not any(t.is_alive() for t in threads), "a hammering thread hung"
        assert auto._thread.is_alive(), "the planning thread died"
        switches = runtime.counters.plan_switches
    finally:
        stop.set()
        client.close()
        auto.close()
        server.stop(grace=None)
        link.close()
        logging.getLogger().removeHandler(errors)

    assert failures == []
    # Nothing lost: every request sent was answered, and the runtime counted each once, none as an error.
    assert len(answered) == sum(sent.values()) > 20
    assert runtime.counters.requests == len(answered) and runtime.counters.errors == 0
    assert switches > 10  # the pins and re-plans really did interleave with the requests
    placements, quantized = Counter(), 0
    for n, reply in answered:
        assert not reply.HasField("error"), reply.error
        placements[edge_pb2.Placement.Name(reply.placement)] += 1
        out = outputs_of(reply)[0]
        nearest = max(range(len(refs)), key=lambda i: cosine(out, refs[i]))
        assert nearest == n, f"request for input {n} answered with input {nearest}'s output"
        if reply.plan.weight_bits:  # an int8 head: close, not exact
            quantized += 1
            assert cosine(out, refs[n]) >= 0.99
        else:  # every float plan is exact: fp32 features, same kernels (one thread) on both sides
            assert torch.equal(out, refs[n]), (reply.plan, reply.note)
    assert placements["SPLIT"] and placements["EDGE_ONLY"] and placements["CLOUD_ONLY"], placements
    # Switching never sent a request to a stream already closed: none fell back (the cloud stayed up).
    assert placements["LOCAL_FALLBACK"] == 0, Counter(r.note for _, r in answered if r.note)
    # Each quantized head was built once, though pins for it raced from several threads.
    assert builds and set(builds.values()) == {1}, builds
    assert quantized > 0
