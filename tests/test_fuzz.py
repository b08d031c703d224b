"""Fuzzing every RPC of both daemons, as real processes on loopback.

Random and mutated messages, raw bytes that are not messages, and valid encoded feature tensors
with one field or chunk changed go to every method of ``SplitInference``, ``Compression``, KServe's
``GRPCInferenceService`` and ``Edge``. Properties, checked on every call:

- every answer is OK or one of INVALID_ARGUMENT, NOT_FOUND, RESOURCE_EXHAUSTED,
  FAILED_PRECONDITION, OUT_OF_RANGE with a message (never INTERNAL or UNKNOWN), per-request
  errors inside streams included;
- every call returns before its deadline (no hangs);
- a mutation the decoder can see (CRC, sizes, dtype, shape, bits, axis, scales, zero points,
  chunk order) answers INVALID_ARGUMENT;
- after each test both daemons are alive and SERVING; after all of them, valid requests still
  give the right answers, and 10,000 bad requests leave each daemon's memory flat.

Hypothesis runs derandomized (the same examples on every run) with a bounded number of examples,
so the file takes about two minutes on two busy cores. The cloud serves resnet18 at 1x3x32x32 and
hosts the Compression service on a job store seeded with one finished job; the edge runs a fixed
split inside layer1's first residual block, where two tensors cross.
"""

from __future__ import annotations

import random
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import numpy as np
import psutil
import pytest
import torch
import yaml
from grpc_health.v1 import health_pb2, health_pb2_grpc
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cleave_cli.launch import DaemonProcess, cloud_process, edge_process, free_port
from cloud_node.config import CloudLimits
from compressor import EncodingSpec, decode, encode, to_chunks
from partitioner.loaded import LoadedModel
from partitioner.models import ModelSpec, calibration_batch
from protos.cleave.v1 import compression_pb2 as cpb
from protos.cleave.v1 import compression_pb2_grpc as cpb_grpc
from protos.cleave.v1 import edge_pb2, edge_pb2_grpc, tensor_pb2
from protos.cleave.v1 import split_inference_pb2 as si_pb2
from protos.cleave.v1 import split_inference_pb2_grpc as si_grpc
from protos.kserve.v2 import grpc_predict_v2_pb2 as kpb
from protos.kserve.v2 import grpc_predict_v2_pb2_grpc as kpb_grpc
from runtime.serving import open_channel
from tests.support import fuzzing as fz

pytestmark = [pytest.mark.integration]

MODEL = {"name": "resnet18", "source": "resnet18", "input_shape": [1, 3, 32, 32]}
LIMITS = CloudLimits()  # the daemons run with the default limits
CUT = "layer1_0_relu"  # inside a residual block: two tensors cross
FEATURE_SPECS = ("int8", "int4c", "fp16", "raw", "int3+none", "fp32+none")
INPUT_SPECS = ("fp32+none", "raw", "fp16", "int8")
ARTIFACT = bytes(range(256)) * 3 + b"seeded artifact"

FUZZ = settings(
    deadline=None,
    derandomize=True,  # the same examples on every run: CI is reproducible
    database=None,
    suppress_health_check=list(HealthCheck),
    max_examples=40,
)

SPLIT_INFERENCE = si_pb2.DESCRIPTOR.services_by_name["SplitInference"]
COMPRESSION = cpb.DESCRIPTOR.services_by_name["Compression"]
EDGE = edge_pb2.DESCRIPTOR.services_by_name["Edge"]
KSERVE = kpb.DESCRIPTOR.services_by_name["GRPCInferenceService"]


@dataclass
class Stack:
    """Both daemons, stubs to them, and valid messages to start mutating from."""

    cloud: DaemonProcess
    edge: DaemonProcess
    cloud_channel: grpc.Channel
    edge_channel: grpc.Channel
    model: LoadedModel = field(repr=False)
    job_id: str
    session_id: str = ""
    features: dict[str, list[tensor_pb2.Tensor]] = field(default_factory=dict, repr=False)
    inputs: dict[str, tensor_pb2.Tensor] = field(default_factory=dict, repr=False)
    x: torch.Tensor | None = field(default=None, repr=False)

    def _repr_pretty_(self, p, cycle: bool) -> None:  # hypothesis prints failing examples with this
        p.text(f"Stack(cloud={self.cloud.address}, edge={self.edge.address})")

    @property
    def split(self) -> si_grpc.SplitInferenceStub:
        return si_grpc.SplitInferenceStub(self.cloud_channel)

    @property
    def compression(self) -> cpb_grpc.CompressionStub:
        return cpb_grpc.CompressionStub(self.cloud_channel)

    @property
    def edge_stub(self) -> edge_pb2_grpc.EdgeStub:
        return edge_pb2_grpc.EdgeStub(self.edge_channel)

    def assert_healthy(self) -> None:
        for daemon in (self.cloud, self.edge):
            assert daemon.proc is not None and daemon.proc.poll() is None, f"{daemon.module} died:\n{daemon.log_tail()}"
            with grpc.insecure_channel(daemon.address) as channel:
                reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=10)
            assert reply.status == health_pb2.HealthCheckResponse.SERVING, daemon.module


