"""The cloud's HTTP face against real ``cleave-cloud`` processes: KServe v2 over HTTP with Triton's
own ``tritonclient.http`` (answers equal to ``tritonclient.grpc`` on the same daemon), Triton's
config / index / statistics on both protocols, the v2 error body, limits, and bearer tokens.

The Triton clients run in a subprocess (``tests/support/http_clients.py``): their ``inference.*`` protobuf
names clash with Cleave's own. Plain HTTP checks use httpx here.
"""

from __future__ import annotations

import contextlib
import json
import ssl
import struct
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import torch
import yaml

from cleave_cli.launch import DaemonProcess, cloud_process, free_port
from cloud_node.config import CloudConfig, HttpConfig
from cloud_node.web.v2 import parse_infer
from partitioner.loaded import LoadedModel, as_tensor_list
from partitioner.models import ModelSpec
from protos.errors import InvalidArgument
from runtime.security import ClientTLS

from .support.pki import make_pki

pytestmark = [pytest.mark.integration]

ROOT = Path(__file__).resolve().parent.parent
TINY = {"name": "tiny", "source": "tests.support.factories:tiny_cnn", "input_shape": [1, 3, 16, 16]}
TOKEN = "http-test-token-1"


def _start(path: Path, extra: dict[str, Any]) -> tuple[DaemonProcess, str]:
    http_port = free_port()
    config = {"models": [TINY], "torch_threads": 1, "http": {"listen": f"127.0.0.1:{http_port}"}, **extra}
    (path / "cloud.yaml").write_text(yaml.safe_dump(config))
    proc = cloud_process(path / "cloud.yaml", free_port(), path / "cloud.log").start()
    url = f"http://127.0.0.1:{http_port}"
    for _ in range(100):  # the gRPC port is up; the HTTP face started before it
        try:
            if httpx.get(url + "/v2/health/ready", timeout=2).status_code == 200:
                break
        except httpx.TransportError:
            pass
    return proc, url


@pytest.fixture(scope="module")
def cloud(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[DaemonProcess, str]]:
    proc, url = _start(tmp_path_factory.mktemp("http"), {"limits": {"max_message_bytes": 1 << 20, "max_batch": 4}})
    yield proc, url
    proc.stop()


@pytest.fixture(scope="module")
def secured(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[DaemonProcess, str]]:
    proc, url = _start(tmp_path_factory.mktemp("http_auth"), {"auth": {"tokens": [TOKEN]}})
    yield proc, url
    proc.stop()


@pytest.fixture(scope="module")
def arrays() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(3)
    return {
        "fp32": rng.standard_normal((2, 3, 16, 16)).astype(np.float32),
        "fp16": rng.standard_normal((1, 3, 16, 16)).astype(np.float16),
        "uint8": rng.integers(0, 256, (1, 3, 16, 16), dtype=np.uint8),
        "big": rng.standard_normal((5, 3, 16, 16)).astype(np.float32),
    }


def _clients(proc: DaemonProcess, url: str, arrays: dict, tmp: Path, token: str = "") -> dict[str, Any]:
    np.savez(tmp / "inputs.npz", **arrays)
    clients = ROOT / "tests" / "support" / "http_clients.py"
    args = [sys.executable, str(clients), url, proc.address, str(tmp / "inputs.npz")]
    done = subprocess.run(args + ([token] if token else []), capture_output=True, text=True, timeout=180, cwd=ROOT)
    assert done.returncode == 0, f"clients failed:\n{done.stderr[-3000:]}\ncloud log:\n{proc.log_tail()}"
    return json.loads(done.stdout)


@pytest.fixture(scope="module")
def triton(cloud: tuple[DaemonProcess, str], arrays: dict, tmp_path_factory: pytest.TempPathFactory) -> dict:
    return _clients(*cloud, arrays, tmp_path_factory.mktemp("clients"))


def _reference(array: np.ndarray) -> np.ndarray:
    model = LoadedModel.load(ModelSpec.from_dict(TINY))
    with torch.inference_mode():
        return as_tensor_list(model.module(torch.from_numpy(array.astype(np.float32))))[0].numpy()


