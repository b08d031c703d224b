"""Shared, cached helpers for the quantization tests: the trained harness model and its graph."""

from __future__ import annotations

import functools

import torch

from partitioner.graph import ModelGraph, trace
from tests.support.harness import Harness, trained_harness


@functools.cache
def harness() -> Harness:
    """Trained once per machine (cached under ~/.cache/cleave), loaded once per test session."""
    torch.manual_seed(0)
    return trained_harness()


@functools.cache
def harness_graph() -> ModelGraph:
    h = harness()
    return trace(h.model, h.test_x[:1])
