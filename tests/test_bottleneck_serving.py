"""A learned bottleneck served by both daemons: the edge runs head + encoder and sends the
range-coded latent (encoding ``entropy``), the cloud decodes it with the tables from the same
artifacts and runs decoder + tail; corrupt or oversized bitstreams answer INVALID_ARGUMENT, and an
edge without the bottleneck is refused by fingerprint."""

from __future__ import annotations

import zlib

import grpc
import pytest
import torch
import yaml

from cleave_cli.client import EdgeClient, outputs_of
from cleave_cli.launch import cloud_process, edge_process, free_port
from compressor import EncodingSpec, encode, to_chunks
from compressor.entropy import max_payload
from partitioner.bottleneck.served import LATENT_CUT
from partitioner.loaded import LoadedModel
from partitioner.models import ModelSpec
from protos.cleave.v1 import edge_pb2, tensor_pb2
from protos.cleave.v1 import split_inference_pb2 as si_pb2
from protos.cleave.v1 import split_inference_pb2_grpc as si_grpc
from tests.support import tiny_bottleneck as small

pytestmark = [pytest.mark.integration]

CUT = "layer1_1_relu_1"


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory):
    """Artifacts of a small trained bottleneck, both daemons serving it, and the model as they load it."""
    torch.set_num_threads(1)
    d = tmp_path_factory.mktemp("bneck")
    small.train_artifacts(d, CUT, augment_copies=3, max_steps=80, budget_s=40)
    x, _, _ = small.images()
    _, held_idx = small.split()
    model = small.classifier()
    spec = {
        "name": "rnb",
        "source": "resnet18",
        "weights": str(d / "model.safetensors"),
        "input_shape": list(small.SHAPE),
        "num_classes": 4,
    }
    with_b = {**spec, "bottleneck": str(d / "bottleneck")}
    (d / "cloud.yaml").write_text(yaml.safe_dump({"models": [with_b], "torch_threads": 1}))
    edge_cfg = {
        "model": with_b,
        "torch_threads": 1,
        "request_timeout_s": 20.0,
        "plan": {"cut": LATENT_CUT, "encoding": "entropy"},
        "reconnect": {"initial_s": 0.1, "max_s": 0.5, "connect_timeout_s": 2.0},
    }
    (d / "edge.yaml").write_text(yaml.safe_dump(edge_cfg))
    (d / "edge-plain.yaml").write_text(yaml.safe_dump({**edge_cfg, "model": spec, "plan": {"cut": CUT}}))
    cloud = cloud_process(d / "cloud.yaml", free_port(), d / "cloud.log").start()
    edge = edge_process(d / "edge.yaml", free_port(), cloud.port, d / "edge.log").start()
    try:
        yield {
            "dir": d,
            "cloud": cloud,
            "edge": edge,
            "local": LoadedModel.load(ModelSpec.from_dict(with_b)),
            "plain": model,
            "held": x[held_idx],
        }
    finally:
        edge.stop()
        cloud.stop()


def test_edge_sends_the_range_coded_latent_and_the_cloud_serves_it(served: dict) -> None:
    local, held = served["local"], served["held"]
    client = EdgeClient(served["edge"].address)
    with pytest.raises(grpc.RpcError) as err:
        client.pin("head_layer1_1_bn2", "entropy")  # the entropy coder has tables for the latent only
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "bottleneck_latent" in err.value.details()
    plan = client.pin(LATENT_CUT, "entropy")
    assert plan.placement == edge_pb2.SPLIT
    latent = local.graph.cut(LATENT_CUT)
    int8_bytes = 64 * 8 * 8  # the plain cut's int8 codes before zstd, per image
    agree = 0
    for x in held:
        reply = client.infer(x.unsqueeze(0))
        assert reply.placement == edge_pb2.SPLIT, reply.note
        out = outputs_of(reply)[0]
        with torch.inference_mode():
            ref = local.module(x.unsqueeze(0))
            plain = served["plain"](x.unsqueeze(0))
        assert torch.allclose(out, ref, atol=1e-4)  # the same bottlenecked model, split across the link
        assert 0 < reply.bytes_up < int8_bytes / 4, reply.bytes_up
        agree += int(out.argmax() == plain.argmax())
    assert latent.shapes[0][1] == 8 and agree >= 0.8 * len(held)


