"""Drive one cloud daemon with ``tritonclient.http`` and ``tritonclient.grpc``; print JSON.

    python tests/support/http_clients.py HTTP_URL GRPC_ADDRESS INPUTS.npz [TOKEN]

Run as a subprocess by ``tests/test_http.py`` (Triton's stubs register ``inference.*`` protobuf
names that Cleave's own would clash with). ``INPUTS.npz`` holds ``fp32`` (batch 2), ``fp16`` and
``uint8`` for the model ``tiny``, and ``big`` (batch over the limit). Output: ``{"http": cases,
"grpc": cases}``, a case being ``{"ok": true, ...}`` or ``{"ok": false, "status": ..., "message": ...}``.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from typing import Any

import numpy as np
import tritonclient.grpc as tgrpc
import tritonclient.http as thttp
from google.protobuf import json_format
from tritonclient.utils import InferenceServerException

DATATYPES = {"fp32": "FP32", "fp16": "FP16", "uint8": "UINT8", "big": "FP32"}


def _cases(lib: Any, client: Any, arrays: dict[str, np.ndarray], http: bool, headers: dict) -> dict[str, Any]:
    out: dict[str, Any] = {}

    def fresh() -> dict[str, str]:  # tritonclient.http adds its own entries to the dict it is given
        return {k if http else k.lower(): v for k, v in headers.items()}

    def case(name: str, call: Callable[[], Any]) -> None:
        try:
            out[name] = {"ok": True, "value": call()}
        except InferenceServerException as exc:
            out[name] = {"ok": False, "status": str(exc.status()), "message": exc.message()}

    def as_dict(value: Any) -> Any:
        if http:
            return value
        return json_format.MessageToDict(value, preserving_proto_field_name=True)

    def infer(model: str, key: str, binary: bool, outputs: bool = True) -> dict[str, Any]:
        array = arrays[key]
        inp = lib.InferInput("input", list(array.shape), DATATYPES[key])
        if http:
            inp.set_data_from_numpy(array, binary_data=binary)
            requested = [lib.InferRequestedOutput("output", binary_data=binary)] if outputs else None
        else:
            inp.set_data_from_numpy(array)
            requested = [lib.InferRequestedOutput("output")] if outputs else None
        result = client.infer(model, [inp], outputs=requested, request_id=f"r-{key}", headers=fresh())
        data = result.as_numpy("output")
        response = result.get_response()
        return {
            "shape": list(data.shape),
            "data": data.astype(np.float64).ravel().tolist(),
            "id": response["id"] if http else response.id,
        }

    case("live", lambda: client.is_server_live(headers=fresh()))
    case("ready", lambda: client.is_server_ready(headers=fresh()))
    case("model_ready", lambda: client.is_model_ready("tiny", headers=fresh()))
    case("model_ready_v1", lambda: client.is_model_ready("tiny", "1", headers=fresh()))
    case("server_metadata", lambda: as_dict(client.get_server_metadata(headers=fresh())))
    case("metadata", lambda: as_dict(client.get_model_metadata("tiny", headers=fresh())))
    case("metadata_unknown", lambda: as_dict(client.get_model_metadata("nope", headers=fresh())))
    case("fp32_json", lambda: infer("tiny", "fp32", binary=False))
    case("fp32_binary", lambda: infer("tiny", "fp32", binary=True))
    case("fp32_default_outputs", lambda: infer("tiny", "fp32", binary=True, outputs=False))
    case("fp16_binary", lambda: infer("tiny", "fp16", binary=True))
    case("uint8_json", lambda: infer("tiny", "uint8", binary=False))
    case("unknown_model", lambda: infer("nope", "fp32", binary=True))
    case("over_batch", lambda: infer("tiny", "big", binary=True))
    case("config", lambda: as_dict(client.get_model_config("tiny", headers=fresh())))
    case("config_unknown", lambda: as_dict(client.get_model_config("nope", headers=fresh())))
    case("index", lambda: as_dict(client.get_model_repository_index(headers=fresh())))
    case("stats", lambda: as_dict(client.get_inference_statistics("tiny", headers=fresh())))
    case("stats_all", lambda: as_dict(client.get_inference_statistics(headers=fresh())))
    return out


def main() -> None:
    url, address, path = sys.argv[1:4]
    token = sys.argv[4] if len(sys.argv) > 4 else ""
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    with np.load(path) as npz:
        arrays = {k: npz[k] for k in npz.files}
    result = {
        "http": _cases(thttp, thttp.InferenceServerClient(url.removeprefix("http://")), arrays, True, headers),
        "grpc": _cases(tgrpc, tgrpc.InferenceServerClient(address), arrays, False, headers),
    }
    if token:  # the same calls without the token
        result["http_no_token"] = _cases(
            thttp, thttp.InferenceServerClient(url.removeprefix("http://")), arrays, True, {}
        )
    print(json.dumps(result))


if __name__ == "__main__":
    main()
