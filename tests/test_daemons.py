"""Both daemons as real processes, driven through gRPC."""

from __future__ import annotations

import json
from pathlib import Path

import grpc
import pytest
import torch
import yaml
from grpc_health.v1 import health_pb2, health_pb2_grpc

from cleave_cli.client import EdgeClient, outputs_of
from cleave_cli.images import synthetic_images
from cleave_cli.launch import DaemonProcess, edge_process, free_port
from compressor import EncodingSpec, encode, to_chunks
from partitioner.loaded import LoadedModel
from protos.cleave.v1 import edge_pb2
from protos.cleave.v1 import split_inference_pb2 as si_pb2
from protos.cleave.v1 import split_inference_pb2_grpc as si_grpc

from .conftest import MODEL

pytestmark = [pytest.mark.integration]


def healthy(address: str) -> bool:
    with grpc.insecure_channel(address) as channel:
        reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5)
    return reply.status == health_pb2.HealthCheckResponse.SERVING


def residual_cut(model: LoadedModel) -> str:
    """A cut inside a residual block: two values cross it."""
    return next(c.name for c in model.graph.cuts if c.target.startswith("layer2") and len(c.live) == 2)


@pytest.fixture(scope="module")
def inputs(local_model: LoadedModel) -> torch.Tensor:
    return synthetic_images(3, local_model.input_shape, seed=7)


@pytest.fixture(scope="module")
def references(local_model: LoadedModel, inputs: torch.Tensor) -> torch.Tensor:
    # One at a time, as the daemons see them: conv kernels differ with batch size in the last bit.
    with torch.inference_mode():
        return torch.cat([local_model.module(x.unsqueeze(0)) for x in inputs])


def test_cloud_get_info_lists_model_and_cuts(cloud: DaemonProcess, local_model: LoadedModel) -> None:
    with grpc.insecure_channel(cloud.address) as channel:
        info = si_grpc.SplitInferenceStub(channel).GetInfo(si_pb2.GetInfoRequest(include_cuts=True), timeout=10)
    (model,) = info.models
    assert model.name == "resnet18" and model.fingerprint == local_model.fingerprint
    assert [c.name for c in model.cuts] == [c.name for c in local_model.graph.cuts]


@pytest.mark.parametrize("cut", ["cloud", "residual", "last"])
def test_split_fp32_equals_local_model_exactly(
    edge: DaemonProcess, local_model: LoadedModel, inputs: torch.Tensor, references: torch.Tensor, cut: str
) -> None:
    key = {"cloud": "cloud", "residual": residual_cut(local_model), "last": local_model.graph.cuts[-1].name}[cut]
    client = EdgeClient(edge.address)
    plan = client.pin(key, "fp32")
    assert plan.placement == (edge_pb2.CLOUD_ONLY if cut == "cloud" else edge_pb2.SPLIT)
    for x, ref in zip(inputs, references, strict=True):
        reply = client.infer(x.unsqueeze(0))
        assert reply.placement == plan.placement, reply.note
        assert torch.equal(outputs_of(reply)[0], ref.unsqueeze(0))
        assert reply.bytes_up > 0 and reply.timing.cloud_compute_ms > 0


@pytest.mark.parametrize("encoding", ["fp16", "int8", "int4c"])
def test_quantized_split_stays_close(
    edge: DaemonProcess,
    local_model: LoadedModel,
    inputs: torch.Tensor,
    references: torch.Tensor,
    encoding: str,
) -> None:
    client = EdgeClient(edge.address)
    client.pin(residual_cut(local_model), "fp32")
    fp32_bytes = client.infer(inputs[:1]).bytes_up
    client.pin(residual_cut(local_model), encoding)
    reply = client.infer(inputs[:1])
    assert reply.placement == edge_pb2.SPLIT, reply.note
    out = outputs_of(reply)[0]
    rel = float((out - references[:1]).abs().max() / references.abs().max())
    assert rel < {"fp16": 1e-2, "int8": 0.1, "int4c": 0.5}[encoding]
    assert reply.bytes_up < fp32_bytes


