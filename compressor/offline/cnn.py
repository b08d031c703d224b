"""Structured channel pruning for CNNs on Torch-Pruning's dependency graph (DepGraph).

Torch-Pruning finds which layers are coupled (a residual add ties the channels of every conv that
feeds it; a concat offsets indices; depthwise and grouped convs tie input to output channels), so
this module is only the strategy around it: which importance, which ratio per layer, what to leave
alone, and the :class:`~.plan.PruningPlan` that replays the result.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn

from .plan import PruningPlan, state_digest, steps_from_history

IMPORTANCES = ("l1", "l2", "bn_scale")

Progress = Callable[[float, str], None]


@dataclass
class CnnPruneConfig:
    """How to prune.

    Attributes:
        ratio: fraction of channels to remove from each prunable group (0 <= ratio < 1).
        global_pruning: rank channels across all layers instead of within each layer.
        layer_ratios: per-module ratios overriding ``ratio`` (module name -> ratio).
        ignored_layers: module names left untouched (their output channels keep their size).
        prune_classifier: allow pruning the layer that produces the model output (off: its
            output size is the number of classes, which must not change).
        round_to: keep channel counts a multiple of this (hardware-friendly); 0 or 1 for none.
        importance: ``"l1"`` (Li et al. 2016), ``"l2"`` or ``"bn_scale"`` (|gamma| of the BatchNorm).
    """

    ratio: float = 0.5
    global_pruning: bool = False
    layer_ratios: dict[str, float] = field(default_factory=dict)
    ignored_layers: list[str] = field(default_factory=list)
    prune_classifier: bool = False
    round_to: int = 0
    importance: str = "l1"

    def validate(self, model: nn.Module | None = None) -> None:
        """ValueError naming the field that is wrong."""
        if not 0.0 <= self.ratio < 1.0:
            raise ValueError(f"ratio: {self.ratio} is not in [0, 1)")
        if self.importance not in IMPORTANCES:
            raise ValueError(f"importance: {self.importance!r} is not one of {', '.join(IMPORTANCES)}")
        if self.round_to < 0:
            raise ValueError(f"round_to: {self.round_to} is negative")
        for name, r in self.layer_ratios.items():
            if not 0.0 <= r < 1.0:
                raise ValueError(f"layer_ratios[{name!r}]: {r} is not in [0, 1)")
        if model is not None:
            names = dict(model.named_modules())
            for key, group in (("layer_ratios", list(self.layer_ratios)), ("ignored_layers", self.ignored_layers)):
                for name in group:
                    if name not in names:
                        raise ValueError(f"{key}: the model has no module {name!r}")


def output_layer(model: nn.Module, example_inputs: torch.Tensor) -> str | None:
    """Name of the last conv/linear that runs, i.e. the classifier whose outputs are the classes."""
    last: list[str] = []
    hooks = [
        m.register_forward_hook(lambda _m, _i, _o, n=n: last.append(n))
        for n, m in model.named_modules()
        if isinstance(m, (nn.Linear, nn.Conv2d))
    ]
    try:
        with torch.no_grad():
            model(example_inputs)
    finally:
        for h in hooks:
            h.remove()
    return last[-1] if last else None


#: Weight of the L1 tie-break in ``bn_scale`` importance, relative to the largest |gamma| of a group:
#: small enough not to reorder gammas that really differ, large enough to order equal ones.
BN_TIE_BREAK = 1e-3


class _BnScaleTieBroken:
    """``bn_scale`` importance (|gamma| of the BatchNorm), ties ordered by the channels' weight L1 norm.

    Torch-Pruning's global ranking removes every channel whose importance is at most the k-th
    smallest. Freshly initialised BatchNorms (an untrained upload, a model before fine-tuning) all
    have gamma = 1, so that selected every channel of every group, which Torch-Pruning skips rather
    than empty a layer: such a job pruned nothing. The tie-break keeps |gamma| the ranking wherever
    gammas differ by more than ``BN_TIE_BREAK`` of the largest.
    """

    def __init__(self) -> None:
        import torch_pruning as tp

        self._bn = tp.importance.BNScaleImportance()
        self._l1 = tp.importance.MagnitudeImportance(p=1)

    def __call__(self, group, **kwargs):
        bn = self._bn(group)
        if bn is None:
            return None
        l1 = self._l1(group)
        if l1 is None or l1.shape != bn.shape:
            return bn
        scale = float(bn.abs().max()) or 1.0
        return bn + BN_TIE_BREAK * scale * l1 / (float(l1.abs().max()) or 1.0)


def _importance(name: str):
    import torch_pruning as tp

    if name == "l1":
        return tp.importance.MagnitudeImportance(p=1)
    if name == "l2":
        return tp.importance.MagnitudeImportance(p=2)
    return _BnScaleTieBroken()


def prune_cnn(
    model: nn.Module,
    example_inputs: torch.Tensor,
    config: CnnPruneConfig,
    progress: Progress | None = None,
    base: dict | None = None,
) -> PruningPlan:
    """Prune ``model`` in place; returns the plan that replays it on an unmodified copy.

    Raises:
        ValueError: a config field is wrong or names a module the model lacks.
    """
    import torch_pruning as tp

    config.validate(model)
    progress = progress or (lambda _f, _s: None)
    model.eval()
    modules = dict(model.named_modules())
    ignored = [modules[n] for n in config.ignored_layers]
    if not config.prune_classifier:
        head = output_layer(model, example_inputs)
        if head is not None:
            ignored.append(modules[head])
    progress(0.1, "building the dependency graph")
    pruner = tp.pruner.MetaPruner(
        model,
        example_inputs,
        importance=_importance(config.importance),
        pruning_ratio=config.ratio,
        pruning_ratio_dict={modules[n]: r for n, r in config.layer_ratios.items()},
        global_pruning=config.global_pruning,
        ignored_layers=ignored,
        round_to=config.round_to or None,
    )
    progress(0.4, "pruning channels")
    with torch.no_grad():
        pruner.step()
    progress(0.8, "recording the plan")
    return PruningPlan(
        input_shape=tuple(example_inputs.shape),
        steps=steps_from_history(pruner.pruning_history()),
        result_sha256=state_digest(model),
        base=dict(base or {}),
    )
