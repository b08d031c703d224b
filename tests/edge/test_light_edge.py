"""The torch-free edge against a normal cloud: split inference from a bundle, the local fallback
when the cloud dies, automatic placement from the bundle's tables, metrics and bearer tokens.

The edge runs with torch blocked (see conftest.py); the cloud runs in an environment with torch.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest
import yaml

from cleave_cli.client import EdgeClient
from cleave_cli.launch import DaemonProcess, free_port
from compressor import RAW_UNCOMPRESSED, EncodingSpec, decode_array, encode
from edge_node.onnx_backend import OnnxBackend
from partitioner.bundle import EdgeBundle
from protos.cleave.v1 import edge_pb2

from .conftest import LIGHT_EDGE, MODEL, ROOT, child_env, cloud_python

pytestmark = [pytest.mark.edge, pytest.mark.integration]

TOKEN = "light-edge-token"


def test_the_edge_imports_no_torch() -> None:
    """Everything the bundle edge imports, imported in a fresh interpreter: no torch or torchvision module loads."""
    code = (
        "import sys, json\n"
        "import edge_node.main, edge_node.onnx_backend, edge_node.servicer, edge_node.autoplan, edge_node.metrics\n"
        "import partitioner.bundle, partitioner.planner, partitioner.costmodel, partitioner.profile, cleave_cli.main\n"
        "print(json.dumps(sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'torchvision'))))\n"
    )
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout) == []


def _x(seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).random(MODEL["input_shape"], dtype=np.float32)


def _out(reply: edge_pb2.EdgeInferResponse) -> np.ndarray:
    assert not reply.HasField("error"), reply.error
    return decode_array(reply.outputs[0])


def test_a_raw_input_reaches_onnx_runtime_as_a_read_only_view(edge_bundle: Path) -> None:
    """The request's RAW input is not copied on its way to ONNX Runtime: decoded as a read-only view
    over the message's bytes, it gives the same answers as a writable copy on every path (whole model,
    float and int8 heads, the features encoded for the cloud), and nothing on the way writes to it."""
    backend = OnnxBackend(EdgeBundle.open(edge_bundle), threads=1)
    x = _x(3)
    wire = edge_pb2.EdgeInferRequest(inputs=[encode(x, RAW_UNCOMPRESSED)]).SerializeToString()
    received = backend.decode(edge_pb2.EdgeInferRequest.FromString(wire).inputs[0])
    assert not received.flags.writeable and np.array_equal(received, x)

    def same(a: list | tuple, b: list | tuple) -> None:
        assert len(a) == len(b) and all(np.array_equal(u, v) for u, v in zip(a, b, strict=True))

    same(backend.run([received]), backend.run([x.copy()]))
    cut, head, _ = backend.parts(backend.bundle.manifest.cuts[0].index)
    int8_head, _ = backend.quantized(cut, head, 8)
    for h in (head, int8_head):
        features = backend.run_head(h, [received])
        same(features, backend.run_head(h, [x.copy()]))
    _, identity, _ = backend.parts(0)  # cloud-only: the input itself is the cloud's features
    (features,) = backend.run_head(identity, [received])
    for text in ("int8", "int4", "fp16", "raw+zstd1"):
        spec = EncodingSpec.parse(text)
        assert encode(features, spec).SerializeToString() == encode(x.copy(), spec).SerializeToString()
    assert np.array_equal(received, x)


class Stack:
    def __init__(self, cloud: DaemonProcess, edge: DaemonProcess, metrics_port: int, bundle: Path) -> None:
        self.cloud, self.edge, self.metrics_port, self.bundle = cloud, edge, metrics_port, bundle
        self.client = EdgeClient(edge.address, token=TOKEN)


def _write(path: Path, data: dict) -> Path:
    path.write_text(yaml.safe_dump(data))
    return path


def start_cloud(tmp: Path, cache: Path) -> DaemonProcess:
    port = free_port()
    config = _write(tmp / "cloud.yaml", {"models": [MODEL], "torch_threads": 1})
    command = [cloud_python(), "-m", "cloud_node.main"]
    return DaemonProcess(
        "cloud_node.main", ["--config", str(config), "--port", str(port)], port, tmp / "cloud.log",
        env=child_env(cache), command=command,
    ).start(300)  # fmt: skip


def start_edge(tmp: Path, cache: Path, bundle: Path, cloud: DaemonProcess, name: str, **config) -> DaemonProcess:
    port = free_port()
    data = {
        "bundle": str(bundle),
        "cloud": cloud.address,
        "torch_threads": 1,
        "request_timeout_s": 20.0,
        "reconnect": {"initial_s": 0.1, "max_s": 0.5, "connect_timeout_s": 2.0},
        **config,
    }
    path = _write(tmp / f"{name}.yaml", data)
    return DaemonProcess(
        "edge_node.main", ["--config", str(path), "--port", str(port)], port, tmp / f"{name}.log",
        env=child_env(cache), command=LIGHT_EDGE,
    ).start(120)  # fmt: skip


@pytest.fixture(scope="module")
def stack(edge_bundle: Path, edge_cache: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    tmp = tmp_path_factory.mktemp("light-stack")
    (tmp / "tokens").write_text(f"{TOKEN}\n")
    cloud = start_cloud(tmp, edge_cache)
    metrics_port = free_port()
    edge = None
    try:
        edge = start_edge(
            tmp,
            edge_cache,
            edge_bundle,
            cloud,
            "edge",
            plan={"cut": "edge", "encoding": "int8"},
            metrics={"listen": f"127.0.0.1:{metrics_port}"},
            auth={"tokens_file": str(tmp / "tokens")},
        )
        yield Stack(cloud, edge, metrics_port, edge_bundle)
    finally:
        if edge is not None:
            edge.stop()
        cloud.stop()


def test_status_names_the_onnx_backend_and_tokens_are_required(stack: Stack) -> None:
    status = stack.client.status()
    assert status.backend.startswith(f"onnx bundle {stack.bundle}"), status.backend
    assert status.model == "resnet18" and len(status.fingerprint) == 64
    out = subprocess.run(
        [sys.executable, "-m", "cleave_cli.main", "status", "--edge", stack.edge.address, "--token", TOKEN],
        cwd=ROOT, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert out.returncode == 0 and "onnx bundle" in out.stdout, out.stderr
    with pytest.raises(grpc.RpcError) as refused:
        EdgeClient(stack.edge.address).status()
    assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED


def test_cleave_infer_runs_where_the_edge_runs(stack: Stack) -> None:
    """The CLI's client commands need no torch either (random inputs are plain noise without it)."""
    argv = [sys.executable, "-m", "cleave_cli.main", "infer", "--edge", stack.edge.address, "--token", TOKEN]
    done = subprocess.run([*argv, "--random", "2"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "random[0]" in done.stdout and "random[1]" in done.stdout


def test_split_inference_from_the_bundle_against_the_cloud(stack: Stack) -> None:
    client, x = stack.client, _x()
    client.pin("edge", "fp32")
    reference = _out(reply := client.infer(x))
    assert reply.placement == edge_pb2.EDGE_ONLY
    manifest = json.loads((stack.bundle / "manifest.json").read_text())
    for cut in manifest["cuts"]:
        client.pin(cut["name"], "fp32")
        reply = client.infer(x)
        assert reply.placement == edge_pb2.SPLIT and reply.plan.cut_index == cut["index"], reply.note
        assert reply.bytes_up > 0 and reply.timing.cloud_compute_ms > 0
        # The ONNX head's features finish in the cloud's torch tail: the same model, other kernels.
        out = _out(reply)
        assert np.abs(out - reference).max() <= 1e-4 * np.abs(reference).max()
        client.pin(cut["name"], "int8")
        out8 = _out(client.infer(x))
        assert out8.argmax() == reference.argmax() and np.abs(out8 - reference).max() < 0.05 * np.abs(reference).max()
    client.pin("cloud", "int8c")
    cloud_only = client.infer(x)
    assert cloud_only.placement == edge_pb2.CLOUD_ONLY and _out(cloud_only).argmax() == reference.argmax()


def test_the_int8_head_of_the_bundle_runs_and_other_widths_are_refused(stack: Stack) -> None:
    client, x = stack.client, _x(1)
    cut = json.loads((stack.bundle / "manifest.json").read_text())["cuts"][-1]
    client.pin("edge", "fp32")
    reference = _out(client.infer(x))
    wanted = edge_pb2.Plan(placement=edge_pb2.SPLIT, cut_name=cut["name"], reason="int8 head")
    wanted.weight_bits["*"] = 8
    plan = client.stub.Replan(edge_pb2.ReplanRequest(plan=wanted), timeout=60)
    assert dict(plan.weight_bits) == {"*": 8}
    out = _out(client.infer(x))
    cosine = float((out * reference).sum() / np.linalg.norm(out) / np.linalg.norm(reference))
    assert cosine >= 0.99 and not np.array_equal(out, reference)
    wanted.weight_bits["*"] = 4
    with pytest.raises(grpc.RpcError) as refused:
        client.stub.Replan(edge_pb2.ReplanRequest(plan=wanted), timeout=60)
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "torch edge" in refused.value.details()
    with pytest.raises(grpc.RpcError) as missing:
        client.pin(5, "int8")  # a cut the bundle does not carry
    assert missing.value.code() == grpc.StatusCode.INVALID_ARGUMENT and cut["name"] in missing.value.details()


def test_metrics_count_what_the_light_edge_served(stack: Stack) -> None:
    stack.client.pin("edge", "fp32")
    stack.client.infer(_x())
    text = urllib.request.urlopen(f"http://127.0.0.1:{stack.metrics_port}/metrics", timeout=10).read().decode()
    served = [line for line in text.splitlines() if line.startswith("cleave_edge_requests_total")]
    assert served and any(float(line.rsplit(" ", 1)[1]) >= 1 for line in served), served


@pytest.mark.parametrize("bits", [32, 8])
def test_automatic_placement_plans_from_the_bundle(stack: Stack, edge_cache: Path, tmp_path: Path, bits: int) -> None:
    # bits: the heads the edge serves (head.weight_bits); with the bundle's int8 heads, a split's accuracy in the
    # plan's reason is the int8 heads' (the bundle's distortion_int8), and no split counts as lossless.
    edge = start_edge(
        tmp_path, edge_cache, stack.bundle, stack.cloud, f"auto{bits}", plan={"cut": "auto"},
        autoplan={"check_interval_s": 0.5, "probe_interval_s": 1.0, "min_top1": None, "max_rel_error": None},
        head={"weight_bits": bits},
    )  # fmt: skip
    try:
        client = EdgeClient(edge.address)
        deadline, status = time.monotonic() + 180, None
        while time.monotonic() < deadline:
            status = client.status()
            if "planned at" in status.plan.reason:
                break
            time.sleep(0.5)
        assert status is not None and "planned at" in status.plan.reason, (status, edge.log_tail())
        assert status.auto_plan and not status.planner_error
        assert "calibration images" in status.plan.reason or status.plan.placement == edge_pb2.EDGE_ONLY
        cuts = {c["index"] for c in json.loads((stack.bundle / "manifest.json").read_text())["cuts"]}
        assert status.plan.placement != edge_pb2.SPLIT or status.plan.cut_index in cuts
        if status.plan.placement == edge_pb2.SPLIT:
            tables = EdgeBundle.open(stack.bundle).planning()
            encoding = str(EncodingSpec.from_proto(status.plan.encoding))
            table = tables.distortion_int8 if bits == 8 else tables.distortion
            top1 = table.get(f"{status.plan.cut_index}|{encoding}", (0.0, 1.0))[1]  # float features, float heads: 1
            assert f"top-1 agreement {top1 * 100:.1f}%" in status.plan.reason, (encoding, status.plan.reason)
            assert dict(status.plan.weight_bits) == ({"*": 8} if bits == 8 else {})
        reply = client.infer(_x())
        assert reply.placement == status.plan.placement and len(_out(reply)) == 1
        assert client.stub.Replan(edge_pb2.ReplanRequest(), timeout=120).reason.startswith("replan requested")
    finally:
        edge.stop()


def test_a_tampered_bundle_is_refused_at_start(stack: Stack, tmp_path: Path) -> None:
    import shutil

    bad = tmp_path / "bundle"
    shutil.copytree(stack.bundle, bad)
    head = sorted((bad / "cuts").glob("*.int8.onnx"))[0]
    data = bytearray(head.read_bytes())
    data[len(data) // 2] ^= 0xFF
    head.write_bytes(bytes(data))
    config = _write(tmp_path / "edge.yaml", {"bundle": str(bad), "cloud": stack.cloud.address})
    done = subprocess.run(
        [*LIGHT_EDGE, "--config", str(config), "--port", str(free_port())],
        cwd=ROOT, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert done.returncode != 0
    assert f"{head}: sha256" in done.stderr, done.stderr[-2000:]


def test_the_edge_falls_back_locally_when_the_cloud_dies(stack: Stack) -> None:
    """Last in this module: it kills the module's cloud."""
    client, x = stack.client, _x(2)
    client.pin("edge", "fp32")
    reference = _out(client.infer(x))
    cut = json.loads((stack.bundle / "manifest.json").read_text())["cuts"][0]
    client.pin(cut["name"], "int8")
    assert client.infer(x).placement == edge_pb2.SPLIT
    stack.cloud.kill()  # SIGKILL: no drain, the stream just breaks
    for _ in range(3):
        reply = client.infer(x)
        assert reply.placement == edge_pb2.LOCAL_FALLBACK, reply
        assert "cloud" in reply.note
        # The bundle's whole model finishes the request: exactly the edge-only answer.
        np.testing.assert_array_equal(_out(reply), reference)
    status = client.status()
    assert not status.cloud_reachable and status.counters.fallback >= 3
    # Its log says what ran: the bundle has no tails, so the whole model.
    assert "falling back to the whole model here" in stack.edge.log_tail(200)


def test_mutual_tls_and_tokens_both_ways(edge_bundle: Path, edge_cache: Path, tmp_path: Path) -> None:
    """The light edge reaches a cloud that requires mutual TLS and a token, and serves its own
    clients over TLS with tokens: the same runtime.security code as the torch edge."""
    from runtime.security import ClientTLS

    pki = tmp_path / "pki"
    done = subprocess.run(
        [cloud_python(), "-m", "tests.support.pki", str(pki)], cwd=ROOT, env=child_env(edge_cache),
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    cloud_port = free_port()
    config = {
        "models": [MODEL],
        "torch_threads": 1,
        "tls": {"cert": str(pki / "server.crt"), "key": str(pki / "server.key"), "ca": str(pki / "ca.crt"),
                "require_client_cert": True},
        "auth": {"tokens": ["to-cloud"]},
    }  # fmt: skip
    (tmp_path / "cloud.yaml").write_text(yaml.safe_dump(config))
    tls = ClientTLS(ca=str(pki / "ca.crt"), cert=str(pki / "client.crt"), key=str(pki / "client.key"))
    cloud = DaemonProcess(
        "cloud_node.main", ["--config", str(tmp_path / "cloud.yaml"), "--port", str(cloud_port)], cloud_port,
        tmp_path / "cloud.log", env=child_env(edge_cache), tls=tls, command=[cloud_python(), "-m", "cloud_node.main"],
    ).start(300)  # fmt: skip
    edge = None
    try:
        edge_port = free_port()
        edge_config = {
            "bundle": str(edge_bundle),
            "cloud": f"127.0.0.1:{cloud_port}",
            "cloud_tls": {
                "ca": str(pki / "ca.crt"),
                "cert": str(pki / "client.crt"),
                "key": str(pki / "client.key"),
                "server_name": "localhost",
            },
            "cloud_auth": {"token": "to-cloud"},
            "tls": {"cert": str(pki / "server.crt"), "key": str(pki / "server.key")},
            "auth": {"tokens": ["to-edge"]},
            "torch_threads": 1,
            "plan": {"cut": json.loads((edge_bundle / "manifest.json").read_text())["cuts"][0]["name"]},
        }
        (tmp_path / "edge.yaml").write_text(yaml.safe_dump(edge_config))
        edge = DaemonProcess(
            "edge_node.main", ["--config", str(tmp_path / "edge.yaml"), "--port", str(edge_port)], edge_port,
            tmp_path / "edge.log", env=child_env(edge_cache), tls=ClientTLS(ca=str(pki / "ca.crt"),
            server_name="localhost"), command=LIGHT_EDGE,
        ).start(120)  # fmt: skip
        client = EdgeClient(
            edge.address, tls=ClientTLS(ca=str(pki / "ca.crt"), server_name="localhost"), token="to-edge"
        )
        reply = client.infer(_x())
        assert reply.placement == edge_pb2.SPLIT, (reply.note, edge.log_tail())
        assert client.status().cloud_reachable
    finally:
        if edge is not None:
            edge.stop()
        cloud.stop()
