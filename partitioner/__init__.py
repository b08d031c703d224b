"""Cleave's partitioner: trace a model, list where it can be split, and load the models
that edge and cloud serve.

* :func:`trace` turns a model into a :class:`ModelGraph` whose :class:`Cut` list gives every
  place the model can be split; :meth:`ModelGraph.split` returns the head (edge) and tail
  (cloud) modules of a cut, with ``tail(*head(x)) == model(x)`` exactly.
* :class:`ModelSpec` and :func:`load_model` build the same model in two processes;
  :func:`fingerprint` proves that they did.

Names are imported on first use (PEP 562): ``import partitioner.spec`` (what the daemons need to
read their configs) must not import torch.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from partitioner.graph import Cut, ModelGraph, NotACut, TraceError, trace
    from partitioner.models import ModelLoadError, calibrate_batchnorm, example_input, fingerprint, load_model
    from partitioner.spec import ModelSpec

_HOME = {
    "Cut": "partitioner.graph",
    "ModelGraph": "partitioner.graph",
    "NotACut": "partitioner.graph",
    "TraceError": "partitioner.graph",
    "trace": "partitioner.graph",
    "ModelLoadError": "partitioner.models",
    "ModelSpec": "partitioner.spec",
    "calibrate_batchnorm": "partitioner.models",
    "example_input": "partitioner.models",
    "fingerprint": "partitioner.models",
    "load_model": "partitioner.models",
}


def __getattr__(name: str) -> Any:
    home = _HOME.get(name)
    if home is None:
        raise AttributeError(f"module 'partitioner' has no attribute {name!r}")
    return getattr(importlib.import_module(home), name)


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
