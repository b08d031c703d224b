"""KServe v2 over HTTP (``/v2/...``), with Triton's binary tensor data extension.

Requests become :class:`~cloud_node.openinference.InferRequest` and go through the same
:class:`~cloud_node.openinference.OpenInference` as the gRPC servicer (validation, limits,
batching, statistics); only the JSON and binary framing lives here.

Binary data (Triton's extension): with an ``Inference-Header-Content-Length: N`` header, the body's
first N bytes are the JSON request and the rest is the binary data of the inputs whose
``parameters.binary_data_size`` says how many bytes are theirs, in input order. An output is sent
as binary when its ``parameters.binary_data`` is true, or when the request's
``parameters.binary_data_output`` is (and the output does not say otherwise); the reply then carries
the same header.
"""

from __future__ import annotations

import json
import math
from typing import TYPE_CHECKING, Any

import numpy as np
from fastapi import APIRouter, Request, Response
from fastapi.responses import JSONResponse
from starlette.concurrency import run_in_threadpool

from protos.errors import InvalidArgument

from .. import __version__
from .app import Backends, read_body

# cloud_node.openinference (and torch) load with the models, after the ports listen: imported in
# the functions that use it, which run only once a request arrives.
if TYPE_CHECKING:
    from ..openinference import InferRequest, InferResult

HEADER_LENGTH = "inference-header-content-length"
SERVER_NAME = "cleave"
EXTENSIONS = ["binary_tensor_data", "model_configuration", "statistics", "model_repository(index)"]


def parse_infer(body: bytes, header_length: str | None, model: str, version: str) -> tuple[InferRequest, dict]:
    """The plain request an HTTP infer body carries, and its JSON (the output choices)."""
    from ..openinference import DATATYPES, InferRequest, InputTensor, RequestedOutput

    if header_length is not None:
        if not header_length.isdigit() or int(header_length) > len(body):
            raise InvalidArgument(
                f"Inference-Header-Content-Length: {header_length!r} is not a byte count within the body "
                f"({len(body)} bytes)"
            )
        split = int(header_length)
        head, binary = body[:split], memoryview(body)[split:]
    else:
        head, binary = body, memoryview(b"")
    try:
        doc = json.loads(head or b"{}")
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise InvalidArgument(f"request body: not JSON ({exc})") from None
    if not isinstance(doc, dict):
        raise InvalidArgument("request body: expected a JSON object")
    inputs = doc.get("inputs")
    if not isinstance(inputs, list):
        raise InvalidArgument("inputs: required, a list of tensors")
    tensors, raw = [], []
    offset = 0
    for i, item in enumerate(inputs):
        where = f"inputs[{i}]"
        if not isinstance(item, dict):
            raise InvalidArgument(f"{where}: expected an object with name, shape, datatype and data")
        name, datatype, shape = item.get("name", ""), item.get("datatype", ""), item.get("shape")
        if not isinstance(shape, list) or not all(isinstance(d, int) and not isinstance(d, bool) for d in shape):
            raise InvalidArgument(f"{where}.shape: expected a list of integers, got {shape!r}")
        params = item.get("parameters") or {}
        size = params.get("binary_data_size") if isinstance(params, dict) else None
        known = DATATYPES.get(datatype)
        count = math.prod(shape) if all(d >= 0 for d in shape) else None  # None: a dynamic dimension
        contents: dict[str, Any] = {}
        if size is not None:
            if not isinstance(size, int) or size < 0 or offset + size > len(binary):
                raise InvalidArgument(
                    f"{where}.parameters.binary_data_size: {size!r} does not fit the {len(binary) - offset} "
                    "binary bytes left in the body"
                )
            if "data" in item:
                raise InvalidArgument(f"{where}.data: give data or parameters.binary_data_size, not both")
            if known is not None and count is not None and size != count * known.dtype.itemsize:
                raise InvalidArgument(
                    f"{where}.parameters.binary_data_size: {size} bytes, expected {count * known.dtype.itemsize} "
                    f"({count} {datatype} values of {known.dtype.itemsize} bytes for shape {shape})"
                )
            raw.append(bytes(binary[offset : offset + size]))
            offset += size
        else:
            values = _flatten(item.get("data"), f"{where}.data")
            if count is not None and len(values) != count:
                # Named here, in this protocol's terms: the shared check names the gRPC fields
                # (contents.fp32_contents, "or send raw_input_contents"), which an HTTP client never sends.
                raise InvalidArgument(f"{where}.data: {len(values)} values, expected {count} for shape {shape}")
            if known is not None and known.contents is None:  # FP16: no typed field; its JSON values travel raw
                raw.append(np.asarray(values, dtype=known.dtype).tobytes())
            else:
                contents = {known.contents if known else "data": values}
        tensors.append(InputTensor(name=name, datatype=datatype, shape=tuple(shape), contents=contents))
    if raw and len(raw) != len(tensors):
        raise InvalidArgument("inputs: send every input as binary data or every input as JSON data, not a mix")
    if offset != len(binary):
        raise InvalidArgument(f"body: {len(binary) - offset} binary bytes after the inputs' binary_data_size")
    outputs = []
    for i, item in enumerate(doc.get("outputs") or []):
        if not isinstance(item, dict) or not isinstance(item.get("name"), str):
            raise InvalidArgument(f"outputs[{i}]: expected an object with a name")
        binary_flag = (item.get("parameters") or {}).get("binary_data")
        outputs.append(RequestedOutput(item["name"], binary_flag if isinstance(binary_flag, bool) else None))
    request = InferRequest(
        model_name=model,
        model_version=version,
        id=str(doc.get("id", "")),
        inputs=tensors,
        outputs=outputs,
        raw_inputs=raw,
    )
    return request, doc


