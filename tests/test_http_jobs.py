"""The compression jobs' REST API against a real ``cleave-cloud`` with bearer tokens on: a whole job
life cycle (chunked upload, submit, server-sent progress, list, cancel, an interrupted download
resumed with Range and checked against its sha256), the gRPC service's errors as HTTP statuses,
and refusal without a token. The same JobManager serves gRPC: a job submitted over REST is seen there.
"""

from __future__ import annotations

import hashlib
import http.client
import io
import json
from collections.abc import Iterator
from pathlib import Path

import grpc
import httpx
import numpy as np
import pytest
import torch
import torchvision
import yaml
from safetensors.torch import save

from cleave_cli.launch import DaemonProcess, cloud_process, free_port
from protos.cleave.v1 import compression_pb2 as pb
from protos.cleave.v1 import compression_pb2_grpc as pb_grpc

pytestmark = [pytest.mark.integration]

TOKEN = "jobs-rest-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


@pytest.fixture(scope="module")
def cloud(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[DaemonProcess, httpx.Client]]:
    path = tmp_path_factory.mktemp("jobs_rest")
    http_port = free_port()
    config = {
        "torch_threads": 1,
        "auth": {"tokens": [TOKEN]},
        "http": {"listen": f"127.0.0.1:{http_port}"},
        "jobs": {"dir": str(path / "store"), "concurrency": 1, "job_threads": 1, "max_upload_bytes": 64 << 20},
    }
    (path / "cloud.yaml").write_text(yaml.safe_dump(config))
    proc = cloud_process(path / "cloud.yaml", free_port(), path / "cloud.log").start()
    client = httpx.Client(base_url=f"http://127.0.0.1:{http_port}", timeout=120)
    for _ in range(100):
        if client.get("/v2/health/ready").status_code == 200:
            break
    yield proc, client
    client.close()
    proc.stop()


def _weights() -> bytes:
    torch.manual_seed(0)
    return save(torchvision.models.resnet18(weights=None, num_classes=10).state_dict())


def _chunks(data: bytes, size: int = 1 << 20) -> Iterator[bytes]:
    for i in range(0, len(data), size):
        yield data[i : i + size]


def _events(client: httpx.Client, job_id: str) -> list[dict]:
    seen = []
    with client.stream("GET", f"/api/v1/jobs/{job_id}/events", headers=AUTH) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        event = None
        for line in r.iter_lines():
            if line.startswith("event: "):
                event = line.removeprefix("event: ")
            elif line.startswith("data: "):
                assert event == "job"
                seen.append(json.loads(line.removeprefix("data: ")))
    return seen


def test_refused_without_a_token(cloud: tuple[DaemonProcess, httpx.Client]) -> None:
    _, client = cloud
    for method, path in [
        ("GET", "/api/v1/jobs"),
        ("POST", "/api/v1/jobs"),
        ("POST", "/api/v1/uploads?format=SAFETENSORS"),
        ("GET", "/api/v1/jobs/x/artifacts/plan.json"),
        ("GET", "/api/v1/console/state"),
    ]:
        r = client.request(method, path, content=b"x" * 10)
        assert r.status_code == 401, (method, path)
        assert r.json()["error"] == "missing 'Authorization: Bearer <token>' header"
    assert client.get("/api/v1/jobs", headers={"Authorization": "Bearer nope"}).status_code == 401
    assert client.get("/openapi.json").status_code == 200  # the API's description is public


def test_openapi_and_docs(cloud: tuple[DaemonProcess, httpx.Client]) -> None:
    _, client = cloud
    spec = client.get("/openapi.json").json()
    for path in ("/api/v1/uploads", "/api/v1/jobs", "/api/v1/jobs/{job_id}/events", "/v2/models/{model}/infer"):
        assert path in spec["paths"], path
    docs = client.get("/docs")
    assert docs.status_code == 200 and "swagger-ui" in docs.text


