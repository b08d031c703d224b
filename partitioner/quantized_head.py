"""The edge head, quantized: 8-bit layers on real int8 kernels, narrower layers stored bit-packed.

Execution path: ONNX Runtime, QOperator format (``QLinearConv`` / ``QLinearMatMul`` with uint8
activations and per-channel int8 weights, VNNI kernels on x86). The README section "Quantized head
execution" has the measurements behind the choice against torch's FX int8 and torchao's PT2E.

Build steps (:func:`build_quantized_head`):

1. copy the head and fold BatchNorm into the convolutions (what the edge really computes);
2. layers at 2-6 bits: per-output-channel ACIQ clipping, affine codes, ACIQ bias correction; the
   codes are bit-packed (:mod:`compressor.bitpack`) and the float weights rebuilt from them, so
   the exported graph computes exactly what the packed artifact will;
3. export to ONNX and quantize statically on the calibration inputs; layers at 8 bits become
   int8 operators, the others stay float (their weights are the dequantized codes);
4. the artifact keeps the int8 ONNX graph *without* the sub-8-bit initializers, plus their packed
   codes, per-channel scale and offset; :meth:`QuantizedHead.load` unpacks them back in.

The artifact is a ``torch.save`` of plain tensors, ints and strings, read back with
``weights_only=True``; nothing in it is executable Python, and the graph inside is an ONNX protobuf.
"""

from __future__ import annotations

import copy
import io
import logging
import os
import re
import tempfile
import threading
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import fx, nn

from compressor.aciq import bias_correction_terms
from compressor.bitpack import BIT_WIDTHS, pack, unpack
from compressor.clipping import clip_range
from compressor.quant import dequantize, quantize

from .loaded import LoadedModel
from .profile import median_ms

__all__ = [
    "FLOAT_BITS",
    "PackedWeight",
    "QuantizedHead",
    "build_quantized_head",
    "fake_quantize_weight",
    "head_layers",
    "measure_speedups",
]

FORMAT = "cleave.quantized_head/1"
FLOAT_BITS = 32  # a layer at 32 "bits" stays float32
LAYER_TYPES = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)


def head_layers(module: nn.Module) -> dict[str, nn.Module]:
    """The convolution and linear layers an fx module calls, by qualified name, in call order
    (the layers whose weights bit allocation and quantization act on)."""
    if not isinstance(module, fx.GraphModule):
        return {name: m for name, m in module.named_modules() if isinstance(m, LAYER_TYPES)}
    out: dict[str, nn.Module] = {}
    for node in module.graph.nodes:
        if node.op == "call_module":
            m = module.get_submodule(node.target)
            if isinstance(m, LAYER_TYPES):
                out.setdefault(str(node.target), m)
    return out


#: Convolutions and linears called as functions (``torch.conv2d`` in a Conv2d subclass's ``forward``, as the
#: pretrained Lite0's package does): the tracer goes through such a module, and its weight is a plain
#: attribute read, so :func:`head_layers` (and bit allocation) cannot see it.
FUNCTIONAL_LAYERS = frozenset(
    (
        torch.conv1d,
        torch.conv2d,
        torch.conv3d,
        nn.functional.conv1d,
        nn.functional.conv2d,
        nn.functional.conv3d,
        nn.functional.linear,
    )
)


def functional_layers(module: fx.GraphModule) -> list[str]:
    """The nodes of ``module``'s graph that call a convolution or linear as a function, in order."""
    return [node.name for node in module.graph.nodes if node.op == "call_function" and node.target in FUNCTIONAL_LAYERS]


@dataclass
class PackedWeight:
    """A weight at 2-8 bits: bit-packed affine codes per output channel, plus a per-channel
    ``(scale, offset)`` that folds in ACIQ's bias correction: ``w = (q - zero_point) * scale + offset``."""

    codes: bytes
    shape: tuple[int, ...]
    bits: int
    scale: torch.Tensor
    zero_point: torch.Tensor
    offset: torch.Tensor

    @classmethod
    def from_float(
        cls, w: torch.Tensor, bits: int, *, clip: str = "aciq", bias_correction: bool = True
    ) -> PackedWeight:
        """Quantize ``w`` per output channel (axis 0) at ``bits``."""
        w = w.detach().float()
        lo, hi = clip_range(w, clip, 0, bits)
        q, scale, zp = quantize(w, bits, lo, hi, 0)
        deq = dequantize(q, scale, zp, 0)
        if bias_correction:
            gain, offset = bias_correction_terms(w, deq, 0)
        else:
            gain, offset = torch.ones(w.shape[0], dtype=torch.float64), torch.zeros(w.shape[0], dtype=torch.float64)
        return cls(
            codes=pack(q.numpy().reshape(-1), bits),
            shape=tuple(w.shape),
            bits=bits,
            scale=(scale.double() * gain).float(),
            zero_point=zp,
            offset=offset.float(),
        )

    def dequantize(self) -> torch.Tensor:
        """The float32 weight the packed codes stand for."""
        count = int(np.prod(self.shape))
        q = torch.from_numpy(unpack(self.codes, self.bits, count)).reshape(self.shape)
        view = (-1,) + (1,) * (len(self.shape) - 1)
        w = (q.float() - self.zero_point.float().reshape(view)) * self.scale.reshape(view)
        return w + self.offset.reshape(view)

    @property
    def nbytes(self) -> int:
        """Bytes of codes and per-channel parameters."""
        return len(self.codes) + 12 * self.shape[0]


