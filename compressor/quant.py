"""Affine (asymmetric uniform) quantization, per tensor or per channel.

``q = clamp(round(x / scale) + zero_point, 0, 2**bits - 1)`` and ``x' = (q - zero_point) * scale``.

The zero point is an integer in ``[0, qmax]``, so the grid always contains 0: the range handed in
is widened to include 0 first (a ReLU output keeps ``lo = 0`` and loses nothing). On that grid,
every value inside ``[lo, hi]`` comes back within half a step (``scale / 2``, plus float32 rounding);
values outside saturate at ``lo`` / ``hi``. A constant group gets ``scale = |c|`` so it comes back
bit-exact.

The math runs in numpy, in float32, vectorised into preallocated buffers; torch tensors are
accepted and returned (converted without a copy on the CPU), so both give the same codes. The
order of operations is fixed by the wire format (messages from older Cleave versions decode the
same): saturate to ``[lo, hi]``, divide by the float32 scale, round half to even, add the zero
point, clamp. :func:`quantize_array` computes exactly that with fewer passes (see there).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from compressor._arrays import as_float32, is_tensor, like

_TINY = float(np.finfo(np.float32).tiny)


def qmax(bits: int) -> int:
    """Largest code at ``bits`` bits."""
    return (1 << bits) - 1


def _host(t: Any, dtype: Any) -> np.ndarray:
    if is_tensor(t):
        t = t.detach().cpu().numpy()
    return np.asarray(t, dtype=dtype)


def affine_params(lo: Any, hi: Any, bits: int) -> tuple[Any, Any]:
    """float32 scales and int32 zero points for the ranges ``[lo, hi]`` (same shapes as ``lo``;
    torch tensors when ``lo`` is one, else numpy arrays)."""
    scales, zero_points = affine_params_array(_host(lo, np.float64), _host(hi, np.float64), bits)
    return like(scales, lo), like(zero_points, lo)


def affine_params_array(lo: np.ndarray, hi: np.ndarray, bits: int) -> tuple[np.ndarray, np.ndarray]:
    """:func:`affine_params` on numpy arrays (float64 math, as the wire format fixes)."""
    top = qmax(bits)
    if np.ndim(lo) == 0:  # per tensor: the same math on Python floats, without ~15 array round trips
        scale, zero_point = _affine_params_scalar(float(lo), float(hi), top)
        return np.array(scale, np.float32), np.array(zero_point, np.int32)
    lo64, hi64 = np.asarray(lo, np.float64), np.asarray(hi, np.float64)
    lo0, hi0 = np.minimum(lo64, 0.0), np.maximum(hi64, 0.0)
    scale = np.maximum((hi0 - lo0) / top, _TINY)
    # A constant group c gets scale |c|: c / scale is exactly +-1, so c comes back bit-exact.
    constant = (lo64 == hi64) & (lo64 != 0)
    scale = np.where(constant, np.abs(lo64), scale)
    scale = np.where(hi0 == lo0, 1.0, scale)
    # Round the float32 scale up, never down, so hi still lands on the grid's top code.
    scale32 = scale.astype(np.float32)
    up = np.nextafter(scale32, np.float32(np.inf))
    scale32 = np.where(scale32.astype(np.float64) < scale, up, scale32).astype(np.float32)
    zero_point = np.clip(np.rint(-lo0 / scale32.astype(np.float64)), 0, top).astype(np.int32)
    return scale32, zero_point


def _affine_params_scalar(lo: float, hi: float, top: int) -> tuple[np.float32, int]:
    """:func:`affine_params_array` for one group: float64 steps in the same order, so the same result."""
    lo0, hi0 = min(lo, 0.0), max(hi, 0.0)
    scale = max((hi0 - lo0) / top, _TINY)
    if lo == hi and lo != 0:
        scale = abs(lo)
    if hi0 == lo0:
        scale = 1.0
    scale32 = np.float32(scale)
    if float(scale32) < scale:
        scale32 = np.nextafter(scale32, np.float32(np.inf))
    return scale32, min(max(round(-lo0 / float(scale32)), 0), top)  # round(): half to even, as np.rint


def _broadcast(t: np.ndarray, ndim: int, axis: int | None) -> np.ndarray:
    """Per-group values shaped to broadcast against an ``ndim``-d tensor (a 0-d array per tensor)."""
    if axis is None:
        return t.reshape(())
    shape = [1] * ndim
    shape[axis] = -1
    return t.reshape(shape)


def quantize(x: Any, bits: int, lo: Any, hi: Any, axis: int | None) -> tuple[Any, Any, Any]:
    """Quantize floating ``x`` onto ``bits``-bit codes.

    Args:
        x: floating tensor or array with finite values (computed in float32; a torch tensor on
            another device is copied to the host first).
        bits: code width, 1 to 8.
        lo, hi: the clipping range: 0-d for per tensor, shape ``(x.shape[axis],)`` per channel.
        axis: ``None`` per tensor, else the channel axis (non-negative).

    Returns:
        ``(q, scales, zero_points)``: ``q`` uint8 with ``x``'s shape (contiguous), float32 scales
        and int32 zero points of ``lo``'s shape; torch tensors when ``x`` is one.
    """
    lo_a, hi_a = _host(lo, np.float32), _host(hi, np.float32)
    scales, zero_points = affine_params_array(lo_a, hi_a, bits)
    q = quantize_array(as_float32(x), bits, scales, zero_points, lo_a, hi_a, axis)
    if is_tensor(x):
        q = like(q, x).to(x.device)
        return q, like(scales, lo).to(x.device), like(zero_points, lo).to(x.device)
    return q, scales, zero_points


def quantize_array(
    x: np.ndarray,
    bits: int,
    scales: np.ndarray,
    zero_points: np.ndarray,
    lo: np.ndarray,
    hi: np.ndarray,
    axis: int | None,
    *,
    covers: bool = False,
) -> np.ndarray:
    """Codes of float32 ``x`` for given parameters: a new C-contiguous uint8 array of ``x``'s shape.

    Equal, code for code, to ``clamp(round(clamp(x, lo, hi) / s) + z, 0, qmax)`` in float32, in
    three passes over ``x``: because float32 division by ``s > 0`` is monotone and correctly
    rounded, ``clamp(x, lo, hi) / s == clamp(x / s, lo / s, hi / s)``; and because rounding is
    monotone and ``-z``, ``qmax - z`` are integers, the final clamp folds into one clamp before
    rounding. So: divide, clamp once to the intersected bounds, round (adding ``z``) into uint8.

    ``covers=True`` promises that ``[lo, hi]`` contains every value of its group (a min-max
    range); the clamp is then skipped when the bounds show it cannot change anything.
    """
    top = qmax(bits)
    if np.ndim(scales) == 0:
        return _quantize_per_tensor(x, top, scales, zero_points, lo, hi, covers)
    s32 = scales.astype(np.float32, copy=False)
    z32 = zero_points.astype(np.float32)
    a = np.divide(lo.astype(np.float32, copy=False), s32)  # fl(lo / s): where clamp(x, lo, hi) / s starts
    b = np.divide(hi.astype(np.float32, copy=False), s32)
    a = np.minimum(a, b)  # clamp(x, lo, hi) with lo > hi is hi
    c, d = -z32, np.float32(top) - z32  # the final clamp's bounds, before adding z
    low, high = np.maximum(a, c), np.minimum(b, d)
    # Disjoint intervals: clamp(clamp(v, a, b), c, d) is the constant d (a > d) or c (b < c).
    above, below = a > d, b < c
    low, high = np.where(above, d, np.where(below, c, low)), np.where(above, d, np.where(below, c, high))
    low, high = low.astype(np.float32), high.astype(np.float32)

    buf = np.divide(x, _broadcast(s32, x.ndim, axis), out=np.empty(x.shape, np.float32))
    if not (covers and np.array_equal(low, a) and np.array_equal(high, b)):
        np.clip(buf, _broadcast(low, x.ndim, axis), _broadcast(high, x.ndim, axis), out=buf)
    q = np.empty(x.shape, np.uint8)
    if not z32.any():
        np.rint(buf, out=q, casting="unsafe")  # in [0, qmax]: the cast is exact
    else:
        np.rint(buf, out=buf)
        np.add(buf, _broadcast(z32, x.ndim, axis), out=q, casting="unsafe")
    return q


def per_tensor_steps(
    top: int, scale: Any, zero_point: Any, lo: Any, hi: Any, covers: bool
) -> tuple[np.float32, float, np.float32, np.float32, bool]:
    """The per-element steps of per-tensor quantization: ``(s, z, low, high, clamp)`` such that the
    codes are ``rint(clamp(x / s, low, high)) + z`` (the clamp only where ``clamp`` is true), as
    :func:`quantize_array` derives them (float32 scalars)."""
    s32, z = np.float32(scale), float(zero_point)
    a, b = np.float32(lo) / s32, np.float32(hi) / s32
    a = min(a, b)
    c, d = np.float32(-z), np.float32(top - z)
    low, high = max(a, c), min(b, d)
    if a > d:
        low = high = d
    elif b < c:
        low = high = c
    return s32, z, np.float32(low), np.float32(high), not (covers and low == a and high == b)


def _quantize_per_tensor(
    x: np.ndarray, top: int, scale: np.ndarray, zero_point: np.ndarray, lo: np.ndarray, hi: np.ndarray, covers: bool
) -> np.ndarray:
    """:func:`quantize_array` for one group, with float32 scalars for the bounds (same steps)."""
    s32, z, low, high, clamp = per_tensor_steps(top, scale, zero_point, lo, hi, covers)
    buf = np.divide(x, s32, out=np.empty(x.shape, np.float32))
    if clamp:
        np.clip(buf, low, high, out=buf)
    q = np.empty(x.shape, np.uint8)
    if z == 0:
        np.rint(buf, out=q, casting="unsafe")
    else:
        np.rint(buf, out=buf)
        np.add(buf, np.float32(z), out=q, casting="unsafe")
    return q


def dequantize(q: Any, scales: Any, zero_points: Any, axis: int | None) -> Any:
    """float32 ``(q - zero_point) * scale``, broadcasting per-channel parameters along ``axis``;
    a torch tensor when ``q`` is one."""
    codes = q.detach().cpu().numpy() if is_tensor(q) else np.asarray(q)
    out = dequantize_array(codes, _host(scales, np.float32), _host(zero_points, np.int32), axis)
    return like(out, q).to(q.device) if is_tensor(q) else out


def dequantize_array(
    q: np.ndarray, scales: np.ndarray, zero_points: np.ndarray, axis: int | None, out: np.ndarray | None = None
) -> np.ndarray:
    """:func:`dequantize` on numpy: one or two passes into ``out`` (a new float32 array by default)."""
    if out is None:
        out = np.empty(q.shape, np.float32)
    s_b = _broadcast(np.asarray(scales, np.float32), q.ndim, axis)
    z32 = np.asarray(zero_points).astype(np.float32)
    if z32.any():
        np.subtract(q, _broadcast(z32, q.ndim, axis), out=out)
        np.multiply(out, s_b, out=out)
    else:  # (q - 0) * s: the same float32 product, without the subtraction pass
        np.multiply(q, s_b, out=out)
    return out
