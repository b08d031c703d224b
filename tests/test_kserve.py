"""The cloud daemon speaks the KServe v2 Open Inference Protocol to Triton's and KServe's clients.

pytestmark = [pytest.mark.integration]

The clients run in subprocesses (``tests/support/v2_clients.py``): tritonclient, kserve and Cleave's own
``inference`` stubs register the same protobuf names, so none of them is imported here. The logic
class :class:`cloud_node.openinference.OpenInference` is also tested in-process, without a server.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
import torch
import yaml
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from cleave_cli.launch import DaemonProcess, cloud_process, free_port
from cloud_node.config import CloudLimits
from cloud_node.openinference import InferRequest, InputTensor, OpenInference, RequestedOutput
from partitioner.loaded import LoadedModel, as_tensor_list
from partitioner.models import ModelSpec
from protos.errors import InvalidArgument, NotFound, ResourceExhausted

ROOT = Path(__file__).resolve().parent.parent
SERVICE = "inference.GRPCInferenceService"
MODELS = {
    "tiny": {"name": "tiny", "source": "tests.support.factories:tiny_cnn", "input_shape": [1, 3, 16, 16]},
    "two": {"name": "two", "source": "tests.support.factories:two_heads", "input_shape": [1, 3, 8, 8]},
}


@pytest.fixture(scope="module")
def local() -> dict[str, LoadedModel]:
    """The served models, built here the same way the daemon builds them (same seed, same weights)."""
    return {name: LoadedModel.load(ModelSpec.from_dict(spec)) for name, spec in MODELS.items()}


@pytest.fixture(scope="module")
def arrays() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(7)
    return {
        "fp32": rng.standard_normal((2, 3, 16, 16)).astype(np.float32),
        "fp16": rng.standard_normal((2, 3, 16, 16)).astype(np.float16),
        "uint8": rng.integers(0, 256, (1, 3, 16, 16), dtype=np.uint8),
        "int64": rng.integers(-3, 4, (1, 3, 16, 16), dtype=np.int64),
        "two": rng.standard_normal((1, 3, 8, 8)).astype(np.float32),
    }


@pytest.fixture(scope="module")
def cloud(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DaemonProcess]:
    path = tmp_path_factory.mktemp("kserve")
    (path / "cloud.yaml").write_text(yaml.safe_dump({"models": list(MODELS.values()), "torch_threads": 1}))
    proc = cloud_process(path / "cloud.yaml", free_port(), path / "cloud.log").start()
    yield proc
    proc.stop()


V2_CLIENTS = ROOT / "tests" / "support" / "v2_clients.py"  # run as a script: it imports no Cleave code


def _run_client(which: str, cloud: DaemonProcess, arrays: dict[str, np.ndarray], tmp: Path) -> dict[str, Any]:
    np.savez(tmp / "inputs.npz", **arrays)
    done = subprocess.run(
        [sys.executable, str(V2_CLIENTS), which, cloud.address, str(tmp / "inputs.npz")],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=ROOT,
    )
    assert done.returncode == 0, f"{which} client failed:\n{done.stderr[-3000:]}\ncloud log:\n{cloud.log_tail()}"
    return json.loads(done.stdout)


@pytest.fixture(scope="module")
def triton(cloud: DaemonProcess, arrays: dict[str, np.ndarray], tmp_path_factory: pytest.TempPathFactory) -> dict:
    return _run_client("triton", cloud, arrays, tmp_path_factory.mktemp("triton"))


@pytest.fixture(scope="module")
def kserve(cloud: DaemonProcess, arrays: dict[str, np.ndarray], tmp_path_factory: pytest.TempPathFactory) -> dict:
    return _run_client("kserve", cloud, arrays, tmp_path_factory.mktemp("kserve_client"))


def _reference(model: LoadedModel, array: np.ndarray) -> list[np.ndarray]:
    with torch.inference_mode():
        return [t.numpy() for t in as_tensor_list(model.module(torch.from_numpy(array.astype(np.float32))))]


def _assert_output(record: dict, name: str, expected: np.ndarray) -> None:
    assert record["ok"], record
    out = record["outputs"][name]
    assert out["datatype"] == "FP32" and out["shape"] == list(expected.shape)
    got = np.asarray(out["data"], dtype=np.float32).reshape(out["shape"])
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)


# --- Triton's client ----------------------------------------------------------------------------


def test_triton_health_and_metadata(triton: dict) -> None:
    assert triton["health"] == {"ok": True, "live": True, "ready": True, "model_ready": True, "model_ready_v1": True}
    assert triton["server_metadata"]["name"] == "cleave" and triton["server_metadata"]["version"]
    assert triton["metadata_tiny"] == {
        "ok": True,
        "name": "tiny",
        "versions": ["1"],
        "platform": "pytorch",
        "tensors": [
            [{"name": "input", "datatype": "FP32", "shape": [-1, 3, 16, 16]}],
            [{"name": "output", "datatype": "FP32", "shape": [-1, 4]}],
        ],
    }
    assert triton["metadata_two"]["tensors"][1] == [
        {"name": "output_0", "datatype": "FP32", "shape": [-1, 3]},
        {"name": "output_1", "datatype": "FP32", "shape": [-1, 4]},
    ]


@pytest.mark.parametrize("key, datatype", [("fp32", "FP32"), ("fp16", "FP16"), ("uint8", "UINT8"), ("int64", "INT64")])
def test_triton_raw_inputs_match_the_local_model(
    triton: dict, local: dict, arrays: dict, key: str, datatype: str
) -> None:
    record = triton[f"raw_{datatype}"]
    _assert_output(record, "output", _reference(local["tiny"], arrays[key])[0])
    # tritonclient reads only raw outputs: a raw request gets a raw reply.
    assert record["raw_outputs"] == 1
    assert record["id"] == f"raw-{datatype}" and record["model_version"] == "1"


@pytest.mark.parametrize("key, datatype", [("fp32", "FP32"), ("uint8", "UINT8"), ("int64", "INT64")])
def test_triton_typed_contents_get_typed_replies(
    triton: dict, local: dict, arrays: dict, key: str, datatype: str
) -> None:
    record = triton[f"typed_{datatype}"]
    _assert_output(record, "output", _reference(local["tiny"], arrays[key])[0])
    assert record["raw_outputs"] == 0 and record["id"] == f"typed-{datatype}"


def test_triton_requested_outputs(triton: dict, local: dict, arrays: dict) -> None:
    logits, pooled = _reference(local["two"], arrays["two"])
    _assert_output(triton["two_all"], "output_0", logits)
    _assert_output(triton["two_all"], "output_1", pooled)
    assert list(triton["two_select"]["outputs"]) == ["output_1"]
    _assert_output(triton["two_select"], "output_1", pooled)


@pytest.mark.parametrize(
    "case, code, names",
    [
        ("model_ready_unknown", "NOT_FOUND", "'nope'"),
        ("model_ready_bad_version", "NOT_FOUND", "version '2'"),
        ("metadata_unknown", "NOT_FOUND", "'nope'"),
        ("unknown_model", "NOT_FOUND", "'nope'"),
        ("bad_version", "NOT_FOUND", "version '7'"),
        ("bad_shape", "INVALID_ARGUMENT", "inputs[0].shape"),
        ("unsupported_datatype", "INVALID_ARGUMENT", "inputs[0].datatype"),
        ("bad_name", "INVALID_ARGUMENT", "inputs[0].name"),
        ("unknown_output", "INVALID_ARGUMENT", "outputs[0].name"),
        ("raw_length", "INVALID_ARGUMENT", "raw_input_contents[0]"),
        ("typed_count", "INVALID_ARGUMENT", "inputs[0].contents.fp32_contents"),
        ("typed_FP16", "INVALID_ARGUMENT", "inputs[0].contents"),
        ("typed_wrong_field", "INVALID_ARGUMENT", "inputs[0].contents.int64_contents"),
    ],
)
def test_triton_errors_name_the_field(triton: dict, case: str, code: str, names: str) -> None:
    record = triton[case]
    assert not record["ok"], record
    assert record["code"] == code and names in record["message"], record


# --- KServe's client ----------------------------------------------------------------------------


def test_kserve_client(kserve: dict, local: dict, arrays: dict) -> None:
    assert kserve["health"] == {"ok": True, "live": True, "ready": True, "model_ready": True}
    assert kserve["model_ready_unknown"]["code"] == "NOT_FOUND"
    for case, key in [("raw_FP32", "fp32"), ("raw_UINT8", "uint8"), ("typed_FP32", "fp32"), ("typed_INT64", "int64")]:
        _assert_output(kserve[case], "output", _reference(local["tiny"], arrays[key])[0])
        assert kserve[case]["model_version"] == "1"
    assert kserve["raw_FP32"]["id"] == "k-raw" and kserve["typed_INT64"]["id"] == "k-typed-i64"
    logits, pooled = _reference(local["two"], arrays["two"])
    _assert_output(kserve["two_all"], "output_0", logits)
    _assert_output(kserve["two_all"], "output_1", pooled)
    assert kserve["unknown_model"]["code"] == "NOT_FOUND"
    assert kserve["bad_shape"]["code"] == "INVALID_ARGUMENT" and "inputs[0].shape" in kserve["bad_shape"]["message"]


# --- The service on the daemon ------------------------------------------------------------------


def test_service_has_health_and_reflection(cloud: DaemonProcess) -> None:
    with grpc.insecure_channel(cloud.address) as channel:
        health = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=SERVICE), timeout=10)
        assert health.status == health_pb2.HealthCheckResponse.SERVING
        reflect = reflection_pb2_grpc.ServerReflectionStub(channel)
        replies = reflect.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")]))
        names = {s.name for s in next(replies).list_services_response.service}
    assert SERVICE in names


def test_importing_the_daemon_never_imports_the_inference_stubs() -> None:
    # A fresh interpreter: in this one, tests that build a daemon in-process have imported them already.
    check = "import sys, cloud_node.main; sys.exit(any(m.startswith('protos.kserve.v2.grpc') for m in sys.modules))"
    assert subprocess.run([sys.executable, "-c", check], timeout=120).returncode == 0


# --- The logic class, without a server ----------------------------------------------------------


def _oip(local: dict, **limits: int) -> OpenInference:
    return OpenInference(lambda name: _get(local, name), list(local), CloudLimits(**limits))


def _get(local: dict, name: str) -> LoadedModel:
    if name not in local:
        raise NotFound(f"model {name!r}")
    return local[name]


def _request(array: np.ndarray, datatype: str = "FP32", **kw: Any) -> InferRequest:
    tensor = InputTensor("input", datatype, tuple(array.shape))
    return InferRequest("tiny", [tensor], raw_inputs=[array.tobytes()], **kw)


def test_limits_answer_resource_exhausted(local: dict, arrays: dict) -> None:
    with pytest.raises(ResourceExhausted, match=r"inputs\[0\]\.shape: 1536 elements .*max_elements"):
        _oip(local, max_elements=1000).infer(_request(arrays["fp32"]))
    with pytest.raises(ResourceExhausted, match=r"raw_input_contents\[0\].*max_request_bytes"):
        _oip(local, max_request_bytes=1000).infer(_request(arrays["fp32"]))
    # The batch is capped per model, from the shape, before the input is converted or run.
    with pytest.raises(ResourceExhausted, match=r"inputs\[0\]\.shape\[0\]: batch 2 exceeds the limit of 1"):
        _oip(local, max_batch=1).infer(_request(arrays["fp32"]))
    with pytest.raises(ResourceExhausted, match=r"batch 2 exceeds the limit of 1 \(limits.max_batch\)"):
        _oip(local, max_batch_per_model={"tiny": 1}).infer(_request(arrays["fp32"]))
    # Checked before the model runs: the reply of a batch must fit one message.
    with pytest.raises(ResourceExhausted, match="max_message_bytes"):
        _oip(local, max_message_bytes=16).infer(_request(arrays["fp32"]))


def test_request_validation(local: dict, arrays: dict) -> None:
    oip = _oip(local)
    x = arrays["fp32"]
    with pytest.raises(InvalidArgument, match="model_name: required"):
        oip.infer(InferRequest("", []))
    with pytest.raises(InvalidArgument, match="inputs: model 'tiny' takes 1 input"):
        oip.infer(InferRequest("tiny", []))
    with pytest.raises(InvalidArgument, match="raw_input_contents: 2 entries for 1 inputs"):
        oip.infer(InferRequest("tiny", [InputTensor("input", "FP32", x.shape)], raw_inputs=[b"", b""]))
    with pytest.raises(InvalidArgument, match=r"inputs\[0\]\.contents: must be empty"):
        oip.infer(
            InferRequest(
                "tiny",
                [InputTensor("input", "FP32", x.shape, {"fp32_contents": [1.0]})],
                raw_inputs=[x.tobytes()],
            )
        )
    with pytest.raises(InvalidArgument, match=r"inputs\[0\]\.shape: \[0, 3, 16, 16\]"):
        oip.infer(_request(x[:0]))
    with pytest.raises(InvalidArgument, match=r"uint_contents: values must be in \[0, 255\]"):
        oip.infer(InferRequest("tiny", [InputTensor("input", "UINT8", (1, 3, 16, 16), {"uint_contents": [256] * 768})]))
    with pytest.raises(InvalidArgument, match=r"outputs\[1\]\.name: 'output' is requested twice"):
        oip.infer(_request(x, outputs=[RequestedOutput("output"), RequestedOutput("output")]))
    with pytest.raises(NotFound, match="version '0'"):
        oip.metadata("tiny", "0")


def test_binary_data_parameter_chooses_the_reply_form(local: dict, arrays: dict) -> None:
    oip = _oip(local)
    x = arrays["fp32"]
    assert oip.infer(_request(x)).raw
    assert not oip.infer(_request(x, outputs=[RequestedOutput("output", binary_data=False)])).raw
    typed = InferRequest("tiny", [InputTensor("input", "FP32", x.shape, {"fp32_contents": x.ravel().tolist()})], id="a")
    result = oip.infer(typed)
    assert not result.raw and result.id == "a" and result.model_version == "1"
    typed.outputs = [RequestedOutput("output", binary_data=True)]
    assert oip.infer(typed).raw


@pytest.mark.parametrize(
    "dtype, datatype, field",
    [
        (np.float32, "FP32", "fp32_contents"),
        (np.float16, "FP16", None),
        (np.float64, "FP64", "fp64_contents"),
        (np.uint8, "UINT8", "uint_contents"),
        (np.int32, "INT32", "int_contents"),
        (np.int64, "INT64", "int64_contents"),
    ],
)
def test_every_datatype_raw_and_typed(local: dict, dtype: type, datatype: str, field: str | None) -> None:
    x = np.random.default_rng(3).integers(0, 200, (2, 3, 16, 16)).astype(dtype)
    expected = _reference(local["tiny"], x)[0]
    oip = _oip(local)
    raw = oip.infer(_request(x, datatype))
    assert raw.raw and raw.outputs[0].data.dtype == np.float32
    np.testing.assert_allclose(raw.outputs[0].data, expected, rtol=1e-5, atol=1e-5)
    if field is not None:
        typed = InferRequest("tiny", [InputTensor("input", datatype, x.shape, {field: x.ravel().tolist()})])
        np.testing.assert_allclose(oip.infer(typed).outputs[0].data, expected, rtol=1e-5, atol=1e-5)
