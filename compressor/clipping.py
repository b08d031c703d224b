"""Clipping-range estimators: where affine quantization puts its ``[lo, hi]``.

An estimator is any callable ``fn(rows, bits, **params) -> (lo, hi)``:

- ``rows`` is a float32 matrix of shape ``(groups, n)`` with ``n > 0``: one row per quantization
  group, i.e. a single row for per-tensor quantization, or one row per channel (the channel axis
  moved to the front) for per-channel quantization. Every value is finite.
- ``bits`` is the target width, for estimators whose optimal clip depends on it (ACIQ, LAPQ).
- ``lo`` and ``hi`` are float tensors of shape ``(groups,)`` with ``lo <= hi``, finite.

Values outside the range saturate at its edges. Register new estimators with
:func:`register_clipper`; the codec looks them up by name, so they need no codec change.
"""

from __future__ import annotations

import inspect
import math
import re
from collections.abc import Callable
from fractions import Fraction
from typing import Any

import torch

Clipper = Callable[..., tuple[torch.Tensor, torch.Tensor]]

_NAME = re.compile(r"[a-z][a-z0-9_]*\Z")
_REGISTRY: dict[str, Clipper] = {}


def register_clipper(name: str, fn: Clipper, *, replace: bool = False) -> None:
    """Make ``fn`` available as clipping method ``name`` (lowercase letters, digits, ``_``).

    Raises:
        ValueError: the name is malformed, or already registered and ``replace`` is false.
    """
    if not _NAME.match(name):
        raise ValueError(f"clipper name {name!r} must match [a-z][a-z0-9_]*")
    if name in _REGISTRY and not replace:
        raise ValueError(f"clipper {name!r} is already registered (pass replace=True to override)")
    _REGISTRY[name] = fn


def clipper_names() -> list[str]:
    """Registered clipping methods, sorted."""
    return sorted(_REGISTRY)


def get_clipper(name: str) -> Clipper:
    """The estimator registered as ``name``; ValueError listing the known ones otherwise."""
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


def clip_range(
    x: torch.Tensor, method: str, axis: int | None, bits: int, **params: Any
) -> tuple[torch.Tensor, torch.Tensor]:
    """Estimate the clipping range of ``x`` with the registered ``method``.

    Args:
        x: a floating tensor with finite values.
        method: a registered clipper name (``"minmax"``, ``"percentile"``, ...).
        axis: ``None`` for one range over the whole tensor, else the channel axis.
        bits: the quantization width the range is for.
        params: passed to the estimator, e.g. ``percentile=99.9``.

    Returns:
        ``(lo, hi)`` float32 tensors: 0-d per tensor, shape ``(x.shape[axis],)`` per channel.
        Empty groups get ``(0, 0)``.
    """
    fn = get_clipper(method)
    rows = _as_rows(x.to(torch.float32), axis)
    groups, n = rows.shape
    if n == 0 or groups == 0:
        lo = hi = torch.zeros(groups, dtype=torch.float32, device=x.device)
    else:
        lo, hi = fn(rows, bits, **params)
        lo, hi = _checked(method, lo, hi, groups)
    if axis is None:
        return lo.reshape(()), hi.reshape(())
    return lo, hi


def _as_rows(x: torch.Tensor, axis: int | None) -> torch.Tensor:
    if axis is None:
        return x.reshape(1, -1)
    channels = x.shape[axis]
    per_channel = math.prod(x.shape) // channels if channels else 0  # explicit: -1 is ambiguous when empty
    return x.movedim(axis, 0).reshape(channels, per_channel)


def _checked(method: str, lo: torch.Tensor, hi: torch.Tensor, groups: int) -> tuple[torch.Tensor, torch.Tensor]:
    lo = torch.as_tensor(lo, dtype=torch.float32).reshape(-1)
    hi = torch.as_tensor(hi, dtype=torch.float32).reshape(-1)
    if lo.numel() != groups or hi.numel() != groups:
        raise ValueError(f"clipper {method!r} returned {lo.numel()}/{hi.numel()} bounds for {groups} groups")
    if not (torch.isfinite(lo).all() and torch.isfinite(hi).all()):
        raise ValueError(f"clipper {method!r} returned a non-finite bound")
    if (lo > hi).any():
        raise ValueError(f"clipper {method!r} returned lo > hi")
    return lo, hi


def minmax(rows: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The full range of each row: nothing saturates."""
    if rows.shape[0] == 1:  # a flat reduction is ~30x faster than a dim=1 one over a single row
        lo, hi = torch.aminmax(rows.reshape(-1))
        return lo.reshape(1), hi.reshape(1)
    return torch.aminmax(rows, dim=1)


def percentile(rows: torch.Tensor, bits: int, percentile: float = 99.99) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric-tail percentile range: ``hi`` is the ``percentile``-th percentile of each row and
    ``lo`` the ``(100 - percentile)``-th (nearest rank: ``hi`` is the ``k``-th smallest value with
    ``k = ceil(percentile / 100 * n)``, ``lo`` the ``k``-th largest; ``k`` is at least the median
    rank so that ``lo <= hi``), so each tail drops the same number of values.

    Selects with ``torch.topk`` / ``torch.kthvalue``, not ``torch.quantile`` (which refuses large
    inputs) nor a full sort.
    """
    if not 50.0 <= percentile <= 100.0:
        raise ValueError(f"percentile: {percentile} is not in [50, 100]")
    n = rows.shape[1]
    # Exact decimal arithmetic: in floats, 99.99 / 100 * 10_000 is 9999.000000000002, rank 10_000.
    k_hi = max(min(math.ceil(Fraction(str(percentile)) * n / 100), n), (n + 2) // 2)
    tail = n + 1 - k_hi  # rank of lo from the bottom, and of hi from the top
    if tail == 1:
        return minmax(rows, bits)
    if tail <= _TOPK_MAX:  # a short tail: partial selection is several times faster than kthvalue
        hi = torch.topk(rows, tail, dim=1).values[:, -1]
        lo = torch.topk(rows, tail, dim=1, largest=False).values[:, -1]
        return lo, hi
    return torch.kthvalue(rows, tail, dim=1).values, torch.kthvalue(rows, k_hi, dim=1).values


_TOPK_MAX = 4096


register_clipper("minmax", minmax)
register_clipper("percentile", percentile)
