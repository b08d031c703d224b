"""Attention-head and FFN-neuron pruning for BERT, RoBERTa, DistilBERT and GPT-2 style models.

The artifact is a JSON plan, ``layer -> pruned heads`` and ``layer -> pruned FFN neurons`` (neuron
sets as bitmasks, :mod:`.indexsets`), a few KB for a 12-layer model. :func:`apply_transformer_plan`
slices the Linear (or GPT-2 ``Conv1D``) layers and updates the head counts itself: transformers v5
removed ``prune_heads``. Importance is data-free (weight magnitudes) or, following Michel et al.
(2019), the gradient of the loss with respect to a head (and neuron) mask on calibration inputs.

``transformers`` is an optional extra; it is imported only by :func:`build_transformer`.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from .indexsets import decode_indices, encode_indices
from .plan import PlanError

PLAN_FORMAT = "cleave.transformer-pruning-plan"
PLAN_VERSION = 1
FAMILIES = ("bert", "roberta", "distilbert", "gpt2")
IMPORTANCES = ("magnitude", "gradient")


@dataclass
class LayerHandles:
    """The parts of one Transformer block that head/neuron pruning touches."""

    attention: nn.Module  # holds the head count attributes
    qkv: list[nn.Module]  # separate q, k, v projections, or one fused GPT-2 c_attn
    out: nn.Module  # attention output projection (input dim = heads x head_dim)
    ffn_in: nn.Module  # hidden -> intermediate
    ffn_out: nn.Module  # intermediate -> hidden
    num_heads: int
    head_dim: int


def _is_conv1d(m: nn.Module) -> bool:
    # GPT-2's Conv1D: a Linear with a transposed weight of shape (in, out).
    return type(m).__name__ == "Conv1D"


def family_of(model: nn.Module) -> str:
    """Which supported family ``model`` is ("bert", "roberta", "distilbert", "gpt2")."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type in FAMILIES:
        return model_type
    raise ValueError(f"model: not a supported Transformer ({', '.join(FAMILIES)}), model_type={model_type!r}")


def _base(model: nn.Module, family: str) -> nn.Module:
    prefix = {"bert": "bert", "roberta": "roberta", "distilbert": "distilbert", "gpt2": "transformer"}[family]
    return getattr(model, prefix, model)


def layers_of(model: nn.Module) -> list[LayerHandles]:
    """Handles of every block, in order."""
    family = family_of(model)
    base = _base(model, family)
    handles = []
    if family in ("bert", "roberta"):
        for layer in base.encoder.layer:
            a = layer.attention.self
            heads = a.num_attention_heads
            handles.append(
                LayerHandles(
                    a,
                    [a.query, a.key, a.value],
                    layer.attention.output.dense,
                    layer.intermediate.dense,
                    layer.output.dense,
                    heads,
                    a.attention_head_size,
                )
            )
    elif family == "distilbert":
        for layer in base.transformer.layer:
            a = layer.attention
            handles.append(
                LayerHandles(
                    a,
                    [a.q_lin, a.k_lin, a.v_lin],
                    a.out_lin,
                    layer.ffn.lin1,
                    layer.ffn.lin2,
                    a.n_heads,
                    a.attention_head_size,
                )
            )
    else:
        for block in base.h:
            a = block.attn
            handles.append(
                LayerHandles(a, [a.c_attn], a.c_proj, block.mlp.c_fc, block.mlp.c_proj, a.num_heads, a.head_dim)
            )
    return handles


def _set_heads(family: str, attention: nn.Module, heads: int, head_dim: int) -> None:
    if family in ("bert", "roberta"):
        attention.num_attention_heads = heads
        attention.all_head_size = heads * head_dim
    elif family == "distilbert":
        attention.n_heads = heads
    else:
        attention.num_heads = heads
        attention.split_size = heads * head_dim  # c_attn output is split into q, k, v of this width


# Slicing.


