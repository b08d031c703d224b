"""ACIQ: analytical clipping for integer quantization (Banner, Nahshan & Soudry, NeurIPS 2019).

Clipping a tensor to ``[-alpha, alpha]`` before uniform quantization trades clipping noise (values
beyond ``alpha`` saturate) against rounding noise (a wider range means wider steps). For a known
prior the expected mean squared error is analytic, so the optimal ``alpha`` is a constant times the
prior's scale:

- Laplace(mu, b):  ``E = 2 b^2 exp(-alpha/b) + alpha^2 / (3 * 4^M)``   (b = mean absolute deviation)
- Gauss(mu, s):    ``E = (alpha^2 + s^2)(1 - erf(alpha / (s sqrt 2))) - sqrt(2/pi) alpha s exp(-alpha^2/2s^2)
                         + alpha^2 / (3 * 4^M)``

The rounding term assumes the paper's ``2^M`` bins of width ``2 alpha / 2^M``; minimising
numerically reproduces the paper's table (:data:`PAPER_LAPLACE`, :data:`PAPER_GAUSS`)::

    bits            2     3     4     5     6     7     8
    Laplace a/b   2.83  3.89  5.03  6.20  7.41  8.64  9.89
    Gauss   a/s   1.71  2.15  2.55  2.94  3.29  3.61  3.92

Cleave's affine grid has ``2^M - 1`` steps between ``lo`` and ``hi`` (both are codes), so the
clipper uses the same objective with step ``2 alpha / (2^M - 1)`` (:func:`optimal_ratio` with
``grid="affine"``): slightly smaller ratios at low bits, as the steps are wider. After a ReLU the
values are a point mass at 0 plus a one-sided tail; the grid is then ``[0, alpha]`` with step
``alpha / (2^M - 1)``, the tail is modelled as exponential (half-Laplace, ``b`` = mean of the
positive values) or half-normal (``s`` = RMS of the positive values), and the clipping noise is
that of one tail.

Also here: per-channel bit allocation (``2^M_i`` proportional to ``alpha_i^(2/3)``, the paper's
optimum for a fixed total number of bins) and bias correction of quantized weights (restore each
output channel's mean and norm). :func:`aciq` is registered as the codec clipper ``"aciq"``, so
``int4:aciq``, ``int3c:aciq(prior=gauss)`` or ``int2:aciq(half=off)`` work with no codec change.
"""

from __future__ import annotations

import math
from functools import cache
from typing import TYPE_CHECKING

import numpy as np

from compressor.clipping import array_clipper, register_clipper

if TYPE_CHECKING:  # the clipper is numpy; only the offline weight helpers below need torch
    import torch

__all__ = [
    "PAPER_GAUSS",
    "PAPER_LAPLACE",
    "aciq",
    "allocate_channel_bits",
    "bias_correct",
    "bias_correction_terms",
    "expected_mse",
    "optimal_ratio",
]

PRIORS = ("laplace", "gauss")
# The published optimal clipping ratios (Banner et al. 2019), for M = 2..8 bits.
PAPER_LAPLACE = {2: 2.83, 3: 3.89, 4: 5.03, 5: 6.2, 6: 7.41, 7: 8.64, 8: 9.89}
PAPER_GAUSS = {2: 1.71, 3: 2.15, 4: 2.55, 5: 2.94, 6: 3.29, 7: 3.61, 8: 3.92}


def _clip_noise(ratio: float, prior: str) -> float:
    """Expected clipping noise of both tails of a unit-scale prior clipped at ``ratio``."""
    if prior == "laplace":
        return 2.0 * math.exp(-ratio)
    # Two Gaussian tails: (a^2 + 1) erfc(a / sqrt 2) - sqrt(2/pi) a exp(-a^2 / 2).
    return (ratio * ratio + 1.0) * math.erfc(ratio / math.sqrt(2.0)) - math.sqrt(2.0 / math.pi) * ratio * math.exp(
        -ratio * ratio / 2.0
    )


