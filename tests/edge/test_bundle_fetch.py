"""The edge fetches its bundle from the cloud at start (``fetch_bundle:``), verifying every hash.

Unit tests of the reassembly limits (:class:`partitioner.bundle_wire.BundleReceiver`, no daemons),
then a cloud with ``bundles: {dir}`` and torch-free edges that fetch from it, refuse a tampered file,
and restart from the bundle they hold with the cloud down.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest
import yaml

from cleave_cli.client import EdgeClient
from cleave_cli.launch import DaemonProcess, free_port
from compressor import decode_array
from partitioner.bundle import MANIFEST, BundleError, BundleFormatError, BundleIntegrityError, EdgeBundle
from partitioner.bundle_wire import BundleReceiver, bundle_chunks
from protos.cleave.v1 import edge_pb2
from protos.cleave.v1 import split_inference_pb2 as si_pb2
from protos.cleave.v1 import split_inference_pb2_grpc as si_grpc

from .conftest import LIGHT_EDGE, MODEL, ROOT, child_env, cloud_python
from .test_bundle_format import FP, write_bundle

pytestmark = pytest.mark.edge


# -- reassembly limits (no daemons) --------------------------------------------------------------


def _chunks(tmp_path: Path, chunk_bytes: int = 7) -> tuple[Path, list[si_pb2.BundleChunk]]:
    src = write_bundle(tmp_path / "src")
    return src, list(bundle_chunks(EdgeBundle.open(src), chunk_bytes))


def _receive(root: Path, chunks: list[si_pb2.BundleChunk], **limits: int) -> EdgeBundle:
    return BundleReceiver(root, **limits).receive(chunks, expect_fingerprint=FP)


@pytest.mark.unit
def test_chunks_reassemble_into_the_same_verified_bundle(tmp_path: Path) -> None:
    src, chunks = _chunks(tmp_path)
    assert chunks[0].manifest == (src / MANIFEST).read_bytes() and not chunks[0].path
    assert all(not c.manifest and 0 < len(c.data) <= 7 for c in chunks[1:])
    bundle = _receive(tmp_path / "dst", chunks)
    assert bundle.manifest.fingerprint == FP
    for name in bundle.manifest.files:
        assert (tmp_path / "dst" / name).read_bytes() == (src / name).read_bytes()


@pytest.mark.unit
def test_a_cloud_sending_more_than_a_file_declares_is_cut_off(tmp_path: Path) -> None:
    src, chunks = _chunks(tmp_path)
    last = max(i for i, c in enumerate(chunks) if c.path == "cuts/2.onnx")
    size = (src / "cuts/2.onnx").stat().st_size
    extra = si_pb2.BundleChunk(path="cuts/2.onnx", offset=size, data=b"more")
    with pytest.raises(BundleIntegrityError, match=r"cuts/2.onnx: the cloud sent 54 bytes or more, .* says 50"):
        _receive(tmp_path / "dst", [*chunks[: last + 1], extra, *chunks[last + 1 :]])
    assert (tmp_path / "dst" / "cuts/2.onnx").stat().st_size == size  # nothing past the end was written


@pytest.mark.unit
def test_the_manifest_limits_bound_what_is_accepted(tmp_path: Path) -> None:
    _, chunks = _chunks(tmp_path)
    manifest = json.loads(chunks[0].manifest)
    total = sum(f["bytes"] for f in manifest["files"].values())
    with pytest.raises(BundleError, match=f"{total} bytes of files, over the limit of {total - 1}"):
        _receive(tmp_path / "a", chunks, max_bytes=total - 1)
    with pytest.raises(BundleError, match=f"{len(manifest['files'])} files, over the limit of 2"):
        _receive(tmp_path / "b", chunks, max_files=2)
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()  # refused before anything is written
    _receive(tmp_path / "c", chunks, max_bytes=total, max_files=len(manifest["files"]))


@pytest.mark.unit
@pytest.mark.parametrize(
    ("mutate", "error", "names"),
    [
        # A byte changed in flight: the file's sha256 fails as soon as it is whole, naming it.
        (
            lambda cs: [
                c if c.path != "cuts/2.onnx" or c.offset else si_pb2.BundleChunk(path=c.path, data=b"X" + c.data[1:])
                for c in cs
            ],
            BundleIntegrityError,
            "cuts/2.onnx: sha256",
        ),
        # A file's last chunk missing: short, named when the next file starts.
        (lambda cs: [c for c in cs if not (c.path == "model.onnx" and c.offset >= 497)], BundleIntegrityError,
         "model.onnx: 497 bytes sent, the manifest says 500"),
        # The stream ends early.
        (lambda cs: cs[:2], BundleIntegrityError, "cuts/2.onnx: not sent"),
        # A file the manifest does not list, a chunk out of place, the manifest twice or missing.
        (lambda cs: [*cs, si_pb2.BundleChunk(path="evil.onnx", data=b"x")], BundleFormatError,
         "'evil.onnx': not a file"),
        (lambda cs: [*cs[:3], cs[4], cs[3], *cs[5:]], BundleIntegrityError, "a chunk at offset 14, expected 7"),
        (lambda cs: [cs[0], *cs], BundleFormatError, "sent twice"),
        (lambda cs: cs[1:], BundleFormatError, "the first message must carry the manifest"),
    ],
)  # fmt: skip
def test_a_broken_stream_is_refused_naming_the_file(tmp_path: Path, mutate, error: type, names: str) -> None:
    _, chunks = _chunks(tmp_path)
    with pytest.raises(error, match=names):
        _receive(tmp_path / "dst", mutate(chunks))


@pytest.mark.unit
def test_a_manifest_naming_a_path_outside_the_bundle_is_refused(tmp_path: Path) -> None:
    _, chunks = _chunks(tmp_path)
    manifest = json.loads(chunks[0].manifest)
    manifest["files"]["../escape.onnx"] = {"sha256": "0" * 64, "bytes": 1}
    bad = si_pb2.BundleChunk(manifest=json.dumps(manifest).encode())
    with pytest.raises(BundleFormatError, match=r"'\.\./escape\.onnx' is not a relative path inside the bundle"):
        _receive(tmp_path / "dst", [bad, *chunks[1:]])
    assert not (tmp_path / "escape.onnx").exists()


# -- a cloud with bundles, torch-free edges fetching from it -------------------------------------


def _write(path: Path, data: dict) -> Path:
    path.write_text(yaml.safe_dump(data))
    return path


class Cloud:
    def __init__(self, process: DaemonProcess, bundles: Path) -> None:
        self.process, self.bundles = process, bundles
        self.address = process.address


@pytest.fixture(scope="module")
def cloud(edge_bundle: Path, edge_cache: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cloud]:
    tmp = tmp_path_factory.mktemp("fetch-cloud")
    shutil.copytree(edge_bundle, tmp / "bundles" / "resnet18")  # its own copy: one test corrupts it
    port = free_port()
    # Relative to cloud.yaml; chunks of 64 KiB, so every file crosses in many messages.
    config = _write(
        tmp / "cloud.yaml",
        {"models": [MODEL], "torch_threads": 1, "chunk_bytes": 65536, "bundles": {"dir": "bundles"}},
    )
    process = DaemonProcess(
        "cloud_node.main", ["--config", str(config), "--port", str(port)], port, tmp / "cloud.log",
        env=child_env(edge_cache), command=[cloud_python(), "-m", "cloud_node.main"],
    ).start(300)  # fmt: skip
    try:
        yield Cloud(process, tmp / "bundles")
    finally:
        process.stop()


def _edge_config(tmp: Path, name: str, cloud_address: str, dest: Path, **extra) -> Path:
    return _write(
        tmp / f"{name}.yaml",
        {
            "bundle": str(dest),
            "fetch_bundle": {"model": "resnet18"},
            "cloud": cloud_address,
            "torch_threads": 1,
            "request_timeout_s": 20.0,
            "reconnect": {"initial_s": 0.1, "max_s": 0.5, "connect_timeout_s": 2.0},
            **extra,
        },
    )


def _start_edge(tmp: Path, cache: Path, config: Path, name: str) -> DaemonProcess:
    port = free_port()
    return DaemonProcess(
        "edge_node.main", ["--config", str(config), "--port", str(port)], port, tmp / f"{name}.log",
        env=child_env(cache), command=LIGHT_EDGE,
    ).start(180)  # fmt: skip


def _run_edge(config: Path) -> subprocess.CompletedProcess:
    """An edge that is expected to refuse to start: its exit and stderr."""
    return subprocess.run(
        [*LIGHT_EDGE, "--config", str(config), "--port", str(free_port())],
        cwd=ROOT, capture_output=True, text=True, timeout=180,
    )  # fmt: skip


def _x() -> np.ndarray:
    return np.random.default_rng(0).random(MODEL["input_shape"], dtype=np.float32)


@pytest.mark.integration
def test_get_bundle_answers_typed_errors(cloud: Cloud) -> None:
    with grpc.insecure_channel(cloud.address) as channel:
        stub = si_grpc.SplitInferenceStub(channel)
        with pytest.raises(grpc.RpcError) as missing:
            list(stub.GetBundle(si_pb2.GetBundleRequest(model="nope"), timeout=30))
        assert missing.value.code() == grpc.StatusCode.NOT_FOUND and "'nope'" in missing.value.details()
        with pytest.raises(grpc.RpcError) as empty:
            list(stub.GetBundle(si_pb2.GetBundleRequest(), timeout=30))
        assert empty.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "model" in empty.value.details()
        chunks = list(stub.GetBundle(si_pb2.GetBundleRequest(model="resnet18"), timeout=120))
    assert chunks[0].manifest == (cloud.bundles / "resnet18" / MANIFEST).read_bytes()
    assert max(len(c.data) for c in chunks) == 65536  # bounded by the cloud's chunk_bytes


@pytest.mark.integration
def test_with_no_bundle_and_no_cloud_the_edge_waits_then_refuses_to_start(tmp_path: Path) -> None:
    dead = f"127.0.0.1:{free_port()}"
    dest = tmp_path / "edge" / "resnet18"
    config = _edge_config(tmp_path, "edge", dead, dest, fetch_bundle={"model": "resnet18", "timeout_s": 3})
    started = time.monotonic()
    done = _run_edge(config)
    assert done.returncode != 0 and time.monotonic() - started >= 3
    assert f"fetch_bundle: cannot ask {dead} for 'resnet18'" in done.stderr, done.stderr[-2000:]
    assert "waiting for the cloud" in done.stderr and not dest.exists()


@pytest.mark.integration
def test_a_tampered_file_on_the_cloud_is_refused_naming_it(cloud: Cloud, tmp_path: Path) -> None:
    """A byte of a head changed on the cloud's disk after it started: the edge refuses the bundle,
    names the file, leaves nothing half-written and keeps what its bundle directory held."""
    victim = sorted((cloud.bundles / "resnet18" / "cuts").glob("*.onnx"))[0]
    name = f"cuts/{victim.name}"
    original = victim.read_bytes()
    dest = tmp_path / "edge" / "resnet18"
    previous = write_bundle(dest)  # a bundle of another model: replaced only by a verified one
    before = (previous / MANIFEST).read_bytes()
    data = bytearray(original)
    data[len(data) // 2] ^= 0xFF
    victim.write_bytes(bytes(data))
    try:
        done = _run_edge(_edge_config(tmp_path, "edge", cloud.address, dest))
    finally:
        victim.write_bytes(original)
    assert done.returncode != 0
    assert f"{name}: sha256" in done.stderr and "refused the bundle of 'resnet18'" in done.stderr, done.stderr[-2000:]
    assert (dest / MANIFEST).read_bytes() == before
    assert sorted(p.name for p in dest.parent.iterdir()) == ["resnet18"]  # no staging directory left


@pytest.mark.integration
def test_the_edge_fetches_serves_and_restarts_offline(cloud: Cloud, edge_cache: Path, tmp_path: Path) -> None:
    """No local bundle: fetched and served (split); a restart reuses it, with the cloud down too.

    Last in this module: it kills the module's cloud."""
    source = cloud.bundles / "resnet18"
    dest = tmp_path / "edge" / "resnet18"
    cut = json.loads((source / MANIFEST).read_text())["cuts"][0]
    config = _edge_config(tmp_path, "edge", cloud.address, dest, plan={"cut": cut["name"], "encoding": "fp32"})
    edge = _start_edge(tmp_path, edge_cache, config, "first")
    try:
        client = EdgeClient(edge.address)
        assert client.status().backend.startswith(f"onnx bundle {dest}")
        reply = client.infer(_x())
        assert (
            not reply.HasField("error") and reply.placement == edge_pb2.SPLIT and reply.plan.cut_index == cut["index"]
        )
        split = decode_array(reply.outputs[0])
        client.pin("edge", "fp32")
        whole = decode_array(client.infer(_x()).outputs[0])
        assert np.abs(split - whole).max() <= 1e-4 * np.abs(whole).max()
        assert "fetch_bundle: fetched resnet18" in edge.log_tail(200)
    finally:
        edge.stop()
    for path in source.rglob("*"):
        if path.is_file():
            assert (dest / path.relative_to(source)).read_bytes() == path.read_bytes(), path
    stamp = (dest / MANIFEST).stat().st_mtime_ns

    again = _start_edge(tmp_path, edge_cache, config, "second")
    try:
        assert "already holds resnet18" in again.log_tail(200)
    finally:
        again.stop()

    cloud.process.kill()
    offline = _start_edge(tmp_path, edge_cache, config, "offline")
    try:
        assert "is not reachable" in offline.log_tail(200)
        reply = EdgeClient(offline.address).infer(_x())  # the cloud is gone: the bundle's whole model answers
        assert reply.placement in (edge_pb2.LOCAL_FALLBACK, edge_pb2.EDGE_ONLY), reply
        np.testing.assert_allclose(decode_array(reply.outputs[0]), whole, rtol=0, atol=1e-5 * np.abs(whole).max())
    finally:
        offline.stop()
    assert (dest / MANIFEST).stat().st_mtime_ns == stamp  # neither restart wrote the bundle again
