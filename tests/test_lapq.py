"""LAPQ: never worse than its Lp initialisation, bounded by evaluations and time, and on a real split."""

from __future__ import annotations

import time

import numpy as np
import pytest
import torch

from compressor import EncodingSpec, decode, encode
from compressor.offline.lapq import fixed_specs, lapq, lp_clip
from partitioner.calibration import SplitLoss, lapq_split
from tests.support.quant import harness, harness_graph

pytestmark = [pytest.mark.slow]


def _bowl(clips: np.ndarray) -> float:
    return float(((clips - np.array([1.0, 2.0, 0.5])) ** 2).sum() + 0.3 * clips[0] * clips[1])


def test_never_worse_than_the_initialisation_and_finds_the_bowl() -> None:
    r = lapq(_bowl, lambda p: np.array([3.0, 3.0, 3.0]) / p, max_evals=300)
    assert r.loss <= r.init_loss
    assert r.loss == pytest.approx(_bowl(r.clips))
    assert r.loss < 0.5 * r.init_loss
    assert r.p in r.p_losses and min(r.p_losses.values()) == r.init_loss
    assert r.evals <= 300


def test_the_p_search_picks_the_best_initialisation() -> None:
    r = lapq(lambda c: float(abs(c[0] - 1.25)), lambda p: np.array([p / 2]), powell=False)
    assert r.p == 2.5 and r.loss == r.init_loss == 0.0


def test_respects_the_evaluation_bound() -> None:
    calls = []

    def loss(c: np.ndarray) -> float:
        calls.append(1)
        return _bowl(c)

    r = lapq(loss, lambda p: np.ones(3) * p, max_evals=12)
    assert len(calls) == r.evals <= 12
    assert r.stopped == "max_evals"
    assert r.loss <= r.init_loss


def test_respects_the_time_bound() -> None:
    def slow(c: np.ndarray) -> float:
        time.sleep(0.02)
        return _bowl(c)

    start = time.perf_counter()
    r = lapq(slow, lambda p: np.ones(3) * p, max_evals=10_000, max_seconds=0.3)
    assert time.perf_counter() - start < 0.3 + 1.0  # slack for a loaded machine
    assert r.evals <= 0.3 / 0.02 + 1  # no evaluation starts past the bound
    assert r.stopped == "max_seconds"
    assert r.loss <= r.init_loss


def test_lp_clip_clips_harder_for_smaller_p() -> None:
    g = torch.Generator().manual_seed(0)
    u = torch.rand(50_000, generator=g) - 0.5
    x = -u.sign() * torch.log1p(-2 * u.abs())
    assert lp_clip(x, 3, 2.0) <= lp_clip(x, 3, 4.0) < float(x.abs().max())


@pytest.mark.parametrize("labelled", [False, True])
def test_on_a_split_of_the_trained_model(labelled: bool) -> None:
    h, graph = harness(), harness_graph()
    head, tail = graph.split("layer2_relu_1")
    x = h.calibration(64)
    loss = SplitLoss(head, tail, x, 3, labels=h.train_y[:64] if labelled else None)
    r = lapq_split(loss, max_evals=40, max_seconds=20)
    assert r.loss <= r.init_loss
    assert r.evals <= 40
    assert len(r.clips) == len(loss.names) == 1
    # The clipping values reach the wire as a "fixed" spec per live tensor.
    specs = fixed_specs(loss.features, r.clips, bits=3)
    assert str(specs[0]).startswith("int3:fixed(")
    y = decode(encode(loss.features[0], EncodingSpec.parse(str(specs[0]))))
    assert float(y.max()) <= float(specs[0].clip_kwargs["hi"]) + 1e-6


def test_weights_and_features_jointly() -> None:
    h, graph = harness(), harness_graph()
    head, tail = graph.split("layer2_relu_1")
    loss = SplitLoss(head, tail, h.calibration(32), 4, weight_bits={"layer2.conv2": 3, "layer2.conv1": 3})
    r = lapq_split(loss, max_evals=25, max_seconds=20)
    assert r.clips.shape == (3,) and r.loss <= r.init_loss
