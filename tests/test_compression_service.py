"""The Compression service end to end, through gRPC against a real ``cleave-cloud`` process:
upload, submit, watch, cancel, kill -9 and restart mid-job, resumable verified download, and the
artifacts loaded and run (the JSON plan replayed on the original equals the served TorchScript)."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import grpc
import numpy as np
import pytest
import torch
import torchvision
import yaml
from safetensors.torch import save_file

from cleave_cli.compress_cmd import CompressionClient
from cleave_cli.launch import cloud_process, free_port
from cleave_cli.main import main as cli
from compressor.offline import apply_plan
from protos.cleave.v1 import compression_pb2 as pb

pytestmark = [pytest.mark.integration]

SHAPE = [1, 3, 64, 64]


def original_model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torchvision.models.resnet18(weights=None, num_classes=10).eval()


def watch_until(client: CompressionClient, job_id: str, predicate) -> pb.Job:
    for job in client.watch(job_id, timeout=180):
        if predicate(job):
            return job
    return client.get(job_id)


def test_job_lifecycle_across_a_crash(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    config = tmp_path / "cloud.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "torch_threads": 1,
                "jobs": {
                    "dir": str(tmp_path / "store"),
                    "concurrency": 1,
                    "job_threads": 1,
                    "max_upload_bytes": 64 << 20,
                    "chunk_bytes": 256 << 10,
                },
            }
        )
    )
    weights = tmp_path / "resnet18.safetensors"
    save_file(original_model().state_dict(), str(weights))
    rng = np.random.default_rng(0)
    data = tmp_path / "eval.npz"
    np.savez(data, inputs=rng.standard_normal((8, 3, 64, 64)).astype(np.float32), labels=rng.integers(0, 10, 8))

    port = free_port()
    cloud = cloud_process(config, port, tmp_path / "cloud.log").start()
    client = CompressionClient(cloud.address)
    try:
        # Uploads: a state dict with its architecture, a dataset; bad ones are refused with the right code.
        model = client.upload(
            weights, pb.UploadHeader(format=pb.SAFETENSORS, architecture="resnet18", num_classes=10, input_shape=SHAPE)
        )
        assert model.kind == "cnn" and model.sha256 == hashlib.sha256(weights.read_bytes()).hexdigest()
        dataset = client.upload(data, pb.UploadHeader(format=pb.DATASET_NPZ))
        bad = tmp_path / "bad.ts"
        bad.write_bytes(b"\x80\x04K\x01.")
        with pytest.raises(grpc.RpcError) as err:
            client.upload(bad, pb.UploadHeader(format=pb.DATASET_NPZ))
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "pickle" in err.value.details()
        with pytest.raises(grpc.RpcError) as err:
            client.upload(bad, pb.UploadHeader(format=pb.TORCHSCRIPT))
        assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED and "allow_code_uploads" in err.value.details()
        with pytest.raises(grpc.RpcError) as err:
            client.upload(bad, pb.UploadHeader(format=pb.DATASET_NPZ, total_bytes=1 << 30))
        assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        with pytest.raises(grpc.RpcError) as err:
            client.get("nope")
        assert err.value.code() == grpc.StatusCode.NOT_FOUND

        ref = pb.ModelRef(model_id=model.id)
        a = client.submit(pb.JobSpec(model=ref, prune=pb.PruneOptions(ratio=0.5), dataset_id=dataset.id))
        b = client.submit(pb.JobSpec(model=ref, prune=pb.PruneOptions(ratio=0.3), skip_evaluation=True))
        c = client.submit(pb.JobSpec(model=ref, engine="quantize", quantize=pb.QuantizeOptions(bits=4)))
        assert a.engine == "prune_cnn" and c.engine == "quantize"
        assert client.cancel(c.id).state == pb.CANCELLED  # cancelled while queued

        # Kill -9 while job a is running, then restart on the same store.
        running = watch_until(client, a.id, lambda j: j.state == pb.RUNNING and j.progress > 0)
        assert running.state == pb.RUNNING and 0 < running.progress < 1 and running.stage
        cloud.kill()
        cloud = cloud_process(config, port, tmp_path / "cloud2.log").start()
        a = client.get(a.id)
        assert a.state in (pb.QUEUED, pb.RUNNING) and "re-queued" in a.message, a
        assert client.get(c.id).state == pb.CANCELLED and client.get(b.id).state == pb.QUEUED

        progress = []
        a = watch_until(client, a.id, lambda j: progress.append(j.progress) or j.state == pb.SUCCEEDED)
        assert a.state == pb.SUCCEEDED, a.message
        assert a.attempts == 2 and any(0 < p < 1 for p in progress)

        # Cancel b while it runs: its process is killed and the worker moves on.
        b = watch_until(client, b.id, lambda j: j.state == pb.RUNNING)
        assert client.cancel(b.id).state == pb.CANCELLED
        assert client.get(b.id).state == pb.CANCELLED and not client.get(b.id).artifacts

        # Download with resume: take the first chunks of a stream, drop it, then resume from the .part file.
        out = tmp_path / "out"
        out.mkdir()
        arts = {x.name: x for x in a.artifacts}
        assert {"model.ts", "model.pt2", "plan.json", "report.json"} <= set(arts)
        stream = client.stub.Download(pb.DownloadRequest(job_id=a.id, artifact="model.ts", chunk_bytes=1 << 16))
        with open(out / "model.ts.part", "wb") as f:
            for i, chunk in enumerate(stream):
                f.write(chunk.data)
                if i == 2:
                    stream.cancel()
                    break
        assert (out / "model.ts.part").stat().st_size == 3 << 16
        for name in ("model.ts", "model.pt2", "plan.json", "report.json"):
            digest = client.download(a.id, name, out / name)
            assert digest == arts[name].sha256 == hashlib.sha256((out / name).read_bytes()).hexdigest()

        # Load and run the artifacts; the plan replayed on the original equals the served model exactly.
        x = torch.randn(SHAPE)
        served = torch.jit.load(str(out / "model.ts"))
        exported = torch.export.load(str(out / "model.pt2")).module()
        replayed = apply_plan(original_model(), (out / "plan.json").read_text())
        with torch.no_grad():
            y = served(x)
            assert y.shape == (1, 10)
            assert torch.equal(replayed(x), y) and torch.allclose(exported(x), y, atol=1e-5)
        ts_state, plan_state = served.state_dict(), replayed.state_dict()
        assert ts_state.keys() == plan_state.keys()
        assert all(torch.equal(ts_state[k], plan_state[k]) for k in ts_state)
        assert arts["plan.json"].size_bytes < 4096 < arts["model.ts"].size_bytes

        report = json.loads(a.report_json)
        before, after = report["before"], report["after"]
        for key in ("parameters", "macs", "size_bytes", "latency_ms", "accuracy"):
            assert key in before and key in after
        assert after["macs"] < before["macs"] / 2 and after["parameters"] < before["parameters"] / 2

        # The CLI: compress a Transformer (plan only), then list jobs.
        cfg = json.dumps(
            {
                "num_hidden_layers": 2,
                "hidden_size": 32,
                "num_attention_heads": 4,
                "intermediate_size": 64,
                "vocab_size": 50,
            }
        )
        rc = cli(
            [
                "compress",
                "--cloud",
                cloud.address,
                "--transformer",
                "bert",
                "--config",
                cfg,
                "--head-ratio",
                "0.5",
                "--ffn-ratio",
                "0.5",
                "--importance",
                "gradient",
                "--out",
                str(tmp_path / "bert"),
                "--json",
            ]
        )
        assert rc == 0
        plan = json.loads((tmp_path / "bert" / "plan.json").read_text())
        assert set(plan["heads"]) == {"0", "1"} and all(len(h) == 2 for h in plan["heads"].values())
        capsys.readouterr()
        assert cli(["jobs", "list", "--cloud", cloud.address]) == 0
        listing = capsys.readouterr().out
        assert all(j in listing for j in (a.id, b.id, c.id)) and "CANCELLED" in listing
    finally:
        client.close()
        cloud.stop()
