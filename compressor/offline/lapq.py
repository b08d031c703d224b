"""LAPQ: loss-aware post-training quantization (Nahshan et al., 2021), for clipping values.

Per-tensor MSE-optimal clipping (ACIQ) ignores that layers interact: the clipping values that
minimise the *network's* loss are jointly coupled. LAPQ therefore

1. initialises every clipping value at the minimiser of the Lp quantization error of its own tensor,
   ``argmin_alpha mean|Q_alpha(x) - x|^p``, with one ``p`` for all tensors chosen in ``[2, 4]`` by the
   calibration loss (larger ``p`` keeps more of the range, smaller clips harder), then
2. optimises all clipping values jointly with Powell's method (derivative-free, so the quantized
   network's loss is simply evaluated) on the calibration loss.

:func:`lapq` is generic: it takes a ``loss(clips) -> float`` and an ``init(p) -> clips``; it keeps
the best point seen, so its result is never worse than its initialisation, and stops after
``max_evals`` loss evaluations or ``max_seconds``. The split-model loss (label-free KL of the
quantized output from the float output, or cross-entropy with labels) is built in
:mod:`partitioner.calibration`.

LAPQ's values reach the wire through the ``"fixed"`` clipper: ``int4:fixed(lo=0.0,hi=2.71)``. Only
the sender uses clipping (the receiver reads scales and zero points from each tensor), so the values
need no proto field; a live set of several tensors takes one spec per tensor (:func:`fixed_specs`).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from compressor.clipping import fixed  # noqa: F401  (re-exported: the clipper LAPQ calibrates for)
from compressor.quant import dequantize, quantize
from compressor.spec import EncodingSpec

__all__ = ["LapqResult", "fixed", "fixed_specs", "lapq", "lp_clip", "quantize_clipped"]

P_GRID = (2.0, 2.5, 3.0, 3.5, 4.0)


def clip_bounds(x: torch.Tensor, alpha: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The range a clipping value ``alpha`` stands for: ``[0, alpha]`` for a non-negative tensor (a
    ReLU output), else ``[-alpha, alpha]``, each intersected with ``x``'s own range."""
    mn, mx = torch.aminmax(x.detach().reshape(-1))
    a = torch.tensor(abs(float(alpha)), dtype=torch.float32)
    lo = mn if float(mn) >= 0 else torch.maximum(mn, -a)
    hi = torch.minimum(mx, a)
    return lo, torch.maximum(hi, lo)


def quantize_clipped(x: torch.Tensor, bits: int, alpha: float) -> torch.Tensor:
    """``x`` through per-tensor affine quantization clipped at ``alpha`` (see :func:`clip_bounds`)."""
    lo, hi = clip_bounds(x, alpha)
    return dequantize(*quantize(x, bits, lo, hi, None), None)


def lp_clip(x: torch.Tensor, bits: int, p: float, points: int = 64, sample: int = 1 << 16) -> float:
    """The clipping value minimising ``mean |Q(x) - x|^p`` over a grid of ``points`` values in
    ``(0, max|x|]`` (on a fixed subsample of at most ``sample`` values, for speed)."""
    flat = x.detach().reshape(-1).float()
    if flat.numel() > sample:
        flat = flat[torch.linspace(0, flat.numel() - 1, sample).long()]
    top = float(flat.abs().max())
    if top == 0.0:
        return 0.0
    best, best_err = top, math.inf
    for alpha in np.linspace(top / points, top, points):
        err = float((quantize_clipped(flat, bits, alpha) - flat).abs().pow(p).mean())
        if err < best_err:
            best, best_err = float(alpha), err
    return best


@dataclass
class LapqResult:
    """What :func:`lapq` found.

    Attributes:
        clips: the best clipping values seen (the initialisation if nothing beat it).
        loss: the calibration loss at ``clips``.
        init_clips, init_loss: the Lp initialisation and its loss.
        p: the chosen Lp norm.
        evals: loss evaluations spent (initialisation included).
        seconds: wall time spent.
        stopped: ``"converged"``, ``"max_evals"`` or ``"max_seconds"``.
        p_losses: the loss at each ``p`` tried.
    """

    clips: np.ndarray
    loss: float
    init_clips: np.ndarray
    init_loss: float
    p: float
    evals: int
    seconds: float
    stopped: str
    p_losses: dict[float, float] = field(default_factory=dict)


