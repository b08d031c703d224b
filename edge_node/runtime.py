"""Where each request runs: the plan, the head, the cloud link and the local fallback.

The plan is swapped atomically between requests: a request takes a snapshot of it on entry and
finishes under that snapshot, so changing the cut or the encoding never drops or fails a request.
When the cloud is unreachable, slow past the deadline, or answers with an error, the request
finishes here: the tail runs on the features the head already computed.

Threads (see docs/threads.md): requests run on the gRPC handler threads that call :meth:`EdgeRuntime.infer`;
plans are put in force by :meth:`EdgeRuntime.pin`, from a ``Replan`` handler or the autoplanner,
one at a time under the pin lock. Placements are :class:`~partitioner.placement.Placement`; the
servicer converts them to the wire's enum.

The model runs through a :class:`~edge_node.backend.Backend`: torch (a traced model) or ONNX
Runtime (an edge bundle); this module imports neither.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections import Counter, deque
from collections.abc import Callable, Hashable
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any, Generic, TypeVar

from compressor import EncodingSpec, encode_apart
from compressor.framing import field_key, varint
from partitioner.costmodel import REPLY_ENCODING, Breakdown, reply_encoding
from partitioner.placement import Placement
from protos.bounds import MAX_PLAN_LABEL, MAX_PREDICTED_MS
from protos.cleave.v1 import edge_pb2, tensor_pb2
from protos.cleave.v1 import split_inference_pb2 as si_pb2
from protos.errors import InvalidArgument, ResourceExhausted, WireError

from .backend import Backend
from .cloud_link import CloudLink

if TYPE_CHECKING:
    from partitioner.loaded import LoadedModel

# A tensor's bytes with its payload: its header's, then the payload field's key, length and bytes.
_PAYLOAD_KEY = len(field_key(tensor_pb2.Tensor.DESCRIPTOR.fields_by_name["payload"].number))
_RAW, _NONE = tensor_pb2.RAW, tensor_pb2.NONE  # a cloud result as encoding it RAW, uncompressed, gives
FLOAT_BITS = 32  # a head at 32 "bits" is the float head (partitioner.quantized_head.FLOAT_BITS)

log = logging.getLogger(__name__)

FALLBACK_LOG_INTERVAL_S = 60.0  # a lasting fallback is logged again this often

T = TypeVar("T")


@dataclass(frozen=True)
class ActivePlan:
    """A plan with its executable parts."""

    placement: Placement  # SPLIT, CLOUD_ONLY or EDGE_ONLY
    cut: Any | None  # the backend's cut (index, name, live, ...); None for edge-only
    spec: EncodingSpec
    head: Any  # what the backend runs for the head (a module, an ONNX session); None for edge-only
    tail: Any  # what the backend finishes a fallback with (None where it runs the whole model)
    reason: str = ""
    predicted: Breakdown | None = None
    predicted_bytes: int = 0  # what the planner expects each request to send up (0: not planned)
    objective: str = ""
    weight_bits: dict[str, int] = field(default_factory=dict)  # quantized head layers; empty: float head
    reply: str = ""  # how the cloud codes the outputs it sends back (costmodel.reply_encoding); "": float32

    @property
    def cut_index(self) -> int | None:
        """The cut requests of this plan are sent at (0 for cloud-only); None for edge-only."""
        return self.cut.index if self.cut is not None else None


@dataclass
class Outcome:
    outputs: list  # the backend's arrays: torch tensors or numpy arrays
    placement: Placement  # where it ran: the plan's, or LOCAL_FALLBACK
    plan: ActivePlan
    timing: edge_pb2.StageTiming
    bytes_up: int = 0
    bytes_down: int = 0
    note: str = ""
    local_tail_ms: float = 0.0  # the tail's run here after a fallback (also inside timing.edge_compute_ms)
    # The outputs as the cloud sent them, when they are what encoding ``outputs`` RAW and uncompressed
    # gives (checked by their decode): a reply carries them as they are. None: encode ``outputs``.
    raw_outputs: list[tensor_pb2.Tensor] | None = None


_COUNTED = {
    Placement.SPLIT: "split",
    Placement.EDGE_ONLY: "edge_only",
    Placement.CLOUD_ONLY: "cloud_only",
    Placement.LOCAL_FALLBACK: "fallback",
}


@dataclass
class Counters:
    """What the runtime served, for ``GetStatus`` and metrics; every field under ``_lock``."""

    requests: int = 0
    split: int = 0
    edge_only: int = 0
    cloud_only: int = 0
    fallback: int = 0
    errors: int = 0
    bytes_up: int = 0
    bytes_down: int = 0
    plan_switches: int = 0
    recent_ms: deque = field(default_factory=lambda: deque(maxlen=50), repr=False)
    # Called with every recorded Outcome on the request's thread, outside the lock (see subscribe).
    _listeners: tuple[Callable[[Outcome], None], ...] = field(default=(), repr=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    @property
    def recent_mean_ms(self) -> float:
        with self._lock:
            return sum(self.recent_ms) / len(self.recent_ms) if self.recent_ms else 0.0

    def subscribe(self, listener: Callable[[Outcome], None]) -> None:
        """Call ``listener`` with every recorded outcome, on the thread that served it.

        It must be quick and must not block (metrics observe; the autoplanner enqueues): it runs
        on the request's own thread, before the reply goes out.
        """
        with self._lock:
            self._listeners = (*self._listeners, listener)

    def unsubscribe(self, listener: Callable[[Outcome], None]) -> None:
        with self._lock:
            self._listeners = tuple(x for x in self._listeners if x != listener)

    def record(self, outcome: Outcome) -> None:
        name = _COUNTED[outcome.placement]
        with self._lock:
            self.requests += 1
            setattr(self, name, getattr(self, name) + 1)
            self.bytes_up += outcome.bytes_up
            self.bytes_down += outcome.bytes_down
            self.recent_ms.append(outcome.timing.total_ms)
            listeners = self._listeners
        for listener in listeners:
            try:
                listener(outcome)
            except Exception:  # noqa: BLE001 - an observer must never fail a served request
                log.exception("outcome listener failed")

    def add(self, name: str) -> None:
        """Count one more ``name`` (``errors``, ``plan_switches``)."""
        with self._lock:
            setattr(self, name, getattr(self, name) + 1)

    def to_proto(self, sessions_opened: int = 0, reconnects: int = 0) -> edge_pb2.Counters:
        """A consistent snapshot, for ``GetStatus``, with the link's counts of sessions."""
        with self._lock:
            return edge_pb2.Counters(
                requests=self.requests,
                split=self.split,
                edge_only=self.edge_only,
                cloud_only=self.cloud_only,
                fallback=self.fallback,
                errors=self.errors,
                bytes_up=self.bytes_up,
                bytes_down=self.bytes_down,
                reconnects=reconnects,
                sessions_opened=sessions_opened,
                plan_switches=self.plan_switches,
            )