def test_corrupt_or_oversized_bitstreams_answer_invalid_argument(served: dict) -> None:
    local = served["local"]
    _, head, _ = local.parts(LATENT_CUT)
    (latent,) = head(served["held"][:1])
    good = encode(latent, EncodingSpec.parse("entropy"), local.entropy_tables)

    def tampered(payload: bytes, raw_size: int | None = None):
        msg = type(good)()
        msg.CopyFrom(good)
        msg.payload = payload
        msg.payload_size = len(payload)
        msg.raw_size = len(payload) if raw_size is None else raw_size
        msg.crc32 = zlib.crc32(payload)  # the checksum holds: the stream itself is what is wrong
        return msg

    huge = b"\0" * (max_payload(latent.shape) + 8)
    cases = {
        1: (tampered(good.payload + good.payload), "more data"),
        2: (tampered(good.payload[:-1]), "32-bit words"),
        3: (tampered(huge), "raw_size"),
        4: (tampered(good.payload, raw_size=len(good.payload) + 4), "payload_size"),
        5: (tampered(huge, raw_size=0), "payload_size"),  # the short header: bounded all the same
    }
    assert good.raw_size == 0  # the short header (raw_size, dtype and codec implied)
    old = tampered(good.payload)  # a frame from before the short header, raw_size set
    old.dtype, old.codec = tensor_pb2.FLOAT32, tensor_pb2.NONE
    with grpc.insecure_channel(served["cloud"].address) as channel:
        stub = si_grpc.SplitInferenceStub(channel)
        sid = stub.OpenSession(
            si_pb2.OpenSessionRequest(model="rnb", fingerprint=local.fingerprint, cut=LATENT_CUT, client="t"),
            timeout=10,
        ).session_id
        frames = []
        for rid, (msg, _) in [*cases.items(), (8, (old, "")), (9, (good, ""))]:
            for i, chunks in enumerate(groups := list(to_chunks([msg], 1 << 20))):
                frames.append(
                    si_pb2.InferFrame(session_id=sid, request_id=rid, chunks=chunks, last=i == len(groups) - 1)
                )
        results = {r.request_id: r for r in stub.Infer(iter(frames), timeout=30)}
        with pytest.raises(grpc.RpcError) as err:
            stub.OpenSession(
                si_pb2.OpenSessionRequest(
                    model="rnb",
                    fingerprint=local.fingerprint,
                    cut=LATENT_CUT,
                    result_encoding=EncodingSpec.parse("entropy").to_proto(),
                ),
                timeout=10,
            )
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "result_encoding" in err.value.details()
        for rid, (_, needle) in cases.items():
            err = results[rid].error
            assert err.code == grpc.StatusCode.INVALID_ARGUMENT.value[0], (rid, err)
            assert needle in err.message, (rid, err.message)
        assert not results[9].HasField("error") and results[9].chunks  # the stream kept serving
        assert not results[8].HasField("error") and results[8].chunks == results[9].chunks


def test_an_edge_without_the_bottleneck_is_refused(served: dict) -> None:
    d = served["dir"]
    other = edge_process(d / "edge-plain.yaml", free_port(), served["cloud"].port, d / "edge-plain.log").start()
    try:
        client = EdgeClient(other.address)
        reply = client.infer(served["held"][:1])
        assert reply.placement == edge_pb2.LOCAL_FALLBACK
        assert "fingerprint" in client.status().cloud_error
    finally:
        other.stop()
    with pytest.raises(ValueError, match="trained on another model"):
        LoadedModel.load(
            ModelSpec("x", "resnet18", input_shape=small.SHAPE, num_classes=4, bottleneck=str(d / "bottleneck"))
        )


def test_planner_ranks_the_bottleneck_latent_with_its_measured_bytes(served: dict) -> None:
    from partitioner.costmodel import SPLIT, CostModel, Link
    from partitioner.planner import Budgets, Planner, distortion_meter
    from partitioner.profile import profile_model, scaled

    local, held = served["local"], served["held"]
    here = profile_model(local, repeats=2, warmup=1, head_samples=4)
    # a weak edge (20x this host) and a fast cloud, so that splitting pays
    cost = CostModel.measure(local, scaled(here, 20.0, "edge"), scaled(here, 0.25, "cloud"), held[:4])
    latent = next(c for c in cost.cuts if c.name == LATENT_CUT)
    plain = next(c for c in cost.cuts if c.name == "head_layer1_1_relu_1")
    assert "entropy" in latent.feature_bytes and "entropy" not in plain.feature_bytes
    assert latent.feature_bytes["entropy"] < plain.feature_bytes["int8"] / 4
    # the encoder's convolutions are profiled nodes of the head: the latent's head costs more than the cut's
    assert latent.edge_ms >= plain.edge_ms
    # the latent is coded exactly: entropy agrees with the served model on every calibration image
    planner = Planner(cost, Budgets(min_top1=1.0), distortion_meter(local, held[:4]))
    ranked = planner.rank(Link(up_mbps=0.5, down_mbps=10.0, rtt_ms=10.0))  # every budget checked
    labels = [s.candidate.label for s in ranked]
    assert f"{LATENT_CUT}#{latent.index} entropy" in labels
    (ours,) = [s for s in ranked if s.candidate.encoding == "entropy"]
    assert ours.candidate.kind == SPLIT and not ours.rejected and ours.distortion.top1 == 1.0
    assert ours.candidate.bytes_up == latent.feature_bytes["entropy"] and ours.predicted.upload_ms > 0
    # range coding is profiled like every codec (it was counted as 0 ms) and priced per MB of latent
    assert here.codecs["entropy"].encode_ms_per_mb > 0 and here.codecs["entropy"].decode_ms_per_mb > 0
    mb = latent.raw_bytes / 1e6
    assert latent.encode_ms["entropy"] == pytest.approx(20.0 * here.codecs["entropy"].encode_ms_per_mb * mb)
    assert latent.decode_ms["entropy"] == pytest.approx(0.25 * here.codecs["entropy"].decode_ms_per_mb * mb)
    assert ours.predicted.encode_ms == latent.encode_ms["entropy"] > 0
