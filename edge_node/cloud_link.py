"""The edge's connection to the cloud: a session per cut and one pipelined ``Infer`` stream.

Requests are written to the stream as soon as they are submitted and matched to results by
request id, so transfers overlap the cloud's compute. When the stream breaks, every pending request
fails at once with :class:`~protos.errors.Unavailable` (the runtime then finishes it locally) and a
supervisor thread reconnects with exponential backoff.

Threads (see docs/threads.md): :meth:`CloudLink.start` starts the supervisor (``cloud-link``); each
:class:`InferStream` has a receiver (``infer-<session>``) that resolves its requests' answers; each
stream replaced by a plan switch has a drain thread (``drain-<session>``). Sessions are opened under
``_connect_lock`` (by the supervisor, or by :meth:`CloudLink.want` on the pinning thread); the
current stream is one reference, swapped under that lock and read lock-free as a snapshot.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import queue
import random
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass
from typing import TYPE_CHECKING

import grpc
from google.protobuf.message import DecodeError

from compressor import Assembler, CodecError, EncodingSpec
from compressor.framing import chunks_wire, field_key, to_pieces, varint
from protos.cleave.v1 import split_inference_pb2 as si_pb2
from protos.cleave.v1 import split_inference_pb2_grpc as si_grpc
from protos.cleave.v1 import tensor_pb2
from protos.errors import Unavailable, WireError, from_rpc_error
from runtime.security import ClientTLS
from runtime.serving import KEEPALIVE, Keepalive, open_channel

from .config import Reconnect
from .link import LinkMonitor
from .probe import probe_rtt

if TYPE_CHECKING:  # the link reads the model's name and fingerprint only: any backend (edge_node.backend) will do
    from .backend import Backend as LoadedModel

log = logging.getLogger(__name__)

# OpenSession answers that mean the cloud is up but will not serve this edge as configured.
REFUSALS = frozenset(
    {
        grpc.StatusCode.NOT_FOUND,  # the model is not served there
        grpc.StatusCode.FAILED_PRECONDITION,  # another fingerprint: not the same model
        grpc.StatusCode.INVALID_ARGUMENT,
        grpc.StatusCode.UNAUTHENTICATED,
        grpc.StatusCode.PERMISSION_DENIED,
    }
)


@dataclass
class CloudReply:
    outputs: list[tensor_pb2.Tensor]
    timing: si_pb2.CloudTiming
    bytes_up: int
    bytes_down: int


class Answer:
    """A request's result, set once by the stream's receiver thread, waited for by the request's thread:
    the part of a ``concurrent.futures.Future`` they use (``result``, ``set_result``, ``set_exception``)
    on one lock. A Future builds a Condition and both sides go through it: with the caches cold after a
    model's compute, creating, setting and reading one took 70 us, against 35 us for this (one run).
    """

    __slots__ = ("_done", "_value", "_error")

    def __init__(self) -> None:
        self._done = threading.Lock()
        self._done.acquire()  # released once, when the result or the error is in
        self._value: CloudReply | None = None
        self._error: BaseException | None = None

    def set_result(self, value: CloudReply) -> None:
        self._value = value
        self._done.release()

    def set_exception(self, error: BaseException) -> None:
        self._error = error
        self._done.release()

    def result(self, timeout: float | None = None) -> CloudReply:
        """The reply; raises the error it was given, or ``concurrent.futures.TimeoutError`` after ``timeout`` s."""
        if not self._done.acquire(timeout=-1 if timeout is None else timeout):
            raise FutureTimeout
        self._done.release()  # done for good: another call returns at once
        if self._error is not None:
            raise self._error
        assert self._value is not None
        return self._value


class RequestFailed(WireError):
    """The cloud answered this request with an error."""


HEARTBEAT_S = 30.0
"""An idle stream sends an empty frame (request id 0) this often. The cloud ends a stream whose client
sends nothing for its ``limits.stream_idle_s`` (120 s by default): without heartbeats an idle edge's
stream would be ended, and reopened, every two minutes. Keep it well under the cloud's setting."""