class Inflight:
    """Requests running now, in total (at most ``limit``) and per cut of the plan each took.

    Shared by the runtime (request threads enter and leave; a pin says which cut is in force) and
    the cloud link (its drain threads ask :meth:`in_use` before closing a replaced stream); every
    count under one lock.
    """

    def __init__(self, limit: int = 64) -> None:
        if limit < 1:
            raise ValueError(f"limits.max_inflight: {limit} is not positive")
        self.limit = limit
        self._count = 0
        self._cuts: Counter[int | None] = Counter()
        self._in_force: int | None = None  # the cut of the plan in force (None: edge-only or none yet)
        self._lock = threading.Lock()

    @property
    def count(self) -> int:
        with self._lock:
            return self._count

    def enter(self, cut_index: int | None) -> None:
        """One more request at ``cut_index`` (None: edge-only); ResourceExhausted past the limit."""
        with self._lock:
            if self._count >= self.limit:
                raise ResourceExhausted(f"queue: {self._count} requests in flight (max_inflight {self.limit})")
            self._count += 1
            self._cuts[cut_index] += 1

    def leave(self, cut_index: int | None) -> None:
        with self._lock:
            self._count -= 1
            self._cuts[cut_index] -= 1

    def switched(self, cut_index: int | None) -> None:
        """The plan in force now sends at ``cut_index`` (None: sends nothing)."""
        with self._lock:
            self._in_force = cut_index

    def in_use(self, cut_index: int) -> bool:
        """Whether a running request took a plan at ``cut_index``, or the plan in force is at it.

        The second half covers the moment of a switch: the new session is open, the old plan still in
        force and requests still taking it; its stream must not close before the switch is done.
        """
        with self._lock:
            return self._cuts[cut_index] > 0 or self._in_force == cut_index


