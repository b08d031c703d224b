"""Fair use of a daemon's handler threads: which calls get one, for how long, and who gets the rest.

gRPC Python's sync server runs every call, health checks included, on one thread pool, and a
streaming call holds its thread for as long as the client keeps the stream open. So a few clients
that open streams and send nothing would take every thread, and the health check would queue
behind them. :class:`Admission` (a server interceptor) prevents that:

- *work* calls (everything but the control methods) may hold at most ``max_workers -
  reserved_workers`` threads; the reserved ones are left for control calls (health ``Check``,
  ``GetInfo``, the edge's status) and for refusals, which are quick, so those answer at once
  even when every work slot is taken;
- of the work slots, streams may take ``max_streams``, and one client (its bearer token, else its
  peer address) ``max_streams_per_client``;
- a stream whose client sends nothing for ``stream_idle_s`` while the server waits for its next
  message is ended with DEADLINE_EXCEEDED, and its thread and buffers are freed.

A call past a limit answers RESOURCE_EXHAUSTED naming the limit. ``max_concurrent_rpcs`` (given to
gRPC itself) bounds the calls in progress or queued, so a flood cannot grow the queue without bound.
"""

from __future__ import annotations

import hashlib
import logging
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import grpc

from .handlers import handler_kind
from .settings import Settings, positive

log = logging.getLogger(__name__)

#: Methods every daemon answers from the reserved threads (cheap, and needed to tell it is alive).
HEALTH_CHECK = "/grpc.health.v1.Health/Check"


