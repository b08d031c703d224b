"""Issue 12, the Compression service side: hostile uploads and requests against real ``cleave-cloud``
processes, one test per finding (1, 2, 7, 8, 11).

Every hostile input is checked for the status code it gets, for the marker file its payload would
write (the payloads are built here and must never be opened by the daemon), for the growth of the
daemon's RSS (its job processes included) staying under 300 MB, for health answering within 2 s
throughout, and for a normal job still succeeding afterwards.

Two daemons: ``strict`` with the defaults (code uploads refused), ``trusting`` with
``jobs.allow_code_uploads: true`` (code runs, but only in the job sandbox). Each test calls with its
own bearer token, so the per-client quotas of one test do not touch another.
"""

from __future__ import annotations

import io
import json
import os
import pickle
import socket
import struct
import subprocess
import sys
import threading
import time
import zipfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import grpc
import numpy as np
import psutil
import pytest
import torch
import torchvision
import yaml
from grpc_health.v1 import health_pb2, health_pb2_grpc
from safetensors.torch import save_file

from cleave_cli.compress_cmd import CompressionClient
from cleave_cli.launch import DaemonProcess, cloud_process, free_port
from protos.cleave.v1 import compression_pb2 as pb
from runtime.serving import open_channel
from tests.support import ROOT

TOKENS = [f"tok-{name}" for name in ("pt2", "ts", "sandbox", "bombs", "sweep", "cleanup", "normal", "quota")]
RSS_BUDGET = 300 << 20
SHAPE = [1, 3, 32, 32]
Code = grpc.StatusCode

pytestmark = [
    pytest.mark.integration,
    pytest.mark.root,
    pytest.mark.skipif(os.geteuid() != 0, reason="the job sandbox's isolation needs root"),
]


# --- Watching a daemon: RSS of its process tree, and health, sampled in the background. ---


class Watch:
    """Samples the daemon's tree RSS and process count, and health latency, every ~0.1 s."""

    def __init__(self, daemon: DaemonProcess) -> None:
        self.proc = psutil.Process(daemon.proc.pid)
        self.address = daemon.address
        self.peak_rss = 0
        self.peak_self = 0  # the daemon process alone
        self.peak_procs = 0
        self.health_failures: list[str] = []
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._threads = [
            threading.Thread(target=self._rss, daemon=True),
            threading.Thread(target=self._health, daemon=True),
        ]
        for t in self._threads:
            t.start()

    def tree_rss(self) -> tuple[int, int]:
        total, count = 0, 0
        for p in [self.proc, *self.proc.children(recursive=True)]:
            try:
                total += p.memory_info().rss
                count += 1
            except psutil.Error:
                pass
        return total, count

    def _rss(self) -> None:
        while not self._stop.wait(0.05):
            rss, count = self.tree_rss()
            try:
                own = self.proc.memory_info().rss
            except psutil.Error:
                own = 0
            with self._lock:
                self.peak_self = max(self.peak_self, own)
                self.peak_rss = max(self.peak_rss, rss)
                self.peak_procs = max(self.peak_procs, count)

    def _health(self) -> None:
        with open_channel(self.address) as channel:
            stub = health_pb2_grpc.HealthStub(channel)
            while not self._stop.wait(0.25):
                t0 = time.monotonic()
                try:
                    stub.Check(health_pb2.HealthCheckRequest(), timeout=2.0)
                except grpc.RpcError as exc:
                    self.health_failures.append(f"{exc.code()} after {time.monotonic() - t0:.2f} s")

    @contextmanager
    def window(self) -> Iterator[dict]:
        """Measure the tree's peak RSS growth and process count over a block."""
        time.sleep(0.2)
        base, procs = self.tree_rss()
        own = self.proc.memory_info().rss
        with self._lock:
            self.peak_rss, self.peak_procs, self.peak_self = base, procs, own
        out: dict = {}
        yield out
        time.sleep(0.3)
        with self._lock:
            out.update(
                growth=self.peak_rss - base, self_growth=self.peak_self - own, procs=self.peak_procs, base_procs=procs
            )

    def close(self) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(timeout=5)


