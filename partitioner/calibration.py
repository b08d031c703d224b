"""Calibration losses of a split model, for LAPQ (:func:`compressor.offline.lapq.lapq`) and bit allocation.

:class:`SplitLoss` turns "clipping values" into "how much worse is the quantized split than the
float model on the calibration inputs": one clipping value per live feature tensor, plus one per
head layer whose weights are quantized per tensor. Label-free by default (KL divergence of the
quantized output's softmax from the float output's), cross-entropy when labels are given.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from compressor.clipping import clip_range
from compressor.offline.lapq import LapqResult, lapq, lp_clip, quantize_clipped
from compressor.quant import dequantize, quantize

__all__ = ["SplitLoss", "lapq_split", "output_distortion", "quantize_features"]


def output_distortion(reference: torch.Tensor, output: torch.Tensor) -> float:
    """Relative squared error ``||output - reference||^2 / ||reference||^2`` (scale-free)."""
    ref = reference.detach().double()
    return float((output.detach().double() - ref).pow(2).sum() / ref.pow(2).sum().clamp(min=1e-30))


def quantize_features(
    features: Sequence[torch.Tensor], bits: int, clip: str = "aciq", per_channel: bool = False, **params: object
) -> list[torch.Tensor]:
    """Each feature through the codec's affine quantization (clip ``clip``), back to float."""
    out = []
    for f in features:
        axis = 1 if per_channel and f.dim() > 1 else None
        lo, hi = clip_range(f, clip, axis, bits, **params)
        out.append(dequantize(*quantize(f, bits, lo, hi, axis), axis))
    return out


class SplitLoss:
    """Calibration loss of ``tail(*Q(head_Q(x)))`` as a function of clipping values.

    Args:
        head, tail: the split (from :meth:`ModelGraph.split`); ``head`` may be any callable returning
            the live tensors (a :class:`~partitioner.quantized_head.QuantizedHead`, say) when no
            ``weight_bits`` are given.
        calib_inputs: the calibration batch.
        feature_bits: width of the live features (per-tensor affine, one clipping value each).
        labels: when given, the loss is cross-entropy against them; otherwise KL from the float output.
        weight_bits: head layers whose weights are also quantized (per tensor, symmetric, one
            clipping value each), by name, at the given widths; layers at 32 bits are left alone.
    """

    def __init__(
        self,
        head: nn.Module | Callable[[torch.Tensor], Sequence[torch.Tensor]],
        tail: nn.Module,
        calib_inputs: torch.Tensor,
        feature_bits: int,
        *,
        labels: torch.Tensor | None = None,
        weight_bits: Mapping[str, int] | None = None,
    ) -> None:
        self.head, self.tail = head, tail
        self.x = calib_inputs
        self.feature_bits = feature_bits
        self.labels = labels
        self.weight_bits = {k: v for k, v in (weight_bits or {}).items() if v < 32}
        params = dict(head.named_parameters()) if self.weight_bits else {}
        self._weights = {name: params[f"{name}.weight"].detach() for name in self.weight_bits}
        with torch.no_grad():
            self.features = list(head(calib_inputs))
            self.reference = tail(*self.features)
        self.names = [f"feature:{i}" for i in range(len(self.features))] + [f"weight:{n}" for n in self.weight_bits]

    def init(self, p: float) -> np.ndarray:
        """Lp-optimal clipping value of every tensor (features at ``feature_bits``, weights at theirs)."""
        values = [lp_clip(f, self.feature_bits, p) for f in self.features]
        values += [lp_clip(self._weights[n], b, p) for n, b in self.weight_bits.items()]
        return np.array(values, dtype=np.float64)

    def output(self, clips: Sequence[float]) -> torch.Tensor:
        """The quantized split's output at these clipping values."""
        k = len(self.features)
        with torch.no_grad():
            if self.weight_bits:
                swapped = {
                    f"{n}.weight": quantize_clipped(self._weights[n], b, float(c))
                    for (n, b), c in zip(self.weight_bits.items(), clips[k:], strict=True)
                }
                features = list(functional_call(self.head, swapped, (self.x,)))
            else:
                features = self.features
            quantized = [
                quantize_clipped(f, self.feature_bits, float(c)) for f, c in zip(features, clips[:k], strict=True)
            ]
            return self.tail(*quantized)

    def __call__(self, clips: Sequence[float]) -> float:
        out = self.output(clips)
        if self.labels is not None:
            return float(F.cross_entropy(out, self.labels))
        return float(
            F.kl_div(F.log_softmax(out, 1), F.log_softmax(self.reference, 1), log_target=True, reduction="batchmean")
        )


def lapq_split(loss: SplitLoss, *, max_evals: int = 200, max_seconds: float = 60.0, powell: bool = True) -> LapqResult:
    """:func:`compressor.offline.lapq.lapq` on a split's calibration loss."""
    return lapq(loss, loss.init, max_evals=max_evals, max_seconds=max_seconds, powell=powell)