def test_health_and_metadata_over_http(triton: dict) -> None:
    http = triton["http"]
    for name in ("live", "ready", "model_ready", "model_ready_v1"):
        assert http[name] == {"ok": True, "value": True}, name
    assert http["server_metadata"]["value"]["name"] == "cleave"
    assert "binary_tensor_data" in http["server_metadata"]["value"]["extensions"]
    assert http["metadata"]["value"] == {
        "name": "tiny",
        "versions": ["1"],
        "platform": "pytorch",
        "inputs": [{"name": "input", "datatype": "FP32", "shape": [-1, 3, 16, 16]}],
        "outputs": [{"name": "output", "datatype": "FP32", "shape": [-1, 4]}],
    }
    assert http["metadata_unknown"]["ok"] is False and http["metadata_unknown"]["status"] == "404"
    assert "not served here" in http["metadata_unknown"]["message"]


def test_http_infer_json_and_binary_equal_grpc_and_the_model(triton: dict, arrays: dict) -> None:
    expected = {key: _reference(arrays[key]) for key in ("fp32", "fp16", "uint8")}
    cases = {"fp32_json": "fp32", "fp32_binary": "fp32", "fp32_default_outputs": "fp32", "fp16_binary": "fp16"}
    cases["uint8_json"] = "uint8"
    for case, key in cases.items():
        for proto in ("http", "grpc"):
            record = triton[proto][case]
            assert record["ok"], (proto, case, record)
            got = np.asarray(record["value"]["data"], dtype=np.float32).reshape(record["value"]["shape"])
            np.testing.assert_allclose(got, expected[key], rtol=1e-5, atol=1e-6, err_msg=f"{proto} {case}")
            assert record["value"]["id"] == f"r-{key}"
        # The two faces are one implementation: bit-identical answers.
        assert triton["http"][case]["value"]["data"] == triton["grpc"][case]["value"]["data"], case


def test_http_errors_match_grpc(triton: dict) -> None:
    http, grpc_ = triton["http"], triton["grpc"]
    assert http["unknown_model"]["status"] == "404" and grpc_["unknown_model"]["status"] == "StatusCode.NOT_FOUND"
    assert http["unknown_model"]["message"] == grpc_["unknown_model"]["message"]
    assert http["over_batch"]["status"] == "429" and grpc_["over_batch"]["status"] == "StatusCode.RESOURCE_EXHAUSTED"
    assert "limits.max_batch" in http["over_batch"]["message"]
    assert http["over_batch"]["message"] == grpc_["over_batch"]["message"]


def test_config_index_and_statistics_on_both_protocols(triton: dict) -> None:
    http, grpc_ = triton["http"], triton["grpc"]
    config = http["config"]["value"]
    assert config["max_batch_size"] == 4 and config["input"][0] == {
        "name": "input",
        "data_type": "TYPE_FP32",
        "dims": [3, 16, 16],
    }
    assert config["output"][0]["dims"] == [4]
    g = grpc_["config"]["value"]["config"]
    assert g["name"] == "tiny" and g["max_batch_size"] == 4 and g["input"][0]["dims"] == ["3", "16", "16"]
    assert http["config_unknown"]["status"] == "404" and grpc_["config_unknown"]["status"] == "StatusCode.NOT_FOUND"
    assert http["index"]["value"] == [{"name": "tiny", "version": "1", "state": "READY", "reason": ""}]
    assert grpc_["index"]["value"]["models"] == [{"name": "tiny", "version": "1", "state": "READY"}]
    # Statistics count both faces' requests (one backend): 5 good requests each before "stats" on
    # HTTP; gRPC ran after HTTP, so it sees 10 successes and HTTP's 2 + its own failures.
    stats = http["stats"]["value"]["model_stats"][0]
    assert stats["name"] == "tiny" and stats["execution_count"] == 5
    assert stats["inference_count"] == 2 + 2 + 2 + 1 + 1 and stats["inference_stats"]["fail"]["count"] == 1
    assert stats["inference_stats"]["success"]["ns"] > stats["inference_stats"]["compute_infer"]["ns"] > 0
    g = grpc_["stats"]["value"]["model_stats"][0]
    assert int(g["execution_count"]) == 10 and int(g["inference_stats"]["fail"]["count"]) == 2
    assert http["stats_all"]["value"]["model_stats"][0]["name"] == "tiny"


