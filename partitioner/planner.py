"""Choose a placement: the candidate with the lowest predicted cost that fits the budgets.

Constraints:
* edge memory: head weights plus peak live activations must fit ``memory_budget`` bytes;
* accuracy: the model's output with the encoded features must stay within ``max_rel_error``
  (max |y - y_float| / max |y_float|) and agree on top-1 at least ``min_top1`` of the time, on
  calibration inputs. Distortion is measured lazily, best candidate first, and cached: only the
  candidates that could win are ever evaluated.

Objectives: ``latency`` (the sum of the stages) or ``throughput`` (the slowest pipelined stage).
Baselines for comparison: ``neurosurgeon`` (best cut with fp32 features, no compression),
``edge-only``, ``cloud-raw`` (the input as 8-bit codes + zstd), ``cloud-jpeg`` and ``cloud-webp`` (the
input as JPEG / WebP at the default quality 90).

:class:`SwitchPolicy` adds hysteresis for re-planning: a new plan replaces the current one only
when it is predicted to be clearly faster, so a noisy link estimate does not make the edge flap.
"""

from __future__ import annotations

import bisect
import functools
import json
import operator
import os
import statistics
import time
import weakref
from collections import OrderedDict, deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

import numpy as np

from compressor import EncodingSpec, clipping, decode, encode
from compressor.quant import affine_params_array, dequantize_array, quantize_array

from ._lazy import fx, torch  # imported on first use: ranking candidates needs no torch (the light edge)
from .costmodel import (
    CLOUD_ONLY,
    EDGE_ONLY,
    REPLY_ENCODING,
    SPLIT,
    UNCOMPRESSED,
    Breakdown,
    Candidate,
    CostModel,
    CutCost,
    Link,
    calibration_key,
    is_lossless,
)
from .profile import cache_dir, monotone_fit

if TYPE_CHECKING:
    from .graph import Cut, ModelGraph
    from .loaded import LoadedModel

OBJECTIVES = ("latency", "throughput")
CLOUD_SAMPLES = 3  # replies before the cloud's measured compute corrects its profile
BASELINES = ("neurosurgeon", "edge-only", "cloud-raw", "cloud-jpeg", "cloud-webp")
#: Why :meth:`Planner.rank` passed over a candidate whose accuracy it had no time left to measure.
UNMEASURED = "accuracy not measured yet (the walk's time ran out)"


@dataclass(frozen=True)
class Distortion:
    rel_error: float
    top1: float  # fraction of calibration inputs whose top-1 class matches the float model's


@dataclass(frozen=True)
class Scored:
    candidate: Candidate
    predicted: Breakdown
    cost_ms: float  # what the objective minimises
    distortion: Distortion | None = None
    rejected: str = ""  # why it does not fit the budgets; empty when it does


@dataclass
class Budgets:
    memory_bytes: int | None = None
    max_rel_error: float | None = None
    min_top1: float | None = None