@dataclass
class ServingLimits(Settings):
    """How many calls a daemon takes at once, whose they are, and how long a stream may sit idle."""

    max_concurrent_rpcs: int = 256  # calls in progress or queued, every method; past it gRPC answers RESOURCE_EXHAUSTED
    reserved_workers: int = 4  # handler threads kept for control calls (health Check, GetInfo, GetStatus)
    max_streams: int = 16  # streaming calls at once (Infer, UploadModel, Probe, health Watch, ...)
    max_streams_per_client: int = 8  # per bearer token, or per peer address when there are no tokens
    stream_idle_s: float = 120.0  # a stream whose client sends nothing for this long is ended

    @classmethod
    def for_workers(cls, max_workers: int) -> ServingLimits:
        """The defaults, scaled down to fit a small pool of ``max_workers`` threads."""
        reserved = min(cls.reserved_workers, max(1, max_workers // 4))
        return cls(
            reserved_workers=reserved,
            max_streams=max(1, min(cls.max_streams, max_workers - reserved)),
            max_concurrent_rpcs=max(cls.max_concurrent_rpcs, max_workers),
        )

    def validate(self) -> None:
        positive(
            self, "reserved_workers", "max_streams", "max_streams_per_client", "max_concurrent_rpcs", "stream_idle_s"
        )

    def check(self, max_workers: int) -> None:
        """Raise ValueError naming the first setting that cannot work with ``max_workers`` threads."""
        if self.reserved_workers < 1:
            raise ValueError(f"reserved_workers: {self.reserved_workers}, needs at least 1")
        if max_workers <= self.reserved_workers:
            raise ValueError(f"max_workers: {max_workers} leaves no thread beyond {self.reserved_workers} reserved")
        if not 1 <= self.max_streams <= max_workers - self.reserved_workers:
            raise ValueError(
                f"max_streams: {self.max_streams} must be in [1, max_workers - reserved_workers = "
                f"{max_workers - self.reserved_workers}]"
            )
        if self.max_streams_per_client < 1:
            raise ValueError(f"max_streams_per_client: {self.max_streams_per_client}, needs at least 1")
        if self.max_concurrent_rpcs < max_workers:
            raise ValueError(f"max_concurrent_rpcs: {self.max_concurrent_rpcs} is below max_workers {max_workers}")
        if self.stream_idle_s <= 0:
            raise ValueError(f"stream_idle_s: {self.stream_idle_s} is not positive")


def client_identity(context: grpc.ServicerContext) -> str:
    """Who a call comes from, for quotas: a digest of its bearer token, else its peer's address (no port)."""
    for key, value in context.invocation_metadata() or ():
        if key == "authorization" and isinstance(value, str) and value.startswith("Bearer "):
            return "token:" + hashlib.sha256(value[7:].encode()).hexdigest()[:12]
    peer = context.peer() or "?"
    kind, _, address = peer.partition(":")
    if kind in ("ipv4", "ipv6"):
        address = address.rsplit(":", 1)[0]  # "127.0.0.1:5123" / "[::1]:5123" -> the host
    return f"{kind}:{address}"


def end_stream(context: grpc.ServicerContext, code: grpc.StatusCode, details: str) -> None:
    """End a call from another thread: the client gets ``code``; the handler's next read raises."""
    call = getattr(getattr(context, "_rpc_event", None), "call", None)
    try:
        from grpc._cython import cygrpc

        call.cancel(getattr(cygrpc.StatusCode, code.name.lower()), details)
    except Exception:  # noqa: BLE001 - gRPC's internals moved: cancel plainly (the client sees CANCELLED)
        context.cancel()


class _Watched:
    """A request iterator that records when the handler started waiting for the next message."""

    __slots__ = ("requests", "context", "waiting_since", "__weakref__")

    def __init__(self, requests: Iterator[Any], context: grpc.ServicerContext) -> None:
        self.requests = requests
        self.context = context
        self.waiting_since: float | None = None

    def __iter__(self) -> _Watched:
        return self

    def __next__(self) -> Any:
        self.waiting_since = time.monotonic()
        try:
            return next(self.requests)
        finally:
            self.waiting_since = None


class IdleWatchdog:
    """Ends streams that have waited ``idle_s`` for their client's next message; one thread for all."""

    def __init__(self, idle_s: float) -> None:
        self.idle_s = idle_s
        self._watched: set[_Watched] = set()
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._closed = threading.Event()
        self.ended = 0  # streams ended for idleness, for tests and logs (written by the watchdog thread only)

    def watch(self, requests: Iterator[Any], context: grpc.ServicerContext) -> Iterator[Any]:
        watched = _Watched(requests, context)
        with self._lock:
            self._watched.add(watched)
            if self._thread is None and not self._closed.is_set():
                self._thread = threading.Thread(target=self._run, name="idle-streams", daemon=True)
                self._thread.start()
        if not context.add_callback(lambda: self._forget(watched)):
            self._forget(watched)
        return watched

    def close(self) -> None:
        """Stop the watchdog thread (the daemon's stop calls it once its server has drained)."""
        self._closed.set()
        with self._lock:
            thread = self._thread
        if thread is not None:
            thread.join()

    def _forget(self, watched: _Watched) -> None:
        with self._lock:
            self._watched.discard(watched)

    def _run(self) -> None:
        period = min(max(self.idle_s / 4, 0.05), 1.0)
        while not self._closed.wait(period):
            now = time.monotonic()
            with self._lock:
                idle = [w for w in self._watched if w.waiting_since is not None and now - w.waiting_since > self.idle_s]
                for w in idle:
                    self._watched.discard(w)
            for w in idle:
                self.ended += 1
                log.info("ending a stream from %s: no message for %.0f s", client_identity(w.context), self.idle_s)
                end_stream(w.context, grpc.StatusCode.DEADLINE_EXCEEDED, f"stream: no message for {self.idle_s:g} s")


class _Once:
    """Calls ``action`` the first time it is called, from whichever thread comes first."""

    def __init__(self, action: Callable[[], None] | None) -> None:
        self._action = action
        self._lock = threading.Lock()

    def __call__(self) -> None:
        with self._lock:
            action, self._action = self._action, None
        if action is not None:
            action()


def _leaving_after(responses: Iterator[Any], leave: _Once) -> Iterator[Any]:
    """The handler's responses, then ``leave()`` once they end (or the stream is closed early)."""
    try:
        yield from responses
    finally:
        leave()


class Admission(grpc.ServerInterceptor):
    """Admits work calls within the limits of :class:`ServingLimits`; control methods always pass."""

    def __init__(self, limits: ServingLimits, max_workers: int, control_methods: Sequence[str] = ()) -> None:
        limits.check(max_workers)
        self.limits = limits
        self.work_slots = max_workers - limits.reserved_workers
        self.control = frozenset([HEALTH_CHECK, *control_methods])
        self.watchdog = IdleWatchdog(limits.stream_idle_s)
        self._lock = threading.Lock()
        self._work = 0
        self._streams: Counter[str] = Counter()  # per client

    def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], grpc.RpcMethodHandler | None],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler | None:
        handler = continuation(handler_call_details)
        if handler is None or handler_call_details.method in self.control:
            return handler
        kind = handler_kind(handler.request_streaming, handler.response_streaming)
        behaviour = getattr(handler, kind.attribute)
        streaming = handler.request_streaming or handler.response_streaming
        reads_stream = handler.request_streaming
        method = handler_call_details.method

        def admitted(request: Any, context: grpc.ServicerContext) -> Any:
            client = client_identity(context) if streaming else ""
            refusal = self._enter(client, streaming)
            if refusal:
                # DEBUG: a flood of refused calls must not become a flood of log lines.
                log.debug("refused %s from %s: %s", method, client or client_identity(context), refusal)
                context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, refusal)
            leave = _Once(lambda: self._leave(client, streaming))
            # The callback frees the slot of a call that ends before its handler runs to the end (a
            # cancelled call, or a response stream the client stops reading). Otherwise the slot is
            # freed when the handler finishes, before gRPC sends the status: a client that has its
            # status may at once call again without being refused for a slot that is still held.
            if not context.add_callback(leave):
                leave()
            if reads_stream:
                request = self.watchdog.watch(request, context)
            if handler.response_streaming:
                return _leaving_after(behaviour(request, context), leave)
            try:
                return behaviour(request, context)
            finally:
                leave()

        return kind.make(
            admitted,
            request_deserializer=handler.request_deserializer,
            response_serializer=handler.response_serializer,
        )

    def _enter(self, client: str, streaming: bool) -> str:
        limits = self.limits
        with self._lock:
            if self._work >= self.work_slots:
                return f"server busy: {self._work} calls in progress (max_workers - reserved_workers)"
            if streaming:
                total = sum(self._streams.values())
                if total >= limits.max_streams:
                    return f"streams: limit of {limits.max_streams} open streams reached (max_streams)"
                if self._streams[client] >= limits.max_streams_per_client:
                    return (
                        f"streams: this client already has {self._streams[client]} open streams "
                        f"(max_streams_per_client {limits.max_streams_per_client})"
                    )
                self._streams[client] += 1
            self._work += 1
        return ""

    def _leave(self, client: str, streaming: bool) -> None:
        with self._lock:
            self._work -= 1
            if streaming:
                self._streams[client] -= 1
                if self._streams[client] <= 0:
                    del self._streams[client]

    @property
    def in_progress(self) -> tuple[int, int]:
        """(work calls, streams) admitted and not yet finished."""
        with self._lock:
            return self._work, sum(self._streams.values())
