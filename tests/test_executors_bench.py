"""``benchmarks/executors.py``: the float ONNX Runtime graph it times is the torch head's, and its timer runs
every variant as often, in turn."""

from __future__ import annotations

import torch

from benchmarks.executors import float_on_ort, side_by_side
from partitioner.loaded import LoadedModel, as_tensor_list
from partitioner.models import ModelSpec


def test_the_float_onnx_runtime_head_computes_the_torch_head() -> None:
    torch.manual_seed(0)
    model = LoadedModel.load(ModelSpec(name="r18", source="resnet18", input_shape=(1, 3, 64, 64)))
    cut = model.graph.cuts[len(model.graph.cuts) // 2]
    _, head, _ = model.parts(cut.index)
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        want = as_tensor_list(head(x))
    got = float_on_ort(head, x)(x)
    assert len(got) == len(want)
    for g, w in zip(got, want, strict=True):
        assert g.shape == w.shape
        torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-4)  # float rounding: other kernels


def test_side_by_side_runs_each_variant_as_often_in_turn() -> None:
    calls: list[str] = []
    medians = side_by_side({"a": lambda: calls.append("a"), "b": lambda: calls.append("b")}, repeats=4, warmup=1)
    assert set(medians) == {"a", "b"} and all(v >= 0 for v in medians.values())
    assert calls.count("a") == calls.count("b") == 5  # 1 warm-up + 4 repeats each
    assert calls[2:] == ["a", "b", "b", "a", "a", "b", "b", "a"]  # the order rotates every repeat
