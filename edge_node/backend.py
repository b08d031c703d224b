"""What runs the model's parts on the edge: torch (a traced model) or ONNX Runtime (an edge bundle).

:class:`~edge_node.runtime.EdgeRuntime` never touches a tensor library itself: it asks its backend
for a cut's parts, runs them through it, and hands it the cloud's outputs to decode. Two backends:

* :class:`edge_node.torch_backend.TorchBackend`: the model traced with torch.fx (any model torch
  loads; heads quantized at any bit width on request). Imports torch.
* :class:`edge_node.onnx_backend.OnnxBackend`: an edge bundle (:mod:`partitioner.bundle`) on ONNX
  Runtime: float and int8 heads at the bundle's cuts, the whole model for edge-only plans and the
  local fallback. Imports no torch.

This module is the interface only; it imports neither.
"""

from __future__ import annotations

from typing import Any, Protocol

from protos.cleave.v1 import tensor_pb2


class Backend(Protocol):
    """The model as the edge runtime runs it."""

    kind: str  # "torch" or "onnx bundle": what `cleave status` reports
    fallback: str  # what finishing a request locally runs, for the fallback log ("the tail here", ...)
    name: str
    fingerprint: str
    input_shape: tuple[int, ...]
    entropy_tables: Any  # a bottleneck's range-coder tables, or None

    def describe(self) -> str:
        """One line for status and logs: the backend and where its model comes from."""

    def parts(self, key: int | str) -> tuple[Any, Any, Any]:
        """``(cut, head, tail)`` of the cut ``key`` (an index or a name); KeyError naming the cuts there are.

        ``cut`` has ``index``, ``name``, ``live``, ``shapes`` and ``dtypes``; ``head`` and ``tail``
        are only ever passed back to :meth:`run_head` and :meth:`run_tail`.
        """

    def quantized(self, cut: Any, head: Any, bits: int | dict[str, int]) -> tuple[Any, dict[str, int]]:
        """The head of ``cut`` with its weights at ``bits`` (an int for every layer, or per layer),
        and the per-layer bits it has; ValueError naming what it cannot build."""

    def run(self, inputs: list) -> list:
        """The whole model on ``inputs``: its outputs."""

    def run_head(self, head: Any, inputs: list) -> tuple:
        """A head on ``inputs``: the cut's live set, in :attr:`Cut.live` order."""

    def run_tail(self, cut: Any, tail: Any, inputs: list, features: tuple) -> list:
        """Finish locally a request whose features did not reach the cloud: its outputs."""

    def decode(self, tensor: tensor_pb2.Tensor, payload: bytes | memoryview | None = None) -> Any:
        """A wire tensor as this backend's array (CodecError as :func:`compressor.decode_array` raises it);
        ``payload``: its payload, held apart from ``tensor`` (None: ``tensor.payload``)."""
