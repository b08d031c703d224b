"""Prometheus metrics both daemons share: per-RPC counts and latency, and the ``/metrics`` endpoint.

:class:`RpcMetrics` is a gRPC server interceptor; pass it to ``Daemon(..., interceptors=[...])``.
It uses the metric names and labels of go-grpc-prometheus (``grpc_server_started_total``,
``grpc_server_handled_total``, ``grpc_server_handling_seconds``, ``grpc_server_msg_*_total`` with
``grpc_type``, ``grpc_service``, ``grpc_method`` and ``grpc_code``), so existing gRPC dashboards
and alerts work unchanged. A streaming call counts once, when it ends, with its final status.

Each daemon keeps its metrics in its own :class:`~prometheus_client.CollectorRegistry` (see
:func:`new_registry`), never the process-global one: tests start several daemons' worth of
metrics in one process, and each must count only its own calls.
"""

from __future__ import annotations

import errno
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import grpc
from prometheus_client import CollectorRegistry, Counter, GCCollector, Histogram, PlatformCollector, ProcessCollector
from prometheus_client import start_http_server as _start_http_server

from .handlers import handler_kind
from .serving import is_loopback, port_in_use_error
from .settings import Settings

# RPC latency, seconds: sub-millisecond health checks up to streams that stay open for minutes.
RPC_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300)
# One stage of one request (head, encode, tail, ...), seconds.
STAGE_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)


@dataclass
class MetricsConfig(Settings):
    """``metrics:`` in ``cloud.yaml`` and ``edge.yaml``.

    ``listen``: ``host:port`` for the HTTP ``/metrics`` endpoint, or a bare port (bound on
    127.0.0.1). Empty or port 0: no endpoint and no metrics (the default). A non-loopback host needs
    the daemon's ``allow_insecure_public: true``, like the gRPC port.
    """

    listen: str = ""

    def validate(self) -> None:
        parse_listen(self.listen)  # a typo fails at start, naming the key

    @property
    def enabled(self) -> bool:
        return parse_listen(self.listen) is not None


class LabelCache:
    """The children of one labelled metric, each looked up once: ``cache("decode").observe(x)``.

    prometheus_client's ``labels()`` validates the values and takes a lock on every call; on a
    request's path that is several lookups per request. Only for label values from a fixed set
    (stages, methods, status codes): the cache keeps every child it hands out.
    """

    def __init__(self, metric: Any) -> None:
        self.metric = metric
        self._children: dict[tuple[str, ...], Any] = {}

    def __call__(self, *values: str) -> Any:
        child = self._children.get(values)
        if child is None:  # two threads may both look it up: labels() returns the same child to each
            child = self._children[values] = self.metric.labels(*values)
        return child


def new_registry() -> CollectorRegistry:
    """A daemon's own registry, with the process (CPU, memory, fds), platform and GC collectors."""
    registry = CollectorRegistry()
    ProcessCollector(registry=registry)
    PlatformCollector(registry=registry)
    GCCollector(registry=registry)
    return registry


# -- the interceptor ------------------------------------------------------------------------------


def _final_code(context: grpc.ServicerContext, failed: bool) -> grpc.StatusCode:
    """The status a finished call answers: the one set by ``abort``/``set_code``, else OK or UNKNOWN."""
    code = context.code()
    if code is not None:
        return code
    if not context.is_active():  # the client cancelled or its deadline passed
        return grpc.StatusCode.CANCELLED
    return grpc.StatusCode.UNKNOWN if failed else grpc.StatusCode.OK


class _Call:
    """One call's bookkeeping: start time, messages, and exactly one final record."""

    __slots__ = ("_metrics", "_labels", "_started", "_done")

    def __init__(self, metrics: RpcMetrics, labels: tuple[str, str, str]) -> None:
        self._metrics = metrics
        self._labels = labels
        self._done = False
        metrics.started_child(*labels).inc()
        self._started = time.perf_counter()

    def received(self) -> None:
        self._metrics.received_child(*self._labels).inc()

    def sent(self) -> None:
        self._metrics.sent_child(*self._labels).inc()

    def finish(self, code: grpc.StatusCode) -> None:
        if self._done:
            return
        self._done = True
        self._metrics.handling_child(*self._labels).observe(time.perf_counter() - self._started)
        self._metrics.handled_child(*self._labels, code.name).inc()

    def requests(self, requests: Iterator[Any]) -> Iterator[Any]:
        for request in requests:
            self.received()
            yield request

    def responses(self, responses: Iterator[Any], context: grpc.ServicerContext) -> Iterator[Any]:
        """Pass ``responses`` through; record the final status when the stream ends, however it ends."""
        try:
            for response in responses:
                self.sent()
                yield response
        except GeneratorExit:  # gRPC stopped reading: the client went away
            self.finish(grpc.StatusCode.CANCELLED)
            close = getattr(responses, "close", None)
            if close is not None:
                close()  # run the handler's own cleanup now, not at garbage collection
            raise
        except BaseException:
            self.finish(_final_code(context, failed=True))
            raise
        self.finish(_final_code(context, failed=False))


# go-grpc-prometheus's grpc_type label for each kind of method.
_TYPE_LABELS = {
    (False, False): "unary",
    (False, True): "server_stream",
    (True, False): "client_stream",
    (True, True): "bidi_stream",
}