def test_job_life_cycle_over_rest(cloud: tuple[DaemonProcess, httpx.Client], tmp_path: Path) -> None:
    proc, client = cloud
    weights = _weights()
    query = "format=SAFETENSORS&architecture=resnet18&num_classes=10&input_shape=1,3,32,32&name=r18"

    # Upload errors, checked before the body is stored: the gRPC service's codes as HTTP statuses.
    r = client.post("/api/v1/uploads?format=PICKLE", content=b"x", headers=AUTH)
    assert r.status_code == 400 and "format: 'PICKLE' is not one of" in r.json()["error"]
    r = client.post("/api/v1/uploads?format=TORCHSCRIPT", content=b"x", headers=AUTH)
    assert r.status_code == 403 and "allow_code_uploads" in r.json()["error"]
    r = client.post(f"/api/v1/uploads?{query}", content=b"not safetensors at all", headers=AUTH)
    assert r.status_code == 400 and "safetensors" in r.json()["error"]
    # A 1 GiB announcement is refused from the headers, before the body is read.
    conn = http.client.HTTPConnection(client.base_url.host, client.base_url.port, timeout=60)
    conn.putrequest("POST", "/api/v1/uploads?format=DATASET_NPZ")
    conn.putheader("Authorization", AUTH["Authorization"])
    conn.putheader("Content-Length", str(1 << 30))
    conn.endheaders(b"x" * 1000)
    answer = conn.getresponse()
    assert answer.status == 429 and "byte limit" in json.loads(answer.read())["error"]
    conn.close()

    # A chunked upload (no Content-Length): streamed into the store, hashed as it comes.
    r = client.post(f"/api/v1/uploads?{query}", content=_chunks(weights), headers=AUTH)
    assert r.status_code == 200, r.text
    model = r.json()
    assert model["kind"] == "cnn" and model["sha256"] == hashlib.sha256(weights).hexdigest()
    assert model["size_bytes"] == len(weights)

    spec = {"model": {"model_id": model["id"], "input_shape": [1, 3, 32, 32]}, "prune": {"ratio": 0.5}}
    r = client.post("/api/v1/jobs", json={**spec, "skip_evaluation": True, "label": "rest"}, headers=AUTH)
    assert r.status_code == 201, r.text
    job = r.json()
    assert job["state"] == "QUEUED" and job["engine"] == "prune_cnn" and job["spec"]["label"] == "rest"
    r = client.post("/api/v1/jobs", json={"model": {"model_id": "m-nope"}}, headers=AUTH)
    assert r.status_code == 404 and "spec.model.model_id" in r.json()["error"]
    r = client.post("/api/v1/jobs", json={"prune": {"ratio": "lots"}}, headers=AUTH)
    assert r.status_code == 400 and r.json()["error"].startswith("spec:")

    # A second job, cancelled while queued; cancelling again conflicts with its state.
    other = client.post("/api/v1/jobs", json=spec, headers=AUTH).json()
    assert client.post(f"/api/v1/jobs/{other['id']}/cancel", headers=AUTH).json()["state"] == "CANCELLED"
    r = client.post(f"/api/v1/jobs/{other['id']}/cancel", headers=AUTH)
    assert r.status_code == 409 and "already CANCELLED" in r.json()["error"]

    # Progress as server-sent events, until the job ends.
    events = _events(client, job["id"])
    states = [e["state"] for e in events]
    assert states[-1] == "SUCCEEDED", events[-1]
    assert "RUNNING" in states and any(0 < e["progress"] < 1 for e in events)
    done = client.get(f"/api/v1/jobs/{job['id']}", headers=AUTH).json()
    assert done["state"] == "SUCCEEDED" and done["artifacts"]
    listed = client.get("/api/v1/jobs", params={"state": ["SUCCEEDED", "CANCELLED"]}, headers=AUTH).json()["jobs"]
    assert {j["id"] for j in listed} == {job["id"], other["id"]}
    assert client.get("/api/v1/jobs", params={"state": "DONE"}, headers=AUTH).status_code == 400
    assert client.get("/api/v1/jobs/nope", headers=AUTH).status_code == 404

    # One implementation behind two faces: gRPC sees the REST job as it is.
    channel = grpc.insecure_channel(proc.address)
    stub = pb_grpc.CompressionStub(channel)
    seen = stub.GetJob(pb.GetJobRequest(job_id=job["id"]), metadata=[("authorization", f"Bearer {TOKEN}")])
    assert seen.state == pb.SUCCEEDED and [a.sha256 for a in seen.artifacts] == [a["sha256"] for a in done["artifacts"]]
    channel.close()

    # Download, interrupted after some bytes, resumed with Range; the whole checked against the sha256.
    artifact = max(done["artifacts"], key=lambda a: a["size_bytes"])
    url = f"/api/v1/jobs/{job['id']}/artifacts/{artifact['name']}"
    got = io.BytesIO()
    with client.stream("GET", url, headers=AUTH) as r:
        assert r.status_code == 200 and r.headers["accept-ranges"] == "bytes"
        sha = r.headers["x-content-sha256"]
        for part in r.iter_bytes(4096):
            got.write(part)
            if got.tell() >= artifact["size_bytes"] // 3:
                break  # the connection drops here
    offset = got.tell()
    assert 0 < offset < artifact["size_bytes"]
    r = client.get(url, headers={**AUTH, "Range": f"bytes={offset}-", "If-Range": f'"{sha}"'})
    assert r.status_code == 206, r.headers
    assert r.headers["content-range"] == f"bytes {offset}-{artifact['size_bytes'] - 1}/{artifact['size_bytes']}"
    data = got.getvalue() + r.content
    assert len(data) == artifact["size_bytes"] and hashlib.sha256(data).hexdigest() == sha == artifact["sha256"]
    r = client.get(url, headers={**AUTH, "Range": f"bytes={artifact['size_bytes'] + 10}-"})
    assert r.status_code == 416
    r = client.get(f"/api/v1/jobs/{other['id']}/artifacts/plan.json", headers=AUTH)
    assert r.status_code == 409 and "not SUCCEEDED" in r.json()["error"]
    np.testing.assert_equal(len(data), artifact["size_bytes"])