class BuildOnce(Generic[T]):
    """A cache whose values are built once per key, however many threads ask at the same time.

    The first caller of a key builds it outside the lock; the others wait for its result. A build
    that raises is not cached: its waiters get the error, the next caller builds again.
    """

    def __init__(self) -> None:
        self._futures: dict[Hashable, Future] = {}
        self._lock = threading.Lock()

    def get(self, key: Hashable, build: Callable[[], T]) -> T:
        with self._lock:
            future = self._futures.get(key)
            owner = future is None
            if owner:
                future = self._futures[key] = Future()
        if not owner:
            return future.result()
        try:
            value = build()
        except BaseException as exc:
            with self._lock:
                del self._futures[key]
            future.set_exception(exc)
            raise
        future.set_result(value)
        return value

    def __len__(self) -> int:
        with self._lock:
            return sum(1 for f in self._futures.values() if f.done() and f.exception() is None)


class EdgeRuntime:
    """Runs requests under the current plan, with the cloud when it can and locally when it must.

    ``inflight`` bounds and counts running requests; give the same object's ``in_use`` to the
    :class:`~edge_node.cloud_link.CloudLink` so a stream replaced by a plan switch drains first.
    """

    def __init__(
        self,
        model: Backend | LoadedModel,
        link: CloudLink,
        request_timeout_s: float,
        inflight: Inflight | None = None,
        head_bits: int = FLOAT_BITS,
        input_is_8bit: bool = True,
    ) -> None:
        """``model``: a :class:`~edge_node.backend.Backend`, or a loaded torch model (run by the torch backend).

        ``input_is_8bit``: inputs are 8-bit images, so a cloud-only plan sending 8-bit codes is lossless and gets
        its reply as float32; every lossy plan gets it coded (:func:`~partitioner.costmodel.reply_encoding`), as
        the planner measured its accuracy."""
        if hasattr(model, "graph"):  # a LoadedModel
            from .torch_backend import TorchBackend

            model = TorchBackend(model)
        self.model: Backend = model
        self.head_bits = head_bits  # default weight bits for heads of pinned plans
        self.input_is_8bit = input_is_8bit
        self._quantized: BuildOnce[tuple[Any, dict[str, int]]] = BuildOnce()  # per (cut, per-layer bits)
        self.inflight_requests = inflight if inflight is not None else Inflight()
        self.link = link
        self.request_timeout_s = request_timeout_s
        self.counters = Counters()
        self._fallback_lock = threading.Lock()  # guards the two below: what _log_fallback said last, and when
        self._fallback_note = ""
        self._fallback_logged = 0.0
        self._pin_lock = threading.Lock()  # one plan switch at a time (Replan and the autoplanner both pin)
        # Written only under _pin_lock; requests read the reference once, lock-free, and keep that snapshot.
        self._plan: ActivePlan = ActivePlan(Placement.EDGE_ONLY, None, EncodingSpec(), None, None, "initial")

    # -- plans -----------------------------------------------------------------------------------
    @property
    def plan(self) -> ActivePlan:
        return self._plan

    @property
    def max_inflight(self) -> int:
        return self.inflight_requests.limit

    def pin(
        self,
        placement: Placement,
        cut: int | str | None = None,
        spec: EncodingSpec | None = None,
        *,
        reason: str = "pinned",
        predicted: Breakdown | None = None,
        objective: str = "",
        weight_bits: int | dict[str, int] | None = None,
        predicted_bytes: int = 0,
    ) -> ActivePlan:
        """Put a plan in force and return it; requests already running finish under theirs.

        ``placement``: SPLIT at ``cut`` (a cut name or index, not 0), CLOUD_ONLY (``cut`` None or
        0: the input is sent) or EDGE_ONLY (no cut). ``spec``: how features cross (default raw).
        ``weight_bits``: the head's weight bits, for every layer (an int) or per layer (a dict;
        unnamed layers float); None uses the runtime's default. 32 is the float head.

        Raises InvalidArgument naming ``placement``, ``cut`` or ``weight_bits``. Thread-safe: the
        switches are serialised (the last pin to take the lock is the plan in force); building the
        plan is not, and concurrent pins of one quantized head wait for a single build.
        """
        # Built outside the lock (a quantized head takes a while): pins racing for one share the build.
        plan = self._make_plan(placement, cut, spec or EncodingSpec(), reason)
        plan = replace(plan, predicted=predicted, predicted_bytes=predicted_bytes, objective=objective)
        plan = self._quantize_head(plan, self.head_bits if weight_bits is None else weight_bits)
        with self._pin_lock:
            # Open the new session before switching, so requests keep going to the cloud meanwhile.
            self.link.want(plan.cut_index, prediction=plan_prediction(plan), reply=plan.reply)
            self._plan = plan
            self.inflight_requests.switched(plan.cut_index)
            self.counters.add("plan_switches")
        log.info("plan: %s, %s (%s)", _where(plan), plan.spec, reason)
        return plan

    def _quantize_head(self, plan: ActivePlan, bits: int | dict[str, int]) -> ActivePlan:
        """Swap in a quantized head (built once per cut and bits); edge-only and cloud-only keep theirs."""
        if plan.placement != Placement.SPLIT or bits == FLOAT_BITS or bits == {}:
            return plan
        key = (plan.cut.index, bits if isinstance(bits, int) else tuple(sorted(bits.items())))

        def build() -> tuple[Any, dict[str, int]]:
            try:
                return self.model.quantized(plan.cut, plan.head, bits)
            except ValueError as exc:
                raise InvalidArgument(f"weight_bits: {exc}") from exc

        head, per_layer = self._quantized.get(key, build)
        # A quantized head makes the plan lossy whatever crosses: its reply comes coded, as the planner measured it.
        reply = REPLY_ENCODING if any(b < FLOAT_BITS for b in per_layer.values()) else plan.reply
        return replace(plan, head=head, weight_bits=per_layer, reply=reply)

    def _make_plan(self, placement: Placement, cut: int | str | None, spec: EncodingSpec, reason: str) -> ActivePlan:
        if not isinstance(placement, Placement) or placement == Placement.LOCAL_FALLBACK:
            raise InvalidArgument(f"placement: {placement!r} is not a plan (SPLIT, CLOUD_ONLY or EDGE_ONLY)")
        if placement == Placement.EDGE_ONLY:
            if cut is not None:
                raise InvalidArgument(f"cut: an edge-only plan has no cut, got {cut!r}")
            return ActivePlan(Placement.EDGE_ONLY, None, spec, None, None, reason)
        if placement == Placement.CLOUD_ONLY:
            cut = 0 if cut is None else cut
        elif cut is None:
            raise InvalidArgument("cut: a split plan needs a cut (a name or an index)")
        try:
            cut_obj, head, tail = self.model.parts(cut)
        except KeyError as exc:
            raise InvalidArgument(f"cut: {exc.args[0]}") from exc
        if placement == Placement.CLOUD_ONLY and cut_obj.index != 0:
            raise InvalidArgument(f"cut: a cloud-only plan sends the input (cut 0), not cut {cut!r}")
        if placement == Placement.SPLIT and cut_obj.index == 0:
            raise InvalidArgument(f"cut: {cut!r} is the model's input; sending it is a CLOUD_ONLY plan")
        if spec.encoding == "entropy" and (self.model.entropy_tables is None or cut_obj.name != "bottleneck_latent"):
            raise InvalidArgument("encoding: entropy sends a bottleneck's latent: only at the cut bottleneck_latent")
        reply = reply_encoding(placement, str(spec), self.input_is_8bit)
        return ActivePlan(placement, cut_obj, spec, head, tail, reason, reply=reply)

    # -- requests --------------------------------------------------------------------------------
    @property
    def inflight(self) -> int:
        return self.inflight_requests.count

    def cut_in_use(self, cut_index: int) -> bool:
        """Whether a running request took a plan at ``cut_index``."""
        return self.inflight_requests.in_use(cut_index)

    def check_inputs(self, inputs: list) -> None:
        expected = self.model.input_shape
        if len(inputs) != 1:
            raise InvalidArgument(f"inputs: model {self.model.name!r} takes 1 tensor, got {len(inputs)}")
        x = inputs[0]
        if str(x.dtype).removeprefix("torch.") != "float32":
            raise InvalidArgument(f"inputs[0].dtype: expected float32, got {x.dtype}")
        if x.ndim != len(expected) or tuple(x.shape[1:]) != tuple(expected[1:]) or x.shape[0] < 1:
            raise InvalidArgument(
                f"inputs[0].shape: expected (N, {', '.join(map(str, expected[1:]))}), got {tuple(x.shape)}"
            )

    def infer(self, inputs: list) -> Outcome:
        """Run one request under the current plan; never fails because of the cloud."""
        self.check_inputs(inputs)
        while True:
            plan = self._plan  # this request's snapshot: a pin meanwhile does not change it
            self.inflight_requests.enter(plan.cut_index)
            if self._plan is plan:
                break  # counted while its plan was in force: a replaced stream waits for it
            self.inflight_requests.leave(plan.cut_index)  # a pin came in between: take the new plan
        try:
            outcome = self._run(inputs, plan)
        except Exception:
            self.counters.add("errors")
            raise
        finally:
            self.inflight_requests.leave(plan.cut_index)
        self.counters.record(outcome)
        return outcome

    def _run(self, inputs: list, plan: ActivePlan) -> Outcome:
        timing = edge_pb2.StageTiming()
        started = time.perf_counter()
        if plan.placement == Placement.EDGE_ONLY:
            outputs = self.model.run(inputs)
            timing.edge_compute_ms = timing.total_ms = (time.perf_counter() - started) * 1e3
            return Outcome(outputs, Placement.EDGE_ONLY, plan, timing)

        features = self.model.run_head(plan.head, inputs)
        t_head = time.perf_counter()
        timing.edge_compute_ms = (t_head - started) * 1e3

        stream = self.link.stream_for(plan.cut.index, plan.reply)
        if stream is None:
            if self.link.refusal:
                note = f"cloud refused the session: {self.link.refusal}"
            else:
                note = f"cloud unreachable: {self.link.last_error or f'no session at cut {plan.cut.index} yet'}"
            return self._finish_locally(inputs, features, plan, timing, started, note)

        # Each payload apart from its tensor: the frames copy it once (see encode_apart).
        apart = [encode_apart(f, plan.spec, self.model.entropy_tables) for f in features]
        encoded, payloads = [t for t, _ in apart], [p for _, p in apart]
        t_enc = time.perf_counter()
        timing.encode_ms = (t_enc - t_head) * 1e3
        request_id = self.link.next_request_id()
        remaining = self.request_timeout_s - (t_enc - started)
        try:
            reply = stream.submit(request_id, encoded, payloads).result(timeout=max(remaining, 0.0))
        except FutureTimeout:
            stream.forget(request_id)
            # No answer in time is evidence too: the uplink moved these bytes no faster than this.
            waited_ms = (time.perf_counter() - t_enc) * 1e3
            sent = sum(t.ByteSize() + (_PAYLOAD_KEY + len(varint(len(p))) + len(p) if p else 0) for t, p in apart)
            self.link.monitor.record_stall(sent, waited_ms)
            note = f"cloud missed the {self.request_timeout_s:.1f}s deadline"
            return self._finish_locally(inputs, features, plan, timing, started, note)
        except WireError as exc:
            return self._finish_locally(inputs, features, plan, timing, started, f"cloud failed: {exc.message}")
        t_back = time.perf_counter()
        cloud = reply.timing
        cloud_ms = cloud.queue_ms + cloud.decode_ms + cloud.compute_ms + cloud.encode_ms
        timing.transfer_ms = max((t_back - t_enc) * 1e3 - cloud_ms, 0.0)
        timing.cloud_queue_ms = cloud.queue_ms
        timing.cloud_decode_ms = cloud.decode_ms
        timing.cloud_compute_ms = cloud.compute_ms
        timing.cloud_encode_ms = cloud.encode_ms
        outputs = [self.model.decode(t) for t in reply.outputs]
        t_end = time.perf_counter()
        timing.decode_ms = (t_end - t_back) * 1e3
        timing.total_ms = (t_end - started) * 1e3
        self.link.monitor.record_transfer(reply.bytes_up, reply.bytes_down, timing.transfer_ms)
        raw = reply.outputs if all(t.encoding == _RAW and t.codec == _NONE for t in reply.outputs) else None
        return Outcome(outputs, plan.placement, plan, timing, reply.bytes_up, reply.bytes_down, raw_outputs=raw)

    def _log_fallback(self, plan: ActivePlan, note: str) -> None:
        """Say why requests run the tail here: when the reason changes, and once a minute while it lasts."""
        now = time.monotonic()
        with self._fallback_lock:
            if note == self._fallback_note and now - self._fallback_logged < FALLBACK_LOG_INTERVAL_S:
                return
            self._fallback_note, self._fallback_logged = note, now
        log.warning("falling back to %s (plan %s, %s): %s", self.model.fallback, _where(plan), plan.reason, note)

    def _finish_locally(
        self, inputs: list, features: tuple, plan: ActivePlan, timing: edge_pb2.StageTiming, started: float, note: str
    ) -> Outcome:
        self._log_fallback(plan, note)
        t0 = time.perf_counter()
        outputs = self.model.run_tail(plan.cut, plan.tail, inputs, features)
        t1 = time.perf_counter()
        timing.edge_compute_ms += (t1 - t0) * 1e3
        timing.total_ms = (t1 - started) * 1e3
        return Outcome(outputs, Placement.LOCAL_FALLBACK, plan, timing, note=note, local_tail_ms=(t1 - t0) * 1e3)