def expected_mse(ratio: float, bits: int, prior: str = "laplace", *, half: bool = False, grid: str = "paper") -> float:
    """Expected quantization MSE of a unit-scale prior (b = 1 or sigma = 1) clipped at ``ratio``.

    Args:
        ratio: ``alpha / b`` (Laplace) or ``alpha / sigma`` (Gauss).
        bits: the code width ``M``.
        prior: ``"laplace"`` or ``"gauss"``.
        half: one-sided (after ReLU): grid ``[0, alpha]``, one tail. The result is per positive value.
        grid: ``"paper"`` (``2^M`` bins, the paper's model) or ``"affine"`` (``2^M - 1`` steps between
            two codes, Cleave's quantizer).
    """
    if prior not in PRIORS:
        raise ValueError(f"prior: {prior!r} is not one of {', '.join(PRIORS)}")
    steps = (1 << bits) if grid == "paper" else (1 << bits) - 1
    width = (1.0 if half else 2.0) * ratio / steps
    # One exponential tail of scale b (or a half-normal's) has exactly the clipping noise of both
    # tails of the Laplace (or normal) prior: the density is doubled on one side.
    return _clip_noise(ratio, prior) + width * width / 12.0


@cache
def optimal_ratio(bits: int, prior: str = "laplace", *, half: bool = False, grid: str = "affine") -> float:
    """The ``alpha / scale`` minimising :func:`expected_mse` (golden-section search; it is unimodal).

    With ``grid="paper"`` this reproduces :data:`PAPER_LAPLACE` / :data:`PAPER_GAUSS` to two decimals.
    """
    if not 1 <= bits <= 16:
        raise ValueError(f"bits: {bits} is not in 1..16")
    lo, hi = 1e-3, 40.0
    inv_phi = (math.sqrt(5.0) - 1.0) / 2.0

    def f(r: float) -> float:
        return expected_mse(r, bits, prior, half=half, grid=grid)

    a, b = hi - inv_phi * (hi - lo), lo + inv_phi * (hi - lo)
    fa, fb = f(a), f(b)
    for _ in range(200):
        if fa < fb:
            hi, b, fb = b, a, fa
            a = hi - inv_phi * (hi - lo)
            fa = f(a)
        else:
            lo, a, fa = a, b, fb
            b = lo + inv_phi * (hi - lo)
            fb = f(b)
    return (lo + hi) / 2.0


def _scale(rows: np.ndarray, prior: str, center: np.ndarray) -> np.ndarray:
    """Per row: the Laplace b (mean absolute deviation) or the Gaussian sigma around ``center``."""
    dev = rows - center[:, None]  # float64: center is
    return np.abs(dev).mean(1) if prior == "laplace" else np.sqrt(np.square(dev).mean(1))


@array_clipper
def aciq(rows: np.ndarray, bits: int, prior: str = "laplace", half: str = "auto") -> tuple[np.ndarray, np.ndarray]:
    """Clipper ``"aciq"``: the analytically optimal range of each row (see the module docstring).

    The statistics (mean, deviation, tail scale) accumulate in float64, so the float32 range is
    the correctly rounded one whatever the summation order: numpy, torch or another language
    computing the same formula get the same bounds (a float32 sum would differ in its last bits).

    Args:
        rows: ``(groups, n)`` float32 numpy, one row per quantization group.
        bits: code width.
        prior: ``"laplace"`` (default; activations and weights are closer to it) or ``"gauss"``.
        half: ``"auto"`` treats a row with no negative value as a ReLU output (one-sided grid
            ``[0, alpha]``); ``"on"`` forces that for every row (negatives saturate at 0 only if the
            row's min is non-negative: otherwise the row falls back to two-sided); ``"off"`` is always
            two-sided around the row mean.

    Returns:
        ``(lo, hi)`` float32 per row, never wider than the row's own min / max.
    """
    if prior not in PRIORS:
        raise ValueError(f"prior: {prior!r} is not one of {', '.join(PRIORS)}")
    if half not in ("auto", "on", "off"):
        raise ValueError(f"half: {half!r} is not auto, on or off")
    mn, mx = rows.min(1).astype(np.float64), rows.max(1).astype(np.float64)
    one_sided = mn >= 0 if half != "off" else np.zeros(mn.shape, bool)
    lo, hi = mn.copy(), mx.copy()
    if not one_sided.all():  # two-sided rows: symmetric around the mean
        two = ~one_sided
        sub = rows if two.all() else rows[two]
        mean = sub.mean(1, dtype=np.float64)
        alpha = optimal_ratio(bits, prior) * _scale(sub, prior, mean)
        lo[two], hi[two] = np.maximum(mn[two], mean - alpha), np.minimum(mx[two], mean + alpha)
    if one_sided.any():  # no negative value: the positive part's scale, and lo stays the row's min
        sub = rows if one_sided.all() else rows[one_sided]
        count = np.maximum(np.count_nonzero(sub, axis=1), 1)  # the values > 0 (none is negative)
        # Exponential b = the positive values' mean; half-normal sigma = their RMS.
        if prior == "laplace":
            tail = sub.sum(1, dtype=np.float64) / count
        else:
            tail = np.sqrt(np.square(sub, dtype=np.float64).sum(1) / count)
        hi[one_sided] = np.minimum(mx[one_sided], optimal_ratio(bits, prior, half=True) * tail)
    lo32, hi32 = lo.astype(np.float32), hi.astype(np.float32)
    return lo32, np.maximum(hi32, lo32)


