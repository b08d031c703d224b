"""``cut: auto``: the edge plans its own placement and re-plans as the link moves.

At start it profiles itself (cached on disk), asks the cloud for its profile, probes the link and
builds a :class:`~partitioner.planner.Planner`; the chosen plan is pinned on the runtime (until
then requests run on the edge). Afterwards it re-evaluates every ``check_interval_s`` against the
link estimate (live traffic, or an active probe when traffic says nothing) and switches only when
:class:`~partitioner.planner.SwitchPolicy` agrees, so the plan does not flap. Switching never drops a
request: the runtime opens the new session first and each request finishes under its own plan.

Threads (see docs/threads.md): the planning thread (``autoplan``) owns the planner, the current
choice and the switch policy; nothing else touches them. Other threads talk to it through its inbox:
served requests post what they measured (:meth:`AutoPlanner._observe`, a non-blocking put; when the
inbox is full an observation is dropped, never a request delayed), and ``Edge.Replan`` posts a
re-plan and waits for its answer. A manual pin turns automatic planning off under ``_lock``, which
the planning thread also holds while it checks that flag and pins, so a re-plan in flight can never
undo a manual pin.
"""

from __future__ import annotations

import contextlib
import logging
import queue
import threading
import time
from collections.abc import Mapping
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import grpc

from compressor import EncodingSpec
from partitioner.costmodel import Candidate, CostModel, Link
from partitioner.placement import Placement
from partitioner.planner import Budgets, Distortion, Planner, Scored, SwitchPolicy
from partitioner.profile import from_proto
from protos.cleave.v1 import split_inference_pb2 as si_pb2
from protos.cleave.v1 import split_inference_pb2_grpc as si_grpc
from protos.errors import Unavailable

from .config import AutoPlanSettings
from .link import LinkMonitor
from .probe import probe_link
from .runtime import FLOAT_BITS, EdgeRuntime, Outcome

if TYPE_CHECKING:
    from partitioner.bundle import PlanningTables
    from partitioner.loaded import LoadedModel

    from .backend import Backend

log = logging.getLogger(__name__)

INBOX_SIZE = 1024  # observations waiting for the planning thread; past this, new ones are dropped
PROFILE_TIMEOUT_S = 120.0  # the cloud profiles its tails at the edge's input shape on the first request
PROBE_TIMEOUT_S = 15.0  # the longest an active probe holds the planning thread
SILENT_MBPS = 1e-3  # the rate a probe that got no answer at all stands for
SLOW_WALK_S = 2.0  # a re-plan check longer than this is logged, with the accuracy checks it ran
REPLAN_TIMEOUT_S = 120.0  # how long Edge.Replan waits for the planning thread's answer
LONGEST_CHECK_GAP_S = 30.0  # max_check_share never spaces re-plan checks further apart than this
FIRST_PLAN = "first plan in progress: profiles, calibration images, link probe (requests run on the edge meanwhile)"


@dataclass(frozen=True)
class _Observation:
    """What one answered request measured, for the planner (posted by the request's thread)."""

    cut_index: int  # -1: edge-only
    spec: EncodingSpec
    cloud_compute_ms: float
    bytes_up: int
    edge_compute_ms: float = 0.0


@dataclass(frozen=True)
class _Replan:
    """A re-plan asked for by ``Edge.Replan``; the planning thread answers through ``future``."""

    future: Future


_STOP = object()