def seed_job_store(root: Path) -> str:
    """A job store holding one SUCCEEDED job with one small artifact, for GetJob / Download / Cancel."""
    from cloud_node.jobs.store import ArtifactRecord, JobStore, publish

    store = JobStore(root)
    spec = cpb.JobSpec(engine="quantize", model=cpb.ModelRef(torchvision="resnet18"), label="seeded")
    job = store.insert_job(spec.SerializeToString(), "quantize")
    store.claim_next()
    src = store.temp_path()
    src.write_bytes(ARTIFACT)
    dest = store.artifacts_dir / job.id / "plan.json"
    digest = publish(src, dest)
    assert store.finish(job.id, [ArtifactRecord("plan.json", dest, len(ARTIFACT), digest, "application/json")], "{}")
    store.close()
    return job.id


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    root = tmp_path_factory.mktemp("fuzz")
    job_id = seed_job_store(root / "jobs")
    cloud_cfg = {
        "models": [MODEL],
        "torch_threads": 1,
        "jobs": {"dir": str(root / "jobs"), "concurrency": 1, "queue_limit": 2, "max_upload_bytes": 1 << 20},
    }
    edge_cfg = {
        "model": MODEL,
        "torch_threads": 1,
        "plan": {"cut": CUT, "encoding": "int8"},
        "request_timeout_s": 20.0,
        "reconnect": {"initial_s": 0.1, "max_s": 0.5, "connect_timeout_s": 2.0},
    }
    (root / "cloud.yaml").write_text(yaml.safe_dump(cloud_cfg))
    (root / "edge.yaml").write_text(yaml.safe_dump(edge_cfg))
    cloud = cloud_process(root / "cloud.yaml", free_port(), root / "cloud.log").start()
    edge = None
    try:
        edge = edge_process(root / "edge.yaml", free_port(), cloud.port, root / "edge.log").start()
        model = LoadedModel.load(ModelSpec.from_dict(MODEL))
        s = Stack(cloud, edge, open_channel(cloud.address), open_channel(edge.address), model, job_id)
        s.session_id = s.split.OpenSession(
            si_pb2.OpenSessionRequest(model="resnet18", fingerprint=model.fingerprint, cut=CUT), timeout=30
        ).session_id
        s.x = calibration_batch(model.input_shape, 1)
        _cut, head, _tail = model.parts(CUT)
        with torch.inference_mode():
            feats = head(s.x)
        s.features = {spec: [encode(f, EncodingSpec.parse(spec)) for f in feats] for spec in FEATURE_SPECS}
        s.inputs = {spec: encode(s.x, EncodingSpec.parse(spec)) for spec in INPUT_SPECS}
        yield s
        s.cloud_channel.close()
        s.edge_channel.close()
    finally:
        if edge is not None:
            edge.stop()
        cloud.stop()


@pytest.fixture(autouse=True)
def healthy_after(stack: Stack) -> Iterator[None]:
    yield
    stack.assert_healthy()


# -- SplitInference ------------------------------------------------------------------------------


@FUZZ
@given(model=st.one_of(st.sampled_from(["", "resnet18"]), fz.TEXT), include_cuts=st.booleans())
def test_get_info(stack: Stack, model: str, include_cuts: bool) -> None:
    reply, code = fz.unary(
        stack.split.GetInfo, si_pb2.GetInfoRequest(model=model, include_cuts=include_cuts), "GetInfo"
    )
    if model in ("", "resnet18"):
        assert code is None and reply.models[0].fingerprint == stack.model.fingerprint
    else:
        assert code == grpc.StatusCode.NOT_FOUND


@settings(FUZZ, max_examples=25)
@given(
    model=st.one_of(st.just("resnet18"), fz.TEXT),
    repeats=st.sampled_from([1, 2, LIMITS.max_profile_repeats + 1, 2**32 - 1]),
    warmup=st.sampled_from([1, LIMITS.max_profile_warmup + 1, 2**32 - 1]),
    batch=st.sampled_from([0, 1, LIMITS.max_profile_batch + 1, 2**32 - 1]),
)
def test_profile_arguments(stack: Stack, model: str, repeats: int, warmup: int, batch: int) -> None:
    # Profiling is expensive: valid runs are bounded (1-2 repeats, batch <= 1, cached after the first).
    request = si_pb2.ProfileRequest(model=model, repeats=repeats, warmup=warmup, batch=batch)
    reply, code = fz.unary(stack.split.Profile, request, "Profile")
    if model != "resnet18":
        assert code == grpc.StatusCode.NOT_FOUND
    elif repeats > LIMITS.max_profile_repeats or warmup > LIMITS.max_profile_warmup or batch > LIMITS.max_profile_batch:
        assert code == grpc.StatusCode.INVALID_ARGUMENT
    else:
        assert code is None and reply.nodes and reply.fingerprint == stack.model.fingerprint