INFER = "/" + si_pb2.DESCRIPTOR.services_by_name["SplitInference"].full_name + "/Infer"
_HEARTBEAT = si_pb2.InferFrame().SerializeToString()  # request id 0, nothing else
_CHUNKS_FIELD = si_pb2.InferFrame.DESCRIPTOR.fields_by_name["chunks"].number
_LAST = si_pb2.InferFrame(last=True).SerializeToString()  # a frame's last field, appended to its chunks
_REQUEST_ID_KEY = field_key(si_pb2.InferFrame.DESCRIPTOR.fields_by_name["request_id"].number, 0)  # a varint


class InferStream:
    """One ``Infer`` stream bound to one session.

    Frames travel as bytes, serialized on the submitting thread: their size is the request's
    ``bytes_up`` without serializing them a second time (upb's ``ByteSize`` encodes the whole
    message: 42 us for a 444 KB frame), and gRPC's request-iterator thread only writes them.
    Results arrive as bytes too and are parsed on the receiver thread, which counts their size.
    """

    def __init__(
        self,
        channel: grpc.Channel,
        session_id: str,
        cut_index: int,
        chunk_bytes: int,
        on_broken: Callable[[InferStream], None],
        reply: str = "",
    ) -> None:
        """Not yet open: :meth:`start` opens the call and starts the receiver. ``reply``: how the session's
        cloud codes results ("": float32), part of what a request asks for with its cut."""
        self.session_id = session_id
        # A request's first frame starts with this (InferFrame's first field), serialized once per stream.
        self._session_field = si_pb2.InferFrame(session_id=session_id).SerializeToString()
        self.cut_index = cut_index
        self.reply = reply
        self.chunk_bytes = chunk_bytes
        self.broken = False
        self.closing = False  # half-closed: takes no more requests
        self._on_broken = on_broken
        self._outbox: queue.SimpleQueue = queue.SimpleQueue()
        self._pending: dict[int, tuple[Answer, int]] = {}
        self._lock = threading.Lock()  # guards _pending, broken and closing
        self._channel = channel
        self._call = None
        self._receiver = threading.Thread(target=self._receive, name=f"infer-{session_id[:8]}", daemon=True)

    def start(self) -> InferStream:
        """Open the ``Infer`` call and start the receiver thread; returns self."""
        infer = self._channel.stream_stream(INFER)  # bytes both ways: see the class docstring
        self._call = infer(self._frames())
        self._receiver.start()
        return self

    def _frames(self) -> Iterator[bytes]:
        """What gRPC's request-iterator thread writes: each queued request's frames, in order, and a
        heartbeat when nothing was queued for ``HEARTBEAT_S``. gRPC takes the next request only once it
        has written the last one, so when the link stalls requests wait here; one whose deadline passed
        meanwhile (:meth:`forget`) is dropped unsent. Sent later, it would only delay the fresh requests
        queued behind it and give the cloud a tail to run that nobody waits for: after a 4 s cut under
        load, stale requests kept every new one past its deadline for 28 s (``test_faults -k link_cut``)."""
        while True:
            try:
                queued = self._outbox.get(timeout=HEARTBEAT_S)
            except queue.Empty:
                yield _HEARTBEAT
                continue
            if queued is None:
                return
            request_id, frames = queued
            with self._lock:
                wanted = request_id in self._pending
            if wanted:
                yield from frames

    def submit(
        self, request_id: int, features: Sequence[tensor_pb2.Tensor], payloads: Sequence[bytes] | None = None
    ) -> Answer:
        """Queue a request; its answer resolves to a :class:`CloudReply`. ``payloads``: the features'
        payloads when they are apart (``compressor.encode_apart``; copied once, into the frames)."""
        answer = Answer()
        groups = list(to_pieces(features, self.chunk_bytes, payloads)) or [[]]
        frames = []
        request = _REQUEST_ID_KEY + varint(request_id) if request_id else b""
        for i, group in enumerate(groups):
            # Serialized in pieces, the features' bytes copied once: the same bytes as building the
            # InferFrame (fields in number order: session_id, request_id, chunks, last) and serializing it.
            head = self._session_field + request if i == 0 else request
            last = _LAST if i == len(groups) - 1 else b""
            frames.append(b"".join([head, *chunks_wire(_CHUNKS_FIELD, group), last]))
        size = sum(map(len, frames))
        with self._lock:  # ordered against close(): nothing is queued behind the end of the stream
            if self.broken or self.closing:
                raise Unavailable("cloud stream is down" if self.broken else "cloud stream is closing")
            self._pending[request_id] = (answer, size)
            self._outbox.put((request_id, frames))
        return answer

    def forget(self, request_id: int) -> None:
        """Stop waiting for a request (its deadline passed): a late result is dropped, and the request
        is not sent at all if it is still queued (see :meth:`_frames`)."""
        with self._lock:
            self._pending.pop(request_id, None)

    def close(self) -> None:
        """Half-close: pending results still arrive, then the stream ends."""
        with self._lock:
            if not self.closing:
                self.closing = True
                self._outbox.put(None)

    def wait_ended(self, timeout: float) -> bool:
        """Wait for the stream to end (every result in, or broken); True when it has."""
        if not self._receiver.is_alive() and self._call is None:
            return True  # never started
        self._receiver.join(timeout)
        return not self._receiver.is_alive()

    @property
    def pending(self) -> int:
        with self._lock:
            return len(self._pending)

    def _receive(self) -> None:
        partial: dict[int, tuple[Assembler, int]] = {}
        try:
            for data in self._call:
                try:
                    result = si_pb2.InferResult.FromString(data)
                except DecodeError as exc:
                    self._call.cancel()
                    raise CodecError(f"not an InferResult ({exc})") from None
                rid = result.request_id
                assembler, down = partial.pop(rid, (None, 0))
                down += len(data)
                if result.HasField("error"):
                    self._resolve(rid, error=RequestFailed(result.error.message))
                    continue
                assembler = assembler or Assembler()
                assembler.add(result.chunks)
                if not result.last:
                    partial[rid] = (assembler, down)
                    continue
                with self._lock:
                    entry = self._pending.pop(rid, None)
                if entry is not None:
                    answer, up = entry
                    answer.set_result(CloudReply(assembler.finish(), result.timing, up, down))
            self._fail_all(Unavailable("cloud closed the stream"))
        except (grpc.RpcError, CodecError) as exc:
            error = from_rpc_error(exc) if isinstance(exc, grpc.RpcError) else Unavailable(f"bad result: {exc}")
            log.warning("infer stream %s broke: %s", self.session_id[:8], error.message)
            self._fail_all(error)

    def _resolve(self, rid: int, error: WireError) -> None:
        with self._lock:
            entry = self._pending.pop(rid, None)
        if entry is not None:
            entry[0].set_exception(error)

    def _fail_all(self, error: WireError) -> None:
        with self._lock:
            self.broken = True
            pending, self._pending = self._pending, {}
        for answer, _ in pending.values():
            answer.set_exception(Unavailable(error.message))
        self._on_broken(self)


