"""Clipping-range estimators: where affine quantization puts its ``[lo, hi]``.

An estimator is any callable ``fn(rows, bits, **params) -> (lo, hi)``:

- ``rows`` is a float32 matrix of shape ``(groups, n)`` with ``n > 0``: one row per quantization
  group, i.e. a single row for per-tensor quantization, or one row per channel (the channel axis
  moved to the front) for per-channel quantization. Every value is finite. It is a numpy array for
  estimators registered with ``numpy=True`` (all the built-in ones, so the codec needs no torch),
  else a torch tensor (sharing memory with the array).
- ``bits`` is the target width, for estimators whose optimal clip depends on it (ACIQ, LAPQ).
- ``lo`` and ``hi`` are float arrays or tensors of shape ``(groups,)`` with ``lo <= hi``, finite.

Values outside the range saturate at its edges. Register new estimators with
:func:`register_clipper`; the codec looks them up by name, so they need no codec change.
"""

from __future__ import annotations

import functools
import inspect
import math
import re
from collections.abc import Callable
from dataclasses import dataclass
from fractions import Fraction
from typing import Any

import numpy as np

from compressor._arrays import as_float32, is_tensor, like, torch_or_none

Clipper = Callable[..., tuple[Any, Any]]

_NAME = re.compile(r"[a-z][a-z0-9_]*\Z")


@dataclass(frozen=True)
class _Entry:
    fn: Clipper
    numpy: bool


_REGISTRY: dict[str, _Entry] = {}


def register_clipper(name: str, fn: Clipper, *, replace: bool = False, numpy: bool = False) -> None:
    """Make ``fn`` available as clipping method ``name`` (lowercase letters, digits, ``_``).

    ``numpy=True``: ``fn`` takes and returns numpy arrays (and works without torch); otherwise it
    gets a torch tensor and the method needs torch installed.

    Raises:
        ValueError: the name is malformed, or already registered and ``replace`` is false.
    """
    if not _NAME.match(name):
        raise ValueError(f"clipper name {name!r} must match [a-z][a-z0-9_]*")
    if name in _REGISTRY and not replace:
        raise ValueError(f"clipper {name!r} is already registered (pass replace=True to override)")
    _REGISTRY[name] = _Entry(fn, numpy)


def clipper_names() -> list[str]:
    """Registered clipping methods, sorted."""
    return sorted(_REGISTRY)


def get_clipper(name: str) -> Clipper:
    """The estimator registered as ``name``; ValueError listing the known ones otherwise."""
    return _entry(name).fn


def _entry(name: str) -> _Entry:
    try:
        return _REGISTRY[name]
    except KeyError:
        known = ", ".join(clipper_names())
        raise ValueError(f"unknown clipping method {name!r}; registered: {known}") from None


def check_params(name: str, params: dict[str, Any]) -> None:
    """Fail early (ValueError) when ``params`` do not fit the signature of clipper ``name``."""
    fn = get_clipper(name)
    try:
        inspect.signature(fn).bind(None, 8, **params)
    except TypeError as e:
        raise ValueError(f"clipping method {name!r}: {e}") from None
    except ValueError:  # builtins without a signature: nothing to check
        pass


def clip_range(x: Any, method: str, axis: int | None, bits: int, **params: Any) -> tuple[Any, Any]:
    """Estimate the clipping range of ``x`` with the registered ``method``.

    Args:
        x: a floating tensor or array with finite values.
        method: a registered clipper name (``"minmax"``, ``"percentile"``, ...).
        axis: ``None`` for one range over the whole tensor, else the channel axis.
        bits: the quantization width the range is for.
        params: passed to the estimator, e.g. ``percentile=99.9``.

    Returns:
        ``(lo, hi)`` float32: 0-d per tensor, shape ``(x.shape[axis],)`` per channel; torch
        tensors when ``x`` is one, else numpy arrays. Empty groups get ``(0, 0)``.
    """
    lo, hi = clip_range_array(as_float32(x), method, axis, bits, **params)
    if is_tensor(x):
        return like(lo, x).to(x.device), like(hi, x).to(x.device)
    return lo, hi


def clip_range_array(
    x: np.ndarray, method: str, axis: int | None, bits: int, **params: Any
) -> tuple[np.ndarray, np.ndarray]:
    """:func:`clip_range` on a float32 numpy array; returns float32 numpy arrays."""
    entry = _entry(method)
    rows = _as_rows(x, axis)
    groups, n = rows.shape
    if n == 0 or groups == 0:
        lo = hi = np.zeros(groups, np.float32)
    else:
        if entry.numpy:
            lo, hi = entry.fn(rows, bits, **params)
        else:
            torch = torch_or_none()
            if torch is None:
                raise ValueError(f"clipping method {method!r} is a torch estimator, and torch is not installed")
            rows = np.ascontiguousarray(rows)
            if not rows.flags.writeable:  # a read-only input (a received RAW tensor): torch.from_numpy warns
                rows = rows.copy()
            lo, hi = entry.fn(torch.from_numpy(rows), bits, **params)
        lo, hi = _checked(method, lo, hi, groups)
    if axis is None:
        return lo.reshape(()), hi.reshape(())
    return lo, hi


def _as_rows(x: np.ndarray, axis: int | None) -> np.ndarray:
    if axis is None:
        return x.reshape(1, -1)
    channels = x.shape[axis]
    per_channel = math.prod(x.shape) // channels if channels else 0  # explicit: -1 is ambiguous when empty
    return np.moveaxis(x, axis, 0).reshape(channels, per_channel)


