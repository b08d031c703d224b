"""Served models and edge sessions: the cloud's state, independent of gRPC."""

from __future__ import annotations

import functools
import logging
import math
import threading
import time
import uuid
from collections import deque
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Protocol

import torch

from compressor import (
    RAW_UNCOMPRESSED,
    ByteBudget,
    CodecError,
    CodecLimits,
    EncodingSpec,
    check_header,
    decode,
    encode,
)
from partitioner.graph import Cut
from partitioner.loaded import LoadedModel, check_features
from partitioner.models import ModelSpec
from protos.bounds import MAX_PLAN_LABEL, MAX_PREDICTED_MS
from protos.cleave.v1 import split_inference_pb2 as si_pb2
from protos.cleave.v1 import tensor_pb2
from protos.errors import FailedPrecondition, InvalidArgument, NotFound, ResourceExhausted
from runtime.logsafe import printable

from .batching import Batchers, DirectRunner, DynamicBatcher
from .config import CloudLimits

log = logging.getLogger(__name__)


class RemoteTails(Protocol):
    """Where tails run when not in this process (:class:`cloud_node.ray_backend.serving.RayTails`)."""

    def run(
        self,
        model: str,
        part: int | str,
        features: Sequence[tensor_pb2.Tensor],
        result_spec: EncodingSpec,
        limits: CodecLimits,
    ) -> tuple[list[tensor_pb2.Tensor], si_pb2.CloudTiming]:
        """Run ``part`` (a cut index) of ``model`` on encoded features; encoded outputs and timing."""
        ...

    def pools(self) -> list[si_pb2.TailPool]:
        """Each model's replicas, queue depth and recent scaling decisions."""
        ...

    def close(self) -> None:
        """Stop background work (after the drain)."""
        ...


class ModelRegistry:
    """The models this daemon serves, loaded and traced once at start."""

    def __init__(self, specs: list[ModelSpec]) -> None:
        self.models: dict[str, LoadedModel] = {}
        for spec in specs:
            started = time.perf_counter()
            self.models[spec.name] = LoadedModel.load(spec)
            log.info(
                "model %s: %d cuts, fingerprint %s, loaded in %.1fs",
                spec.name,
                len(self.models[spec.name].graph.cuts),
                self.models[spec.name].fingerprint[:12],
                time.perf_counter() - started,
            )

    def get(self, name: str) -> LoadedModel:
        try:
            return self.models[name]
        except KeyError:
            raise NotFound(f"model {name!r} is not served here (serving: {', '.join(self.models)})") from None

    def info(self, model: LoadedModel, include_cuts: bool) -> si_pb2.ModelInfo:
        info = si_pb2.ModelInfo(
            name=model.name,
            fingerprint=model.fingerprint,
            input_shape=list(model.input_shape),
            input_dtype=tensor_pb2.FLOAT32,
        )
        if include_cuts:
            info.cuts.extend(cut_info(c) for c in model.graph.cuts)
        return info


PREDICTED_STAGES = ("edge_ms", "encode_ms", "upload_ms", "rtt_ms", "decode_ms", "cloud_ms", "download_ms")


@dataclass(frozen=True)
class PlanPrediction:
    """What an edge's plan predicts for one request, as its ``OpenSession`` reported it (for the console).

    Immutable: a session's is set when it opens (each plan switch to another cut, each reconnection
    opens a new session, so it is the plan in force when the session was opened).
    """

    label: str
    objective: str
    total_ms: float
    edge_ms: float
    encode_ms: float
    upload_ms: float
    rtt_ms: float
    decode_ms: float
    cloud_ms: float
    download_ms: float

    @classmethod
    def from_proto(cls, message: si_pb2.PlanPrediction) -> PlanPrediction:
        """Checked: InvalidArgument naming ``plan.<field>`` for a number that is not finite and within
        0..MAX_PREDICTED_MS, or a label or objective over MAX_PLAN_LABEL characters."""
        values = {}
        for name in ("total_ms", *PREDICTED_STAGES):
            value = getattr(message, name)
            if not math.isfinite(value) or not 0.0 <= value <= MAX_PREDICTED_MS:
                raise InvalidArgument(f"plan.{name}: {value} is not a latency in ms (0 to {MAX_PREDICTED_MS:.0f})")
            values[name] = value
        for name in ("label", "objective"):
            if len(getattr(message, name)) > MAX_PLAN_LABEL:
                raise InvalidArgument(f"plan.{name}: longer than {MAX_PLAN_LABEL} characters")
        return cls(
            label=printable(message.label, MAX_PLAN_LABEL),
            objective=printable(message.objective, MAX_PLAN_LABEL),
            **values,
        )

    def to_json(self) -> dict[str, float | str]:
        return asdict(self)


