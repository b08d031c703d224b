"""Drive the cloud's Open Inference Protocol with Triton's or KServe's own client; print JSON.

    python tests/support/v2_clients.py triton|kserve ADDRESS INPUTS.npz

Run as a subprocess by ``tests/test_kserve.py``: tritonclient, kserve and Cleave's own stubs each
register ``inference.*`` messages in protobuf's default pool, so no two of them can share a process.
``INPUTS.npz`` holds the arrays to send (``fp32``, ``fp16``, ``uint8``, ``int64`` for the model
``tiny``; ``two`` for the two-output model ``two``). The output is one JSON object: case name ->
record, where a record is ``{"ok": true, "outputs": {name: {"datatype", "shape", "data"}}, ...}`` or
``{"ok": false, "code": "INVALID_ARGUMENT", "message": ...}``.
"""

from __future__ import annotations

import asyncio
import json
import sys
from collections.abc import Callable
from typing import Any

import numpy as np

TINY, TWO = "tiny", "two"
DATATYPES = {"fp32": "FP32", "fp16": "FP16", "uint8": "UINT8", "int64": "INT64"}


def _tensor(datatype: str, array: np.ndarray) -> dict[str, Any]:
    return {"datatype": datatype, "shape": list(array.shape), "data": array.astype(np.float64).ravel().tolist()}


def _error(code: str, message: str) -> dict[str, Any]:
    return {"ok": False, "code": code.removeprefix("StatusCode."), "message": message}


# --- Triton -----------------------------------------------------------------------------------


def triton_cases(address: str, arrays: dict[str, np.ndarray]) -> dict[str, Any]:
    import tritonclient.grpc as tc
    from tritonclient.grpc import service_pb2
    from tritonclient.utils import InferenceServerException

    client = tc.InferenceServerClient(address)
    out: dict[str, Any] = {}

    def case(name: str, call: Callable[[], dict[str, Any]]) -> None:
        try:
            out[name] = {"ok": True, **call()}
        except InferenceServerException as exc:
            out[name] = _error(str(exc.status()), exc.message())

    def reply(result: Any, names: list[str]) -> dict[str, Any]:
        response = result.get_response()
        outputs = {n: _tensor(o.datatype, result.as_numpy(n)) for n, o in zip(names, response.outputs, strict=True)}
        return {
            "outputs": outputs,
            "id": response.id,
            "model_version": response.model_version,
            "raw_outputs": len(response.raw_output_contents),
        }

    def infer(model: str, key: str, datatype: str | None = None, name: str = "input", **kw: Any) -> dict[str, Any]:
        array = arrays[key]
        inp = tc.InferInput(name, list(array.shape), datatype or DATATYPES.get(key, "FP32"))
        inp.set_data_from_numpy(array)
        result = client.infer(model, [inp], **kw)
        return reply(result, [o.name for o in result.get_response().outputs])

    def typed(field: str, datatype: str, values: Any, shape: list[int], raw: list[bytes] | None = None) -> Any:
        request = service_pb2.ModelInferRequest(model_name=TINY, id=f"typed-{datatype}")
        tensor = request.inputs.add(name="input", datatype=datatype, shape=shape)
        if field:
            getattr(tensor.contents, field).extend(values)
        request.raw_input_contents.extend(raw or [])
        try:
            response = client._client_stub.ModelInfer(request, timeout=30)
        except Exception as exc:  # noqa: BLE001 - a grpc.RpcError, reported as a record
            return _error(str(exc.code()), exc.details())
        outputs = {
            o.name: _tensor(o.datatype, np.asarray(o.contents.fp32_contents, dtype=np.float32).reshape(o.shape))
            for o in response.outputs
        }
        return {"ok": True, "outputs": outputs, "id": response.id, "raw_outputs": len(response.raw_output_contents)}

    def model_metadata(model: str) -> dict[str, Any]:
        meta = client.get_model_metadata(model)
        tensors = [
            [{"name": t.name, "datatype": t.datatype, "shape": list(t.shape)} for t in group]
            for group in (meta.inputs, meta.outputs)
        ]
        return {"name": meta.name, "versions": list(meta.versions), "platform": meta.platform, "tensors": tensors}

    def server_metadata() -> dict[str, Any]:
        meta = client.get_server_metadata()
        return {"name": meta.name, "version": meta.version}

    case(
        "health",
        lambda: {
            "live": client.is_server_live(),
            "ready": client.is_server_ready(),
            "model_ready": client.is_model_ready(TINY),
            "model_ready_v1": client.is_model_ready(TINY, "1"),
        },
    )
    case("model_ready_unknown", lambda: {"ready": client.is_model_ready("nope")})
    case("model_ready_bad_version", lambda: {"ready": client.is_model_ready(TINY, "2")})
    case("server_metadata", server_metadata)
    case("metadata_tiny", lambda: model_metadata(TINY))
    case("metadata_two", lambda: model_metadata(TWO))
    case("metadata_unknown", lambda: model_metadata("nope"))
    for key, datatype in DATATYPES.items():
        case(
            f"raw_{datatype}",
            lambda key=key, datatype=datatype: infer(
                TINY, key, request_id=f"raw-{datatype}", outputs=[tc.InferRequestedOutput("output")]
            ),
        )
    case("two_all", lambda: infer(TWO, "two"))
    case("two_select", lambda: infer(TWO, "two", outputs=[tc.InferRequestedOutput("output_1")]))
    fp32, uint8, int64 = arrays["fp32"], arrays["uint8"], arrays["int64"]
    out["typed_FP32"] = typed("fp32_contents", "FP32", fp32.ravel().tolist(), list(fp32.shape))
    out["typed_UINT8"] = typed("uint_contents", "UINT8", uint8.ravel().tolist(), list(uint8.shape))
    out["typed_INT64"] = typed("int64_contents", "INT64", int64.ravel().tolist(), list(int64.shape))
    # Errors.
    case("unknown_model", lambda: infer("nope", "fp32"))
    case("bad_version", lambda: infer(TINY, "fp32", model_version="7"))
    case("bad_shape", lambda: infer(TINY, "two"))
    arrays["bool"] = arrays["fp32"] > 0
    case("unsupported_datatype", lambda: infer(TINY, "bool", datatype="BOOL"))
    case("bad_name", lambda: infer(TINY, "fp32", name="image"))
    case("unknown_output", lambda: infer(TINY, "fp32", outputs=[tc.InferRequestedOutput("logits")]))
    out["raw_length"] = typed("", "FP32", [], list(fp32.shape), raw=[fp32.tobytes()[:-4]])
    out["typed_count"] = typed("fp32_contents", "FP32", fp32.ravel().tolist()[:-1], list(fp32.shape))
    out["typed_FP16"] = typed("", "FP16", [], list(fp32.shape))
    out["typed_wrong_field"] = typed("int64_contents", "FP32", int64.ravel().tolist(), list(fp32.shape))
    client.close()
    return out


