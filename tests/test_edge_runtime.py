"""The edge runtime's decisions, without a server: the cloud address is a closed loopback port."""

from __future__ import annotations

import pytest
import torch

from cleave_cli.images import synthetic_images
from compressor import EncodingSpec
from edge_node.cloud_link import CloudLink
from edge_node.config import Reconnect
from edge_node.link import LinkMonitor
from edge_node.runtime import EdgeRuntime, Inflight
from partitioner.loaded import LoadedModel
from partitioner.placement import Placement
from protos.errors import InvalidArgument, ResourceExhausted

pytestmark = [pytest.mark.integration]


@pytest.fixture()
def runtime(local_model: LoadedModel):
    inflight = Inflight(2)
    link = CloudLink(
        "127.0.0.1:1", local_model, LinkMonitor(), Reconnect(0.05, 0.1, 0.5), 1 << 20, 1 << 24, in_use=inflight.in_use
    ).start()
    yield EdgeRuntime(local_model, link, request_timeout_s=2.0, inflight=inflight)
    link.close()


def cloud_link(cloud, model: LoadedModel, **kw) -> CloudLink:
    """A started link to the test cloud daemon, reconnecting fast (``kw``: CloudLink's keyword arguments)."""
    return CloudLink(cloud.address, model, LinkMonitor(), Reconnect(0.05, 0.5, 5.0), 1 << 20, 1 << 26, **kw).start()


def test_unreachable_cloud_means_exact_local_answers(runtime: EdgeRuntime, local_model: LoadedModel) -> None:
    x = synthetic_images(1, local_model.input_shape, seed=2)
    with torch.inference_mode():
        ref = local_model.module(x)
    runtime.pin(Placement.SPLIT, "layer3_0_relu", EncodingSpec.parse("int4"))
    outcome = runtime.infer([x])
    assert outcome.placement == Placement.LOCAL_FALLBACK and "cloud unreachable" in outcome.note
    assert torch.equal(outcome.outputs[0], ref)
    runtime.pin(Placement.EDGE_ONLY)
    outcome = runtime.infer([x])
    assert outcome.placement == Placement.EDGE_ONLY and torch.equal(outcome.outputs[0], ref)
    assert runtime.counters.requests == 2 and runtime.counters.fallback == 1 and runtime.counters.edge_only == 1


def test_bad_inputs_and_cuts_name_the_problem(runtime: EdgeRuntime) -> None:
    with pytest.raises(InvalidArgument, match=r"inputs\[0\].shape"):
        runtime.infer([torch.zeros(1, 3, 8, 8)])
    with pytest.raises(InvalidArgument, match=r"inputs\[0\].dtype"):
        runtime.infer([torch.zeros(1, 3, 64, 64, dtype=torch.float64)])
    with pytest.raises(InvalidArgument, match="takes 1 tensor"):
        runtime.infer([])
    with pytest.raises(InvalidArgument, match="cut: .*no_such_cut"):
        runtime.pin(Placement.SPLIT, "no_such_cut")


def test_too_many_requests_in_flight(runtime: EdgeRuntime, local_model: LoadedModel) -> None:
    for _ in range(runtime.max_inflight):  # as if two requests were running
        runtime.inflight_requests.enter(None)
    with pytest.raises(ResourceExhausted, match="max_inflight 2"):
        runtime.infer([synthetic_images(1, local_model.input_shape)])
    runtime.inflight_requests.leave(None)
    assert runtime.infer([synthetic_images(1, local_model.input_shape)]).placement == Placement.EDGE_ONLY


def test_plan_switches_under_load_fall_back_for_nothing(cloud, local_model: LoadedModel) -> None:
    """Requests that took their plan just before a switch finish on the old cut's stream, in split mode."""
    import threading
    from concurrent.futures import ThreadPoolExecutor

    inflight = Inflight(16)
    link = cloud_link(cloud, local_model, drain_s=10.0, in_use=inflight.in_use)
    runtime = EdgeRuntime(local_model, link, request_timeout_s=10.0, inflight=inflight)
    cuts = ["layer2_0_relu", "layer3_0_relu"]
    x = synthetic_images(1, local_model.input_shape, seed=4)
    with torch.inference_mode():
        ref = local_model.module(x)
    stop = threading.Event()

    def client() -> list:
        outcomes = []
        while not stop.is_set():
            outcomes.append(runtime.infer([x]))
        return outcomes

    try:
        runtime.pin(Placement.SPLIT, cuts[0], EncodingSpec.parse("int8"))
        with ThreadPoolExecutor(3) as pool:
            futures = [pool.submit(client) for _ in range(3)]
            for i in range(8):  # a switch every 0.25 s while three clients keep requests in flight
                runtime.pin(Placement.SPLIT, cuts[(i + 1) % 2], EncodingSpec.parse("int8"))
                stop.wait(0.25)
            stop.set()
            outcomes = [o for f in futures for o in f.result(timeout=60)]
    finally:
        stop.set()
        link.close()
    notes = {o.note for o in outcomes if o.placement != Placement.SPLIT}
    assert len(outcomes) >= 8 and not notes, notes
    for o in outcomes:
        assert float((o.outputs[0] - ref).abs().max() / ref.abs().max()) < 0.05


