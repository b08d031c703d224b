"""Cleave's partitioner: trace a model, list where it can be split, and load the models
that edge and cloud serve.

* :func:`trace` turns a model into a :class:`ModelGraph` whose :class:`Cut` list gives every
  place the model can be split; :meth:`ModelGraph.split` returns the head (edge) and tail
  (cloud) modules of a cut, with ``tail(*head(x)) == model(x)`` exactly.
* :class:`ModelSpec` and :func:`load_model` build the same model in two processes;
  :func:`fingerprint` proves that they did.
"""

from partitioner.graph import Cut, ModelGraph, NotACut, TraceError, trace
from partitioner.models import (
    ModelLoadError,
    ModelSpec,
    calibrate_batchnorm,
    example_input,
    fingerprint,
    load_model,
)

__all__ = [
    "Cut",
    "ModelGraph",
    "ModelLoadError",
    "ModelSpec",
    "NotACut",
    "TraceError",
    "calibrate_batchnorm",
    "example_input",
    "fingerprint",
    "load_model",
    "trace",
]
