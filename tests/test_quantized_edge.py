"""The edge runs a quantized head: int8 kernels or packed low-bit weights, recorded in the plan."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from cleave_cli.client import EdgeClient, outputs_of
from cleave_cli.launch import DaemonProcess
from compressor import EncodingSpec
from edge_node.autoplan import AutoPlanner
from edge_node.cloud_link import CloudLink
from edge_node.config import AutoPlanSettings, Reconnect
from edge_node.link import LinkMonitor
from edge_node.runtime import EdgeRuntime
from edge_node.servicer import plan_to_proto
from partitioner.costmodel import SPLIT, Breakdown, Candidate
from partitioner.loaded import LoadedModel
from partitioner.models import calibration_batch
from partitioner.placement import Placement
from partitioner.planner import Scored
from protos.cleave.v1 import edge_pb2

CUT = "layer3_0_relu"


def cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(F.cosine_similarity(a.flatten(), b.flatten(), dim=0))


@pytest.fixture()
def runtime(local_model: LoadedModel):
    link = CloudLink("127.0.0.1:1", local_model, LinkMonitor(), Reconnect(0.05, 0.1, 0.5), 1 << 20, 1 << 24).start()
    yield EdgeRuntime(local_model, link, request_timeout_s=2.0)
    link.close()


def test_int8_and_packed_heads_run_and_are_reported(runtime: EdgeRuntime, local_model: LoadedModel) -> None:
    x = calibration_batch(local_model.input_shape, 1, seed=11)
    with torch.inference_mode():
        ref = local_model.module(x)
    float_plan = runtime.pin(SPLIT, CUT, weight_bits=32)
    assert float_plan.weight_bits == {} and not plan_to_proto(float_plan, "m").weight_bits
    plan = runtime.pin(SPLIT, CUT, weight_bits=8)
    assert plan.weight_bits and set(plan.weight_bits.values()) == {8}
    assert dict(plan_to_proto(plan, "m").weight_bits) == plan.weight_bits
    assert type(plan.head).__name__ == "QuantizedHead"
    out = runtime.infer([x])  # the cloud is unreachable: the float tail runs here on int8 features
    assert out.placement == Placement.LOCAL_FALLBACK
    assert cosine(out.outputs[0], ref) >= 0.99 and not torch.equal(out.outputs[0], ref)
    packed = runtime.pin(SPLIT, CUT, weight_bits={next(iter(plan.weight_bits)): 4})
    assert sorted(set(packed.weight_bits.values())) == [4, 32]
    assert cosine(runtime.infer([x]).outputs[0], ref) >= 0.95
    with pytest.raises(Exception, match="weight_bits"):
        runtime.pin(SPLIT, CUT, weight_bits={"no.such.layer": 8})


def test_autoplanner_allocates_bits_for_a_split(runtime: EdgeRuntime, local_model: LoadedModel) -> None:
    planner = AutoPlanner(local_model, runtime, None, LinkMonitor(), AutoPlanSettings(), allocate_head_bits=True)
    planner._calib = calibration_batch(local_model.input_shape, 8)
    cut = local_model.graph.cut(CUT)
    candidate = Candidate(SPLIT, cut.index, cut.name, "int8", 1000, 100, 1.0, 0.1, 0.1, 1.0, 10**9)
    bits = planner.weight_bits_for(Scored(candidate, Breakdown(), 1.0))
    assert bits and set(bits.values()) <= {2, 4, 6, 8}
    plan = runtime.pin(SPLIT, cut.index, EncodingSpec.parse("int8"), weight_bits=bits)
    assert plan.weight_bits == bits
    assert planner.weight_bits_for(Scored(candidate, Breakdown(), 1.0)) == bits  # cached per model
    off = AutoPlanner(local_model, runtime, None, LinkMonitor(), AutoPlanSettings(), allocate_head_bits=False)
    assert off.weight_bits_for(Scored(candidate, Breakdown(), 1.0)) is None


def test_replan_pins_an_int8_head_on_the_daemon(edge: DaemonProcess, local_model: LoadedModel) -> None:
    client = EdgeClient(edge.address)
    plan = edge_pb2.Plan(cut_name=CUT, encoding=EncodingSpec.parse("fp32").to_proto())
    plan.weight_bits["*"] = 8
    pinned = client.stub.Replan(edge_pb2.ReplanRequest(plan=plan), timeout=120)
    assert pinned.weight_bits and set(pinned.weight_bits.values()) == {8}
    x = calibration_batch(local_model.input_shape, 1, seed=12)
    with torch.inference_mode():
        ref = local_model.module(x)
    reply = client.infer(x)
    assert reply.placement == edge_pb2.SPLIT, reply.note
    assert cosine(outputs_of(reply)[0], ref) >= 0.99
    client.pin(CUT, "fp32")  # back to the exact float head for the other tests
    assert not client.status().plan.weight_bits


def test_int8_head_speedups_are_measured_where_the_planner_asks(local_model: LoadedModel) -> None:
    from edge_node.autoplan import _anchor_cuts
    from partitioner.quantized_head import measure_speedups

    anchors = _anchor_cuts(local_model)
    splits = [c.index for c in local_model.graph.cuts if c.index > 0]
    assert len(anchors) == 3 and anchors[0] == splits[0] and anchors[-1] == splits[-1]
    cut = local_model.graph.cut(CUT).index
    speedups = measure_speedups(local_model, calibration_batch(local_model.input_shape, 4), [cut], repeats=3)
    assert list(speedups) == [cut] and 0 < speedups[cut] < float("inf")