@FUZZ
@given(data=st.data())
def test_open_and_close_session(stack: Stack, data: st.DataObject) -> None:
    names = [c.name for c in stack.model.graph.cuts]
    request = si_pb2.OpenSessionRequest(
        model=data.draw(st.one_of(st.sampled_from(["resnet18", ""]), fz.TEXT)),
        fingerprint=data.draw(st.one_of(st.sampled_from([stack.model.fingerprint, ""]), fz.TEXT)),
        cut=data.draw(fz.cut_keys(names)),
        client=data.draw(fz.TEXT),
    )
    if data.draw(st.booleans()):
        request.result_encoding.CopyFrom(data.draw(fz.tensor_encodings()))
    reply, code = fz.unary(stack.split.OpenSession, request, "OpenSession")
    if code is None:
        closed, code = fz.unary(stack.split.CloseSession, si_pb2.CloseSessionRequest(session_id=reply.session_id), "")
        assert code is None and closed.requests == 0
    sid = data.draw(st.one_of(fz.TEXT, st.just("")))
    _, code = fz.unary(stack.split.CloseSession, si_pb2.CloseSessionRequest(session_id=sid), "CloseSession")
    assert code == grpc.StatusCode.NOT_FOUND


@settings(FUZZ, max_examples=60)
@given(data=st.data())
def test_infer_random_frames(stack: Stack, data: st.DataObject) -> None:
    frames = data.draw(fz.infer_frames([stack.session_id]))
    replies, _code = fz.streaming(stack.split.Infer, frames, "Infer")
    for reply in replies:
        if reply.HasField("error"):
            fz.check_request_error(reply.error, "Infer")


def _chunked(tensors: list[tensor_pb2.Tensor], size: int = 1500) -> list[list[tensor_pb2.TensorChunk]]:
    """Chunk groups like ``to_chunks`` makes, but for tensors whose sizes may lie (mutated ones)."""
    groups = []
    for index, t in enumerate(tensors):
        header = tensor_pb2.Tensor()
        header.CopyFrom(t)
        header.ClearField("payload")
        pieces = [t.payload[i : i + size] for i in range(0, len(t.payload), size)] or [b""]
        groups.append([tensor_pb2.TensorChunk(index=index, header=header, data=pieces[0])])
        groups += [[tensor_pb2.TensorChunk(index=index, data=p)] for p in pieces[1:]]
    return groups


def _frames(session_id: str, groups, request_id: int = 1) -> list[si_pb2.InferFrame]:
    frames = [si_pb2.InferFrame(session_id=session_id, request_id=request_id, chunks=g) for g in groups]
    frames[-1].last = True
    return frames


def _cloud_result(stack: Stack, frames: list[si_pb2.InferFrame]) -> si_pb2.InferResult:
    """The first terminal result of request 1 on a fresh stream (chunks of a result merged)."""
    replies, code = fz.streaming(stack.split.Infer, frames, "Infer")
    assert code is None, code
    merged = si_pb2.InferResult()
    for reply in replies:
        if reply.HasField("error"):
            fz.check_request_error(reply.error, "Infer")
        merged.MergeFrom(reply)
        if reply.last:
            return merged
    raise AssertionError(f"no final result among {len(replies)} replies")


def _tail_reference(stack: Stack, tensors: list[tensor_pb2.Tensor]) -> torch.Tensor:
    _cut, _head, tail = stack.model.parts(CUT)
    with torch.inference_mode():
        return tail(*[decode(t) for t in tensors])


@settings(FUZZ, max_examples=80)
@given(spec=st.sampled_from(FEATURE_SPECS), data=st.data())
def test_infer_mutated_feature_tensors(stack: Stack, spec: str, data: st.DataObject) -> None:
    tensors, must_reject, what = data.draw(fz.mutated_tensors(fz.Tensors(stack.features[spec])))
    result = _cloud_result(stack, _frames(stack.session_id, _chunked(tensors)))
    if must_reject:
        assert result.error.code == grpc.StatusCode.INVALID_ARGUMENT.value[0], f"{spec} {what}: {result.error}"
    elif not result.HasField("error"):
        assert result.chunks and list(result.chunks[0].header.shape) == [1, 1000], what