class Planner:
    """Ranks every candidate of a :class:`CostModel` for a link under budgets."""

    #: The most candidates :meth:`rank` screens in one batch (``screen_many``).
    LOOKAHEAD = 32
    #: The smallest head, as a share of the whole model's edge time, whose served time corrects E(k).
    MIN_EDGE_SHARE = 0.02
    #: A cut's served edge times stop shaping E(k) (:meth:`edge_ms`) once this many edge observations came after them.
    EDGE_MEMORY = 256
    #: The most sizes measured ahead of the walk at once (:meth:`measure_on_demand`).
    MOST_SIZES = 1024

    def __init__(
        self,
        cost: CostModel,
        budgets: Budgets | None = None,
        distortion: Callable[[Candidate], Distortion] | None = None,
        objective: str = "latency",
        feature_encodings: tuple[str, ...] | None = None,
        input_is_8bit: bool = True,
        screen: Callable[[Candidate], Distortion | None] | None = None,
        screen_many: Callable[[list[Candidate]], list[Distortion | None]] | None = None,
        quantized_heads: bool = False,
    ) -> None:
        """``quantized_heads``: splits run quantized heads (an edge's ``head.weight_bits`` under 32), so no
        split is lossless, not even one sending float32 features: ``distortion`` measures them all.

        ``input_is_8bit``: inputs come from 8-bit images (camera frames, files), so sending them
        as 8-bit codes per channel (cloud-only ``int8c``) loses nothing against the source and is
        not charged to the accuracy budget.

        ``screen``: a cheap look at a candidate before ``distortion`` measures it, returning the
        best distortion the full measurement could still find (a lower bound on its relative
        error, an upper bound on its top-1 agreement; None when it cannot tell). A candidate whose
        bound already breaks the accuracy budget is rejected without the full measurement, so
        the budgets decide exactly as they would have (see :meth:`DistortionMeter.screen`).

        ``screen_many``: ``screen`` for several candidates at once (one batched pass through the
        model: :meth:`DistortionMeter.screen_many`). When given, :meth:`rank` screens the next few
        unscreened candidates of its walk together, 4 at first and twice as many each time the
        walk goes on (at most :attr:`LOOKAHEAD`); a bound is a bound however it was found, so the
        same candidates are rejected and accepted."""
        if objective not in OBJECTIVES:
            raise ValueError(f"objective: {objective!r} is not one of {', '.join(OBJECTIVES)}")
        self.cost = cost
        self.budgets = budgets or Budgets()
        self.objective = objective
        self._distortion = distortion
        self.input_is_8bit = input_is_8bit
        self.quantized_heads = quantized_heads
        self._screen = screen
        self._screen_many = screen_many
        self._lookahead = 4
        self._measured: dict[tuple[int, str], Distortion] = {}
        self._bounds: dict[tuple[int, str], Distortion | None] = {}
        self._more: Callable[[dict[int, frozenset[str]]], CostModel] | None = None  # see measure_on_demand
        self._asked: dict[int, set[str]] = {}
        self._pending: dict[Link, list[tuple[float, int, str]]] = {}
        self._chunk = 0
        self._misses = 0  # full measurements that broke the accuracy budget (screens passed them)
        self._bounded_at: dict[tuple[int, str], int] = {}  # a bound's key -> self._misses when it was found
        self._encodings = {"feature_encodings": feature_encodings} if feature_encodings else {}
        self._encodings["input_is_8bit"] = input_is_8bit
        self.candidates = cost.candidates(**self._encodings)
        self.cloud_scale = 1.0
        self.cloud_observations = 0
        self._cloud_ratios: deque[float] = deque(maxlen=9)
        self.edge_scale = 1.0
        self._edge_ratios: deque[float] = deque(maxlen=9)
        # Per cut observed (-1: edge-only): (its predicted E(k), the last few served/predicted ratios, the count of
        # edge observations when it was last served). See edge_ms.
        self._edge_at: dict[int, tuple[float, deque[float], int]] = {}
        self._edge_seen = 0
        self._edge_points: tuple[list[float], list[float]] | None = None  # the corrected curve, until the next one
        self._byte_ratios: dict[tuple[int, str], deque[float]] = {}  # (cut index, encoding) -> sent / predicted
        #: False when the last :meth:`rank` ran out of time before a candidate it had to measure
        #: (see its ``deadline``): a later walk, measuring what this one could not, may find better.
        self.walk_complete = True

    @property
    def measurements(self) -> int:
        """How many candidates' distortions this planner has measured (or looked up) so far."""
        return len(self._measured)

    def use(self, cost: CostModel) -> None:
        """Rank ``cost``'s candidates from now on: the same model on the same hosts, with the sizes of
        more cuts measured (:meth:`CostModel.measure`'s ``cuts``). Accuracy measured so far is kept:
        it depends on the cut and the encoding, not on sizes."""
        self.cost = cost
        self.candidates = cost.candidates(**self._encodings)

    def floor(self, cut: CutCost, link: Link, encoding: str = "") -> float:
        """The least a candidate at ``cut`` sending ``encoding`` can cost on ``link``, its size unknown:
        its compute at both ends, its codec's times (none when ``encoding`` is not given), the RTT
        and the reply, with no bytes to send (a prediction only grows with the bytes sent and the
        codec's time; ``tests/test_plan_speed.py`` checks it against every candidate)."""
        kind = CLOUD_ONLY if cut.index == 0 else SPLIT
        encode_ms, decode_ms = cut.encode_ms.get(encoding, 0.0), cut.decode_ms.get(encoding, 0.0)
        bare = Candidate(
            kind,
            cut.index,
            cut.name,
            encoding,
            0,
            min(self.cost.output_bytes, self.cost.reply_bytes or self.cost.output_bytes),
            cut.edge_ms,
            encode_ms,
            decode_ms,
            cut.cloud_ms,
            0,
        )
        return self.score(bare, link).cost_ms

    def observe_cloud(self, cut_index: int, compute_ms: float) -> None:
        """Correct the cloud's predicted compute from what it reports doing (every reply carries it).

        The cloud profile is taken once, on an idle host; under load, with other sessions or batching
        its tail runs slower (or faster) by about the same factor at every cut. The median ratio of
        measured to predicted over the last few replies scales C(k) for every candidate.
        """
        predicted = next((c.cloud_ms for c in self.cost.cuts if c.index == cut_index), 0.0)
        if predicted <= 0.05 or compute_ms <= 0:
            return  # too small to give a meaningful ratio
        self._cloud_ratios.append(compute_ms / predicted)
        self.cloud_observations += 1
        if len(self._cloud_ratios) >= CLOUD_SAMPLES:
            self.cloud_scale = min(max(statistics.median(self._cloud_ratios), 0.1), 10.0)

    def observe_edge(self, cut_index: int, compute_ms: float) -> None:
        """Correct the edge's predicted compute from what served requests took (``cut_index`` -1: edge-only).

        The edge profiles itself once, at start, timing heads back to back; serving requests one at a
        time (under a CPU quota, between other work) runs them slower, by about the same factor at
        every cut: measured 1.15-1.4x the profile for the whole model under CFS quotas. As for the
        cloud, the median ratio of measured to predicted over the last few requests scales E(k) for
        every candidate, edge-only included.

        A head predicted under ``MIN_EDGE_SHARE`` of the whole model says nothing about the edge's speed:
        under a CPU quota it runs whole in the period's share, at full speed (at 30x, the head of
        ``size#1``, predicted at its sustained 0.3 ms, took 0.1), and elsewhere it times the timer. Its
        ratio, a third, would have scaled every head by a third while such a plan was served.
        """
        if cut_index < 0:
            predicted = self.cost.edge_total_ms
        else:
            predicted = next((c.edge_ms for c in self.cost.cuts if c.index == cut_index), 0.0)
        if predicted <= max(0.05, self.MIN_EDGE_SHARE * self.cost.edge_total_ms) or compute_ms <= 0:
            return  # too small to give a meaningful ratio
        ratio = compute_ms / predicted
        self._edge_ratios.append(ratio)
        if len(self._edge_ratios) >= CLOUD_SAMPLES:
            self.edge_scale = min(max(statistics.median(self._edge_ratios), 0.1), 10.0)
        self._edge_seen += 1
        _, ratios, _ = self._edge_at.get(cut_index, (predicted, deque(maxlen=9), 0))
        ratios.append(ratio)
        self._edge_at[cut_index] = (predicted, ratios, self._edge_seen)
        self._edge_points = None

    def edge_ms(self, predicted_ms: float) -> float:
        """A head predicted to take ``predicted_ms`` on the edge (its profile's E(k)), corrected by served requests.

        The profile's shape is not the served one: under a CPU quota the heads up to the middle of
        EfficientNet-Lite0 served in 0.67-0.8x their profile at 4x and 30x while the late heads and the whole
        model took 0.9-1.26x (placement_real.json), so one scale for every cut, the median of whichever cuts
        were served last, ranked a late cut over a middle one that was 1.3x faster (4x, 5 Mbit/s). Each cut
        served at least ``CLOUD_SAMPLES`` times (within the last ``EDGE_MEMORY`` edge observations) is a point
        (E(k), its median ratio x E(k)); the corrected E is piecewise linear through those points (made
        monotone), and beyond the first or last it keeps that point's ratio. With no such cut yet, the global
        ``edge_scale``; with one, the same as that scale.
        """
        if predicted_ms <= 0:
            return predicted_ms
        if self._edge_points is None:
            recent = [
                (x, statistics.median(r) * x)
                for x, r, last in self._edge_at.values()
                if len(r) >= CLOUD_SAMPLES and self._edge_seen - last < self.EDGE_MEMORY
            ]
            recent.sort()
            xs = [x for x, _ in recent]
            self._edge_points = (xs, monotone_fit([y for _, y in recent]) if recent else [])
        xs, ys = self._edge_points
        if not xs:
            return predicted_ms * self.edge_scale
        if predicted_ms <= xs[0]:
            ratio = ys[0] / xs[0]
        elif predicted_ms >= xs[-1]:
            ratio = ys[-1] / xs[-1]
        else:
            i = bisect.bisect_right(xs, predicted_ms)
            x0, x1, y0, y1 = xs[i - 1], xs[i], ys[i - 1], ys[i]
            return y0 + (y1 - y0) * (predicted_ms - x0) / (x1 - x0)
        return predicted_ms * min(max(ratio, 0.1), 10.0)

    def observe_bytes(self, candidate: Candidate, bytes_up: int) -> None:
        """Correct one candidate's predicted upload from the bytes its requests really sent.

        Bytes are predicted from calibration inputs; what the app sends may compress better or
        worse (camera frames are smoother than synthetic ones; features follow). Unlike compute,
        this says nothing about other cuts or encodings, so it corrects only the candidate observed:
        from ``CLOUD_SAMPLES`` requests on, its upload is scaled by the median ratio of the last few.
        """
        if candidate.kind == EDGE_ONLY or candidate.bytes_up <= 0 or bytes_up <= 0:
            return
        ratios = self._byte_ratios.setdefault((candidate.cut_index, candidate.encoding), deque(maxlen=9))
        ratios.append(bytes_up / candidate.bytes_up)

    def byte_scale(self, candidate: Candidate) -> float:
        """Measured over predicted bytes for ``candidate`` (1.0 until it has been observed enough)."""
        ratios = self._byte_ratios.get((candidate.cut_index, candidate.encoding))
        if ratios is None or len(ratios) < CLOUD_SAMPLES:
            return 1.0
        return min(max(statistics.median(ratios), 0.05), 20.0)

    def score(self, candidate: Candidate, link: Link) -> Scored:
        predicted = candidate.predict(link)
        if self.cloud_scale != 1.0 and candidate.kind != EDGE_ONLY:
            predicted = replace(predicted, cloud_ms=predicted.cloud_ms * self.cloud_scale)
        if self.edge_scale != 1.0 or self._edge_at:
            predicted = replace(predicted, edge_ms=self.edge_ms(predicted.edge_ms))
        if self._byte_ratios and (scale := self.byte_scale(candidate)) != 1.0:
            predicted = replace(predicted, upload_ms=predicted.upload_ms * scale)
        cost = predicted.total_ms if self.objective == "latency" else predicted.bottleneck_ms
        return Scored(candidate, predicted, cost)

    def lossless(self, candidate: Candidate) -> bool:
        """Whether ``candidate`` sends what the model computes unchanged (no accuracy to measure)."""
        if self.quantized_heads and candidate.kind == SPLIT:
            return False
        return is_lossless(candidate.kind, candidate.encoding, self.input_is_8bit)

    def distortion_of(self, candidate: Candidate) -> Distortion | None:
        if self.lossless(candidate) or self._distortion is None:
            return None if self._distortion is None else Distortion(0.0, 1.0)
        key = (candidate.cut_index, candidate.encoding)
        if key not in self._measured:
            self._measured[key] = self._distortion(candidate)
        return self._measured[key]

    def with_distortion(self, scored: Scored) -> Scored:
        """``scored`` with its distortion measured (for display: the budgets are not checked)."""
        if scored.distortion is not None:
            return scored
        return replace(scored, distortion=self.distortion_of(scored.candidate))

    def measured(self, scored: Scored) -> Scored:
        """``scored`` checked against the budgets with its distortion measured in full, even when a
        screen was enough to reject it (for display: the reason then quotes the measured values)."""
        return self._check(scored, screen=False)

    def _violation(self, d: Distortion, bound: bool = False) -> str:
        """Why distortion ``d`` breaks the accuracy budget ("" when it does not)."""
        b = self.budgets
        # Top-1 agreement is the budget users state; the relative output error is the secondary guard.
        if b.min_top1 is not None and d.top1 < b.min_top1:
            return f"top-1 {'<= ' if bound else ''}{d.top1:.2f} < {b.min_top1}"
        if b.max_rel_error is not None and d.rel_error > b.max_rel_error:
            return f"rel error {'>= ' if bound else ''}{d.rel_error:.3g} > {b.max_rel_error}"
        return ""

    def _check(self, scored: Scored, screen: bool = True) -> Scored:
        b, c = self.budgets, scored.candidate
        if b.memory_bytes is not None and c.kind != CLOUD_ONLY and c.edge_memory > b.memory_bytes:
            return Scored(c, scored.predicted, scored.cost_ms, None, f"edge memory {c.edge_memory} > {b.memory_bytes}")
        if b.max_rel_error is None and b.min_top1 is None:
            return scored
        key = (c.cut_index, c.encoding)
        if screen and self._needs_screen(c):  # (neither measured nor lossless)
            bound = self._bounds[key] if key in self._bounds else self._keep_bound(key, self._screen(c))
            reason = "" if bound is None else self._violation(bound, bound=True)
            if not reason and self._bounded_at[key] < self._misses:
                # Screened before a full measurement broke the budget, which moved the screens to the input
                # that broke it (DistortionMeter): one input again, then the whole batch only if it passes.
                bound = self._keep_bound(key, self._screen(c))
                reason = "" if bound is None else self._violation(bound, bound=True)
            if reason:
                return Scored(c, scored.predicted, scored.cost_ms, None, f"{reason} (screened)")
        new = key not in self._measured
        d = self.distortion_of(c)
        if d is None:
            return scored
        reason = self._violation(d)
        self._misses += bool(new and reason)
        return Scored(c, scored.predicted, scored.cost_ms, d, reason)

    def _needs_screen(self, c: Candidate) -> bool:
        """Whether :meth:`_check` would screen ``c`` now (a screen is on, and ``c`` is lossy, fits
        the memory budget and has neither been measured nor bounded)."""
        b = self.budgets
        if self._screen is None or self._distortion is None or (b.max_rel_error is None and b.min_top1 is None):
            return False
        if b.memory_bytes is not None and c.kind != CLOUD_ONLY and c.edge_memory > b.memory_bytes:
            return False
        key = (c.cut_index, c.encoding)
        return key not in self._measured and not self.lossless(c)

    def _screen_ahead(self, ordered: list[Scored], start: int) -> None:
        """Bound ``ordered[start]`` and the next unscreened candidates of the walk in one batch."""
        if self._screen_many is None or not self._needs_screen(ordered[start].candidate):
            return
        if (ordered[start].candidate.cut_index, ordered[start].candidate.encoding) in self._bounds:
            return
        batch: dict[tuple[int, str], Candidate] = {}
        for scored in ordered[start:]:
            c = scored.candidate
            key = (c.cut_index, c.encoding)
            if key not in self._bounds and key not in batch and self._needs_screen(c):
                batch[key] = c
                if len(batch) >= self._lookahead:
                    break
        self._lookahead = min(2 * self._lookahead, self.LOOKAHEAD)
        for key, bound in zip(batch, self._screen_many(list(batch.values())), strict=True):
            self._keep_bound(key, bound)

    def _keep_bound(self, key: tuple[int, str], bound: Distortion | None) -> Distortion | None:
        self._bounds[key], self._bounded_at[key] = bound, self._misses
        return bound

    def rank(self, link: Link, limit: int | None = None, deadline: float | None = None) -> list[Scored]:
        """Candidates by cost; budgets are checked in order until ``limit`` feasible ones are found.

        With sizes measured on demand (:meth:`measure_on_demand`), every candidate whose size is
        not known yet and that could cost less than the candidate about to be checked is measured
        first, and the walk starts again with it in order: the same candidates are checked as with
        every size measured beforehand. Screens ahead take the next candidates known; a batch of
        other candidates gives a candidate the same bound up to float rounding
        (:attr:`DistortionMeter.SLACK`), so the same ones are rejected.

        ``deadline`` (``time.monotonic()``): past it, a candidate whose accuracy is not known yet is
        passed over (rejected as :data:`UNMEASURED`) instead of measured, so the walk ends on the
        cheapest candidate already known to fit: on a slow device each measurement runs the model
        on every calibration input, seconds apiece, and a re-plan must not wait minutes for them.
        What was measured is kept; :attr:`walk_complete` says whether anything was passed over."""
        while True:
            ordered = sorted((self.score(c, link) for c in self.candidates), key=lambda s: s.cost_ms)
            out, feasible = [], 0
            self.walk_complete = True
            for i, scored in enumerate(ordered):
                if limit is not None and feasible >= limit:
                    out.append(scored)
                    continue
                if self._grow(link, scored.cost_ms):
                    break  # more candidates could come before this one: walk again
                if deadline is not None and self._unknown(scored.candidate) and time.monotonic() >= deadline:
                    out.append(replace(scored, rejected=UNMEASURED))
                    self.walk_complete = False
                    continue
                self._screen_ahead(ordered, i)
                checked = self._check(scored)
                out.append(checked)
                feasible += not checked.rejected
            else:
                return out

    def measure_on_demand(
        self, measure: Callable[[dict[int, frozenset[str]]], CostModel], first: int = 32
    ) -> dict[int, set[str]]:
        """Measure the sizes of candidates when a walk (:meth:`rank`) reaches them, not before.

        ``measure(asked)``: the cost model with the encodings ``asked`` names measured at each cut,
        besides every encoding at the input (cut 0) and :data:`UNCOMPRESSED` at every cut
        (:meth:`CostModel.measure`'s ``cuts``); the planner's cost model is one of those. Before a
        walk checks a candidate, the unmeasured candidates whose :meth:`floor` is at most its
        predicted cost are measured, with the next lowest floors up to ``first`` candidates
        (twice as many each time, up to :attr:`MOST_SIZES`). The cheapest floors are the early cuts,
        whose live sets are the largest to encode (about 10 ms a size on 3 inputs for resnet50's
        first cuts), and a walk that stops early needs few: a resnet50 plan at 10 Mbit/s needed 5 where 256
        were measured, most of a second. Which candidates are measured never changes the plan
        (see :meth:`rank`), only how many rounds of sizes it takes. Returns what is asked (live).
        """
        self._more, self._chunk, self._pending = measure, first, {}
        return self._asked

    def _grow(self, link: Link, horizon: float) -> bool:
        """Measure the sizes a walk on ``link`` needs before it looks at candidates costing up to
        ``horizon`` (:meth:`measure_on_demand`); whether any were measured."""
        if self._more is None:
            return False
        pending = self._pending.get(link)
        if pending is None:
            pending = self._pending[link] = sorted(
                (self.floor(cut, link, e), cut.index, e)
                for cut in self.cost.cuts
                if cut.index != 0
                for e in cut.encode_ms
                if e != UNCOMPRESSED and e not in self._asked.get(cut.index, ())
            )
        if not pending or pending[0][0] > horizon:
            return False
        take = max(bisect.bisect_right(pending, (horizon, float("inf"), "")), self._chunk)
        for _, index, e in pending[:take]:
            self._asked.setdefault(index, set()).add(e)
        self._chunk = min(2 * self._chunk, self.MOST_SIZES)
        self._pending.clear()
        self.use(self._more({k: frozenset(v) for k, v in self._asked.items()}))
        return True

    def _unknown(self, c: Candidate) -> bool:
        """Whether :meth:`_check` would have to measure (or screen) ``c`` to decide on it."""
        b = self.budgets
        if self._distortion is None or (b.max_rel_error is None and b.min_top1 is None) or self.lossless(c):
            return False
        if b.memory_bytes is not None and c.kind != CLOUD_ONLY and c.edge_memory > b.memory_bytes:
            return False  # rejected on memory, before any measurement
        key = (c.cut_index, c.encoding)
        if key in self._measured:
            return False
        bound = self._bounds.get(key)
        return bound is None or not self._violation(bound, bound=True)

    def best(self, link: Link, deadline: float | None = None) -> Scored:
        """The plan: the cheapest candidate within budgets (edge-only always qualifies on accuracy).

        ``deadline``: as for :meth:`rank`; the plan is then the cheapest of those known to fit."""
        for scored in self.rank(link, limit=1, deadline=deadline):
            if not scored.rejected:
                return scored
        raise ValueError("no candidate fits the budgets (edge memory too small even for edge-only?)")

    def baseline(self, name: str, link: Link) -> Scored:
        """A comparison placement, scored on ``link`` without budgets."""
        if name == "edge-only":
            pool = [c for c in self.candidates if c.kind == EDGE_ONLY]
        elif name == "cloud-raw":
            pool = [c for c in self.candidates if c.kind == CLOUD_ONLY and c.encoding == "int8c"]
        elif name in ("cloud-jpeg", "cloud-webp"):
            image = name.removeprefix("cloud-")
            pool = [c for c in self.candidates if c.kind == CLOUD_ONLY and c.encoding == image]
        elif name == "neurosurgeon":
            pool = [c for c in self.candidates if c.encoding == UNCOMPRESSED or c.kind == EDGE_ONLY]
        else:
            raise ValueError(f"baseline: {name!r} is not one of {', '.join(BASELINES)}")
        if not pool:
            raise ValueError(f"baseline {name!r}: the model has no such candidate")
        return min((self.score(c, link) for c in pool), key=lambda s: s.cost_ms)