def test_plain_http_errors_and_limits(cloud: tuple[DaemonProcess, str]) -> None:
    _, url = cloud
    with httpx.Client(base_url=url, timeout=30) as c:
        r = c.post("/v2/models/nope/infer", json={"inputs": []})
        assert r.status_code == 404 and r.json() == {"error": "model 'nope' is not served here (serving: tiny)"}
        r = c.post(
            "/v2/models/tiny/infer",
            json={"inputs": [{"name": "input", "shape": [1, 3, 8, 8], "datatype": "FP32", "data": [0.0] * 192}]},
        )
        assert r.status_code == 400 and "inputs[0].shape" in r.json()["error"]
        r = c.post(
            "/v2/models/tiny/infer",
            json={"inputs": [{"name": "input", "shape": [1, 3, 16, 16], "datatype": "FP32", "data": [0.0] * 5}]},
        )
        assert r.status_code == 400 and "5 values, expected 768" in r.json()["error"]
        r = c.post("/v2/models/tiny/infer", content=b"{not json")
        assert r.status_code == 400 and "not JSON" in r.json()["error"]
        r = c.post("/v2/models/tiny/infer", content=b"x" * (1 << 21))  # over limits.max_message_bytes
        assert r.status_code == 413 and "limits.max_message_bytes" in r.json()["error"]
        r = c.get("/api/v1/jobs")  # this cloud hosts no Compression service
        assert r.status_code == 501 and "--jobs-dir" in r.json()["error"]
        r = c.get("/v2/models/tiny/versions/2")
        assert r.status_code == 404 and "no version '2'" in r.json()["error"]
        # Binary data, as curl sends it: JSON header, then raw little-endian bytes.
        array = np.arange(768, dtype=np.float32) / 768
        head = json.dumps(
            {
                "inputs": [
                    {
                        "name": "input",
                        "shape": [1, 3, 16, 16],
                        "datatype": "FP32",
                        "parameters": {"binary_data_size": array.nbytes},
                    }
                ],
                "outputs": [{"name": "output", "parameters": {"binary_data": True}}],
            }
        ).encode()
        r = c.post(
            "/v2/models/tiny/infer",
            content=head + array.tobytes(),
            headers={"Inference-Header-Content-Length": str(len(head)), "Content-Type": "application/octet-stream"},
        )
        assert r.status_code == 200, r.text
        split = int(r.headers["inference-header-content-length"])
        reply = json.loads(r.content[:split])
        assert reply["outputs"][0]["parameters"]["binary_data_size"] == 16
        got = np.frombuffer(r.content[split:], dtype="<f4")
        np.testing.assert_allclose(got, _reference(array.reshape(1, 3, 16, 16)).ravel(), rtol=1e-5, atol=1e-6)
        r = c.post(
            "/v2/models/tiny/infer",
            content=head + array.tobytes()[:-4],
            headers={"Inference-Header-Content-Length": str(len(head))},
        )
        assert r.status_code == 400 and "binary_data_size" in r.json()["error"]


def test_tokens_guard_every_route_but_health(secured: tuple[DaemonProcess, str], arrays: dict, tmp_path: Path) -> None:
    proc, url = secured
    result = _clients(proc, url, arrays, tmp_path, token=TOKEN)
    assert result["http"]["fp32_binary"]["ok"] and result["grpc"]["fp32_binary"]["ok"]
    assert result["http"]["config"]["ok"] and result["grpc"]["index"]["ok"]
    refused = result["http_no_token"]
    assert refused["live"]["value"] is True and refused["ready"]["value"] is True  # health stays open
    for name in ("metadata", "fp32_json", "config", "index", "stats"):
        assert refused[name]["status"] == "401", name
        assert "Authorization: Bearer" in refused[name]["message"], name
    with httpx.Client(base_url=url, timeout=30) as c:
        r = c.get("/v2/models/tiny", headers={"Authorization": "Bearer wrong"})
        assert r.status_code == 401 and r.json() == {"error": "invalid bearer token"}
        assert r.headers["www-authenticate"] == "Bearer"
        assert c.get("/api/v1/console/state").status_code == 401
        page = c.get("/")  # the console's page holds no data; it asks for the token
        assert page.status_code == 200 and "token" in page.text


# --- the parsing, without a server ---------------------------------------------------------------