@settings(FUZZ, max_examples=40)
@given(spec=st.sampled_from(FEATURE_SPECS), data=st.data())
def test_infer_mutated_chunks(stack: Stack, spec: str, data: st.DataObject) -> None:
    groups = list(to_chunks(stack.features[spec], 1500))
    mutated, what = data.draw(fz.mutated_chunks(groups))
    result = _cloud_result(stack, _frames(stack.session_id, mutated))
    assert result.error.code == grpc.StatusCode.INVALID_ARGUMENT.value[0], f"{spec} {what}: {result.error}"


@pytest.mark.parametrize("spec", FEATURE_SPECS)
def test_infer_valid_features_exact(stack: Stack, spec: str) -> None:
    """The unmutated requests the fuzzers start from are served, and exactly."""
    tensors = stack.features[spec]
    result = _cloud_result(stack, _frames(stack.session_id, to_chunks(tensors, 1500)))
    assert not result.HasField("error"), result.error
    (header,) = [c.header for c in result.chunks if c.HasField("header")]
    header.payload = b"".join(c.data for c in result.chunks)
    assert torch.equal(decode(header), _tail_reference(stack, tensors))


@settings(FUZZ, max_examples=30)
@given(
    messages=st.lists(
        st.builds(
            si_pb2.ProbeMessage,
            seq=fz.UINT64,
            data=st.binary(max_size=2048),
            echo=st.booleans(),
            reply_bytes=st.one_of(st.integers(0, 4096), st.sampled_from([(8 << 20) + 1, 2**64 - 1]), fz.UINT64),
        ),
        min_size=1,
        max_size=5,
    )
)
def test_probe(stack: Stack, messages: list[si_pb2.ProbeMessage]) -> None:
    replies, code = fz.streaming(stack.split.Probe, messages, "Probe")
    if code is None:
        assert len(replies) == len(messages)


# -- Compression ---------------------------------------------------------------------------------


def _valid_uploads() -> list[tuple[int, bytes]]:
    import io

    from safetensors.numpy import save

    buf = io.BytesIO()
    np.savez(buf, inputs=np.zeros((2, 3, 4, 4), np.float32), labels=np.array([0, 1], np.int64))
    st_bytes = save({"inputs": np.zeros((2, 3), np.float32), "labels": np.array([1, 0], np.int64)})
    return [(cpb.DATASET_NPZ, buf.getvalue()), (cpb.DATASET_SAFETENSORS, st_bytes), (cpb.SAFETENSORS, st_bytes)]


@settings(FUZZ, max_examples=60)
@given(stream=fz.upload_streams(_valid_uploads()))
def test_upload_model(stack: Stack, stream: list[cpb.UploadChunk]) -> None:
    reply, code = fz.client_stream(stack.compression.UploadModel, stream, "UploadModel")
    if code is None:
        assert reply.id and len(reply.sha256) == 64


@settings(FUZZ, max_examples=40)
@given(spec=fz.job_specs())
def test_submit_job(stack: Stack, spec: cpb.JobSpec) -> None:
    _, code = fz.unary(stack.compression.SubmitJob, cpb.SubmitJobRequest(spec=spec), "SubmitJob")
    assert code is not None, "a fuzzed spec was queued"


@FUZZ
@given(job=st.one_of(fz.TEXT, st.just("")), which=st.sampled_from(["seeded", "random"]))
def test_get_watch_cancel_job(stack: Stack, job: str, which: str) -> None:
    job_id = stack.job_id if which == "seeded" else job
    got, code = fz.unary(stack.compression.GetJob, cpb.GetJobRequest(job_id=job_id), "GetJob")
    watched, wcode = fz.streaming(stack.compression.WatchJob, cpb.WatchJobRequest(job_id=job_id), "WatchJob", False)
    _, ccode = fz.unary(stack.compression.CancelJob, cpb.CancelJobRequest(job_id=job_id), "CancelJob")
    if which == "seeded":
        assert got.state == cpb.SUCCEEDED and [w.state for w in watched] == [cpb.SUCCEEDED]
        assert ccode == grpc.StatusCode.FAILED_PRECONDITION
    else:
        assert code == wcode == ccode == grpc.StatusCode.NOT_FOUND


@FUZZ
@given(states=st.lists(fz.ENUM, max_size=4), limit=fz.UINT32)
def test_list_jobs(stack: Stack, states: list[int], limit: int) -> None:
    reply, _code = fz.unary(stack.compression.ListJobs, cpb.ListJobsRequest(states=states, limit=limit), "ListJobs")
    if reply is not None and (not states or cpb.SUCCEEDED in states) and limit != 0:
        assert stack.job_id in [j.id for j in reply.jobs]