@dataclass
class SwitchPolicy:
    """Hysteresis: switch only when the new plan beats the current one by a clear margin."""

    min_gain: float = 0.10  # relative
    min_gain_ms: float = 2.0  # absolute
    confirmations: int = 2  # consecutive checks that must agree
    _streak: int = 0
    _pending: str = ""

    @property
    def pending(self) -> str:
        """The label of the plan a streak of checks is confirming ("" when none)."""
        return self._pending

    def should_switch(self, planner: Planner, current: Candidate | None, best: Scored, link: Link) -> bool:
        if current is None:
            return True
        if best.candidate == current:
            self._streak, self._pending = 0, ""
            return False
        now = planner.score(current, link).cost_ms
        clearly_better = best.cost_ms < now * (1 - self.min_gain) and now - best.cost_ms > self.min_gain_ms
        if not clearly_better:
            self._streak, self._pending = 0, ""
            return False
        label = best.candidate.label
        self._streak = self._streak + 1 if label == self._pending else 1
        self._pending = label
        if self._streak >= self.confirmations:
            self._streak, self._pending = 0, ""
            return True
        return False


def distortion_meter(
    model: LoadedModel, calib: torch.Tensor, *, record: bool = False
) -> Callable[[Candidate], Distortion]:
    """Measure a candidate's output distortion on ``calib`` (a batch of inputs) against float.

    ``record``: a :class:`DistortionMeter`: on the first candidate, the model runs once on
    ``calib`` keeping every cut's live set as the head would return it (:class:`LiveSets`); each
    candidate then costs an encode, a decode and its tail, not a head too, and it can screen
    candidates on one input (:meth:`DistortionMeter.screen`). The snapshots hold every activation
    of the batch (about a GB for resnet50 on 8 images), so a one-off planner (``cleave plan``)
    records and a daemon that keeps its meter does not. Results are identical either way
    (:func:`head_tail_distortion`). Opaque models (no graph to record) always run head and tail.
    """
    if model.graph.opaque or not record:
        return head_tail_distortion(model, calib)
    return DistortionMeter(model, calib)