class AutoPlanner:
    """Keeps the runtime on the best plan for the current link.

    Life cycle: construct, :meth:`start` (subscribes to the runtime's outcomes and starts the
    planning thread), :meth:`close`.
    """

    def __init__(
        self,
        model: LoadedModel | Backend,
        runtime: EdgeRuntime,
        stub: si_grpc.SplitInferenceStub,
        monitor: LinkMonitor,
        settings: AutoPlanSettings,
        allocate_head_bits: bool = False,
    ) -> None:
        # The loaded torch model (its graph is profiled and measured here), or a bundle's backend
        # (the tables in the bundle stand for those measurements: see prepare).
        self.model = getattr(model, "loaded", model)
        self.allocate_head_bits = allocate_head_bits
        self._calib = None
        self._calibration_count = 0  # calibration images behind the distortion in a plan's reason
        self.runtime = runtime
        self.stub = stub
        self.monitor = monitor
        self.settings = settings
        self.policy = SwitchPolicy(settings.min_gain, settings.min_gain_ms, settings.confirmations)
        # Owned by the planning thread (set before it starts, or by it).
        self.planner: Planner | None = None
        self.current: Scored | None = None
        self._evidence = -1  # link samples seen at the last check: only new evidence confirms a switch
        # The runtime's (cut, encoding) of each candidate that sends: which candidate a served request was.
        self._by_plan: dict[tuple[int, EncodingSpec], Candidate] = {}
        # Written by the planning thread only; GetStatus reads it.
        # Until the first plan: the thread is already at work (a slow device's first plan takes minutes).
        self.error = FIRST_PLAN
        self._lock = threading.Lock()  # guards _enabled; held by the planning thread while it pins
        self._enabled = True
        self._ready = threading.Event()  # set once the planner exists: requests may post observations
        self._inbox: queue.Queue = queue.Queue(maxsize=INBOX_SIZE)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="autoplan", daemon=True)

    @property
    def enabled(self) -> bool:
        """Whether the planner keeps the plan (False after a manual pin, until the next re-plan).

        Read without the lock (a snapshot, for status): the lock is held through a whole pin, and
        :meth:`apply` re-checks the flag under it before pinning."""
        return self._enabled

    def start(self) -> None:
        self.runtime.counters.subscribe(self._observe)
        self._thread.start()

    def close(self, timeout: float = 5.0) -> bool:
        """Stop the planning thread; a re-plan still waiting is answered Unavailable.

        Returns False when the thread is still at work after ``timeout`` (in the middle of a
        measurement, which it does not interrupt): the caller must not let the interpreter finalize
        under it (see ``edge_node.main``)."""
        self.runtime.counters.unsubscribe(self._observe)
        self._stop.set()
        with contextlib.suppress(queue.Full):  # when full, the thread sees _stop after its next message
            self._inbox.put_nowait(_STOP)
        if self._thread.is_alive() and threading.current_thread() is not self._thread:
            self._thread.join(timeout)
        return not self._thread.is_alive() or threading.current_thread() is self._thread

    def use(self, planner: Planner) -> None:
        """Plan with ``planner`` from now on (set once, when profiles and the first probe are in)."""
        self._by_plan = {runtime_plan(c)[1:]: c for c in planner.candidates if c.kind != Placement.EDGE_ONLY}
        self.planner = planner
        self._ready.set()

    def _observe(self, outcome: Outcome) -> None:
        """Every answered request (on its own thread): post what it measured to the planning thread."""
        plan = outcome.plan
        if not self._ready.is_set() or outcome.placement == Placement.LOCAL_FALLBACK:
            return
        edge_ms = outcome.timing.edge_compute_ms
        if outcome.placement == Placement.EDGE_ONLY:
            observation = _Observation(-1, plan.spec, 0.0, 0, edge_ms)
        elif plan.cut is None:
            return
        else:
            observation = _Observation(
                plan.cut.index, plan.spec, outcome.timing.cloud_compute_ms, outcome.bytes_up, edge_ms
            )
        try:
            self._inbox.put_nowait(observation)
        except queue.Full:
            log.debug("planner inbox full: dropped an observation")

    def _absorb(self, observation: _Observation) -> None:
        """On the planning thread: the cloud's compute time and the bytes sent correct the planner."""
        planner = self.planner
        if planner is None:
            return
        if observation.cut_index != 0:  # a head ran here (cloud-only sends the input as it is)
            planner.observe_edge(observation.cut_index, observation.edge_compute_ms)
        if observation.cut_index < 0:
            return  # edge-only: nothing crossed
        planner.observe_cloud(observation.cut_index, observation.cloud_compute_ms)
        candidate = self._by_plan.get((observation.cut_index, observation.spec))
        if candidate is not None:  # also under a manual pin: bytes depend on the inputs, not on who chose
            planner.observe_bytes(candidate, observation.bytes_up)

    def _handle(self, message: object) -> None:
        """One message from the inbox, on the planning thread."""
        if isinstance(message, _Observation):
            self._absorb(message)
        elif isinstance(message, _Replan):
            self._serve_replan(message.future)

    # -- planning --------------------------------------------------------------------------------
    def prepare(self) -> Planner:
        """Profiles (edge: measured here; cloud: over the wire), cost model and planner."""
        if hasattr(self.model, "bundle"):
            return self._prepare_from_bundle(self.model)
        from partitioner.photos import calibration_inputs
        from partitioner.planner import cached_distortion, distortion_meter, head_tail_distortion
        from partitioner.profile import cached_profile
        from partitioner.quantized_head import measure_speedups

        s = self.settings
        phases, started = {}, time.monotonic()

        def phase(name: str) -> None:  # how long each step took, for the log: a slow device's first plan takes minutes
            nonlocal started
            phases[name], started = time.monotonic() - started, time.monotonic()

        # At the edge's input shape: the tail runs on what the edge sends, whatever the cloud's config says.
        # Asked for first: the cloud profiles itself (once per shape) while this device profiles itself.
        request = si_pb2.ProfileRequest(model=self.model.name, input_shape=self.model.input_shape)
        asked = self.stub.Profile.future(request, timeout=PROFILE_TIMEOUT_S)
        try:
            edge = cached_profile(self.model, role="edge")
            phase("profile")
            reply = asked.result()
        finally:
            asked.cancel()  # a no-op once answered; an edge profile that raised must not leave the call behind
        if reply.fingerprint != self.model.fingerprint:
            raise Unavailable("cloud profile is for another fingerprint; edge and cloud models differ")
        cloud = from_proto(reply)
        phase("waiting for the cloud's profile")
        calib = self._calib = calibration_inputs(self.model.spec, s.calibration, s.calibration_inputs)
        self._calibration_count = len(calib)
        # Bytes and distortions depend only on the model and the calibration images: kept on disk (keyed by both,
        # as cleave plan keeps them), so a restarted edge plans without encoding every cut again.
        cost = CostModel.measure(self.model, edge, cloud, calib[: s.byte_samples], cache=True)
        phase("bytes")
        if self.runtime.head_bits == 8:
            # Heads run on int8 kernels: the search over cuts must see their E(k), not the float one.
            cost = cost.with_quantized_heads(measure_speedups(self.model, calib, _anchor_cuts(self.model)))
            phase("int8 heads")
        budgets = Budgets(
            memory_bytes=int(s.memory_budget_mb * 1e6) if s.memory_budget_mb else None,
            max_rel_error=s.max_rel_error,
            min_top1=s.min_top1,
        )
        bits = self.runtime.head_bits
        if bits != FLOAT_BITS:
            # A split's accuracy is what its served head, the wire and the tail do together: quantizing every
            # layer of a head moves the output far more than quantizing the one feature that crosses.
            measure = head_tail_distortion(self.model, calib, head_at=self._served_head)
            meter = cached_distortion(measure, self.model, calib, heads=f"{bits}-bit")
        else:
            meter = cached_distortion(distortion_meter(self.model, calib), self.model, calib)
        log.info("planner ready: %s", ", ".join(f"{name} {seconds:.1f} s" for name, seconds in phases.items()))
        return Planner(
            cost, budgets, meter, s.objective, input_is_8bit=s.input_is_8bit, quantized_heads=bits != FLOAT_BITS
        )

    def _served_head(self, cut_index: int) -> Any:
        """The quantized head the runtime serves for a split at ``cut_index`` (``head.weight_bits``; the same
        build, on the backend's calibration images), for the planner's distortion measure."""
        cut, head, _ = self.runtime.model.parts(cut_index)
        return self.runtime.model.quantized(cut, head, self.runtime.head_bits)[0]

    def _prepare_from_bundle(self, backend: Any) -> Planner:
        """The same planner from an edge bundle, without torch: the bundle's tables hold the bytes and
        distortions measured at build time; E(k) is timed here on the bundle's heads (ONNX Runtime),
        C(k) comes from the cloud as for the torch edge."""
        s = self.settings
        tables = backend.tables
        request = si_pb2.ProfileRequest(model=backend.name, input_shape=backend.input_shape)
        reply = self.stub.Profile(request, timeout=PROFILE_TIMEOUT_S)
        if reply.fingerprint != backend.fingerprint:
            raise Unavailable("cloud profile is for another fingerprint; edge and cloud models differ")
        cloud = from_proto(reply)
        edge = backend.edge_profile()
        cost = tables.cost_model(edge, cloud, backend.name)
        if self.runtime.head_bits == 8:
            cost = cost.with_quantized_heads(backend.speedups())
        budgets = Budgets(
            memory_bytes=int(s.memory_budget_mb * 1e6) if s.memory_budget_mb else None,
            max_rel_error=s.max_rel_error,
            min_top1=s.min_top1,
        )
        self._calibration_count = int(tables.calibration.get("inputs", 0))
        return Planner(
            cost,
            budgets,
            table_distortion(bundle_distortion(tables, self.runtime.head_bits)),
            s.objective,
            input_is_8bit=s.input_is_8bit,
            quantized_heads=self.runtime.head_bits != FLOAT_BITS,
        )

    def measure_link(self) -> Link:
        """Probe the link now (on the planning thread; at most ``PROBE_TIMEOUT_S``).

        A probe that the cloud refuses raises (the cloud is away: the runtime falls back by itself and
        the plan stays). A probe whose every message, echoes included, stays unanswered until its
        deadline is a measurement: the link is buried (requests queued behind a collapsed rate) or
        drops everything, and nothing sent to the cloud now comes back sooner. It counts as a round
        trip of the whole deadline at next to no throughput, so the plan moves to the edge, and the
        next probe that gets through moves it back."""
        try:
            result = probe_link(self.stub, timeout=PROBE_TIMEOUT_S)
            rtt_ms, up, down = result.rtt_ms, result.up_mbps, result.down_mbps
        except grpc.RpcError as exc:
            if exc.code() != grpc.StatusCode.DEADLINE_EXCEEDED:
                raise
            log.info("link probe: no answer within %.0f s; planning as if nothing gets through", PROBE_TIMEOUT_S)
            rtt_ms, up, down = PROBE_TIMEOUT_S * 1e3, SILENT_MBPS, SILENT_MBPS
        self.monitor.record_probe(rtt_ms, up, down)
        # The probe measures the link's rates; the per-request overhead comes from requests served so far.
        return Link(up, down, rtt_ms, self.monitor.snapshot().overhead_ms)

    def current_link(self) -> Link:
        """The live estimate, refreshed by an active probe when traffic has not measured it lately."""
        if time.monotonic() - self.monitor.updated > self.settings.probe_interval_s:
            return self.measure_link()
        e = self.monitor.snapshot()
        return Link(max(e.up_mbps, 1e-3), max(e.down_mbps, 1e-3), e.rtt_ms, e.overhead_ms)

    def choose(self, link: Link, deadline: float | None = None) -> Scored:
        """The plan for ``link`` (``deadline``: see :meth:`Planner.rank`)."""
        assert self.planner is not None
        if self.settings.baseline:
            return self.planner.baseline(self.settings.baseline, link)
        return self.planner.best(link, deadline)

    def apply(self, scored: Scored, reason: str, enable: bool = False) -> bool:
        """Pin ``scored`` unless a manual pin turned planning off (``enable``: turn it back on first).

        On the planning thread. Returns whether it pinned.
        """
        placement, cut, spec = runtime_plan(scored.candidate)
        if self.planner is not None and self._calibration_count:
            # The plan's accuracy in user terms, in the reason that `cleave status` shows.
            scored = self.planner.with_distortion(scored)
            if scored.distortion is not None:
                top1, count = scored.distortion.top1 * 100, self._calibration_count
                reason += f"; top-1 agreement {top1:.1f}% on {count} calibration images"
        weight_bits = self.weight_bits_for(scored)
        with self._lock:  # against pin_manually: checking the flag and pinning are one step
            if enable:
                self._enabled = True
            if not self._enabled:
                return False
            self.runtime.pin(
                placement,
                cut,
                spec,
                reason=reason,
                predicted=scored.predicted,
                predicted_bytes=scored.candidate.bytes_up,
                objective=self.settings.objective,
                weight_bits=weight_bits,
            )
        self.current = scored
        return True

    def weight_bits_for(self, scored: Scored) -> dict[str, int] | None:
        """Per-layer head weight bits for a split (Auto-Split's allocation), or None for the default.

        The allocation keeps the head within the memory budget and the output within the accuracy
        budget (``max_rel_error`` squared: allocate_bits bounds the relative *squared* error).
        """
        c = scored.candidate
        if not self.allocate_head_bits or c.kind != Placement.SPLIT or self._calib is None:
            return None
        from partitioner.bitalloc import allocate_bits

        s = self.settings
        budget = int(s.memory_budget_mb * 1e6) if s.memory_budget_mb else c.edge_memory
        allocation = allocate_bits(self.model, c.cut_index, self._calib, budget, (s.max_rel_error or 0.05) ** 2)
        return allocation.weight_bits

    def replan(self, timeout: float = REPLAN_TIMEOUT_S) -> Scored:
        """Plan now from a fresh probe, without hysteresis (``Edge.Replan`` with no plan).

        Called on a gRPC thread: the planning thread does the work, this waits for its answer.
        """
        if self._stop.is_set():
            raise Unavailable("automatic planning has stopped (the edge is shutting down)")
        if not self._ready.is_set():
            raise Unavailable(f"automatic planning is not ready: {self.error}")
        future: Future = Future()
        try:
            self._inbox.put(_Replan(future), timeout=timeout)
            return future.result(timeout)
        except (queue.Full, FutureTimeout):
            future.cancel()
            raise Unavailable(f"re-plan: the planner did not answer within {timeout:.0f} s") from None

    def _serve_replan(self, future: Future) -> None:
        if not future.set_running_or_notify_cancel():
            return  # the caller gave up waiting
        try:
            link = self.measure_link()
            best = self.choose(link)
            self.apply(best, reason=f"replan requested at {_describe(link)}", enable=True)
            self.error = ""
        except Exception as exc:  # noqa: BLE001 - the Replan caller gets it, the planning thread goes on
            future.set_exception(exc)
        else:
            future.set_result(best)

    def first_plan(self, link: Link) -> Scored:
        """The first plan for ``link``, on the planning thread, once the planner is in use.

        Every candidate the walk reaches is checked. With quantized heads, though, each accuracy check builds
        a head (seconds, minutes under a CPU quota), and a walk past every split of a model those heads break
        takes hours: the first plan is then the best known to fit after ``measure_budget_s``, as a re-plan
        check's is, and the checks that follow measure the rest (:attr:`Planner.walk_complete`)."""
        assert self.planner is not None
        started = time.monotonic()
        quantized = self.planner.quantized_heads
        best = self.choose(link, deadline=started + self.settings.measure_budget_s if quantized else None)
        log.info(
            "first plan chosen in %.1f s (%d accuracy checks%s); predicted, fastest of each kind: %s",
            time.monotonic() - started,
            self.planner.measurements,
            "" if self.planner.walk_complete else ", more to come",
            _fastest_by_kind(self.planner, link),
        )
        return best

    def pin_manually(self) -> None:
        """A plan is being pinned from outside: stop re-planning until :meth:`replan`.

        Returns after any automatic pin in progress, so the caller's pin comes last.
        """
        with self._lock:
            self._enabled = False

    # -- the loop ----------------------------------------------------------------------------------
    def _run(self) -> None:
        delay = 0.5
        while not self._stop.is_set() and self.planner is None:
            try:
                planner = self.prepare()
                link = self.measure_link()
                self.use(planner)
                self.apply(self.first_plan(link), reason=f"planned at {_describe(link)}")
                self.error = ""
            except (grpc.RpcError, Unavailable, ValueError) as exc:
                self.error = _message(exc)
                log.warning("planner not ready (%s); retrying in %.1fs", self.error, delay)
                self._stop.wait(delay)
                delay = min(delay * 2, 10.0)
            except Exception as exc:  # noqa: BLE001 - nothing may end automatic planning
                self.error = _message(exc)
                log.exception("planning failed; retrying in %.1fs", delay)
                self._stop.wait(delay)
                delay = min(delay * 2, 10.0)
        interval = self.settings.check_interval_s
        next_check = time.monotonic() + interval
        while not self._stop.is_set():
            try:
                message = self._inbox.get(timeout=max(next_check - time.monotonic(), 0.0))
            except queue.Empty:
                message = None
            if message is _STOP:
                break
            self._handle(message)
            # Checked after every message, so a steady flow of observations cannot starve the checks.
            if time.monotonic() >= next_check:
                busy = _busy_s()
                if self.enabled:
                    try:
                        self._check()
                    except (grpc.RpcError, Unavailable) as exc:
                        self.error = _message(exc)  # the cloud is away; the runtime falls back by itself
                    except Exception as exc:  # noqa: BLE001 - nothing may end automatic planning
                        self.error = _message(exc)
                        log.exception("re-planning check failed; the plan in force stays")
                next_check = time.monotonic() + self.check_gap(_busy_s() - busy)
        self._refuse_waiting()

    def check_gap(self, busy_s: float) -> float:
        """Seconds from the end of a check that kept this thread busy for ``busy_s`` to the next one.

        ``check_interval_s``, or more where the check took over ``max_check_share`` of that: at 30x slower
        than the cloud under a CPU quota, a check's 17 ms of CPU kept it busy for ~400 ms (most of it
        waiting for the quota's next period), and one check a second held 1.7x the latency of the same
        plan pinned (placement_real.json). Never past ``LONGEST_CHECK_GAP_S``, so a link change is still
        seen."""
        s = self.settings
        return max(s.check_interval_s, min(busy_s / s.max_check_share, LONGEST_CHECK_GAP_S))

    def _refuse_waiting(self) -> None:
        """After the loop: answer the re-plans still in the inbox."""
        while True:
            try:
                message = self._inbox.get_nowait()
            except queue.Empty:
                return
            if isinstance(message, _Replan) and message.future.set_running_or_notify_cancel():
                message.future.set_exception(Unavailable("automatic planning has stopped"))

    def _check(self) -> None:
        link = self.current_link()
        # New evidence: link samples, or cloud timings that re-scale the cloud's compute.
        samples = self.monitor.snapshot().samples + (self.planner.cloud_observations if self.planner else 0)
        fresh = samples != self._evidence
        if not fresh and (self.planner is None or self.planner.walk_complete):
            return  # nothing new about the link: re-counting old evidence would defeat hysteresis
        self._evidence = samples
        started, measured = time.monotonic(), self.planner.measurements if self.planner else 0
        # Accuracy checks for at most measure_budget_s: the best plan known to fit is used meanwhile, and the
        # next checks measure what this one could not (also without new evidence, but only new evidence switches).
        best = self.choose(link, deadline=started + self.settings.measure_budget_s)
        took = time.monotonic() - started
        if took > SLOW_WALK_S:  # accuracy checks of candidates not measured before, on this device's CPU
            checks = (self.planner.measurements if self.planner else 0) - measured
            log.info("re-plan check at %s took %.1f s (%d accuracy checks)", _describe(link), took, checks)
        if not fresh:
            return
        current = self.current.candidate if self.current else None
        if self.policy.should_switch(self.planner, current, best, link):
            log.info(
                "re-plan at %s: %s -> %s", _describe(link), current.label if current else "-", best.candidate.label
            )
            self.apply(best, reason=f"re-planned at {_describe(link)}")
        elif self.policy.pending:
            log.info(
                "re-plan check at %s: %s is clearly faster than %s; waiting for the next check to confirm",
                _describe(link),
                best.candidate.label,
                current.label if current else "-",
            )
        self.error = ""