@settings(FUZZ, max_examples=50)
@given(
    which=st.sampled_from(["seeded", "random"]),
    job=fz.TEXT,
    artifact=st.one_of(st.sampled_from(["", "plan.json"]), fz.TEXT),
    offset=st.one_of(st.integers(0, len(ARTIFACT) + 3), fz.UINT64),
    chunk_bytes=st.one_of(st.sampled_from([0, 1, 100, 4 << 20, (4 << 20) + 1]), fz.UINT32),
)
def test_download(stack: Stack, which: str, job: str, artifact: str, offset: int, chunk_bytes: int) -> None:
    job_id = stack.job_id if which == "seeded" else job
    request = cpb.DownloadRequest(job_id=job_id, artifact=artifact, offset=offset, chunk_bytes=chunk_bytes)
    chunks, code = fz.streaming(stack.compression.Download, request, "Download", stream_request=False)
    valid = which == "seeded" and artifact in ("", "plan.json") and offset <= len(ARTIFACT) and chunk_bytes <= 4 << 20
    assert (code is None) == valid, code
    if valid:
        assert b"".join(c.data for c in chunks) == ARTIFACT[offset:]


# -- Edge ----------------------------------------------------------------------------------------


def _check_edge_reply(reply: edge_pb2.EdgeInferResponse, where: str) -> None:
    if reply.HasField("error"):
        fz.check_request_error(reply.error, where)
    else:
        assert reply.placement == edge_pb2.SPLIT, f"{where}: {reply.note}"  # the cloud kept serving
        assert len(reply.outputs) == 1 and reply.outputs[0].shape[-1] == 1000, where


@settings(FUZZ, max_examples=60)
@given(data=st.data())
def test_edge_infer_random(stack: Stack, data: st.DataObject) -> None:
    request = data.draw(fz.edge_requests(list(stack.inputs.values())))
    reply, _code = fz.unary(stack.edge_stub.Infer, request, "Edge.Infer")
    if reply is not None:
        _check_edge_reply(reply, "Edge.Infer")


@settings(FUZZ, max_examples=60)
@given(spec=st.sampled_from(INPUT_SPECS), data=st.data())
def test_edge_infer_mutated_input(stack: Stack, spec: str, data: st.DataObject) -> None:
    tensors, must_reject, what = data.draw(fz.mutated_tensors(fz.Tensors([stack.inputs[spec]])))
    reply, code = fz.unary(stack.edge_stub.Infer, edge_pb2.EdgeInferRequest(inputs=tensors), "Edge.Infer")
    if must_reject:
        assert code == grpc.StatusCode.INVALID_ARGUMENT, f"{spec} {what}: {code} {reply and reply.note}"
    elif code is None:
        _check_edge_reply(reply, f"Edge.Infer {spec} {what}")


@settings(FUZZ, max_examples=30)
@given(data=st.data())
def test_edge_infer_stream(stack: Stack, data: st.DataObject) -> None:
    requests = data.draw(st.lists(fz.edge_requests(list(stack.inputs.values())), min_size=1, max_size=4))
    replies, code = fz.streaming(stack.edge_stub.InferStream, requests, "Edge.InferStream")
    if code is None:
        assert len(replies) == len(requests)
    for reply in replies:
        _check_edge_reply(reply, "Edge.InferStream")


@settings(FUZZ, max_examples=40)
@given(data=st.data())
def test_edge_replan(stack: Stack, data: st.DataObject) -> None:
    from partitioner.quantized_head import head_layers

    names = [c.name for c in stack.model.graph.cuts]
    layers = list(head_layers(stack.model.parts(CUT)[1])) + ["*"]
    plan = edge_pb2.Plan(
        placement=data.draw(fz.ENUM),
        cut_index=data.draw(st.one_of(st.integers(0, len(names) + 2), fz.UINT32)),
        cut_name=data.draw(st.one_of(st.just(""), fz.cut_keys(names[:12]))),
        weight_bits=data.draw(
            st.dictionaries(
                st.one_of(st.sampled_from(layers), fz.TEXT), st.sampled_from([0, 2, 4, 7, 8, 32, 2**32 - 1])
            )
        ),
        reason=data.draw(fz.TEXT),
    )
    if data.draw(st.booleans()):
        plan.encoding.CopyFrom(data.draw(fz.tensor_encodings()))
    request = edge_pb2.ReplanRequest(plan=plan) if data.draw(st.booleans()) else edge_pb2.ReplanRequest()
    try:
        _, code = fz.unary(stack.edge_stub.Replan, request, "Edge.Replan")
        if not request.HasField("plan"):
            assert code == grpc.StatusCode.FAILED_PRECONDITION  # a fixed cut: nothing to plan
        _, code = fz.unary(stack.edge_stub.GetStatus, edge_pb2.GetStatusRequest(), "Edge.GetStatus")
        assert code is None
        _, code = fz.unary(stack.edge_stub.GetPlan, edge_pb2.GetPlanRequest(), "Edge.GetPlan")
        assert code is None
    finally:
        _pin(stack, "int8")  # back to the configured split for the other tests