def plan_prediction(plan: ActivePlan) -> si_pb2.PlanPrediction | None:
    """What ``plan`` predicts, as the cloud's ``OpenSession`` takes it (None: no prediction, or edge-only).

    Values outside what the cloud accepts (not finite, negative, over an hour) are clamped there, so a
    wild estimate never costs the edge its session."""
    p = plan.predicted
    if p is None or plan.cut is None:
        return None

    def ms(value: float) -> float:
        return min(max(value, 0.0), MAX_PREDICTED_MS) if math.isfinite(value) else MAX_PREDICTED_MS

    return si_pb2.PlanPrediction(
        label=f"{_where(plan)}, {plan.spec}"[:MAX_PLAN_LABEL],
        objective=plan.objective[:MAX_PLAN_LABEL],
        total_ms=ms(p.total_ms),
        edge_ms=ms(p.edge_ms),
        encode_ms=ms(p.encode_ms),
        upload_ms=ms(p.upload_ms),
        rtt_ms=ms(p.rtt_ms),
        decode_ms=ms(p.decode_ms),
        cloud_ms=ms(p.cloud_ms),
        download_ms=ms(p.download_ms),
    )


def _where(plan: ActivePlan) -> str:
    """A plan's placement and cut, for the log: ``SPLIT at layer2_0_relu``."""
    return f"{plan.placement.name} at {plan.cut.name if plan.cut else '-'}"