def bundle_distortion(tables: PlanningTables, head_bits: int) -> Mapping[str, tuple[float, float]]:
    """The table of ``tables`` that holds the accuracy of splits whose heads run at ``head_bits`` (32: float,
    8: the bundle's int8 heads). Raises Unavailable for a bundle built before int8 heads were measured."""
    if head_bits == FLOAT_BITS:
        return tables.distortion
    if tables.distortion_int8 is None:
        raise Unavailable(
            "head.weight_bits: 8 plans with the accuracy of the bundle's int8 heads, and this bundle was built "
            "before it was measured: rebuild it with `cleave bundle`, or serve float heads (head.weight_bits: 32)"
        )
    return tables.distortion_int8


def table_distortion(table: Mapping[str, tuple[float, float]]):
    """A planner's distortion measure that reads a bundle's table (:class:`PlanningTables`'s
    ``distortion`` or ``distortion_int8``): a candidate the table lacks is reported as breaking any
    accuracy budget (never chosen on a guess)."""

    def measure(candidate: Candidate) -> Distortion:
        found = table.get(f"{candidate.cut_index}|{candidate.encoding}")
        if found is None:
            log.debug("no distortion for %s in the bundle: not a candidate", candidate.label)
            return Distortion(float("inf"), 0.0)
        return Distortion(*found)

    return measure


