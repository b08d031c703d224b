"""The job manager and store without a server: uploads refused cleanly, submit validation, queue
limits, cancellation, crash recovery, datasets, the dispatcher and the Pareto front."""

from __future__ import annotations

import io
import pickle
import time
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision
from safetensors.torch import save

from cloud_node.config import CloudConfig, JobsConfig, Retention, Sandbox
from cloud_node.jobs import JobManager
from cloud_node.jobs.datasets import DatasetError, load_dataset
from cloud_node.jobs.engines import dispatch, pareto
from cloud_node.jobs.store import FAILED, QUEUED, RUNNING, SUCCEEDED, ArtifactRecord, publish
from protos.cleave.v1 import compression_pb2 as pb
from protos.errors import FailedPrecondition, InvalidArgument, NotFound, PermissionDenied, ResourceExhausted
from runtime.settings import SettingsError


def manager(root: Path, **kw) -> JobManager:
    return JobManager(JobsConfig(dir=str(root), **kw))  # workers not started: nothing runs


def chunks(data: bytes, fmt: int, **header) -> list[pb.UploadChunk]:
    h = pb.UploadHeader(format=fmt, **header)
    return [pb.UploadChunk(header=h)] + [pb.UploadChunk(data=data[i : i + 4096]) for i in range(0, len(data), 4096)]


def store_snapshot(m: JobManager) -> tuple:
    files = sorted(p.name for p in m.store.uploads_dir.iterdir())
    return m.store.count_uploads(), files, sorted(p.name for p in m.store.tmp_dir.iterdir())


def tiny_torchscript() -> bytes:
    buf = io.BytesIO()
    torch.jit.save(torch.jit.script(torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.ReLU())), buf)
    return buf.getvalue()


def npz(**arrays) -> bytes:
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    return buf.getvalue()