def _to_numpy(v: Any) -> np.ndarray:
    if is_tensor(v):
        v = v.detach().cpu().numpy()
    return np.asarray(v, dtype=np.float32).reshape(-1)


def _checked(method: str, lo: Any, hi: Any, groups: int) -> tuple[np.ndarray, np.ndarray]:
    lo, hi = _to_numpy(lo), _to_numpy(hi)
    if lo.size != groups or hi.size != groups:
        raise ValueError(f"clipper {method!r} returned {lo.size}/{hi.size} bounds for {groups} groups")
    if not (np.isfinite(lo).all() and np.isfinite(hi).all()):
        raise ValueError(f"clipper {method!r} returned a non-finite bound")
    if (lo > hi).any():
        raise ValueError(f"clipper {method!r} returned lo > hi")
    return lo, hi


def array_clipper(fn: Clipper) -> Clipper:
    """Let a numpy clipper also take torch rows (returning torch bounds), for direct callers;
    the codec always hands it numpy."""

    @functools.wraps(fn)
    def wrapper(rows: Any, bits: int, **params: Any) -> tuple[Any, Any]:
        if not is_tensor(rows):
            return fn(rows, bits, **params)
        lo, hi = fn(as_float32(rows), bits, **params)
        return like(np.asarray(lo), rows).to(rows.device), like(np.asarray(hi), rows).to(rows.device)

    return wrapper


@array_clipper
def minmax(rows: np.ndarray, bits: int) -> tuple[np.ndarray, np.ndarray]:
    """The full range of each row: nothing saturates."""
    return rows.min(axis=1), rows.max(axis=1)


@array_clipper
def percentile(rows: np.ndarray, bits: int, percentile: float = 99.99) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric-tail percentile range: ``hi`` is the ``percentile``-th percentile of each row and
    ``lo`` the ``(100 - percentile)``-th (nearest rank: ``hi`` is the ``k``-th smallest value with
    ``k = ceil(percentile / 100 * n)``, ``lo`` the ``k``-th largest; ``k`` is at least the median
    rank so that ``lo <= hi``), so each tail drops the same number of values.

    Selects the order statistics with ``np.partition`` (introselect), not a full sort; a single long
    row with short tails (the usual per-tensor case) selects from the few values past a sampled
    threshold instead of the whole row.
    """
    if not 50.0 <= percentile <= 100.0:
        raise ValueError(f"percentile: {percentile} is not in [50, 100]")
    n = rows.shape[1]
    # Exact decimal arithmetic: in floats, 99.99 / 100 * 10_000 is 9999.000000000002, rank 10_000.
    k_hi = max(min(math.ceil(Fraction(str(percentile)) * n / 100), n), (n + 2) // 2)
    tail = n + 1 - k_hi  # rank of lo from the bottom, and of hi from the top
    if tail == 1:
        return rows.min(axis=1), rows.max(axis=1)
    if rows.shape[0] == 1 and tail * _SAMPLE_STEP * 4 <= n:  # one long row, short tails
        row = rows[0]
        lo = -_kth_largest(np.negative(row), tail)
        return np.float32([lo]), np.float32([_kth_largest(row, tail)])
    part = np.partition(rows, (tail - 1, k_hi - 1), axis=1)
    return part[:, tail - 1], part[:, k_hi - 1]


_SAMPLE_STEP = 32


def _kth_largest(row: np.ndarray, k: int) -> np.float32:
    """The ``k``-th largest value of a 1-d array, exactly, for ``k`` much smaller than its length.

    A strided sample gives a threshold ``t`` that about ``2k`` values exceed; when at least ``k``
    values are ``> t``, the ``k`` largest are all among them, so selecting from those few is exact;
    when fewer are above ``t`` but at least ``k`` are at or above it (ties, e.g. the zeros of a
    ReLU), ``t`` is the answer. Otherwise (an unlucky sample) it selects from the whole row.
    """
    sample = row[::_SAMPLE_STEP]
    rank = min(sample.size, 2 * -(-k // _SAMPLE_STEP) + 16)  # of the threshold, from the top of the sample
    threshold = np.partition(sample, sample.size - rank)[sample.size - rank]
    above = row > threshold
    count = int(np.count_nonzero(above))
    if count >= k:
        candidates = row[above]
    elif count + int(np.count_nonzero(row == threshold)) >= k:
        return threshold  # fewer than k values above it, at least k at or above: it is the k-th (ties)
    else:
        candidates = row
    return np.partition(candidates, candidates.size - k)[candidates.size - k]


@array_clipper
def fixed(rows: np.ndarray, bits: int, lo: float = 0.0, hi: float = 0.0) -> tuple[np.ndarray, np.ndarray]:
    """Clipper ``"fixed"``: the given range (e.g. calibrated offline by LAPQ), intersected with each
    row's own range so that no code is spent on values that do not occur."""
    if not (math.isfinite(lo) and math.isfinite(hi)) or lo > hi:
        raise ValueError(f"fixed clip: lo={lo} hi={hi} is not a finite range with lo <= hi")
    lo32, hi32 = np.float32(lo), np.float32(hi)  # float32 bounds, as a float32 clamp rounds them
    mn, mx = rows.min(axis=1), rows.max(axis=1)
    out_lo = np.minimum(np.maximum(mn, lo32), hi32)
    return out_lo, np.maximum(np.minimum(np.maximum(mx, lo32), hi32), out_lo)


register_clipper("minmax", minmax, numpy=True)
register_clipper("percentile", percentile, numpy=True)
register_clipper("fixed", fixed, numpy=True)
