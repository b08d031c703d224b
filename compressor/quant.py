"""Affine (asymmetric uniform) quantization, per tensor or per channel.

``q = clamp(round(x / scale) + zero_point, 0, 2**bits - 1)`` and ``x' = (q - zero_point) * scale``.

The zero point is an integer in ``[0, qmax]``, so the grid always contains 0: the range handed in
is widened to include 0 first (a ReLU output keeps ``lo = 0`` and loses nothing). On that grid,
every value inside ``[lo, hi]`` comes back within half a step (``scale / 2``, plus float32 rounding);
values outside saturate at ``lo`` / ``hi``. A constant group gets ``scale = |c|`` so it comes back
bit-exact.
"""

from __future__ import annotations

import torch

_TINY = torch.finfo(torch.float32).tiny


def qmax(bits: int) -> int:
    """Largest code at ``bits`` bits."""
    return (1 << bits) - 1


def affine_params(lo: torch.Tensor, hi: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """float32 scales and int32 zero points for the ranges ``[lo, hi]`` (same shapes as ``lo``)."""
    top = qmax(bits)
    lo64, hi64 = lo.double(), hi.double()
    lo0, hi0 = lo64.clamp(max=0.0), hi64.clamp(min=0.0)
    scale = ((hi0 - lo0) / top).clamp(min=_TINY)
    # A constant group c gets scale |c|: c / scale is exactly +-1, so c comes back bit-exact.
    constant = (lo64 == hi64) & (lo64 != 0)
    scale = torch.where(constant, lo64.abs(), scale)
    scale = torch.where(hi0 == lo0, torch.ones_like(scale), scale)
    # Round the float32 scale up, never down, so hi still lands on the grid's top code.
    scale32 = scale.float()
    up = torch.nextafter(scale32, torch.full_like(scale32, torch.inf))
    scale32 = torch.where(scale32.double() < scale, up, scale32)
    zero_point = torch.round(-lo0 / scale32.double()).clamp(0, top).to(torch.int32)
    return scale32, zero_point


def _broadcastable(t: torch.Tensor, ndim: int, axis: int | None) -> torch.Tensor | float:
    if axis is None:
        return float(t.reshape(()).item()) if t.numel() == 1 else t
    shape = [1] * ndim
    shape[axis] = -1
    return t.reshape(shape)


def quantize(
    x: torch.Tensor, bits: int, lo: torch.Tensor, hi: torch.Tensor, axis: int | None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Quantize floating ``x`` onto ``bits``-bit codes.

    Args:
        x: floating tensor with finite values (any device; computed in float32).
        bits: code width, 1 to 8.
        lo, hi: the clipping range: 0-d for per tensor, shape ``(x.shape[axis],)`` per channel.
        axis: ``None`` per tensor, else the channel axis (non-negative).

    Returns:
        ``(q, scales, zero_points)``: ``q`` uint8 with ``x``'s shape (contiguous), float32 scales
        and int32 zero points of ``lo``'s shape.
    """
    scales, zero_points = affine_params(lo, hi, bits)
    x = x.to(torch.float32)
    lo_b, hi_b = _broadcastable(lo, x.ndim, axis), _broadcastable(hi, x.ndim, axis)
    s_b, z_b = _broadcastable(scales, x.ndim, axis), _broadcastable(zero_points.float(), x.ndim, axis)
    t = torch.clamp(x, lo_b, hi_b)  # saturate first: clipping is the contract, not the grid edge
    t = t.div_(s_b).round_().add_(z_b).clamp_(0, qmax(bits))
    return t.to(torch.uint8, memory_format=torch.contiguous_format), scales, zero_points


def dequantize(q: torch.Tensor, scales: torch.Tensor, zero_points: torch.Tensor, axis: int | None) -> torch.Tensor:
    """float32 ``(q - zero_point) * scale``, broadcasting per-channel parameters along ``axis``."""
    s_b = _broadcastable(scales.to(torch.float32), q.ndim, axis)
    z_b = _broadcastable(zero_points.to(torch.float32), q.ndim, axis)
    return q.to(torch.float32).sub_(z_b).mul_(s_b)