def test_infer_stream_pipelines_many_requests(
    edge: DaemonProcess, local_model: LoadedModel, inputs: torch.Tensor, references: torch.Tensor
) -> None:
    client = EdgeClient(edge.address)
    client.pin(residual_cut(local_model), "fp32")
    batch = [inputs[i % 3].unsqueeze(0) for i in range(9)]
    replies = {r.request_id: r for r in client.infer_stream(batch)}
    assert sorted(replies) == list(range(1, 10))
    for rid, reply in replies.items():
        assert torch.equal(outputs_of(reply)[0], references[(rid - 1) % 3].unsqueeze(0))


def test_edge_rejects_bad_input_and_keeps_serving(edge: DaemonProcess, inputs: torch.Tensor) -> None:
    client = EdgeClient(edge.address)
    with pytest.raises(grpc.RpcError) as err:
        client.infer(torch.zeros(1, 3, 32, 32))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "inputs[0].shape" in err.value.details()
    bad = encode(inputs[:1], EncodingSpec(encoding="raw", codec="none"))
    bad.payload = bad.payload[:-4]
    with pytest.raises(grpc.RpcError) as err:
        client.stub.Infer(edge_pb2.EdgeInferRequest(inputs=[bad]), timeout=10)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "inputs[0]" in err.value.details()
    assert healthy(edge.address)
    assert client.infer(inputs[:1]).outputs


def open_session(stub: si_grpc.SplitInferenceStub, model: LoadedModel, cut: str) -> str:
    reply = stub.OpenSession(
        si_pb2.OpenSessionRequest(model="resnet18", fingerprint=model.fingerprint, cut=cut, client="test"),
        timeout=10,
    )
    return reply.session_id


def test_fingerprint_mismatch_is_refused(cloud: DaemonProcess, local_model: LoadedModel) -> None:
    with grpc.insecure_channel(cloud.address) as channel:
        stub = si_grpc.SplitInferenceStub(channel)
        with pytest.raises(grpc.RpcError) as err:
            stub.OpenSession(si_pb2.OpenSessionRequest(model="resnet18", fingerprint="0" * 64, cut="3"), timeout=10)
        assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert "fingerprint" in err.value.details()
        with pytest.raises(grpc.RpcError) as err:
            stub.OpenSession(si_pb2.OpenSessionRequest(model="nope", fingerprint="x", cut="3"), timeout=10)
        assert err.value.code() == grpc.StatusCode.NOT_FOUND
        with pytest.raises(grpc.RpcError) as err:
            stub.OpenSession(
                si_pb2.OpenSessionRequest(model="resnet18", fingerprint=local_model.fingerprint, cut="no_such_node"),
                timeout=10,
            )
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "cut" in err.value.details()


def test_edge_with_other_weights_never_gets_served_by_the_cloud(
    cloud: DaemonProcess, daemon_dir: Path, inputs: torch.Tensor
) -> None:
    config = daemon_dir / "edge-other.yaml"
    config.write_text(yaml.safe_dump({"model": {**MODEL, "seed": 1}, "plan": {"cut": "cloud", "encoding": "fp32"}}))
    other = edge_process(config, free_port(), cloud.port, daemon_dir / "edge-other.log").start()
    try:
        client = EdgeClient(other.address)
        reply = client.infer(inputs[:1])
        assert reply.placement == edge_pb2.LOCAL_FALLBACK
        status = client.status()
        assert not status.cloud_reachable and "fingerprint" in status.cloud_error
    finally:
        other.stop()


def frames_for(session_id: str, request_id: int, tensors: list) -> list[si_pb2.InferFrame]:
    groups = list(to_chunks(tensors, 1 << 20))
    return [
        si_pb2.InferFrame(session_id=session_id, request_id=request_id, chunks=g, last=i == len(groups) - 1)
        for i, g in enumerate(groups)
    ]


