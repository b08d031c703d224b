"""``cut: auto`` against a real cloud daemon: the edge plans at start, reports its prediction next to
measured latency, re-plans on request, and stops re-planning while a plan is pinned."""

from __future__ import annotations

import time
from pathlib import Path

import grpc
import pytest
import torch
import yaml

from cleave_cli.client import EdgeClient, outputs_of
from cleave_cli.launch import DaemonProcess, edge_process, free_port
from partitioner.loaded import LoadedModel
from partitioner.models import calibration_batch
from protos.cleave.v1 import edge_pb2, tensor_pb2

from .conftest import MODEL

pytestmark = [pytest.mark.integration]


def start_edge(daemon_dir: Path, cloud: DaemonProcess, name: str, autoplan: dict) -> DaemonProcess:
    config = daemon_dir / f"{name}.yaml"
    config.write_text(yaml.safe_dump({"model": MODEL, "torch_threads": 1, "autoplan": autoplan}))
    return edge_process(config, free_port(), cloud.port, daemon_dir / f"{name}.log").start()


def wait_planned(client: EdgeClient, timeout: float = 90.0) -> edge_pb2.EdgeStatus:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        status = client.status()
        if status.plan.reason.startswith("planned"):
            return status
        time.sleep(0.3)
    raise AssertionError(f"no plan after {timeout}s: {status.planner_error}")


def test_edge_plans_by_itself(cloud: DaemonProcess, daemon_dir: Path, local_model: LoadedModel) -> None:
    edge = start_edge(daemon_dir, cloud, "edge-auto", {"check_interval_s": 0.5})
    try:
        client = EdgeClient(edge.address)
        status = wait_planned(client)
        plan = status.plan
        assert status.auto_plan and status.planner_error == ""
        assert plan.objective == "latency" and plan.predicted.total_ms > 0
        assert plan.predicted_ms == pytest.approx(plan.predicted.total_ms)
        # What the plan sends per request: nothing from the edge alone, the planner's measured bytes otherwise.
        assert (plan.predicted_bytes == 0) == (plan.placement == edge_pb2.EDGE_ONLY), plan
        # The accuracy of the plan in user terms, measured on the calibration images.
        assert "top-1 agreement" in plan.reason and "on 8 calibration images" in plan.reason
        assert status.link.rtt_ms > 0 and status.link.up_mbps > 0 and status.link.down_mbps > 0

        x = calibration_batch(local_model.input_shape, 1, seed=9)
        with torch.inference_mode():
            ref = local_model.module(x)
        for _ in range(5):
            reply = client.infer(x)
            assert reply.placement in (edge_pb2.SPLIT, edge_pb2.CLOUD_ONLY, edge_pb2.EDGE_ONLY), reply.note
            rel = float((outputs_of(reply)[0] - ref).abs().max() / ref.abs().max())
            assert rel <= 0.05  # the planner's default accuracy budget
        status = client.status()
        assert status.mean_latency_ms > 0  # measured, reported next to the prediction

        replanned = client.stub.Replan(edge_pb2.ReplanRequest(), timeout=60)
        assert replanned.reason.startswith("replan requested") and replanned.predicted.total_ms > 0

        client.pin("edge", "fp32")
        assert not client.status().auto_plan  # pinned: the planner keeps its hands off
        time.sleep(1.5)
        assert client.status().plan.placement == edge_pb2.EDGE_ONLY
        client.stub.Replan(edge_pb2.ReplanRequest(), timeout=60)
        assert client.status().auto_plan
    finally:
        edge.stop()


def test_baseline_edge_plans_like_the_baseline(cloud: DaemonProcess, daemon_dir: Path) -> None:
    baseline = start_edge(daemon_dir, cloud, "edge-baseline", {"baseline": "cloud-jpeg"})
    try:
        status = wait_planned(EdgeClient(baseline.address))
        assert status.plan.placement == edge_pb2.CLOUD_ONLY and status.plan.encoding.encoding == tensor_pb2.JPEG
    finally:
        baseline.stop()


def test_fixed_cut_edge_refuses_automatic_replan(cloud: DaemonProcess, daemon_dir: Path) -> None:
    config = daemon_dir / "edge-fixed.yaml"
    config.write_text(yaml.safe_dump({"model": MODEL, "plan": {"cut": "cloud", "encoding": "int8"}}))
    fixed = edge_process(config, free_port(), cloud.port, daemon_dir / "edge-fixed.log").start()
    try:
        client = EdgeClient(fixed.address)
        with pytest.raises(grpc.RpcError) as err:
            client.stub.Replan(edge_pb2.ReplanRequest(), timeout=10)
        assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION and "--cut auto" in err.value.details()
        assert client.status().plan.placement == edge_pb2.CLOUD_ONLY  # unchanged
    finally:
        fixed.stop()


