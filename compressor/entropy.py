"""Entropy coding of integer latents with per-channel probability tables (no torch).

A learned bottleneck (see :mod:`partitioner.bottleneck`) sends integer symbols, one per latent
element, each coded with the probability table of its channel. The tables are fixed at export
(a factorized prior, as in Ballé et al.'s ``EntropyBottleneck``) and both sides hold the same
float64 copy, so the coder's integer model, built deterministically from it, agrees bit for bit.
The bitstream itself comes from `constriction <https://bamler-lab.github.io/constriction/>`_'s
range coder; nothing here writes a coder by hand.

Decoding is bounded by what the receiver already knows: the symbol count comes from the shape
the session expects, never from the stream, and a stream longer than :func:`max_payload` for that
shape, one with trailing words, or one whose length is not a whole number of 32-bit words is
refused with a :class:`CodecError` naming ``tensor.payload``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from compressor.errors import CodecError

__all__ = ["EntropyTables", "decode_symbols", "encode_symbols", "max_payload"]

# constriction's categorical models quantize probabilities to 24 bits, and leave every symbol of
# the table at least one quantum: no symbol ever costs more than 24 bits.
_MAX_BITS_PER_SYMBOL = 24
_SLACK_WORDS = 4  # the range coder's flush


def _constriction() -> Any:
    try:
        import constriction
    except ImportError as exc:  # pragma: no cover - depends on the install
        raise CodecError("encoding: entropy-coded tensors need constriction (the `bottleneck` extra)") from exc
    return constriction


@dataclass
class EntropyTables:
    """Per-channel probability tables over the integers ``offset .. offset + K - 1``.

    Attributes:
        pmf: (C, K) probabilities; each row sums to 1 and every entry is positive.
        offset: the symbol value of column 0 (usually ``-(K // 2)``). Values outside the table
            are clamped into it when encoding (the prior's tails hold a negligible mass).
    """

    pmf: np.ndarray
    offset: int
    _models: list[Any] = field(default_factory=list, repr=False, compare=False)

    def __post_init__(self) -> None:
        pmf = np.asarray(self.pmf, dtype=np.float64)
        if pmf.ndim != 2 or pmf.shape[0] < 1 or pmf.shape[1] < 2:
            raise CodecError(f"entropy.pmf: need a (channels, >= 2 symbols) table, got shape {pmf.shape}")
        if not np.all(np.isfinite(pmf)) or np.any(pmf <= 0):
            raise CodecError("entropy.pmf: every probability must be finite and positive")
        self.pmf = pmf / pmf.sum(axis=1, keepdims=True)
        self.offset = int(self.offset)

    @property
    def channels(self) -> int:
        return int(self.pmf.shape[0])

    @property
    def symbols(self) -> int:
        return int(self.pmf.shape[1])

    def models(self) -> list[Any]:
        """One constriction categorical model per channel (built once)."""
        if not self._models:
            cat = _constriction().stream.model.Categorical
            self._models = [cat(row, perfect=False) for row in self.pmf]
        return self._models

    def bits(self, symbols: np.ndarray) -> float:
        """The ideal code length (bits) of ``symbols`` (..., C, H, W) under these tables."""
        idx = self._indices(symbols)
        chan = np.arange(self.channels).reshape(-1, 1, 1)
        return float(-np.log2(self.pmf[chan, idx]).sum())

    def _indices(self, symbols: np.ndarray) -> np.ndarray:
        return np.clip(np.asarray(symbols, dtype=np.int64) - self.offset, 0, self.symbols - 1).astype(np.int32)


def max_payload(shape: Sequence[int]) -> int:
    """The longest bitstream (bytes) a tensor of ``shape`` may take: 24 bits a symbol, plus the flush."""
    count = math.prod(int(d) for d in shape)
    return 4 * (math.ceil(count * _MAX_BITS_PER_SYMBOL / 32) + _SLACK_WORDS)


def _check_shape(shape: Sequence[int], tables: EntropyTables) -> tuple[int, ...]:
    shape = tuple(int(d) for d in shape)
    if len(shape) != 4 or shape[1] != tables.channels or min(shape) < 1:
        raise CodecError(f"tensor.shape: {list(shape)} is not (N, {tables.channels}, H, W) for this bottleneck")
    return shape


def encode_symbols(symbols: np.ndarray, tables: EntropyTables) -> bytes:
    """Range-code integer ``symbols`` of shape (N, C, H, W), channel by channel, into one bitstream."""
    symbols = np.asarray(symbols)
    shape = _check_shape(symbols.shape, tables)
    idx = tables._indices(symbols)
    models = tables.models()
    enc = _constriction().stream.queue.RangeEncoder()
    for n in range(shape[0]):
        for c in range(shape[1]):
            enc.encode(np.ascontiguousarray(idx[n, c]).ravel(), models[c])
    return enc.get_compressed().astype("<u4").tobytes()


def decode_symbols(data: bytes | np.ndarray, tables: EntropyTables, shape: Sequence[int]) -> np.ndarray:
    """The (N, C, H, W) int32 symbols ``data`` codes, for the ``shape`` the receiver expects.

    Raises:
        CodecError: ``tensor.payload`` when the stream is not whole 32-bit words, longer than
            :func:`max_payload`, not exactly consumed by the symbols of ``shape``, or rejected by
            the coder; ``tensor.shape`` when ``shape`` does not fit the tables.
    """
    shape = _check_shape(shape, tables)
    buf = np.frombuffer(data, dtype=np.uint8) if isinstance(data, bytes | bytearray | memoryview) else data
    buf = np.asarray(buf, dtype=np.uint8).ravel()
    limit = max_payload(shape)
    if buf.size > limit:
        raise CodecError(f"tensor.payload: {buf.size} bytes exceeds {limit}, the most {list(shape)} can take")
    if buf.size % 4:
        raise CodecError(f"tensor.payload: {buf.size} bytes is not a whole number of 32-bit words")
    words = buf.view("<u4").astype(np.uint32)
    models = tables.models()
    per_channel = shape[2] * shape[3]
    out = np.empty(shape, dtype=np.int32)
    try:
        dec = _constriction().stream.queue.RangeDecoder(words)
        for n in range(shape[0]):
            for c in range(shape[1]):
                out[n, c] = np.asarray(dec.decode(models[c], per_channel)).reshape(shape[2], shape[3])
        exhausted = dec.maybe_exhausted()
    except (ValueError, RuntimeError, AssertionError) as exc:
        raise CodecError(f"tensor.payload: not a valid entropy-coded stream ({exc})") from exc
    if not exhausted:
        raise CodecError("tensor.payload: the stream holds more data than the expected shape codes (corrupt)")
    return out + np.int32(tables.offset)