def _slice_out(m: nn.Module, keep: torch.Tensor) -> None:
    """Keep output features ``keep`` of a Linear or Conv1D."""
    with torch.no_grad():
        if _is_conv1d(m):
            m.weight = nn.Parameter(m.weight[:, keep].clone())
            m.nf = len(keep)
        else:
            m.weight = nn.Parameter(m.weight[keep].clone())
            m.out_features = len(keep)
        if m.bias is not None:
            m.bias = nn.Parameter(m.bias[keep].clone())


def _slice_in(m: nn.Module, keep: torch.Tensor) -> None:
    """Keep input features ``keep`` of a Linear or Conv1D."""
    with torch.no_grad():
        if _is_conv1d(m):
            m.weight = nn.Parameter(m.weight[keep].clone())
        else:
            m.weight = nn.Parameter(m.weight[:, keep].clone())
            m.in_features = len(keep)


def _head_columns(heads: Iterable[int], head_dim: int) -> torch.Tensor:
    return torch.tensor([h * head_dim + j for h in sorted(heads) for j in range(head_dim)], dtype=torch.long)


# Plans.


@dataclass
class TransformerPlan:
    """Pruned heads and FFN neurons per layer index."""

    family: str
    num_layers: int
    heads: dict[int, list[int]]
    neurons: dict[int, list[int]]

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": PLAN_FORMAT,
            "version": PLAN_VERSION,
            "family": self.family,
            "num_layers": self.num_layers,
            "heads": {str(k): sorted(v) for k, v in sorted(self.heads.items()) if v},
            "neurons": {str(k): encode_indices(v) for k, v in sorted(self.neurons.items()) if v},
        }

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), separators=(",", ":"), sort_keys=True)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> TransformerPlan:
        if not isinstance(data, Mapping) or data.get("format") != PLAN_FORMAT:
            raise PlanError(f"plan.format: expected {PLAN_FORMAT!r}")
        if data.get("version") != PLAN_VERSION:
            raise PlanError(f"plan.version: {data.get('version')!r} is not supported")
        family, layers = data.get("family"), data.get("num_layers")
        if family not in FAMILIES:
            raise PlanError(f"plan.family: {family!r} is not one of {', '.join(FAMILIES)}")
        if not isinstance(layers, int) or layers <= 0:
            raise PlanError(f"plan.num_layers: expected a positive integer, got {layers!r}")

        def layer_key(key: str, field: str) -> int:
            if not (isinstance(key, str) and key.isdigit() and int(key) < layers):
                raise PlanError(f"plan.{field}: layer {key!r} is not in 0..{layers - 1}")
            return int(key)

        heads: dict[int, list[int]] = {}
        for key, value in dict(data.get("heads", {})).items():
            if not (isinstance(value, list) and all(isinstance(h, int) and h >= 0 for h in value)):
                raise PlanError(f"plan.heads[{key}]: expected a list of head indices")
            heads[layer_key(key, "heads")] = sorted(set(value))
        neurons: dict[int, list[int]] = {}
        for key, value in dict(data.get("neurons", {})).items():
            try:
                neurons[layer_key(key, "neurons")] = decode_indices(value, f"plan.neurons[{key}]")
            except ValueError as exc:
                raise PlanError(str(exc)) from None
        return cls(family, layers, heads, neurons)

    @classmethod
    def from_json(cls, text: str | bytes) -> TransformerPlan:
        try:
            return cls.from_dict(json.loads(text))
        except json.JSONDecodeError as exc:
            raise PlanError(f"plan: not JSON ({exc})") from None


