"""Auto-Split style bit allocation for one cut: per-layer weight bits for the head and the
feature bit-width, under an edge memory budget and a distortion budget.

1. **Sensitivity** (measured, cached per model and calibration set): the output distortion when a
   single layer's weights are quantized to ``b`` bits and everything else stays float; and, per cut,
   the distortion when only the live features are quantized to ``b`` bits. Distortion is the
   relative squared error of the model's output (:func:`partitioner.calibration.output_distortion`).
   A layer's sensitivity does not depend on the cut, so one table serves every cut of a model.
2. **Greedy search** on the additive model ``D = sum_l D_l(b_l) + D_f(b_f)`` (the usual first-order
   assumption of HAWQ / Auto-Split): start with every layer and the features at their widest; first
   lower weights until the head fits the memory budget (cheapest distortion per byte saved first),
   then keep lowering whatever saves the most bytes per unit of added distortion (head bytes plus
   ``feature_weight`` times feature bytes: the transfer is the latency proxy) while the predicted
   distortion stays within budget.
3. **Check**: the chosen configuration is measured for real; while it exceeds the budget, the last
   optional step is undone. An allocation whose memory phase alone breaks the budget is returned
   with ``feasible=False`` so a planner can skip the cut.
"""

from __future__ import annotations

import hashlib
import math
import threading
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import nn
from torch.func import functional_call

from partitioner.calibration import output_distortion, quantize_features
from partitioner.graph import Cut, ModelGraph
from partitioner.loaded import LoadedModel
from partitioner.quantized_head import FLOAT_BITS, fake_quantize_weight, head_layers

__all__ = ["BitAllocation", "allocate_bits", "layer_sensitivity"]

_CACHE: dict[tuple, dict[str, dict[int, float]]] = {}
_CACHE_LOCK = threading.Lock()


@dataclass
class BitAllocation:
    """The bits chosen for one cut, what they cost and what they do to the output.

    Attributes:
        cut: the cut's name.
        weight_bits: bits per head layer (see :func:`partitioner.quantized_head.head_layers`).
        feature_bits: width of the live features on the wire.
        head_bytes: weight storage of the head at these widths (other parameters at float32).
        feature_bytes: bytes of the live features per sample at ``feature_bits``.
        distortion: measured relative squared output error on the calibration inputs.
        predicted_distortion: the additive model's estimate.
        feasible: both budgets are met.
        steps: the greedy moves taken, in order, as ``(what, new_bits)``.
    """

    cut: str
    weight_bits: dict[str, int]
    feature_bits: int
    head_bytes: int
    feature_bytes: int
    distortion: float
    predicted_distortion: float
    feasible: bool
    steps: list[tuple[str, int]] = field(default_factory=list)


def _digest(x: torch.Tensor) -> str:
    return hashlib.sha256(x.detach().contiguous().cpu().numpy().tobytes()).hexdigest()[:16] + str(tuple(x.shape))


def layer_sensitivity(
    model: LoadedModel | ModelGraph, calib_inputs: torch.Tensor, weight_bits: Sequence[int] = (8, 6, 4, 2)
) -> dict[str, dict[int, float]]:
    """Output distortion of quantizing each conv / linear layer alone, per width: ``{layer: {bits: D}}``.

    Cached per (model, calibration inputs, widths); the model key is the fingerprint of a
    :class:`LoadedModel`, else the graph's identity.
    """
    graph = model.graph if isinstance(model, LoadedModel) else model
    ident = model.fingerprint if isinstance(model, LoadedModel) else id(graph.module)
    key = (ident, _digest(calib_inputs), tuple(sorted(weight_bits)))
    with _CACHE_LOCK:
        if key in _CACHE:
            return _CACHE[key]
    module = graph.module
    with torch.no_grad():
        reference = module(calib_inputs)
        table: dict[str, dict[int, float]] = {}
        for name, layer in head_layers(module).items():
            table[name] = {FLOAT_BITS: 0.0}
            for b in weight_bits:
                w = fake_quantize_weight(layer.weight, b)
                table[name][b] = output_distortion(
                    reference, functional_call(module, {f"{name}.weight": w}, (calib_inputs,))
                )
    with _CACHE_LOCK:
        _CACHE[key] = table
    return table


def _layer_bytes(layer: nn.Module, bits: int) -> int:
    """Weight bytes at ``bits`` (with per-channel scale/zero point/offset below float)."""
    n = layer.weight.numel()
    if bits >= FLOAT_BITS:
        return 4 * n
    return math.ceil(n * bits / 8) + 12 * layer.weight.shape[0]