def test_parse_infer_binary_and_json() -> None:
    values = np.arange(6, dtype=np.float32)
    head = json.dumps(
        {
            "id": "7",
            "inputs": [{"name": "input", "shape": [1, 6], "datatype": "FP32", "parameters": {"binary_data_size": 24}}],
        }
    ).encode()
    request, _ = parse_infer(head + values.tobytes(), str(len(head)), "m", "")
    assert request.id == "7" and request.raw_inputs == [values.tobytes()] and request.inputs[0].shape == (1, 6)
    request, _ = parse_infer(
        json.dumps(
            {"inputs": [{"name": "input", "shape": [2, 2], "datatype": "INT64", "data": [[1, 2], [3, 4]]}]}
        ).encode(),
        None,
        "m",
        "1",
    )
    assert request.inputs[0].contents == {"int64_contents": [1, 2, 3, 4]} and request.model_version == "1"
    fp16, _ = parse_infer(
        json.dumps({"inputs": [{"name": "input", "shape": [2], "datatype": "FP16", "data": [1.5, -2]}]}).encode(),
        None,
        "m",
        "",
    )
    assert fp16.raw_inputs == [struct.pack("<2e", 1.5, -2)]


_BINARY_HEAD = b'{"inputs": [{"shape": [1], "parameters": {"binary_data_size": 8}}]}'
_FP32_HEAD = b'{"inputs": [{"shape": [1], "datatype": "FP32", "parameters": {"binary_data_size": 8}}]}'


@pytest.mark.parametrize(
    ("body", "header", "message"),
    [
        (b"[]", None, "expected a JSON object"),
        (b"{}", None, "inputs: required"),
        (b'{"inputs": [{"shape": "x"}]}', None, "inputs[0].shape"),
        (b'{"inputs": [{"shape": [1], "data": ["a"]}]}', None, "is not a number"),
        (b'{"inputs": [{"shape": [1], "data": [true]}]}', None, "is not a number"),
        (b'{"inputs": []}', "99", "Inference-Header-Content-Length"),
        (_BINARY_HEAD + b"abcd", str(len(_BINARY_HEAD)), "binary_data_size: 8 does not fit the 4"),
        # The HTTP field, not the gRPC one ("contents.fp32_contents ... or send raw_input_contents").
        (b'{"inputs": [{"shape": [1, 3], "datatype": "FP32", "data": [0.5]}]}', None, "inputs[0].data: 1 values"),
        (_FP32_HEAD + b"abcdefgh", str(len(_FP32_HEAD)), "binary_data_size: 8 bytes, expected 4"),
    ],
)
def test_parse_infer_refuses_bad_bodies(body: bytes, header: str | None, message: str) -> None:
    with pytest.raises(InvalidArgument, match=message.replace("[", r"\[").replace("]", r"\]")):
        parse_infer(body, header, "m", "")


def test_http_config_listen() -> None:
    assert HttpConfig("8000").address() == ("127.0.0.1", 8000)
    assert HttpConfig("0.0.0.0:9000").address() == ("0.0.0.0", 9000)
    assert not HttpConfig().enabled
    with pytest.raises(ValueError, match="^listen: 'localhost:http'"):
        HttpConfig("localhost:http")
    with pytest.raises(ValueError, match="^http.listen: 'localhost:http'"):  # at load, by its YAML path
        CloudConfig.from_dict({"http": {"listen": "localhost:http"}})


def test_http_uses_the_daemons_mutual_tls(tmp_path: Path) -> None:
    pki = make_pki(tmp_path / "pki")
    tls = {"cert": "pki/server.crt", "key": "pki/server.key", "ca": "pki/ca.crt", "require_client_cert": True}
    http_port = free_port()
    config = {"models": [TINY], "torch_threads": 1, "tls": tls, "http": {"listen": f"127.0.0.1:{http_port}"}}
    (tmp_path / "cloud.yaml").write_text(yaml.safe_dump(config))
    client_tls = ClientTLS(ca=str(pki.ca), cert=str(pki.client_cert), key=str(pki.client_key))
    proc = cloud_process(tmp_path / "cloud.yaml", free_port(), tmp_path / "cloud.log", tls=client_tls).start()
    try:
        trusted = ssl.create_default_context(cafile=str(pki.ca))
        trusted.load_cert_chain(str(pki.client_cert), str(pki.client_key))
        r = httpx.get(f"https://127.0.0.1:{http_port}/v2/models/tiny", verify=trusted, timeout=30)
        assert r.status_code == 200 and r.json()["name"] == "tiny"
        anonymous = ssl.create_default_context(cafile=str(pki.ca))  # no client certificate: refused in the handshake
        with pytest.raises(httpx.TransportError):
            httpx.get(f"https://127.0.0.1:{http_port}/v2/models/tiny", verify=anonymous, timeout=30).raise_for_status()
        with pytest.raises(httpx.TransportError):  # and no plaintext on the TLS port
            httpx.get(f"http://127.0.0.1:{http_port}/v2/health/live", timeout=30)
    finally:
        proc.stop()


