"""Bit allocation: budgets are respected, and a clearly more sensitive layer keeps more bits."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from partitioner.bitalloc import allocate_bits, layer_sensitivity
from partitioner.graph import trace
from tests.support.quant import harness, harness_graph

pytestmark = [pytest.mark.slow]


class _TwoBranches(nn.Module):
    """Two identical-size convolutions; one branch's output counts 100x less, so it is far less sensitive."""

    def __init__(self) -> None:
        super().__init__()
        self.loud = nn.Conv2d(8, 16, 3, padding=1)
        self.quiet = nn.Conv2d(8, 16, 3, padding=1)
        self.head_end = nn.ReLU()
        self.out = nn.Conv2d(16, 4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.head_end(self.loud(x) + 0.01 * self.quiet(x))
        return self.out(y)


def test_the_sensitive_layer_keeps_more_bits() -> None:
    torch.manual_seed(0)
    model = _TwoBranches().eval()
    x = torch.randn(16, 8, 12, 12)
    graph = trace(model, x[:1])
    sens = layer_sensitivity(graph, x, (8, 6, 4, 2))
    assert sens["loud"][2] > 100 * sens["quiet"][2]
    alloc = allocate_bits(graph, "head_end", x, memory_budget_bytes=10**6, max_distortion=1e-3)
    assert alloc.feasible
    assert alloc.weight_bits["quiet"] == 2
    assert alloc.weight_bits["loud"] > alloc.weight_bits["quiet"]
    assert alloc.distortion <= 1e-3


def test_budgets_are_respected_on_the_trained_model() -> None:
    h, graph = harness(), harness_graph()
    x = h.calibration(64)
    for budget, max_d in [(45_000, 0.02), (30_000, 0.2)]:
        alloc = allocate_bits(graph, "layer3_relu_1", x, memory_budget_bytes=budget, max_distortion=max_d)
        assert alloc.feasible, alloc
        assert alloc.head_bytes <= budget
        assert alloc.distortion <= max_d
        assert set(alloc.weight_bits.values()) <= {8, 6, 4, 2}
        assert alloc.feature_bits in (8, 6, 4, 3, 2)
    # A looser distortion budget never costs more bytes.
    tight = allocate_bits(graph, "layer2_relu_1", x, 10**6, 1e-3)
    loose = allocate_bits(graph, "layer2_relu_1", x, 10**6, 3e-2)
    assert loose.head_bytes + loose.feature_bytes <= tight.head_bytes + tight.feature_bytes
    assert tight.distortion <= 1e-3 and loose.distortion <= 3e-2


def test_an_impossible_memory_budget_is_reported_infeasible() -> None:
    h, graph = harness(), harness_graph()
    alloc = allocate_bits(graph, "layer3_relu_1", h.calibration(64), memory_budget_bytes=1_000, max_distortion=0.01)
    assert not alloc.feasible
    assert all(b == 2 for b in alloc.weight_bits.values())  # it went as low as it could


def test_sensitivities_are_cached_per_model() -> None:
    h, graph = harness(), harness_graph()
    x = h.calibration(64)
    assert layer_sensitivity(graph, x) is layer_sensitivity(graph, x)