def fake_quantize_weight(w: torch.Tensor, bits: int, *, bias_correction: bool = True) -> torch.Tensor:
    """``w`` as the quantized head will compute with it: per-channel min-max int8 at 8 bits (ONNX
    Runtime's symmetric int8 is close to it), ACIQ + bias correction below, unchanged at 32."""
    if bits >= FLOAT_BITS:
        return w
    if bits == 8:
        lo, hi = clip_range(w.detach().float(), "minmax", 0, 8)
        return dequantize(*quantize(w.detach().float(), 8, lo, hi, 0), 0)
    return PackedWeight.from_float(w, bits, bias_correction=bias_correction).dequantize()


class QuantizedHead:
    """A quantized head, callable like the float one: ``head(x)`` returns the tuple of live tensors
    (float32). Build with :func:`build_quantized_head`; persist with :meth:`save` / :meth:`load`."""

    def __init__(
        self,
        onnx_model: bytes,
        packed: Mapping[str, PackedWeight],
        weight_bits: Mapping[str, int],
        outputs: int,
        *,
        threads: int | None = None,
    ) -> None:
        self._onnx = onnx_model
        self.packed = dict(packed)
        self.weight_bits = dict(weight_bits)
        self.outputs = outputs
        self._bytes: bytes | None = None
        self._session = _session(onnx_model, self.packed, threads)

    def __call__(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        outs = self._session.run(None, {"x": x.detach().to("cpu", torch.float32).contiguous().numpy()})
        return tuple(torch.from_numpy(o) for o in outs)

    def to_bytes(self) -> bytes:
        """The artifact (see the module docstring), as :meth:`save` writes it."""
        if self._bytes is None:
            state = {
                "format": FORMAT,
                "onnx": torch.frombuffer(bytearray(self._onnx), dtype=torch.uint8),
                "outputs": self.outputs,
                "weight_bits": dict(self.weight_bits),
                "packed": {
                    name: {
                        "codes": torch.frombuffer(bytearray(p.codes), dtype=torch.uint8)
                        if p.codes
                        else torch.zeros(0, dtype=torch.uint8),
                        "shape": list(p.shape),
                        "bits": p.bits,
                        "scale": p.scale,
                        "zero_point": p.zero_point,
                        "offset": p.offset,
                    }
                    for name, p in self.packed.items()
                },
            }
            buf = io.BytesIO()
            torch.save(state, buf)
            self._bytes = buf.getvalue()
        return self._bytes

    @property
    def onnx_bytes(self) -> bytes:
        """The ONNX graph ONNX Runtime runs (without the sub-8-bit weights, which travel packed)."""
        if self.packed:
            raise ValueError("onnx_bytes: this head has packed sub-8-bit layers; its graph alone is incomplete")
        return self._onnx

    @property
    def op_types(self) -> dict[str, int]:
        """How many nodes of each ONNX op type the graph has (``QLinearConv`` are the int8 convolutions)."""
        import onnx

        counts: dict[str, int] = {}
        for node in onnx.load_from_string(self._onnx).graph.node:
            counts[node.op_type] = counts.get(node.op_type, 0) + 1
        return counts

    @property
    def nbytes_on_disk(self) -> int:
        """Size of the saved artifact in bytes."""
        return len(self.to_bytes())

    def save(self, path: str | os.PathLike[str]) -> Path:
        """Write the artifact to ``path`` (atomically) and return the path."""
        path = Path(path)
        tmp = path.with_name(path.name + f".tmp{os.getpid()}")
        tmp.write_bytes(self.to_bytes())
        os.replace(tmp, path)
        return path

    @classmethod
    def load(cls, source: str | os.PathLike[str] | bytes, *, threads: int | None = None) -> QuantizedHead:
        """Read an artifact written by :meth:`save` (``weights_only=True``: no code is unpickled).

        Raises:
            ValueError: the file is not a quantized-head artifact.
        """
        data = source if isinstance(source, bytes) else Path(source).read_bytes()
        state = torch.load(io.BytesIO(data), weights_only=True)
        if not isinstance(state, dict) or state.get("format") != FORMAT:
            raise ValueError(f"not a {FORMAT} artifact")
        packed = {
            name: PackedWeight(
                codes=p["codes"].numpy().tobytes(),
                shape=tuple(int(d) for d in p["shape"]),
                bits=int(p["bits"]),
                scale=p["scale"],
                zero_point=p["zero_point"],
                offset=p["offset"],
            )
            for name, p in state["packed"].items()
        }
        head = cls(
            state["onnx"].numpy().tobytes(), packed, state["weight_bits"], int(state["outputs"]), threads=threads
        )
        head._bytes = data
        return head


def build_quantized_head(
    head: fx.GraphModule,
    calib_inputs: torch.Tensor | Sequence[torch.Tensor],
    weight_bits: Mapping[str, int] | None = None,
    *,
    default_bits: int = 8,
    bias_correction: bool = True,
    threads: int | None = None,
) -> QuantizedHead:
    """Quantize a head (from :meth:`ModelGraph.split`) for the edge.

    Args:
        head: the float head; it is copied, never modified.
        calib_inputs: a batch (or a sequence of batches) of representative inputs, for the int8
            activation ranges.
        weight_bits: bits per layer name (see :func:`head_layers`): 8 runs int8, 2-6 are stored
            packed and run in float, 32 stays float. Layers not named get ``default_bits``.
        bias_correction: apply ACIQ bias correction to sub-8-bit weights.
        threads: ONNX Runtime intra-op threads (default: ``torch.get_num_threads()``).
    """
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

    gm = _fold_batchnorm(head)
    layers = head_layers(gm)
    bits = {name: int((weight_bits or {}).get(name, default_bits)) for name in layers}
    unknown = set(weight_bits or {}) - set(layers)
    if unknown:
        raise ValueError(f"weight_bits: {sorted(unknown)} are not layers of the head (layers: {list(layers)})")
    for name, b in bits.items():
        if b != FLOAT_BITS and b not in BIT_WIDTHS:
            raise ValueError(f"weight_bits[{name!r}]: {b} is not one of {BIT_WIDTHS} or {FLOAT_BITS}")
    packed: dict[str, PackedWeight] = {}
    with torch.no_grad():
        for name, b in bits.items():
            if b < 8:
                packed[name] = PackedWeight.from_float(layers[name].weight, b, bias_correction=bias_correction)
                layers[name].weight.copy_(packed[name].dequantize())

    batches = [calib_inputs] if isinstance(calib_inputs, torch.Tensor) else list(calib_inputs)
    example = batches[0][:1]
    with torch.no_grad():
        outputs = len(gm(example))
    float_model = _export_onnx(gm, example, outputs)

    class _Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self._it = iter([{"x": b[i : i + 16].float().numpy()} for b in batches for i in range(0, len(b), 16)])

        def get_next(self) -> dict[str, np.ndarray] | None:
            return next(self._it, None)

    import onnx

    model = onnx.load_from_string(float_model)
    weight_of = {f"{name}.weight": name for name in layers}
    exclude = [n.name for n in model.graph.node if any(bits.get(weight_of.get(i, ""), 8) != 8 for i in n.input)]
    with tempfile.TemporaryDirectory(prefix="cleave-qhead-") as tmp:
        src, dst = Path(tmp) / "float.onnx", Path(tmp) / "int8.onnx"
        src.write_bytes(float_model)
        root = logging.getLogger()
        root.addFilter(_quiet_quantizer_noise)
        try:
            quantize_static(
                str(src),
                str(dst),
                _Reader(),
                quant_format=QuantFormat.QOperator,
                per_channel=True,
                activation_type=QuantType.QUInt8,
                weight_type=QuantType.QInt8,
                # 7-bit weights: x86 CPUs without VNNI run U8S8 through VPMADDUBSW, whose int16 pair
                # sums saturate for 8-bit weights (255*127*2 > 32767) and cost real accuracy there
                # (cosine 0.99 on a non-VNNI CI machine). 255*64*2 fits: the head is exact on any CPU.
                reduce_range=True,
                nodes_to_exclude=exclude,
            )
        finally:
            root.removeFilter(_quiet_quantizer_noise)
        quantized = onnx.load(str(dst))
    # Sub-8-bit weights travel packed: drop their float copies from the graph.
    keep = [init for init in quantized.graph.initializer if weight_of.get(init.name) not in packed]
    del quantized.graph.initializer[:]
    quantized.graph.initializer.extend(keep)
    return QuantizedHead(quantized.SerializeToString(), packed, bits, outputs, threads=threads)


def measure_speedups(
    model: LoadedModel, calib: torch.Tensor, cut_indices: Sequence[int], repeats: int = 15
) -> dict[int, float]:
    """Float head time over int8 head time at batch 1, at each of ``cut_indices``.

    What the planner needs to put the quantized head's E(k) into its search over cuts
    (:meth:`~partitioner.costmodel.CostModel.with_quantized_heads`): summing per-layer estimates
    would miss ONNX Runtime's fusions and the quantize/dequantize at the head's edges.
    """
    x = calib[:1]
    out = {}
    for index in cut_indices:
        _, head, _ = model.parts(index)
        quantized = build_quantized_head(head, calib)
        with torch.inference_mode():
            out[index] = median_ms(lambda h=head: h(x), repeats, 2) / median_ms(lambda q=quantized: q(x), repeats, 2)
    return out


#: What onnxruntime's quantizer logs on the root logger that says nothing to a user: its advisory to
#: pre-process (the export above already produces a shape-inferred graph), and one multi-line warning
#: per tensor of a known non-float type (shape arithmetic: int64), which it rightly leaves alone (250
#: for Lite0's bundle). A tensor whose type is unknown (elem_type 0) still warns.
_QUANTIZER_NOISE = re.compile(
    r"pre-process|Inference failed or unsupported type to quantize for tensor .*elem_type: [1-9]", re.DOTALL
)


def _quiet_quantizer_noise(record: logging.LogRecord) -> bool:
    return _QUANTIZER_NOISE.search(record.getMessage()) is None


def _fold_batchnorm(head: fx.GraphModule) -> fx.GraphModule:
    from torch.fx.experimental.optimization import fuse

    gm = copy.deepcopy(head).eval()
    return fuse(gm, inplace=True)


# torch.onnx.export keeps process-wide state (and warnings.catch_warnings swaps a global): two threads
# exporting at once fail inside torch ("CURRENT_PATCHER is None"). One export at a time.
_EXPORT_LOCK = threading.Lock()


def _export_onnx(gm: nn.Module, example: torch.Tensor, outputs: int) -> bytes:
    names = [f"y{i}" for i in range(outputs)]
    axes = {name: {0: "batch"} for name in ["x", *names]}
    buf = io.BytesIO()
    with _EXPORT_LOCK, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        # The TorchScript-based exporter: fast (no dynamo), and it keeps parameter names as
        # initializer names, which is how sub-8-bit layers are found in the ONNX graph.
        torch.onnx.export(
            gm,
            (example,),
            buf,
            dynamo=False,
            opset_version=17,
            input_names=["x"],
            output_names=names,
            dynamic_axes=axes,
        )
    return _undo_initializer_dedup(buf.getvalue())


def _undo_initializer_dedup(onnx_model: bytes) -> bytes:
    """Give every ``Identity(initializer)`` output its own copy of the initializer.

    The exporter shares identical constants through Identity nodes; with untrained BatchNorm every
    folded conv bias is the same zero vector, and ONNX Runtime's quantizer then finds no bias
    initializer for those convs and fails.
    """
    import onnx

    model = onnx.load_from_string(onnx_model)
    inits = {i.name: i for i in model.graph.initializer}
    shared = [n for n in model.graph.node if n.op_type == "Identity" and n.input[0] in inits]
    for node in shared:
        copy_ = onnx.TensorProto()
        copy_.CopyFrom(inits[node.input[0]])
        copy_.name = node.output[0]
        model.graph.initializer.append(copy_)
        model.graph.node.remove(node)
    return model.SerializeToString()


def _session(onnx_model: bytes, packed: Mapping[str, PackedWeight], threads: int | None):  # -> InferenceSession
    import onnx
    import onnxruntime as ort
    from onnx import numpy_helper

    if packed:
        model = onnx.load_from_string(onnx_model)
        for name, p in packed.items():
            model.graph.initializer.append(numpy_helper.from_array(p.dequantize().numpy(), f"{name}.weight"))
        onnx_model = model.SerializeToString()
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads or torch.get_num_threads()
    options.inter_op_num_threads = 1
    options.log_severity_level = 3
    return ort.InferenceSession(onnx_model, options, providers=["CPUExecutionProvider"])