class DistortionMeter:
    """Distortion of candidates on a calibration batch, from recorded live sets (see
    :func:`distortion_meter`), with a cheap screen on one input of the batch.

    Call it for a candidate's distortion on the whole batch; :meth:`screen` runs the tail on one
    input only (about 1/n of the work) and returns the best the whole batch could still do. Most
    candidates a planner looks at break the accuracy budget by far, and one input shows it.
    """

    #: Screens allow this much for the tail's float rounding, which may differ at another batch
    #: size: relative error is lowered by it, and a top-1 flip is counted only past it.
    SLACK = 1e-4

    def __init__(self, model: LoadedModel, calib: torch.Tensor) -> None:
        self.model, self.calib = model, calib
        self._live: LiveSets | None = None  # the model runs on the first candidate measured, not before
        self._decoded: tuple[tuple[int, str], list[torch.Tensor]] | None = None  # the last candidate's features
        self._probe = 0  # the input screened: the one that erred most in the last full measurement
        self._independent: bool | None = None  # whether one input alone gives what it gives in the batch

    @property
    def probe(self) -> int:
        """The calibration input screens run on: the one that erred most in the last full measurement."""
        return self._probe

    @probe.setter
    def probe(self, index: int) -> None:
        self._probe = index

    @property
    def live(self) -> LiveSets:
        if self._live is None:
            self._live = LiveSets(self.model, self.calib)
        return self._live

    def values(self, x: torch.Tensor) -> dict[str, torch.Tensor] | None:
        """Every cut's live values on ``x``, the first rows of the calibration batch, from the live sets
        (recorded now if not yet): what :meth:`CostModel.measure` encodes (its ``memo``), so sizes and
        accuracy share one run of the model. None when ``x`` is not the batch's first rows, or when a value
        is held as it was at one cut and changed at another (an in-place write while it was live: sizes
        take one value per name)."""
        n = len(x)
        if x.ndim == 0 or not 0 < n <= len(self.calib) or not torch.equal(self.calib[:n], x):
            return None
        live = self.live
        if live.output.ndim == 0 or live.output.shape[0] != len(self.calib):
            return None
        held: dict[str, torch.Tensor] = {}
        for cut in self.model.graph.cuts:
            for name, value in zip(cut.live, live.at(cut.index), strict=True):
                if held.setdefault(name, value) is not value or value.ndim == 0 or value.shape[0] != len(self.calib):
                    return None
        return {name: value[:n] for name, value in held.items()} | {"__output__": live.output[:n]}

    def __call__(self, candidate: Candidate) -> Distortion:
        features = self._features(candidate)
        with torch.inference_mode():
            if self.model.graph.cut(candidate.cut_index).recomputed:
                _, _, tail = self.model.parts(candidate.cut_index)
                out = as_tensor_list(tail(*features))[0]
            else:  # the tail's very nodes, without building a tail module for this cut
                out = as_tensor_list(run_from_cuts(self.model.graph, [(candidate.cut_index, features)]))[0]
        reference, n = self.live.output, len(self.calib)
        out = _as_replied(out, n)
        if out.shape == reference.shape and out.ndim >= 2 and out.shape[0] == n:
            errors = (out - reference).abs().reshape(n, -1).amax(1)
            if out.shape[-1] > 1:  # an input whose class changed is the one to screen first
                flipped = (out.argmax(-1) != reference.argmax(-1)).reshape(n, -1).any(1)
                errors = torch.where(flipped, torch.inf, errors)
            self._probe = int(errors.argmax())
        return _distortion(out, reference)

    def screen(self, candidate: Candidate) -> Distortion | None:
        """The best distortion ``candidate`` could have on the whole batch, from one input's output.

        Relative error is normalised by the largest output of the batch, so one input's error
        (less :attr:`SLACK`) is a lower bound of the batch's; top-1 agreement is at most the
        share of the batch's outputs that input did not clearly move to another class. None when the model's outputs or
        the live set have no batch dimension to take one input from, or when one input alone
        does not give what it gives in the batch (a model mixing inputs of a batch).
        """
        rows = self._screen_rows(candidate) if self._screenable() else None
        if rows is None:
            return None
        with torch.inference_mode():
            if self.model.graph.cut(candidate.cut_index).recomputed:
                _, _, tail = self.model.parts(candidate.cut_index)
                out = as_tensor_list(tail(*rows))[0]
            else:  # the tail's very nodes, as a full measurement runs them: no tail module built for one screen
                out = as_tensor_list(run_from_cuts(self.model.graph, [(candidate.cut_index, rows)]))[0]
        return self._bound(out)

    def screen_many(self, candidates: list[Candidate]) -> list[Distortion | None]:
        """:meth:`screen` for each of ``candidates``, their tails run as one batch.

        Every candidate adds its one input (its live set at its cut, encoded and decoded) to a
        single run of the traced graph, which starts at the earliest of their cuts and takes in
        each later candidate's input right after its cut's node (:func:`run_from_cuts`): tails
        from different cuts share the nodes they have in common, and the batch makes each node's
        kernels work on several inputs at once. A batch gives an input's output up to float
        rounding, as the one-input screen does (:attr:`SLACK` covers both). Candidates whose cut
        recomputes shape arithmetic (their batch size could be read before the inputs joined)
        are screened one by one.
        """
        if not self._screenable():
            return [None] * len(candidates)
        out: list[Distortion | None] = [None] * len(candidates)
        joined: list[tuple[int, int, list[torch.Tensor]]] = []  # (cut index, position, rows)
        for i, c in enumerate(candidates):
            if self.model.graph.cut(c.cut_index).recomputed:
                out[i] = self.screen(c)
            elif (rows := self._screen_rows(c)) is not None:
                joined.append((c.cut_index, i, rows))
        joined.sort(key=lambda e: e[0])  # stable: rows enter the batch in cut order
        for chunk in range(0, len(joined), self.BATCH):
            part = joined[chunk : chunk + self.BATCH]
            with torch.inference_mode():
                result = as_tensor_list(run_from_cuts(self.model.graph, [(k, rows) for k, _, rows in part]))[0]
            if result.ndim < 1 or result.shape[0] != len(part):
                continue  # not one output row per input: no bound (None)
            for row, (_, i, _) in enumerate(part):
                out[i] = self._bound(result[row : row + 1])
        return out

    #: The most inputs :meth:`screen_many` runs in one batch.
    BATCH = 32

    def _screenable(self) -> bool:
        """Whether the batch's outputs have a batch dimension and its inputs do not mix."""
        n, reference = len(self.calib), self.live.output
        return n >= 2 and reference.ndim >= 2 and reference.shape[0] == n and self._inputs_independent()

    def _screen_rows(self, candidate: Candidate) -> list[torch.Tensor] | None:
        """The live set of the probed input at ``candidate``'s cut, encoded and decoded as the
        candidate sends it (None when the live set has no batch dimension to take it from)."""
        live = self.live.at(candidate.cut_index)
        if not _one_row_per_input(self.model.graph.cut(candidate.cut_index), live, len(self.calib)):
            return None
        j = self._probe
        spec = EncodingSpec.parse(candidate.encoding)
        with torch.inference_mode():
            rows = [_decoded_rows(f, spec, slice(j, j + 1)) for f in live]
        if any(r is None for r in rows):  # not affine min-max: through the codec, the whole batch
            rows = [f[j : j + 1].clone() for f in self._features(candidate)]  # a tail may change its input in place
        return rows

    def _bound(self, out: torch.Tensor) -> Distortion | None:
        """The screen's bound from ``out``, the model's output on the probed input alone.

        ``out`` is taken before the reply's coding (:func:`_as_replied`), which moves each value by at most
        half a code step: the bound allows a whole step besides :attr:`SLACK`, since the full measurement's
        row, equal up to float rounding, may round to the neighbouring code."""
        reference, j = self.live.output, self._probe
        if out.shape != reference[j : j + 1].shape:
            return None
        scale = float(reference.abs().max().clamp_min(1e-12))
        step = _reply_step(out)
        rel = max((float((out - reference[j : j + 1]).abs().max()) - step) / scale - self.SLACK, 0.0)
        if out.shape[-1] > 1:  # top-1 agreement is over every row of every input's output
            rows, want = out.reshape(-1, out.shape[-1]), reference[j : j + 1].reshape(-1, out.shape[-1]).argmax(-1)
            gap = rows.amax(-1) - rows.gather(-1, want[:, None])[:, 0]
            flipped = int((gap > self.SLACK * scale + step).sum())
            top1 = 1.0 - flipped / (reference.numel() // reference.shape[-1])
        else:
            top1 = 0.0 if rel >= 1e-3 else 1.0
        return Distortion(rel, top1)

    def _features(self, candidate: Candidate) -> list[torch.Tensor]:
        """The candidate's live set on the batch, encoded and decoded (kept for the next call:
        a screen that does not reject is followed by the full measurement)."""
        key = (candidate.cut_index, candidate.encoding)
        if self._decoded is None or self._decoded[0] != key:
            spec = EncodingSpec.parse(candidate.encoding)
            live = self.live.at(candidate.cut_index)  # recorded outside inference mode (see LiveSets)
            with torch.inference_mode():
                cut = self.model.graph.cut(candidate.cut_index)
                features = _through_wire(live, spec, self.model, cut, len(self.calib))
            self._decoded = (key, features)
        return self._decoded[1]

    def _inputs_independent(self) -> bool:
        """Whether the first input through the model alone gives its row of the batch's output."""
        if self._independent is None:
            with torch.inference_mode():
                alone = as_tensor_list(self.model.module(self.calib[:1]))[0]
            reference = self.live.output
            scale = float(reference.abs().max().clamp_min(1e-12))
            self._independent = alone.shape == reference[:1].shape and bool(
                (alone - reference[:1]).abs().max() <= self.SLACK * scale / 10
            )
        return self._independent


def _decoded_rows(x: torch.Tensor, spec: EncodingSpec, rows: slice) -> torch.Tensor | None:
    """``decode(encode(x[rows], spec))`` without the codec, for per-tensor affine encodings with min-max
    clipping (the planner's ``int2`` ... ``int8``): their scale and zero point come from the rows (one
    input, as a request sends it), their codes element by element, and bit packing and zstd lose
    nothing, so the codec's own steps on these rows give the same values. None for other encodings.
    """
    plain_minmax = spec.clip == "minmax" and clipping.get_clipper("minmax") is clipping.minmax
    if spec.encoding != "affine" or spec.per_channel or not plain_minmax or x.dtype != torch.float32 or not x.numel():
        return None
    xf = x.detach().contiguous().numpy()[rows]
    if not xf.size:
        return None
    lo, hi = np.asarray(xf.min(), np.float32), np.asarray(xf.max(), np.float32)
    if not (np.isfinite(lo) and np.isfinite(hi)):
        return None  # the codec refuses these: let it say so
    scales, zero_points = affine_params_array(lo, hi, spec.bits)
    q = quantize_array(xf, spec.bits, scales, zero_points, lo, hi, None, covers=True)
    # As the wire carries them: float32 scales and int32 zero points, in lists.
    scales = np.asarray(scales.reshape(-1).tolist(), np.float32)
    zero_points = np.asarray(zero_points.reshape(-1).tolist(), np.int32)
    return torch.from_numpy(dequantize_array(q, scales, zero_points, None))


def cached_distortion(
    measure: Callable[[Candidate], Distortion], model: LoadedModel, calib: torch.Tensor, heads: str = "float"
) -> CachedDistortion:
    """``measure`` with its results kept on disk, so planning the same model again measures nothing.

    Keyed by the model's fingerprint, the calibration batch (:func:`calibration_key`) and ``heads``,
    the heads splits run (``"float"``, or e.g. ``"int8"`` for :func:`head_tail_distortion`'s ``head_at``); an entry
    is one candidate (cut index and encoding), and one more per screened candidate and input screened
    when ``measure`` has a ``screen`` and a ``probe`` (:class:`DistortionMeter`); a full measurement
    keeps the probe it left, and sets it again when read back. ``measure`` must measure on ``calib``.
    """
    return CachedDistortion(measure, model, calib, heads)


class CachedDistortion:
    """:func:`cached_distortion`'s result: call it for a distortion, :meth:`screen` for a bound."""

    def __init__(
        self, measure: Callable[[Candidate], Distortion], model: LoadedModel, calib: torch.Tensor, heads: str = "float"
    ) -> None:
        self._measure = measure
        # Float heads keep the key they always had (no extra part): caches written before stay valid.
        extra = (str(_DISTORTION_VERSION),) + (() if heads == "float" else (f"heads={heads}",))
        self._path = cache_dir().parent / "distortion" / f"{calibration_key(model, calib, *extra)}.json"
        self._probes: dict[str, int] = {}  # a full measurement's entry -> the probe it left (DistortionMeter.probe)
        try:
            self._known = {}
            for k, v in json.loads(self._path.read_text()).items():
                self._known[k] = None if v is None else Distortion(*v[:2])
                if v is not None and len(v) > 2:
                    self._probes[k] = int(v[2])
        except (OSError, ValueError, TypeError):
            self._known, self._probes = {}, {}  # absent, stale or corrupt: measured again

    def __call__(self, candidate: Candidate) -> Distortion:
        key = f"{candidate.cut_index}|{candidate.encoding}"
        if key not in self._known:
            d = self._measure(candidate)
            self._known[key] = d
            if hasattr(self._measure, "probe"):  # where it moved the screens: a run from the cache moves them too
                self._probes[key] = self._measure.probe
            self._save()
        elif key in self._probes:
            self._measure.probe = self._probes[key]
        return self._known[key]

    def _screen_key(self, candidate: Candidate) -> str:
        """A screen's entry: its candidate, and the input screened when ``measure`` says (its ``probe``)."""
        probe = getattr(self._measure, "probe", None)
        return f"{candidate.cut_index}|{candidate.encoding}|screen" + ("" if probe is None else f"|{probe}")

    def screen(self, candidate: Candidate) -> Distortion | None:
        """``measure.screen(candidate)``, cached; None when ``measure`` cannot screen."""
        screen = getattr(self._measure, "screen", None)
        if screen is None:
            return None
        return self._lookup(self._screen_key(candidate), screen, candidate)

    def screen_many(self, candidates: list[Candidate]) -> list[Distortion | None]:
        """:meth:`screen` for each of ``candidates``; those not cached are screened together
        (``measure.screen_many``, or one by one when ``measure`` has only ``screen``)."""
        screen = getattr(self._measure, "screen", None)
        if screen is None:
            return [None] * len(candidates)
        keys = [self._screen_key(c) for c in candidates]
        todo = [(k, c) for k, c in zip(keys, candidates, strict=True) if k not in self._known]
        if todo:
            many = getattr(self._measure, "screen_many", None)
            found = many([c for _, c in todo]) if many is not None else [screen(c) for _, c in todo]
            self._known.update((k, d) for (k, _), d in zip(todo, found, strict=True))
            self._save()
        return [self._known[k] for k in keys]

    def _lookup(self, key: str, measure: Callable[[Candidate], Distortion | None], candidate: Candidate):
        if key not in self._known:
            self._known[key] = measure(candidate)
            self._save()
        return self._known[key]

    def _save(self) -> None:
        self._path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self._path.with_suffix(f".{os.getpid()}.tmp")
        entries = {
            k: None if d is None else [d.rel_error, d.top1, *([self._probes[k]] if k in self._probes else [])]
            for k, d in self._known.items()
        }
        tmp.write_text(json.dumps(entries))
        tmp.replace(self._path)


#: Bumped when how a distortion is measured changes (the disk cache's entries are then stale; 2: screens
#: keyed by the input screened, full measurements with the input they move the screens to; 3: encoded one
#: input at a time, as requests send them; 4: the output coded as a lossy plan's reply, REPLY_ENCODING).
_DISTORTION_VERSION = 4


#: What :func:`head_tail_distortion` keeps of quantized heads' outputs (about 20 of Lite0's cuts on 8 images).
KEPT_LIVE_BYTES = 64 << 20


def head_tail_distortion(
    model: LoadedModel, calib: torch.Tensor, head_at: Callable[[int], Callable] | None = None
) -> Callable[[Candidate], Distortion]:
    """:func:`distortion_meter` the direct way: head, encode, decode and tail per candidate.

    ``head_at``: the head a split at a cut index runs, when it is not the float one (the int8 head an
    edge with ``head.weight_bits: 8`` serves): a split's distortion is then what that head, the wire
    and the tail do together, against the float model. Cut 0 (cloud-only) has no head either way.
    Building such a head takes seconds (an export and a calibration), so it is asked for once per cut:
    its outputs on ``calib`` are kept, the most recent first, up to :data:`KEPT_LIVE_BYTES`, for the
    cut's other encodings, which a planner's walk reaches at other times.
    """
    with torch.inference_mode():
        reference = as_tensor_list(model.module(calib))[0]
    kept: OrderedDict[int, list[torch.Tensor]] = OrderedDict()  # cut index -> head_at's live set on calib

    def live_at(index: int) -> list[torch.Tensor]:
        if index in kept:
            kept.move_to_end(index)
            return kept[index]
        assert head_at is not None
        with torch.inference_mode():
            live = kept[index] = as_tensor_list(head_at(index)(calib))
        while len(kept) > 1 and sum(t.nbytes for v in kept.values() for t in v) > KEPT_LIVE_BYTES:
            kept.popitem(last=False)
        return live

    def measure(candidate: Candidate) -> Distortion:
        spec = EncodingSpec.parse(candidate.encoding)
        _, head, tail = model.parts(candidate.cut_index)
        with torch.inference_mode():
            if head_at is not None and candidate.cut_index != 0:
                live = live_at(candidate.cut_index)
            else:
                live = as_tensor_list(head(calib))
            features = _through_wire(live, spec, model, model.graph.cut(candidate.cut_index), len(calib))
            out = _as_replied(as_tensor_list(tail(*features))[0], len(calib))
        return _distortion(out, reference)

    return measure


def _one_row_per_input(cut: Cut, live: Sequence[torch.Tensor], n: int) -> bool:
    """Whether ``live``, a cut's live set on a batch of ``n`` inputs, holds one row per input along the
    first dimension of every value (the cut's values keep the model's batch dimension of 1)."""
    return all(len(s) > 0 and s[0] == 1 for s in cut.shapes) and all(f.ndim > 0 and f.shape[0] == n for f in live)


def _through_wire(
    live: Sequence[torch.Tensor], spec: EncodingSpec, model: LoadedModel, cut: Cut, n: int
) -> list[torch.Tensor]:
    """A cut's live set on a calibration batch of ``n`` inputs, encoded and decoded as the link would carry
    it (a bottleneck's tables for ``entropy``): one input at a time, as each request sends its own, where
    the cut's values have a batch dimension (:func:`_one_row_per_input`). An affine encoding's range is
    then one input's, as on the wire, not the widest of the batch (which judged per-channel 4 bits at
    Lite0's ``conv2d_11`` at 7 of 8 photos and a relative error of 0.076, where the requests keep 8 of 8
    at 0.062)."""

    def wire(f: torch.Tensor) -> torch.Tensor:
        return decode(encode(f, spec, model.entropy_tables), tables=model.entropy_tables)

    alone = _one_row_per_input(cut, live, n)
    return [_each_input_alone(f, n, wire) if alone else wire(f) for f in live]


def _as_replied(out: torch.Tensor, n: int) -> torch.Tensor:
    """The model's output ``out`` on ``n`` inputs as a lossy plan's replies bring it back: each input's row coded
    alone in :data:`~partitioner.costmodel.REPLY_ENCODING` (the whole output at once when it has no batch
    dimension). Only lossy candidates are measured, so every measured candidate's reply is coded so."""
    spec = EncodingSpec.parse(REPLY_ENCODING)
    return _each_input_alone(out, n, lambda t: decode(encode(t, spec)))


def _each_input_alone(t: torch.Tensor, n: int, wire: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """``wire`` (an encode and decode) applied to each of ``t``'s ``n`` rows alone, as each request codes its own,
    when ``t`` holds one row per input; to the whole of ``t`` otherwise (or when there is one input)."""
    if n <= 1 or t.ndim == 0 or t.shape[0] != n:
        return wire(t)
    return torch.cat([wire(t[i : i + 1]) for i in range(n)])


def _reply_step(out: torch.Tensor) -> float:
    """One code step of ``out`` coded as a reply (:data:`~partitioner.costmodel.REPLY_ENCODING`, min-max affine):
    the most the coding of a value can differ between two runs equal up to float rounding."""
    spec = EncodingSpec.parse(REPLY_ENCODING)
    return float(out.max() - out.min()) / (2**spec.bits - 1) if out.numel() else 0.0


def _distortion(out: torch.Tensor, reference: torch.Tensor) -> Distortion:
    rel = float((out - reference).abs().max() / reference.abs().max().clamp_min(1e-12))
    if out.ndim >= 2 and out.shape[-1] > 1:
        top1 = float((out.argmax(-1) == reference.argmax(-1)).float().mean())
    else:
        top1 = 1.0 if rel < 1e-3 else 0.0
    return Distortion(rel, top1)


def run_from_cuts(graph: ModelGraph, entries: list[tuple[int, list[torch.Tensor]]]) -> object:
    """The tails of several cuts run as one batch: the model's output, one row per input.

    ``entries`` are ``(cut index, live set)`` pairs, live sets batched along their first
    dimension, in cut order (a live set given as its cut's tail takes it). The traced graph runs
    from the first entry's cut; after each later entry's cut node, the entry's live values join
    the batch (concatenated after the rows already there), so the output holds the first entry's
    rows first. Each row is what its cut's tail gives on its live set alone, up to float
    rounding where a kernel sums in another order at another batch size, provided the model
    treats the inputs of a batch independently and no cut of the entries recomputes shape
    arithmetic (:attr:`Cut.recomputed`: a size read before the rows joined would be stale).
    """
    gm = graph.module
    if graph.opaque or not isinstance(gm, fx.GraphModule):
        raise ValueError("run_from_cuts: an opaque model has no graph to run from a cut")
    nodes = list(gm.graph.nodes)
    position = {node: i for i, node in enumerate(nodes)}
    named = {node.name: node for node in nodes}
    joins: dict[int, list[list[torch.Tensor]]] = {}
    for index, rows in entries:
        joins.setdefault(index, []).append(rows)
    start = min(joins)
    # When each value is read for the last time: dropped then, as fx's Interpreter drops them.
    dies: dict[int, list[fx.Node]] = {}
    for node in nodes:
        if node.users:
            dies.setdefault(max(position[u] for u in node.users), []).append(node)
    runner = fx.Interpreter(gm, garbage_collect_values=False)
    env = runner.env
    for i, node in enumerate(nodes):
        if i < start:
            # Attributes are read where they are used, as a tail does; nothing else before the start runs.
            if node.op == "get_attr" and any(position[u] > start for u in node.users):
                env[node] = runner.fetch_attr(node.target)
            continue
        if i > start:
            value = runner.run_node(node)
            if node.op == "output":
                return value
            env[node] = value
        if i in joins:
            for k, name in enumerate(graph.cut(i).live):
                value = named[name]
                parts = ([env[value]] if i > start else []) + [rows[k] for rows in joins[i]]
                env[value] = torch.cat(parts) if len(parts) > 1 else parts[0]
        for done in dies.get(i, ()):
            env.pop(done, None)
    raise ValueError("run_from_cuts: the graph has no output node")


class LiveSets:
    """Every cut's live set on one input batch, from a single run of the traced model.

    At cut ``k`` the head returns the live values as they are after node ``k`` ran, in-place
    updates by nodes up to ``k`` included. One interpreter run snapshots them at every cut. A
    snapshot holds the value itself, shared by every cut it is live at, and is copied only
    before a node that may write its inputs in place (:func:`_may_write`: an in-place module,
    operator or method, or a leaf module of the model's own) reads that value or another view
    of its memory: values nothing writes (most of them) are never copied. Should a value held
    change anyway (its version counter moved: a write no rule foresaw), the model runs again
    copying every value when first seen and again whenever its version moved.
    """

    def __init__(self, model: LoadedModel, x: torch.Tensor) -> None:
        gm = model.graph.module
        if model.graph.opaque or not isinstance(gm, fx.GraphModule):
            raise ValueError(f"{model.name}: an opaque model has no recorded live sets")
        cuts = {c.index: c for c in model.graph.cuts}
        recorder = _live_recorder()(gm, cuts)
        with torch.no_grad():  # not inference_mode: version counters reveal in-place updates
            self.output = as_tensor_list(recorder.run(x))[0]
            self.copied_all = recorder.written_unseen()
            if self.copied_all:
                recorder = _live_recorder()(gm, cuts, copy_all=True)
                self.output = as_tensor_list(recorder.run(x))[0]
        self._sets = {k: tuple(v) for k, v in recorder.sets.items()}

    def at(self, cut_index: int) -> tuple[torch.Tensor, ...]:
        """The live values at cut ``cut_index``, in :attr:`Cut.live` order."""
        return self._sets[cut_index]


#: Python's in-place operators (``out += identity``) and item assignment, as fx records them.
_WRITING_OPERATORS = frozenset(
    {
        operator.iadd,
        operator.isub,
        operator.imul,
        operator.itruediv,
        operator.ifloordiv,
        operator.imod,
        operator.ipow,
        operator.imatmul,
        operator.iand,
        operator.ior,
        operator.ixor,
        operator.ilshift,
        operator.irshift,
        operator.setitem,
    }
)


def _may_write(gm: fx.GraphModule, node: fx.Node) -> bool:
    """Whether ``node`` may change a tensor it reads in place (erring on yes): a torch.nn module with
    ``inplace`` set, a leaf module of the model's own (its code is not in the graph), an in-place
    operator, a function or method whose name ends in ``_`` (``relu_``, ``add_``), or a call given
    ``inplace=True`` or any positional ``True`` (``F.relu(x, True)``)."""
    if node.op == "call_module":
        module = gm.get_submodule(node.target)
        if type(module).__module__.startswith("torch.nn.modules"):
            return getattr(module, "inplace", False) is True
        return True
    if node.op not in ("call_function", "call_method"):
        return False
    if node.kwargs.get("inplace") is True or any(a is True for a in node.args[1:]):
        return True
    name = node.target if node.op == "call_method" else getattr(node.target, "__name__", "")
    return node.target in _WRITING_OPERATORS or (
        isinstance(name, str) and name.endswith("_") and not name.endswith("__")
    )


@functools.cache
def _live_recorder() -> type:
    """The fx Interpreter behind :class:`LiveSets` (a class made on first use: fx is torch)."""

    class _LiveRecorder(fx.Interpreter):
        def __init__(self, module: fx.GraphModule, cuts: dict, copy_all: bool = False) -> None:
            super().__init__(module)
            self._cuts = cuts
            self._index = {node: i for i, node in enumerate(module.graph.nodes)}
            self._named = {node.name: node for node in module.graph.nodes}
            self._copy_all = copy_all
            self._writes = {node for node in module.graph.nodes if _may_write(module, node)}
            # copy_all: a value's name -> (the value, its version then, its copy)
            self._copies: dict[str, tuple[weakref.ref, int, torch.Tensor]] = {}
            # otherwise: id of a value held as it is -> (the value, its version then, where sets hold it)
            self._held: dict[int, tuple[torch.Tensor, int, list[tuple[int, int]]]] = {}
            self._unseen = False  # a held value changed before it was copied
            self.sets: dict[int, list[torch.Tensor]] = {}

        def run_node(self, n: fx.Node):
            if self._held and n in self._writes:
                self._copy_read_by(n)
            value = super().run_node(n)
            cut = self._cuts.get(self._index[n])
            if cut is not None:
                live = [value if name == n.name else self.env[self._named[name]] for name in cut.live]
                if self._copy_all:
                    self.sets[cut.index] = [self._copy(name, t) for name, t in zip(cut.live, live, strict=True)]
                else:
                    self.sets[cut.index] = [self._hold(t, cut.index, i) for i, t in enumerate(live)]
            return value

        def written_unseen(self) -> bool:
            """Whether a value held as it is changed in place (a write :func:`_may_write` did not foresee)."""
            return self._unseen or any(t._version != v for t, v, _ in self._held.values())

        def _hold(self, tensor: torch.Tensor, cut_index: int, position: int) -> torch.Tensor:
            held = self._held.get(id(tensor))
            if held is not None and held[1] != tensor._version:
                self._unseen = True
            if held is None:
                held = self._held[id(tensor)] = (tensor, tensor._version, [])
            held[2].append((cut_index, position))
            return tensor

        def _copy_read_by(self, n: fx.Node) -> None:
            """Copy every held value that shares memory with a tensor ``n`` reads, where sets hold it."""
            args, kwargs = self.fetch_args_kwargs_from_env(n)
            read = {t.untyped_storage().data_ptr() for t in _tensors((args, kwargs))}
            for key, (tensor, version, places) in list(self._held.items()):
                if tensor.untyped_storage().data_ptr() in read:
                    self._unseen |= tensor._version != version
                    copy = tensor.clone()
                    for cut_index, position in places:
                        self.sets[cut_index][position] = copy
                    del self._held[key]

        def _copy(self, name: str, tensor: torch.Tensor) -> torch.Tensor:
            known = self._copies.get(name)
            if known is not None and known[0]() is tensor and known[1] == tensor._version:
                return known[2]
            copy = tensor.clone()
            self._copies[name] = (weakref.ref(tensor), tensor._version, copy)
            return copy

    return _LiveRecorder


def _tensors(value: object) -> list[torch.Tensor]:
    """The tensors in ``value`` (nested tuples, lists and dicts)."""
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, (tuple, list)):
        return [t for v in value for t in _tensors(v)]
    if isinstance(value, dict):
        return [t for v in value.values() for t in _tensors(v)]
    return []


def as_tensor_list(value: object) -> list:
    """:func:`partitioner.loaded.as_tensor_list`, imported on first use (that module imports torch)."""
    from .loaded import as_tensor_list as flatten

    return flatten(value)
