"""Model pruning and weight quantization: the compression service's engines, usable as a library.

- CNN structured pruning on Torch-Pruning: :func:`prune_cnn` prunes a model in place and returns a
  :class:`PruningPlan`, a few KB of JSON that :func:`apply_plan` replays on an unmodified copy of the
  original model to reproduce the pruned weights exactly.
- Transformer attention-head / FFN-neuron plans: :func:`magnitude_importance`,
  :func:`gradient_importance`, :func:`plan_from_scores` and :func:`apply_transformer_plan`.
- Post-training weight quantization: :func:`quantize_weights`.

Torch-Pruning and transformers are imported only when used.
"""

from compressor.pruning.cnn import CnnPruneConfig, output_layer, prune_cnn
from compressor.pruning.indexsets import decode_indices, encode_indices
from compressor.pruning.plan import PlanError, PruningPlan, apply_plan, state_digest
from compressor.pruning.ptq import PtqConfig, int8_backend, quantize_weights, register_int8_backend
from compressor.pruning.transformer import (
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