class _Budget(Exception):
    """Raised inside the objective to stop Powell when the budget is spent."""


def lapq(
    loss: Callable[[np.ndarray], float],
    init: Callable[[float], np.ndarray],
    *,
    p_grid: Sequence[float] = P_GRID,
    max_evals: int = 200,
    max_seconds: float = 60.0,
    powell: bool = True,
) -> LapqResult:
    """Run LAPQ: pick the Lp initialisation with the lowest ``loss``, then Powell on all values.

    Args:
        loss: calibration loss of a vector of clipping values (lower is better).
        init: the Lp-optimal clipping values for a given ``p``.
        p_grid: the values of ``p`` tried (LAPQ searches ``[2, 4]``).
        max_evals: bound on ``loss`` calls, the ``p`` search included (at least one call is made).
        max_seconds: bound on wall time, checked before each ``loss`` call after the first.
        powell: run the joint optimisation (False: the Lp initialisation only).
    """
    start = time.perf_counter()
    evals = 0
    best: tuple[float, np.ndarray] = (math.inf, np.zeros(0))
    stopped = "converged"

    def objective(clips: np.ndarray) -> float:
        nonlocal evals, best
        # The first evaluation always runs: without it there is no result to return.
        if evals and evals >= max_evals:
            raise _Budget("max_evals")
        if evals and time.perf_counter() - start > max_seconds:
            raise _Budget("max_seconds")
        evals += 1
        value = float(loss(np.abs(clips)))
        if not math.isfinite(value):
            value = math.inf
        if value < best[0]:
            best = (value, np.abs(np.array(clips, dtype=np.float64)))
        return value

    p_losses: dict[float, float] = {}
    candidates: dict[float, np.ndarray] = {}
    for p in p_grid:
        candidates[p] = np.asarray(init(p), dtype=np.float64)
        try:
            p_losses[p] = objective(candidates[p])
        except _Budget as e:
            stopped = str(e)
            break
    p_best = min(p_losses, key=p_losses.__getitem__)
    init_clips, init_loss = candidates[p_best], p_losses[p_best]
    best = (init_loss, init_clips.copy())
    if powell and stopped == "converged" and init_clips.size:
        from scipy.optimize import minimize  # heavy import, only when optimising

        # Clipping values live in (0, max]: bound Powell to a sane box around the initialisation.
        bounds = [(1e-3 * c if c > 0 else 0.0, 4.0 * c if c > 0 else 1.0) for c in init_clips]
        try:
            minimize(
                objective,
                init_clips,
                method="Powell",
                bounds=bounds,
                options={"maxfev": max(max_evals - evals, 1), "xtol": 1e-3, "ftol": 1e-4},
            )
        except _Budget as e:
            stopped = str(e)
        if stopped == "converged" and evals >= max_evals:
            stopped = "max_evals"
    return LapqResult(
        clips=best[1],
        loss=best[0],
        init_clips=init_clips,
        init_loss=init_loss,
        p=p_best,
        evals=evals,
        seconds=time.perf_counter() - start,
        stopped=stopped,
        p_losses=p_losses,
    )


def fixed_specs(
    tensors: Sequence[torch.Tensor], clips: Sequence[float], bits: int, codec: str = "zstd"
) -> list[EncodingSpec]:
    """One ``int<bits>:fixed(lo=..,hi=..)`` spec per live tensor, carrying LAPQ's clipping values."""
    specs = []
    for x, alpha in zip(tensors, clips, strict=True):
        lo, hi = clip_bounds(x, float(alpha))
        specs.append(
            EncodingSpec(
                encoding="affine",
                bits=bits,
                clip="fixed",
                clip_params=(("lo", float(lo)), ("hi", float(hi))),
                codec=codec,
            )
        )
    return specs
