"""Post-training weight quantization: each conv/linear weight on a low-bit affine grid.

Ranges come from the codec's clipping registry (:func:`compressor.clipping.clip_range`), so any
registered estimator works by name: ``"minmax"``, ``"percentile"``, and ``"aciq"`` once the
quantization work registers it. The result is (a) the model with weights replaced by their
dequantized values, for evaluation, and (b) a packed artifact (bit-packed codes, scales and zero
points as a safetensors state dict) whose size is what the quantized model costs on disk.

Int8 *execution* (kernels that run on the codes) is chosen by the quantization work; it plugs in
through :func:`register_int8_backend` and :func:`int8_backend`, which this engine leaves unused
until one is registered.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from compressor.bitpack import BIT_WIDTHS, pack
from compressor.clipping import check_params, clip_range
from compressor.offline.lapq import LapqResult, clip_bounds, lapq, lp_clip, quantize_clipped
from compressor.quant import dequantize, quantize

Int8Converter = Callable[[nn.Module, torch.Tensor], nn.Module]
_INT8_BACKEND: Int8Converter | None = None


def register_int8_backend(convert: Int8Converter) -> None:
    """Hook for int8 execution: ``convert(model, example_input)`` returns a module on int8 kernels.

    The example input calibrates activation ranges. The cloud daemon registers the ONNX Runtime
    path of :mod:`partitioner.quantized_head` (compressor cannot import partitioner itself).
    """
    global _INT8_BACKEND
    _INT8_BACKEND = convert


def int8_backend() -> Int8Converter | None:
    """The registered int8 converter, or None while none is registered."""
    return _INT8_BACKEND


@dataclass
class PtqConfig:
    """Weight quantization settings.

    Attributes:
        bits: code width (2, 3, 4, 5, 6 or 8).
        clip: a registered clipping method name.
        per_channel: one range per output channel (axis 0) instead of one per tensor.
    """

    bits: int = 8
    clip: str = "minmax"
    per_channel: bool = True

    def validate(self) -> None:
        if self.bits not in BIT_WIDTHS:
            raise ValueError(f"bits: {self.bits} is not one of {', '.join(map(str, BIT_WIDTHS))}")
        try:
            check_params(self.clip, {})
        except ValueError as exc:
            raise ValueError(f"clip: {exc}") from None


def _quantizable(model: nn.Module) -> list[tuple[str, nn.Parameter]]:
    return [
        (n, w) for n, w in model.named_parameters() if n.endswith("weight") and w.ndim >= 2 and w.is_floating_point()
    ]


def lapq_weight_clips(
    model: nn.Module, calib: torch.Tensor, bits: int, max_evals: int = 200, max_seconds: float = 60.0
) -> tuple[dict[str, float], LapqResult]:
    """LAPQ (Nahshan et al.) for weights: one per-tensor clipping value per layer, Lp-initialised and
    optimised jointly with Powell on the KL divergence of the model's output on ``calib`` from the
    float output. The model is left as it was. Returns ``(name -> clip, the optimiser's result)``.
    """
    layers = _quantizable(model)
    originals = [w.detach().clone() for _, w in layers]
    with torch.no_grad():
        reference = F.log_softmax(_logits(model(calib)), -1)

    def loss(clips: np.ndarray) -> float:
        with torch.no_grad():
            for (_, w), original, alpha in zip(layers, originals, clips, strict=True):
                w.copy_(quantize_clipped(original, bits, float(alpha)))
            out = F.log_softmax(_logits(model(calib)), -1)
            return float(F.kl_div(out, reference, log_target=True, reduction="batchmean"))

    try:
        result = lapq(
            loss,
            lambda p: np.array([lp_clip(o, bits, p) for o in originals]),
            max_evals=max_evals,
            max_seconds=max_seconds,
        )
    finally:
        with torch.no_grad():
            for (_, w), original in zip(layers, originals, strict=True):
                w.copy_(original)
    return {name: float(c) for (name, _), c in zip(layers, result.clips, strict=True)}, result


def _logits(out: object) -> torch.Tensor:
    return out if isinstance(out, torch.Tensor) else out[0]


def quantize_weights(
    model: nn.Module, config: PtqConfig, clips: dict[str, float] | None = None
) -> dict[str, torch.Tensor]:
    """Quantize every weight matrix / kernel (``*.weight`` with 2+ dims) of ``model`` in place
    (fake-quant: values on the grid). Works on plain, TorchScript and ``torch.export`` modules alike.
    ``clips`` (from :func:`lapq_weight_clips`) fixes a per-tensor clipping value for the layers it
    names, instead of ``config.clip``.

    Returns the packed state dict: ``<name>.qweight`` (uint8 bit-packed codes), ``.scales``,
    ``.zero_points`` and ``.shape`` per quantized weight, and every other tensor as is.
    """
    config.validate()
    packed: dict[str, torch.Tensor] = {}
    quantized = set()
    axis = 0 if config.per_channel else None
    for name, w in _quantizable(model):
        layer_axis = axis
        if clips is not None and name in clips:
            layer_axis = None  # LAPQ clips per tensor
            lo, hi = clip_bounds(w.detach(), clips[name])
        else:
            lo, hi = clip_range(w.detach(), config.clip, axis, config.bits)
        q, scales, zps = quantize(w.detach(), config.bits, lo, hi, layer_axis)
        with torch.no_grad():
            w.copy_(dequantize(q, scales, zps, layer_axis).to(w.dtype))
        quantized.add(name)
        codes = pack(q.reshape(-1).numpy(), config.bits)
        packed[f"{name}.qweight"] = torch.from_numpy(np.frombuffer(codes, dtype=np.uint8).copy())
        packed[f"{name}.scales"] = scales.reshape(-1).contiguous()
        packed[f"{name}.zero_points"] = zps.reshape(-1).contiguous()
        packed[f"{name}.shape"] = torch.tensor(list(w.shape), dtype=torch.int64)
    for name, value in model.state_dict().items():
        if name not in quantized and isinstance(value, torch.Tensor):
            packed[name] = value.detach().clone().contiguous()
    return packed