def cut_info(cut: Cut) -> si_pb2.CutInfo:
    return si_pb2.CutInfo(index=cut.index, name=cut.name, live=list(cut.live), nbytes=cut.nbytes)


@functools.lru_cache(maxsize=256)
def _described(encoding: int, bits: int, codec: int) -> str:
    """How a request's features are encoded, for the console: ``8-bit AFFINE + ZSTD``. Once per kind:
    it runs after the tail, on every request, where the name lookups cost tens of microseconds."""
    prefix = f"{bits}-bit " if encoding == tensor_pb2.AFFINE else ""
    codec_name = tensor_pb2.Codec.Name(codec) if codec else "NONE"
    return f"{prefix}{tensor_pb2.Encoding.Name(encoding)} + {codec_name}"


@dataclass
class Session:
    """One edge's binding to a model tail at a cut.

    ``runner`` runs the tail: directly on the calling thread, or through the dynamic batcher that
    every session on the same model and cut shares (see :mod:`cloud_node.batching`). With ``remote``
    (the Ray backend) the still-encoded features go to a replica instead, which decodes, runs and
    encodes (see :mod:`cloud_node.ray_backend`). Features are
    checked against the cut (count, dtype, shape, at most ``max_batch`` rows) from their headers,
    before anything is decompressed or allocated.
    """

    id: str
    model: LoadedModel
    cut: Cut
    tail: torch.nn.Module
    result_spec: EncodingSpec
    codec_limits: CodecLimits
    client: str = ""
    owner: str = ""  # who opened it, for per-client quotas (a token digest or a peer address)
    max_batch: int = 8
    requests: int = 0  # under _lock: a client may run one session on several streams
    last_used: float = field(default_factory=time.monotonic)
    runner: DirectRunner | DynamicBatcher | None = None
    remote: RemoteTails | None = None  # set: the tail runs there (Ray Serve), not in this process
    # For the web console, under _lock (several streams may run one session): written by the threads
    # running its requests, copied by recent(); (unix time, queue, decode, compute, encode ms) of the latest.
    timings: deque = field(default_factory=lambda: deque(maxlen=120))
    features: str = ""  # how the edge encodes its features (its plan's bits and codec), from the latest request
    # What the edge's plan predicts (None: it did not say); set once at open, immutable, so read without a lock.
    plan: PlanPrediction | None = None
    feature_bytes: int = 0  # their bytes on the wire, latest request
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.runner is None:
            self.runner = DirectRunner(self.tail)

    def run(
        self, features: list[tensor_pb2.Tensor], payloads: Sequence[bytes | memoryview] | None = None
    ) -> tuple[list[tensor_pb2.Tensor], si_pb2.CloudTiming]:
        """Decode features, run the tail, encode the outputs. Bad input raises InvalidArgument.

        ``payloads``: the features' payloads, when they are held apart (``Assembler.finish_apart``).

        ``queue_ms`` is the time spent waiting for a batch; ``compute_ms`` the rest of the tail's
        wall time (the whole batch's run when batched), so the four stages add up to the cloud's time.
        """
        self.last_used = time.monotonic()
        t0 = time.perf_counter()
        self.check_headers(features)
        if self.remote is not None:  # Ray backend: the replica decodes, runs and encodes
            if payloads is not None:  # it takes whole tensors
                for msg, payload in zip(features, payloads, strict=True):
                    msg.payload = bytes(payload)
            encoded, timing = self.remote.run(
                self.model.name, self.cut.index, features, self.result_spec, self.codec_limits
            )
        else:
            encoded, timing = self._run_here(features, t0, payloads)
        self._record(features, timing)
        return encoded, timing

    def _run_here(
        self, features: list[tensor_pb2.Tensor], t0: float, payloads: Sequence[bytes | memoryview] | None
    ) -> tuple[list[tensor_pb2.Tensor], si_pb2.CloudTiming]:
        """The single-process path: decode, run the tail through ``runner``, encode."""
        tensors = []
        for i, msg in enumerate(features):
            try:
                payload = None if payloads is None else payloads[i]
                tensors.append(decode(msg, self.codec_limits, self.model.entropy_tables, payload=payload))
            except CodecError as exc:
                raise InvalidArgument(f"features[{i}]: {exc}") from exc
        try:
            check_features(self.cut, tensors)
        except ValueError as exc:
            raise InvalidArgument(str(exc)) from exc
        t1 = time.perf_counter()
        result = self.runner.run(tensors)
        t2 = time.perf_counter()
        encoded = [encode(o, self.result_spec) for o in result.outputs]
        t3 = time.perf_counter()
        timing = si_pb2.CloudTiming(
            queue_ms=result.queue_ms,
            decode_ms=(t1 - t0) * 1e3,
            compute_ms=max((t2 - t1) * 1e3 - result.queue_ms, 0.0),
            encode_ms=(t3 - t2) * 1e3,
        )
        return encoded, timing

    def _record(self, features: list[tensor_pb2.Tensor], timing: si_pb2.CloudTiming) -> None:
        described = _described(features[0].encoding, features[0].bits, features[0].codec) if features else ""
        sent = sum(f.payload_size or len(f.payload) for f in features)
        with self._lock:
            self.requests += 1
            self.features = described or self.features
            self.feature_bytes = sent
            self.timings.append((time.time(), timing.queue_ms, timing.decode_ms, timing.compute_ms, timing.encode_ms))

    def recent(self) -> tuple[int, str, int, list[tuple[float, ...]]]:
        """A consistent copy of (requests, feature encoding, feature bytes, timings) for the console."""
        with self._lock:
            return self.requests, self.features, self.feature_bytes, list(self.timings)

    def check_header(self, index: int, header: tensor_pb2.Tensor) -> None:
        """Refuse feature ``index`` from its header alone; allocates nothing.

        Raises:
            CodecError: the header does not fit the cut (the message names the field).
            ResourceExhausted: its batch is over ``max_batch``.
        """
        cut = self.cut
        if index >= len(cut.live):
            raise CodecError(f"features: cut {cut.name!r} takes {len(cut.live)} tensors, got more")
        where = f"features[{index}] ({cut.live[index]})"
        try:
            dtype, shape = check_header(header, self.codec_limits)
        except CodecError as exc:
            raise CodecError(f"{where}.{str(exc).removeprefix('tensor.')}") from None
        expected = cut.shapes[index]
        if dtype != cut.dtypes[index]:
            raise CodecError(f"{where}: dtype {dtype} != {cut.dtypes[index]}")
        if len(shape) != len(expected) or shape[1:] != tuple(expected[1:]):
            raise CodecError(f"{where}: shape {shape} does not fit {tuple(expected)}")
        if shape and shape[0] > self.max_batch:
            raise ResourceExhausted(
                f"{where}.shape[0]: batch {shape[0]} exceeds the limit of {self.max_batch} (limits.max_batch)"
            )

    def check_headers(self, features: list[tensor_pb2.Tensor]) -> None:
        """Every feature's header, their count and their common batch; InvalidArgument naming the first misfit."""
        cut = self.cut
        if len(features) != len(cut.live):
            raise InvalidArgument(f"features: cut {cut.name!r} takes {len(cut.live)} tensors, got {len(features)}")
        batch = None
        for i, msg in enumerate(features):
            try:
                self.check_header(i, msg)
            except CodecError as exc:
                raise InvalidArgument(str(exc)) from exc
            if msg.shape:
                if batch is not None and msg.shape[0] != batch:
                    raise InvalidArgument(f"features[{i}] ({cut.live[i]}): batch {msg.shape[0]} != {batch}")
                batch = msg.shape[0]


