"""Killing the cloud makes the edge answer locally, and it returns to split mode when the cloud is back."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import torch
import yaml

from cleave_cli.client import EdgeClient, outputs_of
from cleave_cli.images import synthetic_images
from cleave_cli.launch import cloud_process, edge_process, free_port
from partitioner.loaded import LoadedModel
from protos.cleave.v1 import edge_pb2

from .conftest import MODEL

pytestmark = [pytest.mark.integration]


def wait_for(predicate, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.2)
    return False


def test_cloud_killed_then_restarted(tmp_path: Path, local_model: LoadedModel) -> None:
    (tmp_path / "cloud.yaml").write_text(yaml.safe_dump({"models": [MODEL], "torch_threads": 1}))
    (tmp_path / "edge.yaml").write_text(
        yaml.safe_dump(
            {
                "model": MODEL,
                "torch_threads": 1,
                "plan": {"cut": "layer2_0_relu", "encoding": "fp32"},
                "reconnect": {"initial_s": 0.1, "max_s": 0.5, "connect_timeout_s": 2.0},
            }
        )
    )
    cloud_port = free_port()
    cloud = cloud_process(tmp_path / "cloud.yaml", cloud_port, tmp_path / "cloud.log").start()
    edge = edge_process(tmp_path / "edge.yaml", free_port(), cloud_port, tmp_path / "edge.log").start()
    x = synthetic_images(1, local_model.input_shape, seed=3)
    with torch.inference_mode():
        ref = local_model.module(x)
    try:
        client = EdgeClient(edge.address)
        assert client.infer(x).placement == edge_pb2.SPLIT

        cloud.kill()
        reply = client.infer(x)
        assert reply.placement == edge_pb2.LOCAL_FALLBACK and reply.note
        assert torch.equal(outputs_of(reply)[0], ref)
        assert not client.status().cloud_reachable

        cloud = cloud_process(tmp_path / "cloud.yaml", cloud_port, tmp_path / "cloud2.log").start()
        assert wait_for(lambda: client.status().cloud_reachable, timeout=20)
        reply = client.infer(x)
        assert reply.placement == edge_pb2.SPLIT
        assert torch.equal(outputs_of(reply)[0], ref)
        assert client.status().counters.fallback >= 1
    finally:
        edge.stop()
        cloud.stop()