def runtime_plan(candidate: Candidate) -> tuple[Placement, int | None, EncodingSpec]:
    """The placement, cut and encoding the runtime is pinned to for ``candidate`` (cut 0 sends the input)."""
    if candidate.kind == Placement.EDGE_ONLY:
        return Placement.EDGE_ONLY, None, EncodingSpec()
    cut = 0 if candidate.kind == Placement.CLOUD_ONLY else candidate.cut_index
    return candidate.kind, cut, EncodingSpec.parse(candidate.encoding)


def _busy_s() -> float:
    """Seconds this thread has run or waited, ready, for a CPU (Linux's schedstat: under a CPU quota
    the wait for the next period is most of it); its CPU time where schedstat is not available."""
    try:
        with open("/proc/thread-self/schedstat") as f:
            running_ns, waiting_ns = f.read().split()[:2]
        return (int(running_ns) + int(waiting_ns)) / 1e9
    except (OSError, ValueError):
        return time.thread_time()


def _anchor_cuts(model: LoadedModel, count: int = 3) -> list[int]:
    """A few split points spread over the model, where the quantized head's speed-up is measured."""
    splits = [c.index for c in model.graph.cuts if c.index > 0]
    if len(splits) <= count:
        return splits
    return sorted({splits[round(i * (len(splits) - 1) / (count - 1))] for i in range(count)})


def _fastest_by_kind(planner: Planner, link: Link) -> str:
    """Each placement kind's fastest predicted candidate, accuracy aside (for the log: why this plan)."""
    fastest: dict[Placement, Scored] = {}
    for c in planner.candidates:
        scored = planner.score(c, link)
        if c.kind not in fastest or scored.cost_ms < fastest[c.kind].cost_ms:
            fastest[c.kind] = scored
    parts = []
    for kind, s in sorted(fastest.items(), key=lambda item: item[1].cost_ms):
        p = s.predicted
        link_ms = p.upload_ms + p.rtt_ms + p.download_ms
        parts.append(
            f"{kind.value} {s.cost_ms:.1f} ms (edge {p.edge_ms:.1f}, link {link_ms:.1f}, cloud {p.cloud_ms:.1f})"
        )
    return ", ".join(parts)


def _describe(link: Link) -> str:
    return f"{link.up_mbps:.1f}/{link.down_mbps:.1f} Mbit/s, RTT {link.rtt_ms:.1f} ms"


def _message(exc: BaseException) -> str:
    if isinstance(exc, grpc.RpcError):
        return f"{exc.code().name}: {exc.details()}"
    return str(exc)