def _flatten(data: Any, where: str) -> list:
    """Row-major values of nested JSON lists of numbers."""
    if data is None:
        raise InvalidArgument(f"{where}: required (or parameters.binary_data_size with binary data)")
    out: list = []
    stack = [data]
    while stack:
        item = stack.pop()
        if isinstance(item, list):
            stack.extend(reversed(item))
        elif isinstance(item, (int, float)) and not isinstance(item, bool):
            out.append(item)
        else:
            raise InvalidArgument(f"{where}: {item!r} is not a number")
    return out


def encode_infer(result: InferResult, doc: dict) -> Response:
    """The v2 JSON reply; binary outputs after it, with Inference-Header-Content-Length."""
    default = bool((doc.get("parameters") or {}).get("binary_data_output", False))
    asked = {
        o["name"]: (o.get("parameters") or {}).get("binary_data")
        for o in doc.get("outputs") or []
        if isinstance(o, dict)
    }
    outputs, blobs = [], []
    for output in result.outputs:
        flag = asked.get(output.name)
        entry: dict[str, Any] = {"name": output.name, "datatype": output.datatype, "shape": list(output.shape)}
        if flag if isinstance(flag, bool) else default:
            blob = output.data.tobytes()
            entry["parameters"] = {"binary_data_size": len(blob)}
            blobs.append(blob)
        else:
            entry["data"] = output.data.ravel().tolist()
        outputs.append(entry)
    reply: dict[str, Any] = {"model_name": result.model_name, "model_version": result.model_version}
    if result.id:
        reply["id"] = result.id
    reply["outputs"] = outputs
    head = json.dumps(reply).encode()
    if not blobs:
        return Response(head, media_type="application/json")
    return Response(
        b"".join([head, *blobs]),
        media_type="application/octet-stream",
        headers={"Inference-Header-Content-Length": str(len(head))},
    )


def _metadata(meta: Any) -> dict:
    def tensors(items: Any) -> list[dict]:
        return [{"name": t.name, "datatype": t.datatype, "shape": list(t.shape)} for t in items]

    return {
        "name": meta.name,
        "versions": list(meta.versions),
        "platform": meta.platform,
        "inputs": tensors(meta.inputs),
        "outputs": tensors(meta.outputs),
    }


def router(backends: Backends) -> APIRouter:
    r = APIRouter(tags=["KServe v2"])

    @r.get("/v2/health/live", summary="Server live (200)")
    async def live() -> Response:
        return Response(status_code=200)

    @r.get("/v2/health/ready", summary="Server ready (200), or loading its models (503)")
    async def ready() -> Response:
        backends.need_inference()
        return Response(status_code=200)

    @r.get("/v2", summary="Server metadata")
    async def server_metadata() -> dict:
        return {"name": SERVER_NAME, "version": __version__, "extensions": EXTENSIONS}

    @r.post("/v2/repository/index", summary="Every served model and its state (Triton's repository index)")
    async def repository_index() -> JSONResponse:
        return JSONResponse(backends.need_inference().repository_index())

    # Before /v2/models/{model}: "stats" is not a model name here.
    @r.get("/v2/models/stats", summary="Inference statistics of every model (Triton's statistics)")
    async def all_stats() -> dict:
        return backends.need_inference().model_statistics()

    for prefix in ("/v2/models/{model}", "/v2/models/{model}/versions/{version}"):

        @r.get(prefix, summary="Model metadata")
        async def model_metadata(model: str, version: str = "") -> dict:
            return _metadata(backends.need_inference().metadata(model, version))

        @r.get(prefix + "/ready", summary="Model ready (200)")
        async def model_ready(model: str, version: str = "") -> Response:
            backends.need_inference().model(model, version)
            return Response(status_code=200)

        @r.get(prefix + "/config", summary="Model configuration (Triton's model_configuration)")
        async def model_config(model: str, version: str = "") -> dict:
            return backends.need_inference().config(model, version)

        @r.get(prefix + "/stats", summary="Model statistics (Triton's statistics)")
        async def model_stats(model: str, version: str = "") -> dict:
            return backends.need_inference().model_statistics(model, version)

        @r.post(
            prefix + "/infer",
            summary="Run inference: JSON tensors, or Triton's binary data with Inference-Header-Content-Length",
        )
        async def infer(request: Request, model: str, version: str = "") -> Response:
            backend = backends.need_inference()
            body = await read_body(request, backend.limits.max_message_bytes, "limits.max_message_bytes")
            parsed, doc = parse_infer(body, request.headers.get(HEADER_LENGTH), model, version)
            result = await run_in_threadpool(backend.infer, parsed)
            return encode_infer(result, doc)

    return r
