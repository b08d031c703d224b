"""The quantize engine's int8 backend: the whole model run on ONNX Runtime's int8 kernels.

The model is traced and taken as the head of its last cut, so the path the edge uses for its int8
heads (:func:`partitioner.quantized_head.build_quantized_head`: BatchNorm folded, QOperator
``QLinearConv``/``QLinearMatMul``, per-channel int8 weights, activation ranges calibrated on
synthetic inputs) serves whole models too. The artifact is a plain-tensor ``torch.save`` holding an
ONNX protobuf, loadable with ``QuantizedHead.load`` (``weights_only=True``): no Python code in it.
"""

from __future__ import annotations

import torch
from torch import nn

from partitioner.graph import trace
from partitioner.models import calibration_batch
from partitioner.quantized_head import QuantizedHead, build_quantized_head


class Int8Model(nn.Module):
    """A :class:`QuantizedHead` of a whole model, returning the model's output as the model does."""

    def __init__(self, head: QuantizedHead) -> None:
        super().__init__()
        self.head = head

    def forward(self, x: torch.Tensor):
        out = self.head(x)
        return out[0] if len(out) == 1 else out

    def save(self, path) -> None:
        self.head.save(path)


def onnx_int8(model: nn.Module, example: torch.Tensor) -> Int8Model:
    """Convert ``model`` (fx-traceable) to int8 on ONNX Runtime; ``example`` fixes the input shape."""
    graph = trace(model, example)
    head, _ = graph.split(graph.cuts[-1])
    calib = calibration_batch(tuple(example.shape), 8)
    return Int8Model(build_quantized_head(head, calib))
