"""A model ready to serve: its spec, traced graph and fingerprint, built the same way on both hosts.

The edge and the cloud each build a :class:`LoadedModel` from their own config; the fingerprint is
what lets a session refuse to pair a head with a tail from a different model.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from partitioner.graph import Cut, ModelGraph, TraceError, trace
from partitioner.models import ModelSpec, example_input, fingerprint, load_model


@dataclass
class LoadedModel:
    """A traced model with its fingerprint; split parts come from the graph, which builds each cut's once."""

    spec: ModelSpec
    graph: ModelGraph
    fingerprint: str
    entropy_tables: Any = None  # a bottleneck's range-coder tables (compressor.entropy), when it has one

    @classmethod
    def load(cls, spec: ModelSpec) -> LoadedModel:
        """Load, trace and fingerprint ``spec``."""
        module = load_model(spec)
        tables = None
        if spec.bottleneck:
            from partitioner.bottleneck.served import with_bottleneck

            module = with_bottleneck(module, example_input(spec), spec.bottleneck)
            tables = module.tables()
        try:
            graph = trace(module, example_input(spec))
        except TraceError as exc:
            shape = ",".join(map(str, spec.input_shape))
            raise TraceError(f"model {spec.name!r} (input shape {shape}): {exc}") from exc
        code = getattr(graph.module, "code", None)
        return cls(spec=spec, graph=graph, fingerprint=fingerprint(graph.module, code), entropy_tables=tables)

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def input_shape(self) -> tuple[int, ...]:
        return tuple(self.spec.input_shape)

    @property
    def module(self) -> torch.nn.Module:
        """The whole model, as traced (identical results to the loaded module)."""
        return self.graph.module

    def parts(self, key: int | str | Cut) -> tuple[Cut, torch.nn.Module, torch.nn.Module]:
        """``(cut, head, tail)`` for a cut given by index, name or :class:`Cut` (KeyError: no such cut).

        The head and tail are :meth:`ModelGraph.split`'s, cached there: the same objects every call.
        """
        cut = self.graph.cut(key)
        head, tail = self.graph.split(cut)
        return cut, head, tail


def as_tensor_list(value: object) -> list[torch.Tensor]:
    """Flatten a model output (a tensor, or a tuple/list/dict of them) into a list of tensors."""
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, dict):
        value = list(value.values())
    if isinstance(value, (tuple, list)):
        return [t for item in value for t in as_tensor_list(item)]
    raise TypeError(f"model output of type {type(value).__name__} is not a tensor or a collection of them")


def check_features(cut: Cut, tensors: list[torch.Tensor]) -> None:
    """Raise ValueError naming the first tensor that does not fit ``cut`` (count, dtype, shape past batch)."""
    if len(tensors) != len(cut.live):
        raise ValueError(f"features: cut {cut.name!r} takes {len(cut.live)} tensors, got {len(tensors)}")
    batch = None
    for i, (t, shape, dtype) in enumerate(zip(tensors, cut.shapes, cut.dtypes, strict=True)):
        if str(t.dtype).removeprefix("torch.") != dtype:
            raise ValueError(f"features[{i}] ({cut.live[i]}): dtype {t.dtype} != {dtype}")
        if t.dim() != len(shape) or tuple(t.shape[1:]) != tuple(shape[1:]):
            raise ValueError(f"features[{i}] ({cut.live[i]}): shape {tuple(t.shape)} does not fit {tuple(shape)}")
        if t.dim() and batch is not None and t.shape[0] != batch:
            raise ValueError(f"features[{i}] ({cut.live[i]}): batch {t.shape[0]} != {batch}")
        batch = t.shape[0] if t.dim() else batch