# --- KServe -----------------------------------------------------------------------------------


async def _kserve(address: str, arrays: dict[str, np.ndarray]) -> dict[str, Any]:
    import grpc
    from kserve import InferenceGRPCClient
    from kserve.protocol.infer_type import InferInput, InferRequest

    client = InferenceGRPCClient(address, timeout=30, retries=0)
    out: dict[str, Any] = {}

    async def infer(model: str, key: str, binary: bool, request_id: str) -> dict[str, Any]:
        array = arrays[key]
        inp = InferInput("input", list(array.shape), DATATYPES.get(key, "FP32"))
        inp.set_data_from_numpy(array, binary_data=binary)
        try:
            response = await client.infer(InferRequest(model_name=model, infer_inputs=[inp], request_id=request_id))
        except grpc.RpcError as exc:
            return _error(str(exc.code()), exc.details())
        outputs = {o.name: _tensor(o.datatype, o.as_numpy()) for o in response.outputs}
        return {"ok": True, "outputs": outputs, "id": response.id, "model_version": response.model_version}

    out["health"] = {
        "ok": True,
        "live": await client.is_server_live(),
        "ready": await client.is_server_ready(),
        "model_ready": await client.is_model_ready(TINY),
    }
    try:
        await client.is_model_ready("nope")
        out["model_ready_unknown"] = {"ok": True}
    except grpc.RpcError as exc:
        out["model_ready_unknown"] = _error(str(exc.code()), exc.details())
    out["raw_FP32"] = await infer(TINY, "fp32", True, "k-raw")
    out["raw_UINT8"] = await infer(TINY, "uint8", True, "k-raw-u8")
    out["typed_FP32"] = await infer(TINY, "fp32", False, "k-typed")
    out["typed_INT64"] = await infer(TINY, "int64", False, "k-typed-i64")
    out["two_all"] = await infer(TWO, "two", True, "k-two")
    out["unknown_model"] = await infer("nope", "fp32", True, "k-404")
    out["bad_shape"] = await infer(TINY, "two", True, "k-shape")
    await client.close()
    return out


def kserve_cases(address: str, arrays: dict[str, np.ndarray]) -> dict[str, Any]:
    return asyncio.run(_kserve(address, arrays))


def main(argv: list[str]) -> int:
    which, address, inputs = argv
    with np.load(inputs, allow_pickle=False) as data:
        arrays = {k: data[k] for k in data.files}
    cases = {"triton": triton_cases, "kserve": kserve_cases}[which]
    print(json.dumps(cases(address, arrays)))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