def test_cloud_replies_teach_the_planner_about_the_candidate_that_served_them() -> None:
    """Every answered request the runtime records reaches the planner as that candidate's bytes."""
    from types import SimpleNamespace

    from compressor import EncodingSpec
    from edge_node.autoplan import AutoPlanner
    from edge_node.config import AutoPlanSettings
    from edge_node.runtime import ActivePlan, Counters, Outcome
    from partitioner.costmodel import CLOUD_ONLY, SPLIT, Link
    from partitioner.placement import Placement
    from partitioner.planner import Planner

    from .test_planner import synthetic_cost

    runtime = SimpleNamespace(counters=Counters())
    auto = AutoPlanner(None, runtime, None, None, AutoPlanSettings())  # type: ignore[arg-type]
    auto._thread = SimpleNamespace(start=lambda: None)  # listen, without the planning loop
    auto.start()
    auto.use(planner := Planner(synthetic_cost()))
    split = next(c for c in planner.candidates if c.kind == SPLIT and c.cut_index == 2 and c.encoding == "int8")
    cloud_only = next(c for c in planner.candidates if c.kind == CLOUD_ONLY)
    served = ActivePlan(Placement.SPLIT, SimpleNamespace(index=2), EncodingSpec.parse("int8"), None, None)
    timing = edge_pb2.StageTiming(cloud_compute_ms=split.cloud_ms * 2)
    for _ in range(3):
        runtime.counters.record(Outcome([], Placement.SPLIT, served, timing, split.bytes_up * 3))
    fallback = Outcome([], Placement.LOCAL_FALLBACK, served, edge_pb2.StageTiming(), 10**9)
    runtime.counters.record(fallback)  # ignored
    # The requests' threads only posted their observations; the planner is untouched until its thread reads them.
    assert planner.byte_scale(split) == 1.0 and planner.cloud_scale == 1.0 and auto._inbox.qsize() == 3
    while not auto._inbox.empty():
        auto._handle(auto._inbox.get_nowait())
    link = Link(10, 10, 5.0)
    assert planner.byte_scale(split) == pytest.approx(3.0, rel=1e-3)
    assert planner.cloud_scale == pytest.approx(2.0)
    assert planner.score(split, link).predicted.upload_ms == pytest.approx(3 * split.predict(link).upload_ms)
    assert planner.byte_scale(cloud_only) == 1.0


def test_requests_served_on_the_edge_teach_the_planner_the_devices_real_speed() -> None:
    """Edge-only and split requests report their edge compute; cloud-only ones ran no head and say nothing."""
    from types import SimpleNamespace

    from compressor import EncodingSpec
    from edge_node.autoplan import AutoPlanner
    from edge_node.config import AutoPlanSettings
    from edge_node.runtime import ActivePlan, Counters, Outcome
    from partitioner.costmodel import EDGE_ONLY, Link
    from partitioner.placement import Placement
    from partitioner.planner import Planner

    from .test_planner import synthetic_cost

    runtime = SimpleNamespace(counters=Counters())
    auto = AutoPlanner(None, runtime, None, None, AutoPlanSettings())  # type: ignore[arg-type]
    auto._thread = SimpleNamespace(start=lambda: None)  # listen, without the planning loop
    auto.start()
    auto.use(planner := Planner(synthetic_cost()))
    edge_only = next(c for c in planner.candidates if c.kind == EDGE_ONLY)
    local = ActivePlan(Placement.EDGE_ONLY, None, EncodingSpec(), None, None)
    cloud = ActivePlan(Placement.CLOUD_ONLY, SimpleNamespace(index=0), EncodingSpec.parse("int8c"), None, None)
    for _ in range(3):
        timing = edge_pb2.StageTiming(edge_compute_ms=edge_only.edge_ms * 1.3, total_ms=edge_only.edge_ms * 1.3)
        runtime.counters.record(Outcome([], Placement.EDGE_ONLY, local, timing))
        runtime.counters.record(Outcome([], Placement.CLOUD_ONLY, cloud, edge_pb2.StageTiming(edge_compute_ms=0.05)))
    while not auto._inbox.empty():
        auto._handle(auto._inbox.get_nowait())
    assert planner.edge_scale == pytest.approx(1.3)
    assert planner.score(edge_only, Link(10, 10, 5.0)).cost_ms == pytest.approx(1.3 * edge_only.edge_ms)


@pytest.mark.parametrize("bits", [32, 8])
def test_the_first_plan_waits_for_every_check_only_with_float_heads(bits: int) -> None:
    """With quantized heads each accuracy check builds a head: the first plan is the best known to fit after
    measure_budget_s and the checks that follow go on; with float heads it checks every candidate it reaches."""
    import time
    from types import SimpleNamespace

    from edge_node.autoplan import AutoPlanner
    from edge_node.config import AutoPlanSettings
    from partitioner.costmodel import SPLIT, Link
    from partitioner.planner import Budgets, Distortion, Planner

    from .test_planner import synthetic_cost

    def slow_and_lossy(candidate) -> Distortion:  # every lossy candidate breaks the budget, after 0.1 s
        time.sleep(0.1)
        return Distortion(1.0, 0.5)

    runtime = SimpleNamespace(head_bits=bits)
    auto = AutoPlanner(None, runtime, None, None, AutoPlanSettings(measure_budget_s=0.25))  # type: ignore[arg-type]
    planner = Planner(synthetic_cost(), Budgets(min_top1=0.99), slow_and_lossy, quantized_heads=bits != 32)
    auto.use(planner)
    link = Link(10.0, 10.0, 1.0)
    ordered = sorted((planner.score(c, link) for c in planner.candidates), key=lambda s: s.cost_ms)
    first_exact = next(i for i, s in enumerate(ordered) if planner.lossless(s.candidate))
    assert first_exact >= 4  # lossy candidates the walk reaches first: 0.4 s of checks or more
    best = auto.first_plan(link)
    assert best.candidate == ordered[first_exact].candidate  # every lossy one broke the budget
    if bits == 32:
        assert planner.walk_complete and planner.measurements == first_exact
    else:
        assert not any(c.kind == SPLIT for c in planner.candidates if planner.lossless(c))
        assert not planner.walk_complete and 1 <= planner.measurements < first_exact  # stopped after 0.25 s
