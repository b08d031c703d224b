"""Where each request runs: the plan, the head, the cloud link and the local fallback.

The plan is swapped atomically between requests: a request takes a snapshot of it on entry and
finishes under that snapshot, so changing the cut or the encoding never drops or fails a request.
When the cloud is unreachable, slow past the deadline, or answers with an error, the request
finishes here: the tail runs on the features the head already computed.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import Counter, deque
from collections.abc import Callable
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass, field, replace

import torch

from compressor import EncodingSpec, decode, encode
from partitioner.costmodel import Breakdown
from partitioner.graph import Cut
from partitioner.loaded import LoadedModel, as_tensor_list
from partitioner.models import calibration_batch
from partitioner.quantized_head import FLOAT_BITS, build_quantized_head, head_layers
from protos.cleave.v1 import edge_pb2
from protos.errors import InvalidArgument, ResourceExhausted, WireError

from .cloud_link import CloudLink

log = logging.getLogger(__name__)

FALLBACK_LOG_INTERVAL_S = 60.0  # a lasting fallback is logged again this often

SPLIT, EDGE_ONLY, CLOUD_ONLY, LOCAL_FALLBACK = (
    edge_pb2.SPLIT,
    edge_pb2.EDGE_ONLY,
    edge_pb2.CLOUD_ONLY,
    edge_pb2.LOCAL_FALLBACK,
)


@dataclass(frozen=True)
class ActivePlan:
    """A plan with its executable parts."""

    placement: int
    cut: Cut | None  # None for edge-only
    spec: EncodingSpec
    head: torch.nn.Module | None
    tail: torch.nn.Module | None
    reason: str = ""
    predicted: Breakdown | None = None
    objective: str = ""
    weight_bits: dict[str, int] = field(default_factory=dict)  # quantized head layers; empty: float head

    def to_proto(self, model: str) -> edge_pb2.Plan:
        plan = edge_pb2.Plan(
            model=model,
            placement=self.placement,
            encoding=self.spec.to_proto(),
            reason=self.reason,
            objective=self.objective,
        )
        if self.predicted is not None:
            p = self.predicted
            plan.predicted_ms = p.total_ms
            plan.predicted.CopyFrom(
                edge_pb2.PredictedLatency(
                    edge_ms=p.edge_ms,
                    encode_ms=p.encode_ms,
                    upload_ms=p.upload_ms,
                    rtt_ms=p.rtt_ms,
                    decode_ms=p.decode_ms,
                    cloud_ms=p.cloud_ms,
                    download_ms=p.download_ms,
                    total_ms=p.total_ms,
                )
            )
        if self.cut is not None:
            plan.cut_index = self.cut.index
            plan.cut_name = self.cut.name
        plan.weight_bits.update(self.weight_bits)
        return plan


@dataclass
class Outcome:
    outputs: list[torch.Tensor]
    placement: int
    plan: ActivePlan
    timing: edge_pb2.StageTiming
    bytes_up: int = 0
    bytes_down: int = 0
    note: str = ""
    local_tail_ms: float = 0.0  # the tail's run here after a fallback (also inside timing.edge_compute_ms)


@dataclass
class Counters:
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
    # Called with every recorded Outcome, outside the lock (the edge's Prometheus metrics listen here).
    listeners: list[Callable[[Outcome], None]] = field(default_factory=list, repr=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    @property
    def recent_mean_ms(self) -> float:
        with self._lock:
            return sum(self.recent_ms) / len(self.recent_ms) if self.recent_ms else 0.0

    def record(self, outcome: Outcome) -> None:
        names = {SPLIT: "split", EDGE_ONLY: "edge_only", CLOUD_ONLY: "cloud_only", LOCAL_FALLBACK: "fallback"}
        with self._lock:
            self.requests += 1
            setattr(self, names[outcome.placement], getattr(self, names[outcome.placement]) + 1)
            self.bytes_up += outcome.bytes_up
            self.bytes_down += outcome.bytes_down
            self.recent_ms.append(outcome.timing.total_ms)
        for listener in self.listeners:
            try:
                listener(outcome)
            except Exception:  # noqa: BLE001 - an observer must never fail a served request
                log.exception("outcome listener failed")

    def add(self, name: str) -> None:
        """Count one more ``name`` (``errors``, ``plan_switches``)."""
        with self._lock:
            setattr(self, name, getattr(self, name) + 1)

    def to_proto(self, reconnects: int) -> edge_pb2.Counters:
        """A consistent snapshot, for ``GetStatus``."""
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
                plan_switches=self.plan_switches,
            )


class EdgeRuntime:
    """Runs requests under the current plan, with the cloud when it can and locally when it must."""

    def __init__(
        self,
        model: LoadedModel,
        link: CloudLink,
        request_timeout_s: float,
        max_inflight: int = 64,
        head_bits: int = FLOAT_BITS,
    ) -> None:
        self.model = model
        self.head_bits = head_bits  # default weight bits for heads of pinned plans
        self._quantized: dict[tuple, torch.nn.Module] = {}
        self.max_inflight = max_inflight
        self.link = link
        self.request_timeout_s = request_timeout_s
        self.counters = Counters()
        self._inflight = 0
        self._inflight_cuts: Counter[int] = Counter()  # requests running per cut of the plan they took
        self._inflight_lock = threading.Lock()
        self._fallback_lock = threading.Lock()  # guards the two below: what _log_fallback said last, and when
        self._fallback_note = ""
        self._fallback_logged = 0.0
        link.in_use = self.cut_in_use  # a replaced stream drains until its cut's requests are done
        self._plan: ActivePlan = self._make_plan("edge", EncodingSpec(), reason="initial")

    # -- plans -----------------------------------------------------------------------------------
    @property
    def plan(self) -> ActivePlan:
        return self._plan

    def pin(
        self,
        cut: str | int,
        spec: EncodingSpec,
        reason: str = "pinned",
        predicted: Breakdown | None = None,
        objective: str = "",
        weight_bits: int | dict[str, int] | None = None,
    ) -> ActivePlan:
        """Switch to a cut and encoding. ``cut``: "edge", "cloud", a cut name or an index.

        ``weight_bits``: the head's weight bits, for every layer (an int) or per layer (a dict;
        unnamed layers float); None uses the runtime's default. 32 is the float head.
        """
        plan = replace(self._make_plan(cut, spec, reason), predicted=predicted, objective=objective)
        plan = self._quantize_head(plan, self.head_bits if weight_bits is None else weight_bits)
        # Open the new session before switching, so requests keep going to the cloud meanwhile.
        self.link.want(plan.cut.index if plan.cut is not None else None)
        self._plan = plan
        self.counters.add("plan_switches")
        log.info("plan: %s, %s (%s)", _where(plan), plan.spec, reason)
        return plan

    def _quantize_head(self, plan: ActivePlan, bits: int | dict[str, int]) -> ActivePlan:
        """Swap in a quantized head (built once per cut and bits); edge-only and cloud-only keep theirs."""
        if plan.placement != SPLIT or bits == FLOAT_BITS or bits == {}:
            return plan
        layers = list(head_layers(plan.head))
        per_layer = (
            {name: bits for name in layers} if isinstance(bits, int) else {**dict.fromkeys(layers, FLOAT_BITS), **bits}
        )
        key = (plan.cut.index, tuple(sorted(per_layer.items())))
        if key not in self._quantized:
            calib = calibration_batch(self.model.input_shape, 8)
            try:
                self._quantized[key] = build_quantized_head(plan.head, calib, per_layer)
            except ValueError as exc:
                raise InvalidArgument(f"weight_bits: {exc}") from exc
        return replace(plan, head=self._quantized[key], weight_bits=per_layer)

    def _make_plan(self, cut: str | int, spec: EncodingSpec, reason: str) -> ActivePlan:
        if cut == "edge":
            return ActivePlan(EDGE_ONLY, None, spec, None, None, reason)
        key: str | int = 0 if cut == "cloud" else cut
        if isinstance(key, str) and key.isdigit():
            key = int(key)
        try:
            cut_obj, head, tail = self.model.parts(key)
        except KeyError as exc:
            raise InvalidArgument(f"cut: {exc.args[0]}") from exc
        placement = CLOUD_ONLY if cut_obj.index == 0 else SPLIT
        if spec.encoding == "entropy" and (self.model.entropy_tables is None or cut_obj.name != "bottleneck_latent"):
            raise InvalidArgument("encoding: entropy sends a bottleneck's latent: only at the cut bottleneck_latent")
        return ActivePlan(placement, cut_obj, spec, head, tail, reason)

    # -- requests --------------------------------------------------------------------------------
    @property
    def inflight(self) -> int:
        return self._inflight

    def cut_in_use(self, cut_index: int) -> bool:
        """Whether a running request took a plan at ``cut_index``."""
        with self._inflight_lock:
            return self._inflight_cuts[cut_index] > 0

    def check_inputs(self, inputs: list[torch.Tensor]) -> None:
        expected = self.model.input_shape
        if len(inputs) != 1:
            raise InvalidArgument(f"inputs: model {self.model.name!r} takes 1 tensor, got {len(inputs)}")
        x = inputs[0]
        if x.dtype != torch.float32:
            raise InvalidArgument(f"inputs[0].dtype: expected float32, got {x.dtype}")
        if x.dim() != len(expected) or tuple(x.shape[1:]) != tuple(expected[1:]) or x.shape[0] < 1:
            raise InvalidArgument(
                f"inputs[0].shape: expected (N, {', '.join(map(str, expected[1:]))}), got {tuple(x.shape)}"
            )

    def infer(self, inputs: list[torch.Tensor]) -> Outcome:
        """Run one request under the current plan; never fails because of the cloud."""
        self.check_inputs(inputs)
        with self._inflight_lock:
            if self._inflight >= self.max_inflight:
                raise ResourceExhausted(
                    f"queue: {self._inflight} requests in flight (max_inflight {self.max_inflight})"
                )
            self._inflight += 1
            plan = self._plan
            cut = plan.cut.index if plan.cut is not None else None
            self._inflight_cuts[cut] += 1
        try:
            outcome = self._run(inputs, plan)
        except Exception:
            self.counters.add("errors")
            raise
        finally:
            with self._inflight_lock:
                self._inflight -= 1
                self._inflight_cuts[cut] -= 1
        self.counters.record(outcome)
        return outcome

    def _run(self, inputs: list[torch.Tensor], plan: ActivePlan) -> Outcome:
        timing = edge_pb2.StageTiming()
        started = time.perf_counter()
        if plan.placement == EDGE_ONLY:
            with torch.inference_mode():
                outputs = as_tensor_list(self.model.module(*inputs))
            timing.edge_compute_ms = timing.total_ms = (time.perf_counter() - started) * 1e3
            return Outcome(outputs, EDGE_ONLY, plan, timing)

        with torch.inference_mode():
            features = plan.head(*inputs)
        t_head = time.perf_counter()
        timing.edge_compute_ms = (t_head - started) * 1e3

        stream = self.link.stream_for(plan.cut.index)
        if stream is None:
            if self.link.refusal:
                note = f"cloud refused the session: {self.link.refusal}"
            else:
                note = f"cloud unreachable: {self.link.last_error or f'no session at cut {plan.cut.index} yet'}"
            return self._finish_locally(features, plan, timing, started, note)

        encoded = [encode(f, plan.spec, self.model.entropy_tables) for f in features]
        t_enc = time.perf_counter()
        timing.encode_ms = (t_enc - t_head) * 1e3
        request_id = self.link.next_request_id()
        remaining = self.request_timeout_s - (t_enc - started)
        try:
            reply = stream.submit(request_id, encoded).result(timeout=max(remaining, 0.0))
        except FutureTimeout:
            stream.forget(request_id)
            # No answer in time is evidence too: the uplink moved these bytes no faster than this.
            waited_ms = (time.perf_counter() - t_enc) * 1e3
            self.link.monitor.record_stall(sum(t.ByteSize() for t in encoded), waited_ms)
            note = f"cloud missed the {self.request_timeout_s:.1f}s deadline"
            return self._finish_locally(features, plan, timing, started, note)
        except WireError as exc:
            return self._finish_locally(features, plan, timing, started, f"cloud failed: {exc.message}")
        t_back = time.perf_counter()
        cloud = reply.timing
        cloud_ms = cloud.queue_ms + cloud.decode_ms + cloud.compute_ms + cloud.encode_ms
        timing.transfer_ms = max((t_back - t_enc) * 1e3 - cloud_ms, 0.0)
        timing.cloud_queue_ms = cloud.queue_ms
        timing.cloud_decode_ms = cloud.decode_ms
        timing.cloud_compute_ms = cloud.compute_ms
        timing.cloud_encode_ms = cloud.encode_ms
        outputs = [decode(t) for t in reply.outputs]
        t_end = time.perf_counter()
        timing.decode_ms = (t_end - t_back) * 1e3
        timing.total_ms = (t_end - started) * 1e3
        self.link.monitor.record_transfer(reply.bytes_up, reply.bytes_down, timing.transfer_ms)
        return Outcome(outputs, plan.placement, plan, timing, reply.bytes_up, reply.bytes_down)

    def _log_fallback(self, plan: ActivePlan, note: str) -> None:
        """Say why requests run the tail here: when the reason changes, and once a minute while it lasts."""
        now = time.monotonic()
        with self._fallback_lock:
            if note == self._fallback_note and now - self._fallback_logged < FALLBACK_LOG_INTERVAL_S:
                return
            self._fallback_note, self._fallback_logged = note, now
        log.warning("falling back to the local tail (plan %s, %s): %s", _where(plan), plan.reason, note)

    def _finish_locally(
        self, features: tuple, plan: ActivePlan, timing: edge_pb2.StageTiming, started: float, note: str
    ) -> Outcome:
        self._log_fallback(plan, note)
        t0 = time.perf_counter()
        with torch.inference_mode():
            outputs = as_tensor_list(plan.tail(*features))
        t1 = time.perf_counter()
        timing.edge_compute_ms += (t1 - t0) * 1e3
        timing.total_ms = (t1 - started) * 1e3
        return Outcome(outputs, LOCAL_FALLBACK, plan, timing, note=note, local_tail_ms=(t1 - t0) * 1e3)


def _where(plan: ActivePlan) -> str:
    """A plan's placement and cut, for the log: ``SPLIT at layer2_0_relu``."""
    return f"{edge_pb2.Placement.Name(plan.placement)} at {plan.cut.name if plan.cut else '-'}"