def _pin(stack: Stack, encoding: str) -> edge_pb2.Plan:
    plan = edge_pb2.Plan(cut_name=CUT, encoding=EncodingSpec.parse(encoding).to_proto())
    return stack.edge_stub.Replan(edge_pb2.ReplanRequest(plan=plan), timeout=fz.CALL_TIMEOUT)


# -- raw bytes on every method -------------------------------------------------------------------


def _valid_requests(stack: Stack) -> dict[str, list[bytes]]:
    """Serialized valid requests per method path, to mutate byte by byte (never Profile or SubmitJob:
    a mutation could ask for an expensive profile or queue a real job)."""
    fp = stack.model.fingerprint
    frames = _frames(stack.session_id, to_chunks(stack.features["int8"], 1500))
    ser = {
        "SplitInference/GetInfo": [si_pb2.GetInfoRequest(model="resnet18", include_cuts=True)],
        "SplitInference/OpenSession": [si_pb2.OpenSessionRequest(model="resnet18", fingerprint=fp, cut=CUT)],
        "SplitInference/CloseSession": [si_pb2.CloseSessionRequest(session_id="0" * 32)],
        "SplitInference/Infer": frames,
        "SplitInference/Probe": [si_pb2.ProbeMessage(seq=1, data=b"x" * 64, echo=True)],
        "Compression/UploadModel": [cpb.UploadChunk(header=cpb.UploadHeader(format=cpb.DATASET_NPZ, total_bytes=4))],
        "Compression/GetJob": [cpb.GetJobRequest(job_id=stack.job_id)],
        "Compression/WatchJob": [cpb.WatchJobRequest(job_id=stack.job_id)],
        "Compression/CancelJob": [cpb.CancelJobRequest(job_id=stack.job_id)],
        "Compression/ListJobs": [cpb.ListJobsRequest(states=[cpb.SUCCEEDED], limit=3)],
        "Compression/Download": [cpb.DownloadRequest(job_id=stack.job_id, chunk_bytes=512)],
        "Edge/Infer": [edge_pb2.EdgeInferRequest(request_id=3, inputs=[stack.inputs["int8"]])],
        "Edge/InferStream": [edge_pb2.EdgeInferRequest(request_id=3, inputs=[stack.inputs["fp32+none"]])],
        "Edge/Replan": [edge_pb2.ReplanRequest(plan=edge_pb2.Plan(cut_name=CUT))],
    }
    valid = {f"/cleave.v1.{k}": [m.SerializeToString() for m in v] for k, v in ser.items()}
    valid[f"/{KSERVE.full_name}/ModelInfer"] = [_model_infer(stack).SerializeToString()]
    valid[f"/{KSERVE.full_name}/ModelMetadata"] = [kpb.ModelMetadataRequest(name="resnet18").SerializeToString()]
    return valid


def _model_infer(stack: Stack) -> kpb.ModelInferRequest:
    """A valid KServe v2 request for the served model, its input as raw little-endian FP32."""
    x = stack.x.numpy()
    tensor = kpb.ModelInferRequest.InferInputTensor(name="input", datatype="FP32", shape=list(x.shape))
    return kpb.ModelInferRequest(model_name="resnet18", id="fuzz", inputs=[tensor], raw_input_contents=[x.tobytes()])


DATATYPES = ("FP32", "FP16", "UINT8", "INT64", "INT8", "BOOL", "BYTES", "", "fp32")
SHAPE_DIMS = st.integers(-2, 70_000)