def test_the_http_face_starts_without_torch() -> None:
    # It starts before the models load, like the gRPC port: torch must not delay it.
    listen = f"127.0.0.1:{free_port()}"
    check = (
        "import sys\n"
        "from cloud_node.config import CloudConfig\n"
        "from cloud_node.web.server import start_http\n"
        f"server, _ = start_http(CloudConfig.from_dict({{'http': {{'listen': '{listen}'}}, 'jobs': {{'dir': 'x'}}}}))\n"
        "server.stop()\n"
        "print(sorted(m for m in ('torch', 'torchvision') if m in sys.modules))\n"
    )
    done = subprocess.run([sys.executable, "-c", check], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"


class _Jobs:
    """A job manager whose one job never ends: its event streams stay open until the client goes."""

    def __init__(self) -> None:
        from cloud_node.jobs.store import JobRecord

        self.job = JobRecord("j1", "RUNNING", b"", "prune_cnn", progress=0.5)

    def get(self, job_id: str) -> Any:
        return self.job

    def watch(self, job_id: str, active: Any) -> Iterator[Any]:
        yield self.job
        while active():
            time.sleep(0.05)


def test_http_admission_limits_streams_per_client(tmp_path: Path) -> None:
    from cloud_node.web.app import Backends, build_app
    from cloud_node.web.server import HttpServer
    from runtime.admission import ServingLimits
    from runtime.security import ServerTLS, TokenSet

    backends = Backends(jobs=_Jobs())  # type: ignore[arg-type]
    limits = ServingLimits(max_concurrent_rpcs=8, max_streams=3, max_streams_per_client=2)
    app = build_app(backends, tokens=TokenSet(["a", "b"]), limits=limits, jobs_enabled=True)
    server = HttpServer(app, "127.0.0.1", free_port(), ServerTLS())
    try:
        with httpx.Client(base_url=server.url, timeout=30) as c, contextlib.ExitStack() as open_streams:
            lines: list[Iterator[str]] = []

            def stream(token: str) -> httpx.Response:
                r = open_streams.enter_context(
                    c.stream("GET", "/api/v1/jobs/j1/events", headers={"Authorization": f"Bearer {token}"})
                )
                if r.status_code == 200:
                    lines.append(r.iter_lines())  # kept: a dropped iterator closes its response
                    assert next(lines[-1]) == "event: job"
                else:
                    r.read()
                return r

            assert stream("a").status_code == 200 and stream("a").status_code == 200
            refused = stream("a")
            assert refused.status_code == 429 and "limits.max_streams_per_client 2" in refused.json()["error"]
            assert stream("b").status_code == 200  # another client still gets one...
            refused = stream("b")  # ...up to the daemon's total
            assert refused.status_code == 429 and "limits.max_streams 3" in refused.json()["error"]
            assert c.get("/v2/health/live").status_code == 200  # health answers even when all are busy
            assert c.get("/api/v1/jobs/j1", headers={"Authorization": "Bearer b"}).json()["state"] == "RUNNING"
        # The clients went away: the server notices, ends their watches and frees their slots.
        deadline = time.monotonic() + 10
        status = 0
        while status != 200 and time.monotonic() < deadline:
            time.sleep(0.2)
            with (
                httpx.Client(base_url=server.url, timeout=30) as c,
                c.stream("GET", "/api/v1/jobs/j1/events", headers={"Authorization": "Bearer a"}) as r,
            ):
                status = r.status_code
        assert status == 200
    finally:
        server.stop()


def test_http_answers_503_until_the_models_are_loaded() -> None:
    from cloud_node.web.app import Backends, build_app
    from cloud_node.web.server import HttpServer
    from runtime.security import ServerTLS

    server = HttpServer(build_app(Backends(), jobs_enabled=True), "127.0.0.1", free_port(), ServerTLS())
    try:
        with httpx.Client(base_url=server.url, timeout=30) as c:
            assert c.get("/v2/health/live").status_code == 200
            r = c.get("/v2/health/ready")
            assert r.status_code == 503 and "loading its models" in r.json()["error"]
            assert c.post("/v2/models/tiny/infer", json={"inputs": []}).status_code == 503
            assert c.get("/api/v1/jobs").status_code == 503
            assert c.get("/api/v1/console/state").json()["ready"] is False
    finally:
        server.stop()