def apply_transformer_plan(model: nn.Module, plan: TransformerPlan | Mapping[str, Any] | str) -> nn.Module:
    """Remove the plan's heads and neurons from ``model`` in place (slicing weights); returns it."""
    if isinstance(plan, str):
        plan = TransformerPlan.from_json(plan)
    elif isinstance(plan, Mapping):
        plan = TransformerPlan.from_dict(plan)
    family = family_of(model)
    if family != plan.family:
        raise PlanError(f"plan.family: the plan is for {plan.family!r}, the model is {family!r}")
    layers = layers_of(model)
    if len(layers) != plan.num_layers:
        raise PlanError(f"plan.num_layers: the plan has {plan.num_layers} layers, the model {len(layers)}")
    for i, layer in enumerate(layers):
        pruned = plan.heads.get(i, [])
        if pruned:
            if max(pruned) >= layer.num_heads or len(pruned) >= layer.num_heads:
                raise PlanError(f"plan.heads[{i}]: {pruned} does not fit {layer.num_heads} heads (keep at least one)")
            keep_heads = [h for h in range(layer.num_heads) if h not in set(pruned)]
            cols = _head_columns(keep_heads, layer.head_dim)
            if len(layer.qkv) == 1:  # fused q|k|v: the same columns in each third
                width = layer.num_heads * layer.head_dim
                _slice_out(layer.qkv[0], torch.cat([cols, cols + width, cols + 2 * width]))
            else:
                for proj in layer.qkv:
                    _slice_out(proj, cols)
            _slice_in(layer.out, cols)
            _set_heads(family, layer.attention, len(keep_heads), layer.head_dim)
        gone = plan.neurons.get(i, [])
        if gone:
            width = _out_features(layer.ffn_in)
            if max(gone) >= width or len(gone) >= width:
                raise PlanError(f"plan.neurons[{i}]: does not fit {width} neurons (keep at least one)")
            dropped = set(gone)
            keep = torch.tensor([n for n in range(width) if n not in dropped], dtype=torch.long)
            _slice_out(layer.ffn_in, keep)
            _slice_in(layer.ffn_out, keep)
    return model


def _out_features(m: nn.Module) -> int:
    return m.weight.shape[1] if _is_conv1d(m) else m.weight.shape[0]


def masked_reference(model: nn.Module, plan: TransformerPlan) -> nn.Module:
    """Zero what the plan prunes, without changing shapes: the reference the applier must match.

    A head whose value projection is zero contributes nothing to the output projection, and an FFN
    neuron whose input row (weight and bias) is zero outputs act(0) = 0 for GELU/ReLU.
    """
    with torch.no_grad():
        for i, layer in enumerate(layers_of(model)):
            for h in plan.heads.get(i, []):
                cols = _head_columns([h], layer.head_dim)
                value = layer.qkv[-1] if len(layer.qkv) == 3 else layer.qkv[0]
                if len(layer.qkv) == 1:
                    cols = cols + 2 * layer.num_heads * layer.head_dim
                _zero_out(value, cols)
            gone = plan.neurons.get(i, [])
            if gone:
                _zero_out(layer.ffn_in, torch.tensor(gone, dtype=torch.long))
    return model


def _zero_out(m: nn.Module, cols: torch.Tensor) -> None:
    if _is_conv1d(m):
        m.weight[:, cols] = 0
    else:
        m.weight[cols] = 0
    if m.bias is not None:
        m.bias[cols] = 0


# Importance.


def _weight_in(m: nn.Module) -> torch.Tensor:
    """Weight as (out, in) whatever the layer type."""
    return m.weight.t() if _is_conv1d(m) else m.weight