@settings(FUZZ, max_examples=80)
@given(data=st.data())
def test_kserve_model_infer_mutated(stack: Stack, data: st.DataObject) -> None:
    """Valid ModelInfer requests with fields changed: OK, or an allowed status naming what was wrong."""
    request = _model_infer(stack)
    changed = data.draw(
        st.lists(
            st.sampled_from(["datatype", "shape", "raw", "typed", "name", "model", "version", "outputs", "inputs"]),
            min_size=1,
            max_size=3,
            unique=True,
        )
    )
    tensor = request.inputs[0]
    if "datatype" in changed:
        tensor.datatype = data.draw(st.sampled_from(DATATYPES))
    if "shape" in changed:
        tensor.ClearField("shape")
        tensor.shape.extend(data.draw(st.lists(SHAPE_DIMS, max_size=6)))
    if "raw" in changed:
        raw = request.raw_input_contents[0]
        cut = data.draw(st.integers(0, len(raw)))
        request.raw_input_contents[0] = raw[:cut] + data.draw(st.binary(max_size=64))
    if "typed" in changed:  # typed contents as well as (or instead of) raw
        if data.draw(st.booleans()):
            request.ClearField("raw_input_contents")
        values = data.draw(st.lists(st.floats(width=32, allow_nan=True), max_size=64))
        tensor.contents.fp32_contents.extend(values)
        tensor.contents.int64_contents.extend(data.draw(st.lists(st.integers(-(2**63), 2**63 - 1), max_size=8)))
    if "name" in changed:
        tensor.name = data.draw(st.text(max_size=12))
    if "model" in changed:
        request.model_name = data.draw(st.sampled_from(["", "nope", "resnet18 ", "RESNET18"]))
    if "version" in changed:
        request.model_version = data.draw(st.sampled_from(["1", "2", "-1", "latest"]))
    if "outputs" in changed:
        names = data.draw(st.lists(st.sampled_from(["output", "output_0", "", "x"]), max_size=3))
        request.outputs.extend(kpb.ModelInferRequest.InferRequestedOutputTensor(name=n) for n in names)
    if "inputs" in changed:  # a second input, or none at all
        if data.draw(st.booleans()):
            request.inputs.append(kpb.ModelInferRequest.InferInputTensor(name="extra", datatype="FP32", shape=[1]))
        else:
            request.ClearField("inputs")
    reply, code = fz.unary(kpb_grpc.GRPCInferenceServiceStub(stack.cloud_channel).ModelInfer, request, "ModelInfer")
    if reply is not None:
        assert reply.model_name == "resnet18" and reply.outputs, reply


@settings(FUZZ, max_examples=150)
@given(data=st.data())
def test_raw_bytes_every_method(stack: Stack, data: st.DataObject) -> None:
    cloud_services = (SPLIT_INFERENCE, COMPRESSION, KSERVE)
    methods = [(stack.cloud_channel, m) for service in cloud_services for m in fz.raw_methods(service)]
    methods += [(stack.edge_channel, m) for m in fz.raw_methods(EDGE)]
    channel, method = data.draw(st.sampled_from(methods))
    valid = _valid_requests(stack).get(method.path, [])
    rng = random.Random(data.draw(st.integers(0, 2**32)))
    count = data.draw(st.integers(1, 3)) if method.client_streaming else 1
    messages = []
    for _ in range(count):
        if valid and rng.random() < 0.7:
            messages.append(fz.mutate_bytes(rng, rng.choice(valid)))
        else:
            messages.append(rng.randbytes(rng.randrange(0, 64)))
    try:
        fz.send_raw(channel, method, messages, method.path)
    finally:
        if method.path.endswith("/Replan"):
            _pin(stack, "int8")


# -- memory: 10,000 bad requests -----------------------------------------------------------------

FLOOD = 10_000
WARMUP = 1_000
#: RSS growth allowed per daemon over the 10,000 requests, after a 1,000-request warm-up. A leak of
#: 5 KB per bad request (a kept frame, a session, a traceback) would add 50 MB; allocator noise
#: (gRPC thread arenas, pymalloc pools) measures well under 10 MB here.
MAX_GROWTH = 30 << 20


