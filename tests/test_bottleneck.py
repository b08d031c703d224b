"""Learned bottlenecks: the range coder's bounds, training by distillation against int8 features,
artifacts that round-trip without pickle, and the compression engine's report."""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from compressor.entropy import EntropyTables, decode_symbols, encode_symbols, max_payload
from compressor.errors import CodecError
from partitioner import bottleneck as bn
from partitioner.bottleneck.compare import int_k_points
from partitioner.graph import trace
from tests import _bottleneck as small

CUT = "layer1_1_relu_1"  # (64, 8, 8) crossing at 32x32


def tables(channels: int = 3, half: int = 4, seed: int = 0) -> EntropyTables:
    rng = np.random.default_rng(seed)
    return EntropyTables(pmf=rng.random((channels, 2 * half + 1)) + 0.01, offset=-half)


def test_range_coder_round_trips_and_bounds_what_it_reads() -> None:
    t = tables()
    rng = np.random.default_rng(1)
    symbols = rng.integers(-4, 5, size=(2, 3, 5, 7)).astype(np.int32)
    data = encode_symbols(symbols, t)
    assert len(data) % 4 == 0 and len(data) <= max_payload(symbols.shape)
    assert np.array_equal(decode_symbols(data, t, symbols.shape), symbols)
    # the ideal code length is what the coder achieves, within the flush
    assert len(data) * 8 <= t.bits(symbols) + 64
    clamped = decode_symbols(encode_symbols(symbols * 10, t), t, symbols.shape)
    assert clamped.min() == -4 and clamped.max() == 4  # out-of-table values are clamped, not lost
    with pytest.raises(CodecError, match="tensor.payload: .* exceeds"):
        decode_symbols(b"\0" * (max_payload(symbols.shape) + 4), t, symbols.shape)
    with pytest.raises(CodecError, match="whole number of 32-bit words"):
        decode_symbols(data[:-1], t, symbols.shape)
    with pytest.raises(CodecError, match="more data than the expected shape"):
        decode_symbols(data + data, t, symbols.shape)
    with pytest.raises(CodecError, match="more data than the expected shape"):
        decode_symbols(data, t, (1, 3, 5, 7))  # a stream for 2 images read as 1
    with pytest.raises(CodecError, match="tensor.shape"):
        decode_symbols(data, t, (2, 4, 5, 7))
    with pytest.raises(CodecError, match="entropy.pmf"):
        EntropyTables(pmf=np.zeros((2, 3)), offset=0)


@pytest.fixture(scope="module")
def trained() -> dict:
    """The small classifier, its cut, and a bottleneck trained on it (timed)."""
    torch.set_num_threads(1)
    model = small.classifier()
    x, _, groups = small.images()
    train_idx, held_idx = small.split()
    graph = trace(model, x[:1])
    head, tail = graph.split(CUT)
    t0 = time.perf_counter()
    config = bn.BottleneckConfig(channels=64, latent=8, hidden=32)
    b = bn.train(
        head,
        tail,
        bn.augment(x[train_idx], 3, seed=1),
        config,
        bn.TrainConfig(rate_weight=0.02, max_steps=100, budget_s=50),
        cut=(graph.cut(CUT).index, CUT),
    )
    seconds = time.perf_counter() - t0
    return {"model": model, "head": head, "tail": tail, "held": x[held_idx], "b": b, "seconds": seconds}


def test_bottleneck_sends_fewer_bytes_than_int8_features_and_keeps_agreement(trained: dict) -> None:
    b, head, tail, held = trained["b"], trained["head"], trained["tail"], trained["held"]
    assert trained["seconds"] < 60 and b.history["steps"] == 100
    ours = bn.evaluate(b, head, tail, held)
    int8, int4, int2 = int_k_points(head, tail, held)
    assert ours["images"] == len(held) == 15
    assert ours["bytes_mean"] < int8["bytes_mean"] / 4, (ours, int8)
    assert ours["agreement"] >= 0.9 and ours["agreement"] >= int2["agreement"], (ours, int2)
    assert ours["bytes_p95"] >= ours["bytes_mean"] * 0.9


def test_artifacts_round_trip_without_pickle(trained: dict, tmp_path: Path) -> None:
    b = trained["b"]
    feats = bn.cut_features(trained["head"], trained["held"][:3])
    desc = bn.save(b, tmp_path, {"fingerprint": "f" * 64, "source": "resnet18"})
    assert desc["cut"] == {"index": b.cut[0], "name": CUT} and desc["architecture"]["latent"] == 8
    edge, cloud = bn.load(tmp_path, "edge"), bn.load(tmp_path, "cloud")
    data = edge.encode(feats)
    assert data == b.encode(feats)  # the edge's copy codes the same bits
    assert torch.equal(cloud.decode(data, 3), b.decode(data, 3))
    fp = bn.fingerprint(tmp_path)
    assert fp == bn.fingerprint(tmp_path) and len(fp) == 64
    # a changed weight file is caught, and so is a changed base model
    desc_path = tmp_path / bn.artifacts.DESCRIPTION
    other = json.loads(desc_path.read_text())
    other["base"]["fingerprint"] = "0" * 64
    desc_path.write_text(json.dumps(other))
    assert bn.fingerprint(tmp_path) != fp
    edge_file = tmp_path / bn.artifacts.EDGE_FILE
    raw = bytearray(edge_file.read_bytes())
    raw[-1] ^= 1
    edge_file.write_bytes(bytes(raw))
    with pytest.raises(ValueError, match="sha256"):
        bn.load(tmp_path, "edge")
    (tmp_path / bn.artifacts.DESCRIPTION).write_text("not json")
    with pytest.raises(ValueError, match="not JSON"):
        bn.load(tmp_path)