class SessionManager:
    """Opens, finds and expires sessions, within ``limits``; ``batchers`` batches their tails (None: never);
    ``remote`` runs them elsewhere (the Ray backend; None: in this process)."""

    def __init__(
        self,
        registry: ModelRegistry,
        limits: CloudLimits,
        batchers: Batchers | None = None,
        remote: RemoteTails | None = None,
    ) -> None:
        self.registry = registry
        self.limits = limits
        self.batchers = batchers
        self.remote = remote
        self.codec_limits = CodecLimits(max_elements=limits.max_elements, max_payload_bytes=limits.max_request_bytes)
        self._sessions: dict[str, Session] = {}
        self._lock = threading.Lock()
        # Features held for unfinished requests, every Infer stream together (each stream has its own too).
        self.buffered = ByteBudget(limits.max_buffered_bytes, "limits.max_buffered_bytes")

    def open(self, request: si_pb2.OpenSessionRequest, owner: str = "") -> Session:
        """Open a session for ``owner`` (a client identity: at most ``max_sessions_per_client`` each)."""
        if not request.model:
            raise InvalidArgument("model: required")
        model = self.registry.get(request.model)
        if not request.fingerprint:
            raise InvalidArgument("fingerprint: required (the edge's hash of graph and weights)")
        if request.fingerprint != model.fingerprint:
            raise FailedPrecondition(
                f"fingerprint: model {model.name!r} here is {model.fingerprint[:16]}..., the edge has "
                f"{request.fingerprint[:16]}...; edge and cloud must load the same graph and weights"
            )
        key: int | str = int(request.cut) if request.cut.isdigit() else request.cut
        if key == "":
            raise InvalidArgument("cut: required (a cut name or index)")
        try:
            cut, _head, tail = model.parts(key)
        except KeyError as exc:
            raise InvalidArgument(f"cut: {exc.args[0]}") from exc
        try:
            result_spec = (
                EncodingSpec.from_proto(request.result_encoding)
                if request.HasField("result_encoding")
                else RAW_UNCOMPRESSED
            )
        except (CodecError, ValueError) as exc:
            raise InvalidArgument(f"result_encoding: {exc}") from exc
        if result_spec.encoding == "entropy":
            raise InvalidArgument("result_encoding: entropy codes a bottleneck's latent, not a model's outputs")
        plan = PlanPrediction.from_proto(request.plan) if request.HasField("plan") else None
        with self._lock:
            self._expire_idle()
            if len(self._sessions) >= self.limits.max_sessions:
                raise ResourceExhausted(f"sessions: limit of {self.limits.max_sessions} reached")
            owned = sum(1 for s in self._sessions.values() if s.owner == owner)
            if owned >= self.limits.max_sessions_per_client:
                raise ResourceExhausted(
                    f"sessions: this client already has {owned} open sessions "
                    f"(limits.max_sessions_per_client {self.limits.max_sessions_per_client})"
                )
            session = Session(
                id=uuid.uuid4().hex,
                model=model,
                cut=cut,
                tail=tail,
                result_spec=result_spec,
                codec_limits=self.codec_limits,
                client=request.client,
                owner=owner,
                plan=plan,
                max_batch=self.limits.batch_limit(model.name),
                runner=self.batchers.runner(model.name, cut.index, tail) if self.batchers and not self.remote else None,
                remote=self.remote,
            )
            self._sessions[session.id] = session
        log.info(
            "session %s: %s at cut %d (%s) for %s",
            session.id[:8],
            model.name,
            cut.index,
            cut.name,
            printable(request.client) if request.client else "?",
        )
        return session

    def get(self, session_id: str) -> Session:
        with self._lock:
            session = self._sessions.get(session_id)
        if session is None:
            raise NotFound(f"session_id: {session_id!r} is not open (expired or the cloud restarted)")
        return session

    def close(self, session_id: str) -> Session:
        with self._lock:
            session = self._sessions.pop(session_id, None)
        if session is None:
            raise NotFound(f"session_id: {session_id!r} is not open")
        return session

    def __len__(self) -> int:
        return len(self._sessions)

    def pools(self) -> tuple[str, list[si_pb2.TailPool]]:
        """Where each model's tails run: ("ray", its deployment's replicas) or ("process", this process)."""
        if self.remote is not None:
            return "ray", self.remote.pools()
        return "process", [
            si_pb2.TailPool(
                model=name,
                status="HEALTHY",
                replicas={"RUNNING": 1},
                running=1,
                queue_depth=self.batchers.queue_depth(name) if self.batchers is not None else 0,
            )
            for name in self.registry.models
        ]

    def snapshot(self) -> list[Session]:
        """The open sessions now (for the web console)."""
        with self._lock:
            return list(self._sessions.values())

    def _expire_idle(self) -> None:
        now = time.monotonic()
        idle = [s.id for s in self._sessions.values() if now - s.last_used > self.limits.session_idle_s]
        for sid in idle:
            del self._sessions[sid]
        if idle:
            log.info("expired %d sessions idle for over %.0f s", len(idle), self.limits.session_idle_s)