def allocate_bits(
    model: LoadedModel | ModelGraph,
    cut: int | str | Cut,
    calib_inputs: torch.Tensor,
    memory_budget_bytes: int,
    max_distortion: float,
    weight_bits: Sequence[int] = (8, 6, 4, 2),
    feature_bits: Sequence[int] = (8, 6, 4, 3, 2),
    *,
    feature_clip: str = "aciq",
    feature_weight: float = 1.0,
) -> BitAllocation:
    """Choose per-layer weight bits for the head of ``cut`` and the feature width (see module docstring).

    Args:
        model: the traced model (a :class:`LoadedModel` caches by fingerprint).
        cut: index, name or :class:`Cut`.
        calib_inputs: a calibration batch.
        memory_budget_bytes: bound on the head's weight storage.
        max_distortion: bound on the relative squared output error.
        weight_bits, feature_bits: the widths to choose from.
        feature_clip: the codec clipper used for features.
        feature_weight: how many head bytes one feature byte is worth (latency proxy weight).
    """
    graph = model.graph if isinstance(model, LoadedModel) else model
    cut = graph.cut(cut)
    head, tail = graph.split(cut)
    layers = head_layers(head)
    wbits = sorted(set(weight_bits), reverse=True)
    fbits = sorted(set(feature_bits), reverse=True)
    sens = layer_sensitivity(model, calib_inputs, wbits)
    layer_set = set(layers)
    other_bytes = 4 * sum(p.numel() for n, p in head.named_parameters() if n.rsplit(".", 1)[0] not in layer_set)
    other_bytes += 4 * sum(
        p.numel() for n, p in head.named_parameters() if n.endswith(".bias") and n.rsplit(".", 1)[0] in layer_set
    )
    per_sample = sum(math.prod(s[1:]) if len(s) > 1 else 1 for s in cut.shapes)

    with torch.no_grad():
        features = list(head(calib_inputs))
        reference = tail(*features)
        fsens = {b: output_distortion(reference, tail(*quantize_features(features, b, feature_clip))) for b in fbits}

    bits = {name: wbits[0] for name in layers}
    fb = fbits[0]

    def head_bytes(cfg: dict[str, int]) -> int:
        return other_bytes + sum(_layer_bytes(layers[n], b) for n, b in cfg.items())

    def predicted(cfg: dict[str, int], f: int) -> float:
        return sum(sens[n][b] for n, b in cfg.items()) + fsens[f]

    def moves(weights_only: bool) -> list[tuple[float, str, int, float]]:
        """(distortion added per byte saved, what, new bits, distortion added) for every one-step lowering."""
        out = []
        for n, b in bits.items():
            lower = [c for c in wbits if c < b]
            if lower:
                saved = _layer_bytes(layers[n], b) - _layer_bytes(layers[n], lower[0])
                added = max(sens[n][lower[0]] - sens[n][b], 0.0)
                out.append((added / max(saved, 1), n, lower[0], added))
        if not weights_only:
            lower = [c for c in fbits if c < fb]
            if lower:
                saved = feature_weight * per_sample * (fb - lower[0]) / 8
                added = max(fsens[lower[0]] - fsens[fb], 0.0)
                out.append((added / max(saved, 1e-9), "features", lower[0], added))
        return sorted(out, key=lambda m: m[0])

    steps: list[tuple[str, int]] = []
    while head_bytes(bits) > memory_budget_bytes:
        options = moves(weights_only=True)
        if not options:
            break
        _, what, b, _ = options[0]
        bits[what] = b
        steps.append((what, b))
    forced = len(steps)
    while True:
        current = predicted(bits, fb)
        options = [m for m in moves(weights_only=False) if current + m[3] <= max_distortion]
        if not options:
            break
        _, what, b, _ = options[0]
        if what == "features":
            fb = b
        else:
            bits[what] = b
        steps.append((what, b))

    def measure() -> float:
        with torch.no_grad():
            swapped = {
                f"{n}.weight": fake_quantize_weight(layers[n].weight, b) for n, b in bits.items() if b < FLOAT_BITS
            }
            feats = list(functional_call(head, swapped, (calib_inputs,))) if swapped else features
            return output_distortion(reference, tail(*quantize_features(feats, fb, feature_clip)))

    measured = measure()
    while measured > max_distortion and len(steps) > forced:
        what, _ = steps.pop()
        previous = [b for w, b in steps if w == what]
        if what == "features":
            fb = previous[-1] if previous else fbits[0]
        else:
            bits[what] = previous[-1] if previous else wbits[0]
        measured = measure()
    hb = head_bytes(bits)
    return BitAllocation(
        cut=cut.name,
        weight_bits=dict(bits),
        feature_bits=fb,
        head_bytes=hb,
        feature_bytes=math.ceil(per_sample * fb / 8),
        distortion=measured,
        predicted_distortion=predicted(bits, fb),
        feasible=hb <= memory_budget_bytes and measured <= max_distortion,
        steps=steps,
    )