def test_bad_uploads_are_refused_and_change_nothing(tmp_path: Path) -> None:
    m = manager(tmp_path, max_upload_bytes=200_000, allow_code_uploads=True)
    before = store_snapshot(m)
    ts = tiny_torchscript()
    saved = io.BytesIO()
    torch.save({"w": torch.zeros(2)}, saved)
    cases = [
        (chunks(ts[: len(ts) // 2], pb.TORCHSCRIPT), InvalidArgument, "not a TORCHSCRIPT archive"),
        (chunks(ts[:-10], pb.TORCHSCRIPT, total_bytes=len(ts)), InvalidArgument, "truncated"),
        (chunks(ts, pb.TORCHSCRIPT, sha256="0" * 64), InvalidArgument, "header.sha256"),
        (chunks(pickle.dumps({"a": 1}), pb.TORCHSCRIPT), InvalidArgument, "pickle"),
        (chunks(saved.getvalue(), pb.TORCHSCRIPT), InvalidArgument, "torch.save pickle is refused"),
        (chunks(b"hello world", pb.SAFETENSORS, architecture="resnet18"), InvalidArgument, "not a safetensors"),
        (
            chunks(save({"x": torch.zeros(3)}), pb.SAFETENSORS, architecture="resnet18"),
            InvalidArgument,
            "header.architecture",
        ),
        (chunks(save({"x": torch.zeros(3)}), pb.SAFETENSORS), InvalidArgument, "header.architecture"),
        (chunks(ts, pb.UPLOAD_FORMAT_UNSPECIFIED), InvalidArgument, "header.format"),
        (chunks(b"\0" * 300_000, pb.TORCHSCRIPT), ResourceExhausted, "limit"),
        (chunks(ts, pb.TORCHSCRIPT, total_bytes=10**9), ResourceExhausted, "limit"),
        (
            chunks(npz(inputs=np.array([object()] * 2), labels=np.zeros(2, np.int64)), pb.DATASET_NPZ),
            InvalidArgument,
            "dataset",
        ),
        (
            chunks(npz(inputs=np.zeros((2, 3), np.float32), labels=np.zeros(3, np.int64)), pb.DATASET_NPZ),
            InvalidArgument,
            "dataset.inputs",
        ),
        ([pb.UploadChunk(data=b"x")], InvalidArgument, "header"),
    ]
    for messages, error, match in cases:
        with pytest.raises(error, match=match):
            m.upload(messages)
        assert store_snapshot(m) == before
    good = m.upload(chunks(ts, pb.TORCHSCRIPT, name="tiny"))  # opened in a sandboxed process, not here
    assert good.kind == "cnn" and good.path.is_file() and m.store.count_uploads() == 1
    m.store.close()
    strict = manager(tmp_path)  # jobs.allow_code_uploads off, the default
    with pytest.raises(PermissionDenied, match="jobs.allow_code_uploads"):
        strict.upload(chunks(ts, pb.TORCHSCRIPT))
    assert strict.store.count_uploads() == 1


def test_a_state_dict_with_other_classes_names_the_classes_flag(tmp_path: Path) -> None:
    m = manager(tmp_path)
    ten = save(torchvision.models.resnet18(num_classes=10).state_dict())
    match = r"fc.weight is F32\[10, 512\] in the file, 'resnet18' needs F32\[1000, 512\] \(a classifier of 10 classes"
    with pytest.raises(InvalidArgument, match=match):
        m.upload(chunks(ten, pb.SAFETENSORS, architecture="resnet18"))
    assert m.upload(chunks(ten, pb.SAFETENSORS, architecture="resnet18", num_classes=10)).kind == "cnn"
    m.store.close()


def test_submit_validation_names_fields(tmp_path: Path) -> None:
    m = manager(tmp_path)
    ref = pb.ModelRef(torchvision="resnet18")
    for spec, error, match in [
        (pb.JobSpec(), InvalidArgument, "spec.model"),
        (pb.JobSpec(model=pb.ModelRef(torchvision="resnet19")), InvalidArgument, "spec.model.torchvision"),
        (pb.JobSpec(model=pb.ModelRef(model_id="m-nope")), NotFound, "spec.model.model_id"),
        (pb.JobSpec(model=ref, dataset_id="d-nope"), NotFound, "spec.dataset_id"),
        (pb.JobSpec(model=ref, engine="nonesuch"), InvalidArgument, "spec.engine"),
        (pb.JobSpec(model=ref, prune=pb.PruneOptions(ratio=1.5)), InvalidArgument, "spec.prune.ratio"),
        (
            pb.JobSpec(model=ref, engine="quantize", quantize=pb.QuantizeOptions(bits=7)),
            InvalidArgument,
            "spec.quantize.bits",
        ),
        (
            pb.JobSpec(model=ref, engine="quantize", quantize=pb.QuantizeOptions(clip="aciq_laplace")),
            InvalidArgument,
            "spec.quantize.clip: 'aciq_laplace' is not one of lapq, aciq, fixed, minmax, percentile",
        ),
        (
            pb.JobSpec(model=ref, engine="sweep", quantize=pb.QuantizeOptions(clip="nosuch")),
            InvalidArgument,
            "spec.quantize.clip: 'nosuch'",
        ),
        (pb.JobSpec(model=pb.ModelRef(transformer="t5")), InvalidArgument, "spec.model.transformer"),
        (pb.JobSpec(model=pb.ModelRef(transformer="bert", config_json="{")), InvalidArgument, "config_json"),
    ]:
        with pytest.raises(error, match=match):
            m.submit(spec)
    assert m.list([], 0) == []
    for clip in ("lapq", "aciq", ""):  # the optimiser, a registered clipper, the engine's default
        assert m.submit(pb.JobSpec(model=ref, engine="quantize", quantize=pb.QuantizeOptions(clip=clip))).engine


def test_queue_limit_cancel_and_states(tmp_path: Path) -> None:
    m = manager(tmp_path, queue_limit=2)
    spec = pb.JobSpec(model=pb.ModelRef(torchvision="resnet18"), prune=pb.PruneOptions(ratio=0.5))
    a, b = m.submit(spec), m.submit(spec)
    assert a.engine == "prune_cnn" and a.state == QUEUED
    with pytest.raises(ResourceExhausted, match="queue_limit"):
        m.submit(spec)
    assert m.cancel(b.id).state == "CANCELLED"
    with pytest.raises(FailedPrecondition, match="already CANCELLED"):
        m.cancel(b.id)
    m.submit(spec)  # a slot is free again
    with pytest.raises(NotFound, match="job_id"):
        m.get("nope")
    with pytest.raises(FailedPrecondition, match="not SUCCEEDED"):
        m.artifact(a.id, "")
    assert [j.state for j in m.list(["CANCELLED"], 0)] == ["CANCELLED"]


def test_restart_requeues_then_fails_running_jobs(tmp_path: Path) -> None:
    m = manager(tmp_path, max_attempts=2)
    spec = pb.JobSpec(model=pb.ModelRef(torchvision="resnet18"))
    job = m.submit(spec)
    assert m.store.claim_next().id == job.id  # RUNNING, attempt 1 ... and then the daemon dies
    m.store.close()
    m = manager(tmp_path, max_attempts=2)
    job = m.get(job.id)
    assert job.state == QUEUED and "re-queued" in job.message
    m.store.claim_next()  # attempt 2, dies again
    m.store.close()
    job = manager(tmp_path, max_attempts=2).get(job.id)
    assert job.state == FAILED and "2 times" in job.message


def test_finished_artifacts_survive_restart_and_corruption_is_caught(tmp_path: Path) -> None:
    m = manager(tmp_path)
    job = m.submit(pb.JobSpec(model=pb.ModelRef(torchvision="resnet18")))
    m.store.claim_next()
    tmp = m.store.temp_path()
    tmp.write_bytes(b"artifact bytes")
    dest = m.store.artifacts_dir / job.id / "plan.json"
    digest = publish(tmp, dest)
    assert m.store.finish(job.id, [ArtifactRecord("plan.json", dest, 14, digest, "application/json")], "{}")
    m.store.close()
    m = manager(tmp_path)
    assert m.get(job.id).state == SUCCEEDED and m.artifact(job.id, "plan.json").sha256 == digest
    m.store.close()
    dest.write_bytes(b"artifact bytez")  # bit rot
    job = manager(tmp_path).get(job.id)
    assert job.state == FAILED and "plan.json" in job.message


def test_dataset_validation(tmp_path: Path) -> None:
    path = tmp_path / "d.npz"
    path.write_bytes(npz(inputs=np.zeros((4, 3, 8, 8), np.float32), labels=np.arange(4)))
    assert len(load_dataset(path, "npz")) == 4
    for arrays, match in [
        ({"inputs": np.zeros((4, 3), np.float32)}, "dataset.labels: missing"),
        ({"inputs": np.zeros((4, 3), np.float32), "labels": np.zeros(4, np.float32)}, "dataset.labels: dtype"),
        ({"inputs": np.full((2, 3), np.nan, np.float32), "labels": np.zeros(2, np.int64)}, "NaN"),
        ({"inputs": np.zeros((2, 3), np.complex64), "labels": np.zeros(2, np.int64)}, "dataset.inputs: dtype"),
    ]:
        path.write_bytes(npz(**arrays))
        with pytest.raises(DatasetError, match=match):
            load_dataset(path, "npz")


def test_dispatcher_and_pareto() -> None:
    assert dispatch("", "cnn") == "prune_cnn"
    assert dispatch("prune", "transformer") == "prune_transformer"
    assert dispatch("quantize", "model") == "quantize"
    with pytest.raises(ValueError, match="engine"):
        dispatch("prune", "model")
    points = [
        {"size_bytes": 10, "accuracy": 0.9, "latency_ms": 1},
        {"size_bytes": 5, "accuracy": 0.8, "latency_ms": 1},
        {"size_bytes": 8, "accuracy": 0.7, "latency_ms": 1},  # beaten by the 5-byte point
    ]
    assert pareto(points) == points[:2]


def test_jobs_config_section() -> None:
    config = CloudConfig.from_dict({"jobs": {"dir": "/tmp/x", "concurrency": 2}})
    assert config.jobs.concurrency == 2
    with pytest.raises(SettingsError, match="jobs.concurency: unknown key"):
        CloudConfig.from_dict({"jobs": {"concurency": 2}})


def test_zip_that_is_not_torchscript(tmp_path: Path) -> None:
    m = manager(tmp_path, allow_code_uploads=True)
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        z.writestr("archive/data.txt", "hi")
    with pytest.raises(InvalidArgument, match="TorchScript"):
        m.upload(chunks(buf.getvalue(), pb.TORCHSCRIPT))
    with pytest.raises(InvalidArgument, match="EXPORTED_PROGRAM"):
        m.upload(chunks(buf.getvalue(), pb.EXPORTED_PROGRAM))
    assert m.store.count_uploads() == 0


def test_running_state_constant() -> None:
    assert pb.JobState.Value(RUNNING) == pb.RUNNING  # store states are the proto's names


def test_code_upload_is_refused_where_the_sandbox_cannot_isolate(tmp_path: Path) -> None:
    m = manager(tmp_path, allow_code_uploads=True, sandbox=Sandbox(isolate=False))
    with pytest.raises(InvalidArgument, match="cannot isolate"):
        m.upload(chunks(tiny_torchscript(), pb.TORCHSCRIPT))
    assert m.store.count_uploads() == 0 and not list(m.store.tmp_dir.iterdir())


def test_a_job_past_its_timeout_is_killed_and_failed(tmp_path: Path) -> None:
    m = manager(tmp_path, sandbox=Sandbox(timeout_s=1.0))
    m.start()
    try:
        job = m.submit(pb.JobSpec(model=pb.ModelRef(torchvision="resnet18"), prune=pb.PruneOptions(ratio=0.5)))
        seen = list(m.watch(job.id))[-1]
        assert seen.state == FAILED and "jobs.sandbox.timeout_s" in seen.message, seen
        assert not list(m.store.tmp_dir.iterdir())  # its scratch directory is gone with it
    finally:
        m.close()


def test_retention_deletes_old_finished_jobs_and_unused_uploads(tmp_path: Path) -> None:
    m = manager(tmp_path, retention=Retention(max_age_s=3600, max_jobs=1, max_uploads=1))
    spec = pb.JobSpec(model=pb.ModelRef(torchvision="resnet18"))
    done = []
    for _ in range(3):
        job = m.submit(spec)
        m.store.claim_next()
        assert m.store.finish(job.id, [], "{}")
        (m.store.artifacts_dir / job.id).mkdir()
        done.append(job.id)
    data = npz(inputs=np.zeros((2, 3), np.float32), labels=np.zeros(2, np.int64))
    old, used, new = (m.upload(chunks(data, pb.DATASET_NPZ)) for _ in range(3))
    queued = m.submit(pb.JobSpec(model=pb.ModelRef(torchvision="resnet18"), dataset_id=used.id))
    deleted = m.enforce_retention()
    assert set(deleted) == {done[0], done[1], old.id}  # the newest job, the newest upload and one in use stay
    assert not (m.store.artifacts_dir / done[0]).exists() and (m.store.artifacts_dir / done[2]).is_dir()
    assert not old.path.exists() and used.path.exists() and new.path.exists()
    assert m.get(queued.id).state == QUEUED
    assert set(m.enforce_retention(now=time.time() + 7200)) == {done[2], new.id}  # past max_age_s


def test_npz_whose_member_header_lies_is_refused(tmp_path: Path) -> None:
    """A local file header that disagrees with the zip directory (found by the fuzzer: INTERNAL)."""
    from cloud_node.jobs.headers import HeaderError, npz_header

    buf = io.BytesIO()
    np.savez(buf, inputs=np.zeros((2, 3, 4, 4), np.float32), labels=np.zeros(2, np.int64))
    good = tmp_path / "good.npz"
    good.write_bytes(buf.getvalue())
    assert set(npz_header(good, 1 << 16, 1 << 20)) == {"inputs", "labels"}
    bad = tmp_path / "bad.npz"
    bad.write_bytes(b"QK" + buf.getvalue()[2:])  # the first member's local header magic, broken
    with pytest.raises(HeaderError, match="dataset.inputs.npy: unreadable npz member"):
        npz_header(bad, 1 << 16, 1 << 20)
