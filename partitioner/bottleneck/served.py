"""A model with a trained bottleneck inserted at its cut, as both daemons serve it.

:func:`with_bottleneck` rebuilds the bottleneck from its artifacts (safetensors + JSON, no pickle)
and returns one module, ``tail(decoder(bottleneck_latent(encoder(head(x)))))``, that the
partitioner traces like any model. Its cut ``bottleneck_latent`` carries the integer latent: the
edge runs head and encoder, sends the latent with the ``entropy`` encoding, and the cloud runs
decoder and tail. The coder's tables are a buffer of the module, so the model fingerprint covers
encoder, decoder and tables: an edge and a cloud holding different bottlenecks are refused.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import fx, nn

from compressor.entropy import EntropyTables
from partitioner.graph import trace

from .artifacts import load, read_description

__all__ = ["LATENT_CUT", "Bottlenecked", "bottleneck_latent", "with_bottleneck"]

LATENT_CUT = "bottleneck_latent"


@fx.wrap
def bottleneck_latent(y: torch.Tensor, low: int, high: int) -> torch.Tensor:
    """The encoder's output rounded to the integers that go on the wire (one traced node: the cut),
    clamped into the coder's tables ``low .. high`` as the wire clamps them
    (:func:`compressor.entropy.encode_symbols`): the model run whole and the model split across the
    link decode the same values."""
    return torch.round(y).clamp(low, high)


class Bottlenecked(nn.Module):
    """``head`` (the original model up to the cut), encoder, rounding, decoder, ``tail``."""

    def __init__(self, head: nn.Module, tail: nn.Module, directory: str | Path) -> None:
        super().__init__()
        b = load(directory)
        self.head, self.tail = head, tail
        self.encoder, self.decoder = b.encoder, b.decoder
        self.register_buffer("pmf", torch.from_numpy(b.tables.pmf.copy()))
        self.table_offset = b.tables.offset
        self.table_high = b.tables.offset + b.tables.symbols - 1  # the last symbol the tables code
        self.size = tuple(b.feature_shape[1:])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = self.head(x)[0]
        latent = bottleneck_latent(self.encoder(z), self.table_offset, self.table_high)
        return self.tail(self.decoder(latent, size=self.size))

    def tables(self) -> EntropyTables:
        return EntropyTables(pmf=self.pmf.double().numpy(), offset=self.table_offset)


def with_bottleneck(model: nn.Module, example: torch.Tensor, directory: str | Path) -> Bottlenecked:
    """``model`` with the bottleneck in ``directory`` inserted at its cut.

    Raises:
        ValueError: the artifacts are missing or corrupt, or were trained on another model (its
            fingerprint or input shape differ) or at a cut this model does not have.
    """
    from partitioner.models import fingerprint

    desc = read_description(directory)
    base = desc.get("base", {})
    if base.get("fingerprint") != fingerprint(model):
        raise ValueError(
            f"bottleneck: {directory} was trained on another model (fingerprint "
            f"{str(base.get('fingerprint'))[:12]}..., this model {fingerprint(model)[:12]}...)"
        )
    if list(base.get("input_shape", []))[1:] != list(example.shape)[1:]:
        raise ValueError(
            f"bottleneck: trained at input {base.get('input_shape')}, the model takes {list(example.shape)}"
        )
    graph = trace(model, example)
    try:
        head, tail = graph.split(str(desc["cut"]["name"]))
    except KeyError as exc:
        raise ValueError(f"bottleneck.cut: {exc}") from exc
    return Bottlenecked(head, tail, directory).eval()