def test_replies_report_the_plan_each_request_ran_under(runtime: EdgeRuntime, local_model: LoadedModel) -> None:
    """The servicer builds a plan's message once and reuses it; a pin in between changes what replies say."""
    from edge_node.servicer import EdgeServicer, plan_to_proto

    servicer = EdgeServicer(runtime, "127.0.0.1:1", stream_window=2)
    x = synthetic_images(1, local_model.input_shape, seed=3)
    split = runtime.pin(Placement.SPLIT, "layer3_0_relu", EncodingSpec.parse("int4"), reason="first")
    first = [servicer._response(i, runtime.infer([x])) for i in range(2)]  # fall back locally: no cloud
    runtime.pin(Placement.EDGE_ONLY, reason="second")
    second = servicer._response(3, runtime.infer([x]))
    assert [r.plan.cut_name for r in first] == ["layer3_0_relu"] * 2 and first[0].plan.reason == "first"
    assert first[0].plan == first[1].plan == plan_to_proto(split, local_model.name)
    assert second.plan.placement != first[0].plan.placement and second.plan.reason == "second"
    assert second.plan == plan_to_proto(runtime.plan, local_model.name)


def test_a_lossy_plan_gets_its_reply_coded_and_an_exact_one_gets_float32(cloud, local_model: LoadedModel) -> None:
    link = cloud_link(cloud, local_model)
    runtime = EdgeRuntime(local_model, link, request_timeout_s=10.0)
    x = synthetic_images(1, local_model.input_shape, seed=5)
    try:
        with torch.inference_mode():
            ref = local_model.module(x)
        runtime.pin(Placement.SPLIT, "layer3_0_relu", EncodingSpec.parse("raw"))
        exact = runtime.infer([x])
        opened = link.sessions_opened
        runtime.pin(Placement.SPLIT, "layer3_0_relu", EncodingSpec.parse("int8"))  # same cut, another reply
        lossy = runtime.infer([x])
        assert link.sessions_opened == opened + 1
        runtime.pin(Placement.SPLIT, "layer3_0_relu", EncodingSpec.parse("raw"))
        again = runtime.infer([x])
    finally:
        link.close()
    assert exact.placement == lossy.placement == again.placement == Placement.SPLIT
    assert torch.equal(torch.as_tensor(exact.outputs[0]), ref) and torch.equal(torch.as_tensor(again.outputs[0]), ref)
    assert lossy.bytes_down < exact.bytes_down / 2  # 8-bit codes of the outputs instead of float32
    assert 0 < float((torch.as_tensor(lossy.outputs[0]) - ref).abs().max() / ref.abs().max()) < 0.05


def test_switching_back_to_a_draining_streams_cut_takes_that_stream_back(cloud, local_model: LoadedModel) -> None:
    """An edge switching back and forth between cuts, requests running at each all along (``in_use`` always
    true): switching back to a cut whose replaced stream is still draining takes that stream back instead of
    opening another session. Opening one per switch kept a stream per switch open for ``drain_s`` and ran
    into the cloud's max_streams_per_client (8): a fresh stream was refused and a request finished locally
    (tests/test_thread_stress.py, once in a fresh clone's run)."""
    cuts = [local_model.graph.cut(name).index for name in ("layer2_0_relu", "layer3_0_relu", "layer4_0_relu")]
    link = cloud_link(cloud, local_model, drain_s=30.0, in_use=lambda _cut: True)
    try:
        link.want(cuts[0])
        first = link.stream_for(cuts[0])
        link.want(cuts[1])
        second = link.stream_for(cuts[1])
        link.want(cuts[0])
        assert link.stream_for(cuts[0]) is first and not first.closing  # taken back: no new session
        assert link.stream_for(cuts[1]) is second and not second.closing  # still draining for its requests
        for n in range(24):  # three times the cloud's streams per client
            link.want(cuts[n % 3])
            stream = link.stream_for(cuts[n % 3])
            assert stream is not None and not stream.broken, (n, link.last_error)
        assert link.sessions_opened == 3
    finally:
        link.close()