def start_cloud(home: Path, name: str, **jobs) -> tuple[DaemonProcess, Watch]:
    config = home / f"{name}.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "torch_threads": 1,
                "auth": {"tokens": TOKENS},
                "jobs": {
                    "dir": str(home / f"{name}-store"),
                    "job_threads": 1,
                    "max_upload_bytes": 64 << 20,
                    "max_dataset_bytes": 64 << 20,
                    "max_jobs_per_client": 3,
                    "max_uploads_per_client": 6,
                    "max_sweep_parallelism": 1,
                    **jobs,
                },
            }
        )
    )
    cloud = cloud_process(config, free_port(), home / f"{name}.log").start()
    return cloud, Watch(cloud)


@pytest.fixture(scope="module")
def home(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("compression-security")


@pytest.fixture(scope="module")
def strict(home: Path) -> Iterator[tuple[DaemonProcess, Watch]]:
    cloud, watch = start_cloud(home, "strict")
    yield cloud, watch
    watch.close()
    cloud.stop()


@pytest.fixture(scope="module")
def trusting(home: Path) -> Iterator[tuple[DaemonProcess, Watch]]:
    cloud, watch = start_cloud(home, "trusting", allow_code_uploads=True)
    yield cloud, watch
    watch.close()
    cloud.stop()


@contextmanager
def client_for(cloud: DaemonProcess, token: str) -> Iterator[CompressionClient]:
    client = CompressionClient(cloud.address, token=token)
    try:
        yield client
    finally:
        client.close()


def upload_bytes(client: CompressionClient, data: bytes, header: pb.UploadHeader) -> pb.UploadModelResponse:
    def chunks() -> Iterator[pb.UploadChunk]:
        yield pb.UploadChunk(header=header)
        for i in range(0, len(data), 1 << 20):
            yield pb.UploadChunk(data=data[i : i + (1 << 20)])

    return client.stub.UploadModel(chunks(), timeout=120)


def refused(client: CompressionClient, data: bytes, header: pb.UploadHeader) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as err:
        upload_bytes(client, data, header)
    return err.value


def wait_done(client: CompressionClient, job_id: str, timeout: float = 300) -> pb.Job:
    for job in client.watch(job_id, timeout=timeout):
        if job.state in (pb.SUCCEEDED, pb.FAILED, pb.CANCELLED):
            return job
    return client.get(job_id)


def cancel_quietly(client: CompressionClient, job_id: str) -> None:
    try:
        client.cancel(job_id)
    except grpc.RpcError as exc:  # it finished first
        assert exc.code() == Code.FAILED_PRECONDITION, exc


def assert_healthy(watch: Watch, growth: dict) -> None:
    assert growth["growth"] < RSS_BUDGET, f"the daemon's tree grew by {growth['growth'] >> 20} MB"
    assert not watch.health_failures, watch.health_failures


def tiny_weights(path: Path) -> Path:
    torch.manual_seed(0)
    save_file(torchvision.models.resnet18(weights=None, num_classes=10).state_dict(), str(path))
    return path


def normal_job_works(cloud: DaemonProcess, home: Path) -> pb.Job:
    """A safetensors upload and a 4-bit quantize job, start to finish, in the sandbox."""
    weights = home / "resnet18.safetensors"
    if not weights.exists():
        tiny_weights(weights)
    with client_for(cloud, "tok-normal") as client:
        model = client.upload(
            weights, pb.UploadHeader(format=pb.SAFETENSORS, architecture="resnet18", num_classes=10, input_shape=SHAPE)
        )
        assert model.kind == "cnn"
        spec = pb.JobSpec(
            model=pb.ModelRef(model_id=model.id),
            engine="quantize",
            quantize=pb.QuantizeOptions(bits=4),
            skip_evaluation=True,
        )
        job = wait_done(client, client.submit(spec).id)
        assert job.state == pb.SUCCEEDED, job.message
        report = json.loads(job.report_json)
        assert "user=nobody" in report["sandbox"] and "mount+net namespaces" in report["sandbox"]
        return job


# --- Hostile payloads, built here, never opened. ---


class _OpenOnUnpickle:
    """Unpickling this calls open(path, "w"): the marker proves the pickle was loaded."""

    def __init__(self, path: Path) -> None:
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


def pickled_pt2(dest: Path, marker: Path) -> bytes:
    """A genuine torch.export archive whose first weight is switched to a pickle that writes ``marker``."""
    program = torch.export.export(torch.nn.Linear(2, 2), (torch.randn(1, 2),))
    torch.export.save(program, str(dest))
    out = io.BytesIO()
    with zipfile.ZipFile(dest) as zin, zipfile.ZipFile(out, "w") as zout:
        config_name = next(n for n in zin.namelist() if n.endswith("_weights_config.json"))
        config = json.loads(zin.read(config_name))
        first = sorted(config["config"])[0]
        config["config"][first]["use_pickle"] = True
        victim = config_name.rsplit("/", 1)[0] + "/" + config["config"][first]["path_name"]
        for info in zin.infolist():
            data = zin.read(info)
            if info.filename == config_name:
                data = json.dumps(config).encode()
            elif info.filename == victim:
                data = pickle.dumps(_OpenOnUnpickle(marker))
            zout.writestr(info, data)
    return out.getvalue()


class FromFileInForward(torch.nn.Module):
    """forward() maps ``path`` shared and writable: the file appears if forward ever runs."""

    def __init__(self, path: str) -> None:
        super().__init__()
        self.path = path
        self.conv = torch.nn.Conv2d(3, 4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        mapped = torch.from_file(self.path, True, 16)
        return self.conv(x) + mapped.sum()


def scripted(module: torch.nn.Module) -> bytes:
    buf = io.BytesIO()
    torch.jit.save(torch.jit.script(module), buf)
    return buf.getvalue()


# --- Finding 1: code execution through a .pt2 upload. ---


def test_pt2_that_pickles_is_refused_unopened(strict, trusting, home: Path) -> None:
    marker = home / "pt2-marker"
    archive = pickled_pt2(home / "genuine.pt2", marker)
    for (cloud, watch), code, words in (
        (strict, Code.PERMISSION_DENIED, "jobs.allow_code_uploads"),
        (trusting, Code.INVALID_ARGUMENT, "use_pickle"),
    ):
        with client_for(cloud, "tok-pt2") as client, watch.window() as growth:
            err = refused(client, archive, pb.UploadHeader(format=pb.EXPORTED_PROGRAM))
        assert err.code() == code and words in err.details(), err.details()
        assert "EXPORTED_PROGRAM" in err.details() or "pickled" in err.details()
        assert not marker.exists()
        assert_healthy(watch, growth)
    # An honest .pt2 is accepted where code is allowed: opened in the sandbox, with its pickled
    # sample inputs emptied before it was stored.
    honest = home / "honest.pt2"
    torch.export.save(torch.export.export(torch.nn.Conv2d(3, 4, 3), (torch.randn(1, 3, 8, 8),)), str(honest))
    with client_for(trusting[0], "tok-pt2") as client:
        up = client.upload(honest, pb.UploadHeader(format=pb.EXPORTED_PROGRAM, input_shape=[1, 3, 8, 8]))
    assert up.kind == "cnn"
    normal_job_works(strict[0], home)


# --- Finding 2: file writes through a TorchScript upload. ---


def test_torchscript_is_refused_by_default_and_confined_when_allowed(strict, trusting, home: Path) -> None:
    marker = home / "ts-marker"
    writer = scripted(FromFileInForward(str(marker)))
    cloud, watch = strict
    with client_for(cloud, "tok-ts") as client, watch.window() as growth:
        err = refused(client, writer, pb.UploadHeader(format=pb.TORCHSCRIPT))
    assert err.code() == Code.PERMISSION_DENIED
    assert "TORCHSCRIPT" in err.details() and "jobs.allow_code_uploads" in err.details()
    assert_healthy(watch, growth)
    assert not marker.exists()

    # Allowed: the upload is opened (to learn its kind) only in a sandboxed process; its forward
    # runs only in a job, in the sandbox, where the write outside the scratch directory fails.
    cloud, watch = trusting
    with client_for(cloud, "tok-ts") as client:
        with watch.window() as growth:
            up = upload_bytes(client, writer, pb.UploadHeader(format=pb.TORCHSCRIPT, input_shape=SHAPE))
        assert up.kind == "cnn" and not marker.exists()
        # The daemon itself did not load it (its own RSS stays put); the tree's growth is the short-lived
        # sandboxed process (torch and all): what the operator pays for allowing code uploads.
        assert growth["self_growth"] < RSS_BUDGET, growth
        assert not watch.health_failures
        spec = pb.JobSpec(model=pb.ModelRef(model_id=up.id), engine="quantize", quantize=pb.QuantizeOptions(bits=8))
        job = wait_done(client, client.submit(spec).id)
    assert job.state == pb.FAILED and "TorchScript interpreter" in job.message, job  # from_file refused
    assert not marker.exists()
    assert not watch.health_failures
    normal_job_works(cloud, home)


def test_sandbox_has_no_network_and_no_writes_outside_scratch(tmp_path: Path) -> None:
    """What a job process gets, checked from inside one: a listening socket on the host's loopback
    is unreachable, files outside the scratch directory (and the daemon's folders) are read-only,
    the user is nobody, and the limits are set."""
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    outside = tmp_path / "outside-marker"
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        port = server.getsockname()[1]
        probe = f"""
import json, os, resource, socket, sys
from pathlib import Path
from cloud_node.jobs.sandbox import Limits, enter
entered = enter(Path({str(scratch)!r}), Limits(memory_bytes=8 << 30, file_bytes=1 << 20))
out = {{"uid": os.getuid(), "workdir": str(entered.workdir)}}
try:
    socket.create_connection(("127.0.0.1", {port}), timeout=3); out["socket"] = "connected"
except OSError as exc:
    out["socket"] = type(exc).__name__
for name, path in (("outside", {str(outside)!r}), ("source", {str(ROOT / "sandbox-marker")!r})):
    try:
        open(path, "w").close(); out[name] = "written"
    except OSError as exc:
        out[name] = type(exc).__name__
(entered.workdir / "inside").write_text("ok")
try:
    (entered.workdir / "big").write_bytes(b"x" * (2 << 20)); out["fsize"] = "written"
except OSError as exc:
    out["fsize"] = type(exc).__name__
out["as"] = resource.getrlimit(resource.RLIMIT_AS)[0]
print(json.dumps(out))
"""
        env = {**os.environ, "PYTHONPATH": str(ROOT)}
        run = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120, env=env)
    assert run.returncode == 0, run.stderr
    out = json.loads(run.stdout.strip().splitlines()[-1])
    assert out["uid"] == 65534 and out["workdir"] == "/tmp/job"
    assert out["socket"] != "connected" and out["outside"] != "written" and out["source"] != "written"
    assert out["fsize"] != "written" and out["as"] == 8 << 30
    assert (scratch / "inside").read_text() == "ok"
    assert not outside.exists() and not (ROOT / "sandbox-marker").exists()


# --- Finding 7: dataset and model bombs. ---


def deflated_npz(members: dict[str, tuple[np.dtype, tuple[int, ...]]]) -> bytes:
    """An npz whose members are zeros of the given dtype and shape, deflated (written in chunks)."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as z:
        for name, (dtype, shape) in members.items():
            with z.open(f"{name}.npy", "w", force_zip64=True) as f:
                np.lib.format.write_array_header_2_0(
                    f, {"descr": np.dtype(dtype).str, "fortran_order": False, "shape": shape}
                )
                left = int(np.prod(shape)) * np.dtype(dtype).itemsize
                block = bytes(1 << 20)
                while left > 0:
                    f.write(block[: min(left, len(block))])
                    left -= len(block)
    return buf.getvalue()


def npy_bytes(shape: tuple[int, ...], dtype: str = "<f4", payload: bytes = b"") -> bytes:
    buf = io.BytesIO()
    np.lib.format.write_array_header_1_0(buf, {"descr": dtype, "fortran_order": False, "shape": shape})
    return buf.getvalue() + payload


def lying_npz() -> bytes:
    """One member says shape 2^40 in its npy header but holds 64 bytes."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as z:
        z.writestr("inputs.npy", npy_bytes((1 << 40, 1), payload=bytes(64)))
        z.writestr("labels.npy", npy_bytes((1 << 40,), "<i8", payload=bytes(64)))
    return buf.getvalue()


def safetensors_bytes(header: dict, data: bytes = b"") -> bytes:
    raw = json.dumps(header).encode()
    return struct.pack("<Q", len(raw)) + raw + data


def test_dataset_and_model_bombs(strict, home: Path) -> None:
    cloud, watch = strict
    bomb = deflated_npz({"inputs": ("<f4", (256, 1 << 18)), "labels": ("<i8", (256,))})  # 256 MiB of zeros
    assert len(bomb) < 1 << 20
    tiny_model = safetensors_bytes({"w": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}, bytes(4))
    cases = [
        (bomb, pb.UploadHeader(format=pb.DATASET_NPZ), "jobs.max_dataset_bytes"),
        (npy_bytes((1 << 40,)), pb.UploadHeader(format=pb.DATASET_NPZ), "1099511627776"),
        (lying_npz(), pb.UploadHeader(format=pb.DATASET_NPZ), "the member declares"),
        (
            safetensors_bytes(
                {
                    "inputs": {"dtype": "F32", "shape": [1 << 30, 1 << 10], "data_offsets": [0, 1 << 42]},
                    "labels": {"dtype": "I64", "shape": [1 << 30], "data_offsets": [1 << 42, (1 << 42) + (1 << 33)]},
                }
            ),
            pb.UploadHeader(format=pb.DATASET_SAFETENSORS),
            "data_offsets",
        ),
        (
            tiny_model,
            pb.UploadHeader(format=pb.SAFETENSORS, architecture="resnet18", num_classes=1_000_000),
            "jobs.max_num_classes",
        ),
        (
            tiny_model,  # under the class cap: the architecture is built on the meta device, nothing allocated
            pb.UploadHeader(format=pb.SAFETENSORS, architecture="resnet152", num_classes=100_000),
            "does not fit",
        ),
        (
            safetensors_bytes({"fc.weight": {"dtype": "F32", "shape": [1 << 20, 1 << 20], "data_offsets": [0, 4]}}),
            pb.UploadHeader(format=pb.SAFETENSORS, architecture="resnet18"),
            "data_offsets",
        ),
        (tiny_model, pb.UploadHeader(format=pb.SAFETENSORS, architecture="os:system"), "header.architecture"),
        (
            tiny_model,
            pb.UploadHeader(format=pb.SAFETENSORS, architecture="bert", config_json='{"num_hidden_layers": 100000}'),
            "num_hidden_layers",
        ),
    ]
    with client_for(cloud, "tok-bombs") as client:
        for data, header, words in cases:
            with watch.window() as growth:
                err = refused(client, data, header)
            assert err.code() == Code.INVALID_ARGUMENT and words in err.details(), (words, err.details())
            assert_healthy(watch, growth)
    # A real dataset still goes through, and a job with it still runs.
    rng = np.random.default_rng(0)
    data = io.BytesIO()
    np.savez(data, inputs=rng.standard_normal((4, 3, 32, 32)).astype(np.float32), labels=rng.integers(0, 10, 4))
    with client_for(cloud, "tok-bombs") as client:
        assert upload_bytes(client, data.getvalue(), pb.UploadHeader(format=pb.DATASET_NPZ)).kind == "dataset"
    normal_job_works(cloud, home)


# --- Finding 8: client-chosen parallelism, and per-client job quotas. ---


def test_sweep_parallelism_and_grid_are_capped(strict, home: Path) -> None:
    cloud, watch = strict
    ref = pb.ModelRef(torchvision="resnet18", num_classes=10, input_shape=SHAPE)
    with client_for(cloud, "tok-sweep") as client:
        huge = pb.SweepOptions(ratios=[i / 20 for i in range(10)], bits=[2, 3, 4, 5, 6, 8, 32], parallelism=64)
        with pytest.raises(grpc.RpcError) as err:
            client.submit(pb.JobSpec(model=ref, engine="sweep", sweep=huge))
        assert err.value.code() == Code.RESOURCE_EXHAUSTED and "spec.sweep" in err.value.details()
        assert "jobs.max_sweep_points" in err.value.details()

        asked = pb.SweepOptions(ratios=[0.0], bits=[32, 8, 4], parallelism=64)
        with watch.window() as seen:
            job = wait_done(client, client.submit(pb.JobSpec(model=ref, engine="sweep", sweep=asked)).id)
        assert job.state == pb.SUCCEEDED, job.message
        assert json.loads(job.report_json)["parallelism"] == 1  # jobs.max_sweep_parallelism: 1
        # daemon + job process + one pool worker (+ multiprocessing's resource tracker), not 64 workers
        assert seen["procs"] - seen["base_procs"] <= 3, seen
        assert not watch.health_failures

        # Per-client quota of queued + running jobs (jobs.max_jobs_per_client: 3).
        spec = pb.JobSpec(model=ref, engine="quantize", quantize=pb.QuantizeOptions(bits=4), skip_evaluation=True)
        mine = [client.submit(spec) for _ in range(3)]
        with pytest.raises(grpc.RpcError) as err:
            client.submit(spec)
        assert err.value.code() == Code.RESOURCE_EXHAUSTED and "jobs.max_jobs_per_client" in err.value.details()
        with client_for(cloud, "tok-quota") as other:  # another client is not held back by this one
            cancel_quietly(other, other.submit(spec).id)
        for job in mine:
            cancel_quietly(client, job.id)
    normal_job_works(cloud, home)


# --- Finding 11: cancelled uploads, upload quotas, retention, atomic publication. ---


def test_cancelled_upload_quota_retention_and_orphans(home: Path) -> None:
    cloud, watch = start_cloud(
        home, "cleanup", max_uploads_per_client=3, retention={"max_jobs": 1, "max_uploads": 4, "interval_s": 0.5}
    )
    store = home / "cleanup-store"
    try:
        with client_for(cloud, "tok-cleanup") as client:
            # A client that cancels its upload mid-stream: a clean CANCELLED, no traceback in the log.
            release = threading.Event()

            def stalled() -> Iterator[pb.UploadChunk]:
                yield pb.UploadChunk(header=pb.UploadHeader(format=pb.DATASET_NPZ))
                yield pb.UploadChunk(data=b"PK" + bytes(1000))
                release.wait(30)

            call = client.stub.UploadModel.future(stalled(), timeout=60)
            time.sleep(1.0)
            call.cancel()
            release.set()
            time.sleep(1.0)
            log = (home / "cleanup.log").read_text()
            assert "Exception serializing message" not in log and "Traceback" not in log, log[-3000:]
            assert not list((store / "tmp").iterdir())

            # Upload quota: three per client here.
            data = io.BytesIO()
            np.savez(data, inputs=np.zeros((2, 3), np.float32), labels=np.zeros(2, np.int64))
            ids = [upload_bytes(client, data.getvalue(), pb.UploadHeader(format=pb.DATASET_NPZ)).id for _ in range(3)]
            with watch.window() as growth:
                err = refused(client, data.getvalue(), pb.UploadHeader(format=pb.DATASET_NPZ))
            assert err.code() == Code.RESOURCE_EXHAUSTED and "jobs.max_uploads_per_client" in err.details()
            assert_healthy(watch, growth)

            # Retention keeps one finished job: the first one's rows and artifacts go.
            first = normal_job_works(cloud, home)
            second = normal_job_works(cloud, home)
            deadline = time.monotonic() + 20
            while (store / "artifacts" / first.id).exists() and time.monotonic() < deadline:
                time.sleep(0.5)
            assert not (store / "artifacts" / first.id).exists() and (store / "artifacts" / second.id).is_dir()
            with pytest.raises(grpc.RpcError) as err:
                client.get(first.id)
            assert err.value.code() == Code.NOT_FOUND
        cloud.stop()

        # A crash between an upload's row and its rename, or before a temp file was removed: at the next
        # start the row without a file, the file without a row and the temp file are all gone.
        gone = store / "uploads" / f"{ids[-1]}.npz"
        gone.unlink()
        orphan = store / "uploads" / "m-0123456789abcdef.safetensors"
        orphan.write_bytes(b"orphan")
        (store / "tmp" / "leftover.part").write_bytes(b"temp")
        cloud = cloud_process(home / "cleanup.yaml", cloud.port, home / "cleanup2.log").start()
        assert not orphan.exists() and not list((store / "tmp").iterdir())
        with client_for(cloud, "tok-cleanup") as client:
            # ids[0]: the oldest of five uploads, deleted by retention (max_uploads 4); ids[2]: its file was lost.
            for dataset in (ids[0], ids[2]):
                spec = pb.JobSpec(model=pb.ModelRef(torchvision="resnet18"), dataset_id=dataset)
                with pytest.raises(grpc.RpcError) as err:
                    client.submit(spec)
                assert err.value.code() == Code.NOT_FOUND
            spec = pb.JobSpec(model=pb.ModelRef(torchvision="resnet18"), dataset_id=ids[1], skip_evaluation=True)
            cancel_quietly(client, client.submit(spec).id)
    finally:
        watch.close()
        cloud.stop()