def magnitude_importance(model: nn.Module) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Data-free scores: per head the L2 norm of its value rows times its output-projection columns;
    per neuron the norm of its input row times its output column."""
    heads, neurons = [], []
    with torch.no_grad():
        for layer in layers_of(model):
            w_v = _weight_in(layer.qkv[-1] if len(layer.qkv) == 3 else layer.qkv[0])
            if len(layer.qkv) == 1:
                w_v = w_v[2 * layer.num_heads * layer.head_dim :]
            w_o = _weight_in(layer.out)
            v = w_v.reshape(layer.num_heads, -1).norm(dim=1)
            o = w_o.reshape(w_o.shape[0], layer.num_heads, layer.head_dim).norm(dim=(0, 2))
            heads.append(v * o)
            neurons.append(_weight_in(layer.ffn_in).norm(dim=1) * _weight_in(layer.ffn_out).norm(dim=0))
    return heads, neurons


def gradient_importance(
    model: nn.Module,
    batches: Iterable[dict[str, torch.Tensor]],
    loss_fn: Callable[[Any, dict[str, torch.Tensor]], torch.Tensor] | None = None,
) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Michel et al. (2019): |dL/dmask| accumulated over calibration batches, for a mask of ones on
    each head's context (the input of the output projection) and on each FFN neuron.

    ``loss_fn(outputs, batch)`` defaults to cross-entropy on ``batch["labels"]`` when the model has
    logits, else the mean squared last hidden state.
    """
    layers = layers_of(model)
    head_masks = [torch.ones(layer.num_heads, requires_grad=True) for layer in layers]
    neuron_masks = [torch.ones(_out_features(layer.ffn_in), requires_grad=True) for layer in layers]
    hooks = []
    for layer, hm, nm in zip(layers, head_masks, neuron_masks, strict=True):
        hooks.append(
            layer.out.register_forward_pre_hook(
                lambda _m, args, hm=hm, d=layer.head_dim: (args[0] * hm.repeat_interleave(d),)
            )
        )
        hooks.append(layer.ffn_out.register_forward_pre_hook(lambda _m, args, nm=nm: (args[0] * nm,)))
    head_scores = [torch.zeros(layer.num_heads) for layer in layers]
    neuron_scores = [torch.zeros_like(nm) for nm in neuron_masks]
    was_training = model.training
    model.eval()
    try:
        for batch in batches:
            inputs = {k: v for k, v in batch.items() if k != "labels"}
            outputs = model(**inputs)
            loss = (loss_fn or _default_loss)(outputs, batch)
            grads = torch.autograd.grad(loss, head_masks + neuron_masks)
            for s, g in zip(head_scores + neuron_scores, grads, strict=True):
                s += g.abs()
    finally:
        for h in hooks:
            h.remove()
        model.train(was_training)
    return head_scores, neuron_scores


def _default_loss(outputs: Any, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    logits = getattr(outputs, "logits", None)
    if logits is not None and "labels" in batch and logits.ndim == 2:
        return nn.functional.cross_entropy(logits, batch["labels"])
    hidden = outputs.last_hidden_state if hasattr(outputs, "last_hidden_state") else outputs[0]
    return hidden.pow(2).mean()


def plan_from_scores(
    model: nn.Module,
    head_scores: list[torch.Tensor],
    neuron_scores: list[torch.Tensor],
    head_ratio: float,
    ffn_ratio: float,
) -> TransformerPlan:
    """Prune the lowest-scoring ``head_ratio`` of heads and ``ffn_ratio`` of neurons in each layer
    (at least one head and one neuron always stay)."""
    for name, r in (("head_ratio", head_ratio), ("ffn_ratio", ffn_ratio)):
        if not 0.0 <= r < 1.0:
            raise ValueError(f"{name}: {r} is not in [0, 1)")
    heads, neurons = {}, {}
    for i, (hs, ns) in enumerate(zip(head_scores, neuron_scores, strict=True)):
        k = min(int(round(head_ratio * len(hs))), len(hs) - 1)
        heads[i] = sorted(torch.argsort(hs, stable=True)[:k].tolist())
        k = min(int(round(ffn_ratio * len(ns))), len(ns) - 1)
        neurons[i] = sorted(torch.argsort(ns, stable=True)[:k].tolist())
    return TransformerPlan(family_of(model), len(head_scores), heads, neurons)


def build_transformer(family: str, config: Mapping[str, Any] | None = None, seed: int = 0) -> nn.Module:
    """A randomly initialised (seeded) base model of ``family`` from a config: nothing is downloaded."""
    if family not in FAMILIES:
        raise ValueError(f"family: {family!r} is not one of {', '.join(FAMILIES)}")
    try:
        import transformers
    except ImportError as exc:
        raise ValueError("transformers is not installed (pip install 'cleave[transformers]')") from exc
    try:
        cfg = transformers.AutoConfig.for_model(family, **dict(config or {}))
    except (TypeError, ValueError) as exc:
        raise ValueError(f"config: {exc}") from exc
    cfg._attn_implementation = "eager"
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = transformers.AutoModel.from_config(cfg, attn_implementation="eager")
    return model.eval()