def split_method(full_method: str) -> tuple[str, str]:
    """``/pkg.Service/Method`` -> (``pkg.Service``, ``Method``)."""
    service, _, method = full_method.lstrip("/").rpartition("/")
    return (service or "unknown"), (method or "unknown")


class RpcMetrics(grpc.ServerInterceptor):
    """Counts every call (started, handled by status code, messages each way) and times it.

    Only methods the server implements are counted (labels come from registered services, so a
    client cannot grow the label set); an unknown method answers UNIMPLEMENTED uncounted.
    """

    def __init__(self, registry: CollectorRegistry) -> None:
        labels = ["grpc_type", "grpc_service", "grpc_method"]
        self.started = Counter("grpc_server_started_total", "RPCs started on the server.", labels, registry=registry)
        self.handled = Counter(
            "grpc_server_handled_total",
            "RPCs completed on the server, by status code (a stream counts when it ends).",
            [*labels, "grpc_code"],
            registry=registry,
        )
        self.handling = Histogram(
            "grpc_server_handling_seconds",
            "Time from the start of an RPC to its final status, seconds (streams: the whole stream).",
            labels,
            buckets=RPC_BUCKETS,
            registry=registry,
        )
        self.msg_received = Counter(
            "grpc_server_msg_received_total", "Request messages received.", labels, registry=registry
        )
        self.msg_sent = Counter("grpc_server_msg_sent_total", "Response messages sent.", labels, registry=registry)
        # Label values come from the registered methods and gRPC's status codes: a fixed set.
        self.started_child = LabelCache(self.started)
        self.handled_child = LabelCache(self.handled)
        self.handling_child = LabelCache(self.handling)
        self.received_child = LabelCache(self.msg_received)
        self.sent_child = LabelCache(self.msg_sent)

    def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], grpc.RpcMethodHandler | None],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler | None:
        handler = continuation(handler_call_details)
        if handler is None:
            return None
        streaming = (bool(handler.request_streaming), bool(handler.response_streaming))
        kind = handler_kind(*streaming)
        behavior = getattr(handler, kind.attribute)
        if behavior is None:
            return handler
        labels = (_TYPE_LABELS[streaming], *split_method(handler_call_details.method))
        return kind.make(
            self._wrap(behavior, labels, bool(handler.request_streaming), bool(handler.response_streaming)),
            request_deserializer=handler.request_deserializer,
            response_serializer=handler.response_serializer,
        )

    def _wrap(
        self, behavior: Callable[..., Any], labels: tuple[str, str, str], client_streaming: bool, server_streaming: bool
    ) -> Callable[..., Any]:
        def observed(request: Any, context: grpc.ServicerContext) -> Any:
            call = _Call(self, labels)
            if client_streaming:
                request = call.requests(request)
            else:
                call.received()
            try:
                response = behavior(request, context)
            except BaseException:
                call.finish(_final_code(context, failed=True))
                raise
            if server_streaming:
                return call.responses(response, context)
            call.sent()
            call.finish(_final_code(context, failed=False))
            return response

        return observed


# -- the HTTP endpoint ----------------------------------------------------------------------------


def parse_listen(listen: str | int | None) -> tuple[str, int] | None:
    """``host:port``, ``[v6]:port`` or a bare port (loopback) -> (host, port); None when off."""
    text = str(listen if listen is not None else "").strip()
    if not text:
        return None
    if text.isdigit():
        host, port_text = "127.0.0.1", text
    else:
        host, sep, port_text = text.rpartition(":")
        if not sep or not host:
            raise ValueError(f"metrics.listen: {text!r} is not host:port or a port")
        host = host.strip("[]")
    try:
        port = int(port_text)
    except ValueError:
        raise ValueError(f"metrics.listen: port {port_text!r} is not a number") from None
    if not 0 <= port <= 65535:
        raise ValueError(f"metrics.listen: port {port} is out of range")
    return (host, port) if port else None


class MetricsEndpoint:
    """A running ``/metrics`` HTTP server (a daemon thread); :meth:`stop` closes it."""

    def __init__(self, host: str, port: int, registry: CollectorRegistry) -> None:
        self._server, self._thread = _start_http_server(port, addr=host, registry=registry)
        self.host = host
        self.port = self._server.server_port
        self._stopped = threading.Event()

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}/metrics"

    def stop(self) -> None:
        if self._stopped.is_set():
            return
        self._stopped.set()
        self._server.shutdown()
        self._server.server_close()


def serve_metrics(
    listen: str, registry: CollectorRegistry | None, *, allow_insecure_public: bool = False
) -> MetricsEndpoint | None:
    """Start the ``/metrics`` endpoint at ``listen`` (see :func:`parse_listen`); None when it is off.

    A non-loopback address needs ``allow_insecure_public``, as the gRPC port does: the endpoint is
    plain HTTP and tells whoever reaches it the daemon's traffic and models' behaviour.
    """
    address = parse_listen(listen)
    if address is None:
        return None
    host, port = address
    if not allow_insecure_public and not is_loopback(f"{host}:{port}"):
        raise ValueError(
            f"metrics.listen {listen!r} is not loopback; set allow_insecure_public: true to serve metrics on it anyway"
        )
    try:
        return MetricsEndpoint(host, port, registry)
    except OSError as exc:
        if exc.errno == errno.EADDRINUSE:
            raise port_in_use_error("metrics.listen", f"{host}:{port}") from exc
        raise OSError(f"metrics.listen {listen!r}: cannot bind ({exc.strerror or exc})") from exc
