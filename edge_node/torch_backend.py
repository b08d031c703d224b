"""The torch backend (see :mod:`edge_node.backend`): a model loaded and traced with torch.fx.

For development and for models ONNX cannot express: any cut of the graph, heads quantized at any
bit width per layer, bottleneck latents with their entropy coder, and the exact invariant
``tail(*head(x)) == model(x)`` on the local fallback.
"""

from __future__ import annotations

import threading
import warnings
from typing import Any

import numpy as np
import torch
from torch import fx

from compressor import decode_array
from partitioner.loaded import LoadedModel, as_tensor_list
from partitioner.photos import calibration_inputs
from partitioner.quantized_head import FLOAT_BITS, build_quantized_head, functional_layers, head_layers
from protos.cleave.v1 import tensor_pb2

# decode() hands torch read-only arrays (see there). torch warns about the first one in a process and
# never again: that first conversion is made with the warning filtered, once, under this lock.
_READ_ONLY_LOCK = threading.Lock()
_read_only_seen = False


def _over_read_only(array: np.ndarray) -> torch.Tensor:
    global _read_only_seen
    with _READ_ONLY_LOCK, warnings.catch_warnings():
        warnings.filterwarnings("ignore", "The given NumPy array is not writable", UserWarning)
        tensor = torch.from_numpy(array)
        _read_only_seen = True
    return tensor


class TorchBackend:
    kind = "torch"
    fallback = "the tail here, on the head's features"

    def __init__(self, model: LoadedModel, calibration: str | None = None, calibration_count: int = 8) -> None:
        """``calibration``, ``calibration_count``: the images int8 heads take their activation ranges from, as
        :func:`~partitioner.photos.calibration_inputs` reads them (the edge's ``autoplan.calibration``: the
        planner judges an int8 split's accuracy through the very head served here)."""
        self.loaded = model
        self._calibration = (calibration, calibration_count)
        self._calib: torch.Tensor | None = None
        self._calib_lock = threading.Lock()  # guards _calib: heads are built on gRPC and planning threads

    @property
    def name(self) -> str:
        return self.loaded.name

    @property
    def fingerprint(self) -> str:
        return self.loaded.fingerprint

    @property
    def input_shape(self) -> tuple[int, ...]:
        return self.loaded.input_shape

    @property
    def entropy_tables(self) -> Any:
        return self.loaded.entropy_tables

    def describe(self) -> str:
        return f"torch {torch.__version__} (model {self.loaded.spec.source})"

    def parts(self, key: int | str) -> tuple[Any, Any, Any]:
        return self.loaded.parts(key)

    def quantized(self, cut: Any, head: Any, bits: int | dict[str, int]) -> tuple[Any, dict[str, int]]:
        layers = list(head_layers(head))
        if isinstance(bits, int) and not layers:
            # Its convolutions are functions in the traced graph (a package's own Conv2d subclass, as in the
            # pretrained Lite0): nothing to pack per layer, but ONNX Runtime runs every node on int8 kernels.
            if bits != 8:
                raise ValueError(f"{bits} bits need convolution or linear modules in the head; it has none: 8 or 32")
            return build_quantized_head(head, self.calibration_images()), {"*": bits}
        per_layer = (
            {name: bits for name in layers} if isinstance(bits, int) else {**dict.fromkeys(layers, FLOAT_BITS), **bits}
        )
        return build_quantized_head(head, self.calibration_images(), per_layer), per_layer

    def check_allocatable(self) -> None:
        """Raise ValueError, naming ``head.allocate``, when the model's convolutions or linears are function
        calls in the traced graph: per-layer bit allocation sees only modules, so it would leave them float
        and report an allocation that is not what runs."""
        module = self.loaded.module
        hidden = functional_layers(module) if isinstance(module, fx.GraphModule) else []
        if hidden:
            raise ValueError(
                f"head.allocate: the model {self.loaded.spec.source!r} calls {len(hidden)} convolutions or linears "
                f"as functions (first: {hidden[0]}), which per-layer bit allocation cannot see (a package's own "
                "Conv2d subclass, as in the pretrained Lite0); leave it false, or set head.weight_bits: 8 for int8 "
                "heads on ONNX Runtime"
            )

    def calibration_images(self) -> torch.Tensor:
        """The images int8 heads are calibrated on (read once)."""
        with self._calib_lock:
            if self._calib is None:
                source, n = self._calibration
                self._calib = calibration_inputs(self.loaded.spec, source, n)
            return self._calib

    def run(self, inputs: list) -> list:
        with torch.inference_mode():
            return as_tensor_list(self.loaded.module(*map(_tensor, inputs)))

    def run_head(self, head: Any, inputs: list) -> tuple:
        with torch.inference_mode():
            return tuple(head(*map(_tensor, inputs)))

    def run_tail(self, cut: Any, tail: Any, inputs: list, features: tuple) -> list:
        with torch.inference_mode():
            return as_tensor_list(tail(*features))

    def decode(self, tensor: tensor_pb2.Tensor, payload: bytes | memoryview | None = None) -> torch.Tensor:
        # A RAW tensor (a request's input) is read in place: a view over the bytes that reading the
        # message's payload made, which nothing else holds, not a second copy of them (0.6 MB for a
        # 224x224 image). The runtime only reads it (the head, encode, the reply's raw encode); torch
        # cannot mark a tensor read-only, so a model that wrote to its input would write to those bytes.
        array = decode_array(tensor, writable=False, payload=payload)
        if array.flags.writeable or _read_only_seen:
            return torch.from_numpy(array)
        return _over_read_only(array)


def _tensor(x: Any) -> torch.Tensor:
    return x if isinstance(x, torch.Tensor) else torch.from_numpy(x)
