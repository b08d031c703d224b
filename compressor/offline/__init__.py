"""Offline compression: what changes a model, as opposed to the wire codec that encodes tensors.

Everything here needs torch and runs in compression jobs or calibration, never on a request's path;
the codec (:mod:`compressor`'s top-level modules) imports none of it and no torch.

- CNN structured pruning on Torch-Pruning: :func:`prune_cnn` prunes a model in place and returns a
  :class:`PruningPlan`, a few KB of JSON that :func:`apply_plan` replays on an unmodified copy of the
  original model to reproduce the pruned weights exactly.
- Transformer attention-head / FFN-neuron plans: :func:`magnitude_importance`,
  :func:`gradient_importance`, :func:`plan_from_scores` and :func:`apply_transformer_plan`.
- Post-training weight quantization: :func:`quantize_weights`.
- LAPQ (:mod:`compressor.offline.lapq`): loss-aware clipping values, for PTQ's weights and for the
  planner's feature calibration (:mod:`partitioner.calibration`); they reach the wire as the codec's
  ``"fixed"`` clipper.

Torch-Pruning and transformers are imported only when used.
"""

from compressor.offline.cnn import CnnPruneConfig, output_layer, prune_cnn
from compressor.offline.indexsets import decode_indices, encode_indices
from compressor.offline.plan import PlanError, PruningPlan, apply_plan, state_digest
from compressor.offline.ptq import PtqConfig, int8_backend, quantize_weights, register_int8_backend
from compressor.offline.transformer import (
    TransformerPlan,
    apply_transformer_plan,
    build_transformer,
    family_of,
    gradient_importance,
    magnitude_importance,
    masked_reference,
    plan_from_scores,
)

__all__ = [
    "CnnPruneConfig",
    "PlanError",
    "PruningPlan",
    "PtqConfig",
    "TransformerPlan",
    "apply_plan",
    "apply_transformer_plan",
    "build_transformer",
    "decode_indices",
    "encode_indices",
    "family_of",
    "gradient_importance",
    "int8_backend",
    "magnitude_importance",
    "masked_reference",
    "output_layer",
    "plan_from_scores",
    "prune_cnn",
    "quantize_weights",
    "register_int8_backend",
    "state_digest",
]