def _flood_calls(stack: Stack, rng: random.Random, n: int) -> list:
    """``n`` cheap bad calls of every kind, as zero-argument functions that check their answer."""
    cloud_methods = fz.raw_methods(SPLIT_INFERENCE) + fz.raw_methods(COMPRESSION) + fz.raw_methods(KSERVE)
    cloud_unary = [m for m in cloud_methods if not m.client_streaming]
    edge_unary = [m for m in fz.raw_methods(EDGE) if not m.client_streaming and not m.path.endswith("/Replan")]
    good_frames = _frames(stack.session_id, to_chunks(stack.features["int8"], 1500))
    good_input = stack.inputs["fp32+none"]

    def bad_tensor(t: tensor_pb2.Tensor) -> tensor_pb2.Tensor:
        out = tensor_pb2.Tensor()
        out.CopyFrom(t)
        buf = bytearray(out.payload)
        buf[rng.randrange(len(buf))] ^= 1 + rng.randrange(255)  # the CRC catches it
        out.payload = bytes(buf)
        return out

    def one() -> tuple:
        kind = rng.randrange(10)
        if kind < 3:  # raw bytes on a unary or server-streaming method
            channel, method = (
                (stack.cloud_channel, rng.choice(cloud_unary))
                if rng.random() < 0.7
                else (stack.edge_channel, rng.choice(edge_unary))
            )
            return fz.send_raw, channel, method, [rng.randbytes(rng.randrange(1, 48))], method.path
        if kind == 3:
            req = si_pb2.OpenSessionRequest(model="resnet18", fingerprint=rng.randbytes(8).hex(), cut=CUT)
            return fz.unary, stack.split.OpenSession, req, "OpenSession"
        if kind == 4:
            req = cpb.GetJobRequest(job_id=rng.randbytes(6).hex())
            return fz.unary, stack.compression.GetJob, req, "GetJob"
        if kind == 5:
            req = edge_pb2.EdgeInferRequest(inputs=[bad_tensor(good_input)])
            return fz.unary, stack.edge_stub.Infer, req, "Edge.Infer"
        if kind in (6, 7):  # a short Infer stream: a corrupt request, and one left unfinished
            frames = [si_pb2.InferFrame() for _ in good_frames]
            for f, g in zip(frames, good_frames, strict=True):
                f.CopyFrom(g)
            chunk = frames[rng.randrange(len(frames))].chunks[0]
            chunk.data = chunk.data[:-1] + bytes([chunk.data[-1] ^ 0xFF]) if chunk.data else b"x"
            partial = [si_pb2.InferFrame(session_id=stack.session_id, request_id=2, chunks=good_frames[0].chunks)]
            return fz.streaming, stack.split.Infer, frames + partial, "Infer"
        if kind == 8:
            reqs = [edge_pb2.EdgeInferRequest(request_id=i, inputs=[bad_tensor(good_input)]) for i in range(2)]
            return fz.streaming, stack.edge_stub.InferStream, reqs, "Edge.InferStream"
        msgs = [si_pb2.ProbeMessage(seq=1, data=rng.randbytes(64), echo=True), si_pb2.ProbeMessage(reply_bytes=2**40)]
        return fz.streaming, stack.split.Probe, msgs, "Probe"

    return [one() for _ in range(n)]


def _run_flood(calls: list) -> None:
    def run(call: tuple) -> None:
        fn, *args = call
        fn(*args)

    with ThreadPoolExecutor(max_workers=6) as pool:
        for _ in pool.map(run, calls):
            pass


def _rss(daemon: DaemonProcess) -> int:
    return psutil.Process(daemon.proc.pid).memory_info().rss


def test_memory_flat_under_bad_requests(stack: Stack, request: pytest.FixtureRequest) -> None:
    rng = random.Random(20240607)
    _run_flood(_flood_calls(stack, rng, WARMUP))
    before = {d.module: _rss(d) for d in (stack.cloud, stack.edge)}
    started = time.monotonic()
    _run_flood(_flood_calls(stack, rng, FLOOD))
    elapsed = time.monotonic() - started
    after = {d.module: _rss(d) for d in (stack.cloud, stack.edge)}
    growth = {m: after[m] - before[m] for m in before}
    line = ", ".join(f"{m} {before[m] / 2**20:.0f} -> {after[m] / 2**20:.0f} MB" for m in before)
    _report(request, f"memory: {FLOOD} bad requests in {elapsed:.1f}s; RSS {line}")
    for module, grew in growth.items():
        assert grew < MAX_GROWTH, f"{module}: RSS grew {grew / 2**20:.1f} MB over {FLOOD} bad requests"


# -- afterwards ----------------------------------------------------------------------------------


def _report(request: pytest.FixtureRequest, line: str) -> None:
    reporter = request.config.pluginmanager.get_plugin("terminalreporter")
    if reporter is not None:
        reporter.write_line(f"fuzz: {line}")


def test_valid_requests_still_correct(stack: Stack, request: pytest.FixtureRequest) -> None:
    """After all of the above, every service still gives the right answers."""
    _pin(stack, "fp32+none")
    try:
        reply = stack.edge_stub.Infer(
            edge_pb2.EdgeInferRequest(request_id=7, inputs=[stack.inputs["fp32+none"]]), timeout=fz.CALL_TIMEOUT
        )
    finally:
        _pin(stack, "int8")
    assert reply.placement == edge_pb2.SPLIT, reply.note
    with torch.inference_mode():
        assert torch.equal(decode(reply.outputs[0]), stack.model.module(stack.x))
    tensors = stack.features["int8"]
    result = _cloud_result(stack, _frames(stack.session_id, to_chunks(tensors, 1500)))
    (header,) = [c.header for c in result.chunks if c.HasField("header")]
    header.payload = b"".join(c.data for c in result.chunks)
    assert torch.equal(decode(header), _tail_reference(stack, tensors))
    chunks = list(stack.compression.Download(cpb.DownloadRequest(job_id=stack.job_id), timeout=fz.CALL_TIMEOUT))
    assert b"".join(c.data for c in chunks) == ARTIFACT
    for daemon in (stack.cloud, stack.edge):
        assert "Traceback" not in daemon.log_path.read_text(errors="replace"), daemon.log_tail(60)
    _report(request, f"{fz.STATS['calls']} calls, {fz.STATS['messages']} request messages sent")