class CloudLink:
    """Keeps a session at the wanted cut open, reconnecting with backoff when the cloud goes away.

    Life cycle: construct, :meth:`start` (the supervisor thread), :meth:`close`.
    """

    def __init__(
        self,
        target: str,
        model: LoadedModel,
        monitor: LinkMonitor,
        reconnect: Reconnect,
        chunk_bytes: int,
        max_message_bytes: int,
        client_name: str = "cleave-edge",
        *,
        tls: ClientTLS | None = None,
        token: str | None = None,
        drain_s: float = 10.0,
        keepalive: Keepalive = KEEPALIVE,
        in_use: Callable[[int], bool] | None = None,
    ) -> None:
        """``drain_s``: the longest a replaced stream keeps taking requests (those that chose its cut
        before a plan switch) before it is half-closed; the edge passes its request deadline.

        ``in_use(cut_index)``: whether requests that chose a cut are still running (the runtime's
        :meth:`~edge_node.runtime.Inflight.in_use`); a replaced stream closes as soon as none are
        and none of its own are pending, not after all of ``drain_s``. None: never in use."""
        self.target = target
        self.drain_s = drain_s
        self._in_use: Callable[[int], bool] = in_use or (lambda _cut_index: False)
        self.model = model
        self.monitor = monitor
        self.reconnect = reconnect
        self.chunk_bytes = chunk_bytes
        self.client_name = client_name
        self.last_error = "not connected yet"
        # The cloud's reason when it answered OpenSession with a refusal (model not served, another
        # fingerprint, bad token): it is up, but will not serve this edge. Empty otherwise.
        self.refusal = ""
        self._counts_lock = threading.Lock()  # guards the two counts and _lost
        self._sessions_opened = 0  # every session opened
        self._reconnects = 0  # sessions opened to replace one whose stream broke
        self._lost = False  # the current stream broke and none has replaced it yet
        # Every call to the cloud (sessions, Infer, probes, the planner's Profile) goes over this channel.
        # ``keepalive`` must not ping more often than the cloud's own keepalive setting permits.
        self._channel = open_channel(target, max_message_bytes, tls=tls, token=token, keepalive=keepalive)
        self._stub = si_grpc.SplitInferenceStub(self._channel)
        self._stream: InferStream | None = None
        self._draining: list[InferStream] = []  # replaced by a plan switch, finishing their requests
        self._draining_lock = threading.Lock()  # guards _draining (drain threads remove, requests read)
        # The session wanted: (cut index, reply encoding), or None; replaced whole (one reference write), so the
        # supervisor never pairs one want's cut with another's reply.
        self._wanted: tuple[int, str] | None = None
        # What the wanted plan predicts, sent with each OpenSession; replaced whole (one reference write).
        self._prediction: si_pb2.PlanPrediction | None = None
        self._ids = itertools.count(1)  # next() on it is atomic: request ids from any thread
        self._connect_lock = threading.Lock()  # one OpenSession at a time; guards swapping _stream
        self._wake = threading.Event()
        self._closed = threading.Event()
        self._supervisor = threading.Thread(target=self._supervise, name="cloud-link", daemon=True)

    def start(self) -> CloudLink:
        """Start the supervisor thread (it keeps the wanted session open); returns self."""
        self._supervisor.start()
        return self

    @property
    def sessions_opened(self) -> int:
        """Sessions opened: the first, one per plan switch to another cut, and every reconnection."""
        with self._counts_lock:
            return self._sessions_opened

    @property
    def reconnects(self) -> int:
        """Sessions opened to replace one whose stream broke (the cloud went away or restarted)."""
        with self._counts_lock:
            return self._reconnects

    @property
    def stub(self) -> si_grpc.SplitInferenceStub:
        return self._stub

    # -- used by the runtime ---------------------------------------------------------------------
    def next_request_id(self) -> int:
        return next(self._ids)

    def stream_for(self, cut_index: int, reply: str = "") -> InferStream | None:
        """The live stream at ``cut_index`` whose results come coded as ``reply`` ("": float32), or None when
        there is none right now.

        Right after a plan switch that is still the previous stream for requests that took their
        plan before the switch: they finish in split mode instead of falling back.
        """
        stream = self._current_for((cut_index, reply))
        if stream is not None:
            return stream
        with self._draining_lock:
            draining = list(self._draining)
        return next((s for s in draining if (s.cut_index, s.reply) == (cut_index, reply) and not s.broken), None)

    def _current_for(self, wanted: tuple[int, str]) -> InferStream | None:
        stream = self._stream
        if stream is None or stream.broken or (stream.cut_index, stream.reply) != wanted:
            return None
        return stream

    @property
    def reachable(self) -> bool:
        stream = self._stream
        return stream is not None and not stream.broken

    def want(
        self,
        cut_index: int | None,
        wait: bool = True,
        prediction: si_pb2.PlanPrediction | None = None,
        reply: str = "",
    ) -> None:
        """Ask for a session at ``cut_index`` (None: no session needed). With ``wait``, try now.

        ``reply``: how the cloud is to code the session's results (an encoding spec's text; "": float32). A
        session at the same cut with another reply coding is replaced, as one at another cut is.

        ``prediction``: what the plan predicts, told to the cloud with every session opened from now
        on (its console shows it beside what it measures). A session already open at ``cut_index``
        is kept, so the cloud sees a new prediction for the same cut at the next session.
        """
        self._prediction = prediction
        wanted = self._wanted = None if cut_index is None else (cut_index, reply)
        if wanted is not None and wait:
            with self._connect_lock:
                if self._current_for(wanted) is None:
                    try:
                        self._connect(wanted)
                    except WireError as exc:
                        self.last_error = exc.message
        self._wake.set()

    def close(self) -> None:
        self._closed.set()
        self._wake.set()
        with self._connect_lock:
            stream, self._stream = self._stream, None
        with self._draining_lock:
            draining = list(self._draining)
        for s in [stream, *draining]:
            if s is not None:
                s.close()
        if self._supervisor.is_alive():
            self._supervisor.join(timeout=self.reconnect.connect_timeout_s + 1.0)
        self._channel.close()

    # -- connection management -------------------------------------------------------------------
    def _supervise(self) -> None:
        delay = self.reconnect.initial_s
        while not self._closed.is_set():
            want = self._wanted
            if want is not None and self._current_for(want) is None:
                with self._connect_lock:
                    try:
                        if self._current_for(want) is None and want == self._wanted:
                            self._connect(want)
                        delay = self.reconnect.initial_s
                        continue
                    except WireError as exc:
                        self.last_error = exc.message
                # Full jitter keeps many edges from reconnecting in lockstep after a cloud restart.
                self._closed.wait(random.uniform(delay / 2, delay))
                delay = min(delay * 2, self.reconnect.max_s)
                continue
            self._wake.wait(1.0)
            self._wake.clear()

    def _connect(self, wanted: tuple[int, str]) -> None:
        """Open a session and stream at ``wanted`` (cut index, reply coding); replaces the current one.
        A stream at ``wanted`` still draining from an earlier switch is taken back instead of opening
        another (:meth:`_revive`). Raises WireError."""
        revived = self._revive(wanted)
        if revived is not None:
            self._make_current(revived, opened=False)
            log.info("cloud session %s at cut %d taken back from draining", revived.session_id[:8], wanted[0])
            return
        cut_index, reply_coding = wanted
        timeout = self.reconnect.connect_timeout_s
        request = si_pb2.OpenSessionRequest(
            model=self.model.name,
            fingerprint=self.model.fingerprint,
            cut=str(cut_index),
            client=self.client_name,
        )
        if reply_coding:
            request.result_encoding.CopyFrom(EncodingSpec.parse(reply_coding).to_proto())
        prediction = self._prediction
        if prediction is not None:
            request.plan.CopyFrom(prediction)
        try:
            reply = self._stub.OpenSession(
                request,
                timeout=timeout,
                wait_for_ready=False,
            )
        except grpc.RpcError as exc:
            error = from_rpc_error(exc)
            if error.code in REFUSALS:
                # The cloud answered: it is reachable, and retrying will not help until it changes.
                self.refusal = error.message
                log.error("cloud %s refused the session: %s: %s", self.target, error.code.name, error.message)
            else:
                self.refusal = ""
            raise error from None
        stream = InferStream(
            self._channel, reply.session_id, cut_index, self.chunk_bytes, self._on_broken, reply_coding
        ).start()
        self._make_current(stream, opened=True)
        log.info("cloud session %s at cut %d, results %s", reply.session_id[:8], cut_index, reply_coding or "float32")
        self._probe_rtt()

    def _make_current(self, stream: InferStream, *, opened: bool) -> None:
        """Put ``stream`` in force and hand the one it replaces to a drain thread; the link is up again.
        ``opened``: a new session (counted, and as a reconnection if the current stream had broken), not
        one taken back from draining."""
        old, self._stream = self._stream, stream
        if old is not None:
            self._retire(old)
        with self._counts_lock:
            if opened:
                self._sessions_opened += 1
                self._reconnects += self._lost
            self._lost = False
        self.last_error = self.refusal = ""

    def _on_broken(self, stream: InferStream) -> None:
        """On the stream's receiver thread, once it broke or ended."""
        if stream is self._stream and not self._closed.is_set():
            with self._counts_lock:
                self._lost = True
            self.last_error = "cloud stream broke"
            self._wake.set()

    def _revive(self, wanted: tuple[int, str]) -> InferStream | None:
        """Take a replaced stream at ``wanted`` back from the draining list, or None.

        An edge switching between a few plans used to open a session per switch while the replaced ones
        drained, and past the cloud's ``max_streams_per_client`` a new stream was refused and its requests
        finished locally. Whoever removes a stream from the list owns it: its drain thread, finding it gone,
        leaves it open (:meth:`_drain`)."""
        with self._draining_lock:
            stream = next(
                (s for s in self._draining if (s.cut_index, s.reply) == wanted and not (s.broken or s.closing)), None
            )
            if stream is not None:
                self._draining.remove(stream)
        return stream

    def _retire(self, old: InferStream) -> None:
        """Let a replaced stream finish in the background (see :meth:`_drain`)."""
        if not old.broken:
            with self._draining_lock:
                self._draining.append(old)
        threading.Thread(target=self._drain, args=(old,), name=f"drain-{old.session_id[:8]}", daemon=True).start()

    #: A replaced stream whose (cut, reply coding) the current stream serves again closes after this long with
    #: nothing pending, even while requests at its cut run: those use the current stream. Only a request that
    #: took the old stream before the switch back may still submit to it, within its encoding's few milliseconds.
    #: (Waiting for its cut to be idle instead kept an edge switching back and forth between two cuts every 0.25 s
    #: on up to one stream per switch for ``drain_s``, past the cloud's max_streams_per_client.)
    REPLACED_GRACE_S = 0.5

    def _drain(self, old: InferStream) -> None:
        """Keep ``old`` taking requests while its cut's requests run (at most ``drain_s``), half-close it,
        and close its session once its last result is in: closing the session first would fail them."""
        started = time.monotonic()
        deadline = started + self.drain_s
        key = (old.cut_index, old.reply)
        while not old.broken and time.monotonic() < deadline and not self._closed.is_set():
            if self._stream is old:
                return  # taken back (_revive): the current stream now; a later switch drains it anew
            if old.pending == 0 and not self._in_use(old.cut_index):
                break
            served = self._current_for(key) is not None
            if old.pending == 0 and served and time.monotonic() - started >= self.REPLACED_GRACE_S:
                break
            self._closed.wait(0.05)
        with self._draining_lock:
            if old not in self._draining and not old.broken:
                return  # taken back as the current stream (_revive), which owns it now
            with contextlib.suppress(ValueError):
                self._draining.remove(old)
        old.close()
        old.wait_ended(self.drain_s)
        # The cloud expires idle sessions anyway; ValueError: the link closed meanwhile.
        with contextlib.suppress(grpc.RpcError, ValueError):
            self._stub.CloseSession(si_pb2.CloseSessionRequest(session_id=old.session_id), timeout=2.0)

    def _probe_rtt(self, rounds: int = 3) -> None:
        try:
            for rtt in probe_rtt(self._stub, rounds, timeout=self.reconnect.connect_timeout_s):
                self.monitor.record_rtt(rtt)
        except (grpc.RpcError, StopIteration) as exc:
            log.warning("RTT probe failed: %s", exc)