def test_garbage_on_infer_answers_invalid_argument(cloud: DaemonProcess, local_model: LoadedModel) -> None:
    cut = local_model.graph.cut(residual_cut(local_model))
    _, head, _ = local_model.parts(cut.name)
    features = head(torch.randn(local_model.input_shape))
    good = [encode(f, EncodingSpec(encoding="raw")) for f in features]
    flipped = [encode(f, EncodingSpec(encoding="raw")) for f in features]
    flipped[0].payload = bytes([flipped[0].payload[0] ^ 1]) + flipped[0].payload[1:]
    wrong_shape = [encode(f[:, :1], EncodingSpec(encoding="raw")) for f in features]
    bad_bits = [encode(f, EncodingSpec(encoding="affine", bits=4)) for f in features]
    bad_bits[1].bits = 7
    with grpc.insecure_channel(cloud.address) as channel:
        stub = si_grpc.SplitInferenceStub(channel)
        sid = open_session(stub, local_model, cut.name)
        frames = (
            frames_for(sid, 1, flipped)
            + frames_for(sid, 2, wrong_shape)
            + frames_for(sid, 3, bad_bits)
            + frames_for("no-such-session", 4, good)
            + frames_for(sid, 5, good)
        )
        results = {r.request_id: r for r in stub.Infer(iter(frames), timeout=30)}
        for rid, needle in [(1, "crc"), (2, "shape"), (3, "bits"), (4, "session_id")]:
            assert results[rid].error.code in (
                grpc.StatusCode.INVALID_ARGUMENT.value[0],
                grpc.StatusCode.NOT_FOUND.value[0],
            ), rid
            assert needle in results[rid].error.message.lower(), results[rid].error.message
        assert results[1].error.code == grpc.StatusCode.INVALID_ARGUMENT.value[0]
        assert not results[5].HasField("error") and results[5].chunks  # the stream kept serving

        # Bytes that are not an InferFrame at all.
        raw = channel.stream_stream("/cleave.v1.SplitInference/Infer")
        with pytest.raises(grpc.RpcError) as err:
            list(raw(iter([b"\xff\xff\xff\xff garbage"]), timeout=10))
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "cleave.v1.InferFrame" in err.value.details()
    assert healthy(cloud.address)


def test_cli_info_lists_cuts(cloud: DaemonProcess, local_model: LoadedModel, capsys: pytest.CaptureFixture) -> None:
    from cleave_cli.main import main

    assert main(["info", "--cloud", cloud.address]) == 0
    out = capsys.readouterr().out
    assert local_model.fingerprint[:16] in out
    assert all(c.name in out for c in local_model.graph.cuts)
    assert main(["info", "--cloud", cloud.address, "--model", "nope"]) == 1
    assert "NOT_FOUND" in capsys.readouterr().err


def test_cli_infer_random_and_image_files(edge: DaemonProcess, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    from PIL import Image

    from cleave_cli.main import main

    assert main(["infer", "--edge", edge.address, "--random", "2", "--json"]) == 0
    records = json.loads(capsys.readouterr().out)
    assert len(records) == 2 and all(r["top"] and r["timing_ms"]["total_ms"] > 0 for r in records)

    image = tmp_path / "cat.png"
    Image.fromarray(torch.randint(0, 255, (40, 50, 3), dtype=torch.uint8).numpy()).save(image)
    assert main(["infer", "--edge", edge.address, str(image)]) == 0
    table = capsys.readouterr().out
    assert "cat.png" in table and "total" in table

    (tmp_path / "not-an-image.png").write_bytes(b"hello")
    assert main(["infer", "--edge", edge.address, str(tmp_path / "not-an-image.png")]) == 1
    assert "cannot decode image" in capsys.readouterr().err
