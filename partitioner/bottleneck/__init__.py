"""Supervised compression at a cut: a learned bottleneck (encoder on the edge, decoder in the
cloud) trained by distillation with an entropy model; see docs/bottleneck.md.

:mod:`.modules` holds the networks and the factorized prior, :mod:`.train` trains and measures,
:mod:`.artifacts` writes and reads the safetensors + JSON files. The range coder is
:mod:`compressor.entropy` (constriction), shared with the wire codec.
"""

from .artifacts import fingerprint, load, save
from .modules import KINDS, AffineDecoder, AffineEncoder, BottleneckConfig, Decoder, Encoder, FactorizedPrior
from .train import (
    Bottleneck,
    TrainConfig,
    augment,
    channel_importance,
    cut_features,
    empirical_tables,
    evaluate,
    split_by_group,
    teacher_features,
    train,
)

__all__ = [
    "KINDS",
    "AffineDecoder",
    "AffineEncoder",
    "Bottleneck",
    "BottleneckConfig",
    "Decoder",
    "Encoder",
    "FactorizedPrior",
    "TrainConfig",
    "augment",
    "channel_importance",
    "cut_features",
    "empirical_tables",
    "evaluate",
    "fingerprint",
    "load",
    "save",
    "split_by_group",
    "teacher_features",
    "train",
]