def allocate_channel_bits(alphas: torch.Tensor, mean_bits: float, min_bits: int = 1, max_bits: int = 8) -> torch.Tensor:
    """Per-channel bit widths with ``2^M_i`` proportional to ``alpha_i^(2/3)`` (ACIQ, section 4).

    For a fixed total number of bins ``B = sum 2^M_i`` the rounding noise ``sum alpha_i^2 / 4^M_i`` is
    minimal at ``2^M_i = B alpha_i^(2/3) / sum_j alpha_j^(2/3)``. Here the budget is the total number
    of bits, ``round(n * mean_bits)``: the real-valued optimum is computed for ``B = n 2^mean_bits``,
    then rounded by largest remainder and clamped to ``[min_bits, max_bits]`` so that the widths sum
    exactly to the budget (when the budget is reachable within the clamps).

    Returns:
        int64 tensor of widths, one per channel.
    """
    import torch

    a = alphas.double().clamp(min=1e-12).reshape(-1)
    n = a.numel()
    budget = round(n * mean_bits)
    if not n * min_bits <= budget <= n * max_bits:
        raise ValueError(f"mean_bits: {mean_bits} is outside [{min_bits}, {max_bits}]")
    weights = a.pow(2.0 / 3.0)
    ideal = torch.log2(n * 2.0**mean_bits * weights / weights.sum()).clamp(min_bits, max_bits)
    bits = ideal.floor().long()
    # Hand out (or take back) one bit at a time where the real-valued optimum is furthest away.
    while int(bits.sum()) != budget:
        gap = ideal - bits
        if int(bits.sum()) < budget:
            gap[bits >= max_bits] = -math.inf
            bits[int(gap.argmax())] += 1
        else:
            gap[bits <= min_bits] = math.inf
            bits[int(gap.argmin())] -= 1
    return bits


def bias_correction_terms(w: torch.Tensor, w_q: torch.Tensor, axis: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel ``(gain, offset)`` with ``bias_correct(w, w_q) == w_q * gain + offset`` (broadcast
    along ``axis``): what a packed weight stores next to its codes to apply the correction at load."""
    import torch

    flat = w.movedim(axis, 0).reshape(w.shape[axis], -1).double()
    flat_q = w_q.movedim(axis, 0).reshape(w.shape[axis], -1).double()
    mu, mu_q = flat.mean(1), flat_q.mean(1)
    norm, norm_q = (flat - mu[:, None]).norm(dim=1), (flat_q - mu_q[:, None]).norm(dim=1)
    gain = torch.where(norm_q > 0, norm / norm_q.clamp(min=1e-30), torch.ones_like(norm))
    return gain, mu - mu_q * gain


def bias_correct(w: torch.Tensor, w_q: torch.Tensor, axis: int = 0) -> torch.Tensor:
    """Bias correction of quantized weights (ACIQ, section 5): per channel along ``axis``, shift
    and scale ``w_q`` so that its mean and the norm of its deviation match the float ``w``'s.

    Quantization shifts each output channel's mean weight, which shows up as a systematic bias in
    the layer's output whenever the inputs have a non-zero mean (always, after a ReLU).

    Returns ``mean(w) + (w_q - mean(w_q)) * ||w - mean(w)|| / ||w_q - mean(w_q)||``.
    """
    gain, offset = bias_correction_terms(w, w_q, axis)
    shape = [1] * w.dim()
    shape[axis] = -1
    return (w_q.double() * gain.reshape(shape) + offset.reshape(shape)).to(w.dtype)


register_clipper("aciq", aciq, numpy=True)
