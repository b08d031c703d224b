"""Channel and server builders shared by both daemons.

A :class:`Daemon` is a gRPC server with Cleave's defaults: explicit message-size limits (never
gRPC's 4 MiB default), ``grpc.health.v1`` and server reflection for every service it hosts, a
refusal to bind a non-loopback address without TLS unless told so, TLS / mutual TLS and bearer
tokens when configured (:mod:`runtime.security`), one pair of keepalive settings both ends agree on
(:class:`Keepalive`), a clear refusal of a port another process holds, fair use of its handler
threads (reserved threads for health and control calls, stream quotas, idle streams ended:
:mod:`runtime.admission`), and a draining stop (health
NOT_SERVING, finish in-flight calls, then close) on SIGTERM or SIGINT. Requests whose bytes do not
decode as the expected message answer INVALID_ARGUMENT naming the type, where gRPC alone would
answer INTERNAL.

A daemon listens before its models are loaded: a :class:`Service` given without a servicer is
*pending*; its calls answer UNAVAILABLE and health says NOT_SERVING until :meth:`Daemon.attach`
supplies the servicer, so a client can wait for SERVING (``cleave wait``) instead of guessing.
"""

from __future__ import annotations

import errno
import ipaddress
import logging
import os
import signal
import socket
import threading
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent import futures
from dataclasses import dataclass, field
from typing import Any

import grpc
from google.protobuf import message_factory
from google.protobuf.descriptor import MethodDescriptor, ServiceDescriptor
from google.protobuf.message import DecodeError
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from protos.errors import InvalidArgument

from .admission import Admission, ServingLimits
from .handlers import handler_kind
from .security import BearerAuthInterceptor, ClientTLS, ServerAuth, ServerTLS, secure_channel
from .settings import Settings

log = logging.getLogger(__name__)

DEFAULT_MAX_MESSAGE_BYTES = 64 << 20
STARTING = "the daemon is starting (loading its models): wait for health SERVING (`cleave wait`), then retry"


def message_options(max_message_bytes: int) -> list[tuple[str, Any]]:
    """Channel/server options that set both message-size limits explicitly."""
    return [
        ("grpc.max_send_message_length", max_message_bytes),
        ("grpc.max_receive_message_length", max_message_bytes),
    ]


@dataclass(frozen=True)
class Keepalive(Settings):
    """The keepalive settings of a link: one pair, the client's and the server's half, that agree.

    gRPC core (doc/keepalive.md) answers a client that pings more often than its server permits with
    GOAWAY ``too_many_pings``, which kills every stream on the connection. By default a server permits
    one ping per 5 minutes while no data flows, and none at all without a call in flight, so a client
    pinging every 10 s over an idle stream is cut off after a few pings. Here:

    - the client pings every ``interval_ms`` while the connection is idle, with or without calls in
      flight and without gRPC's default cap of two pings between data frames, and drops the connection
      when a ping goes unanswered for ``timeout_ms``;
    - the server accepts pings as often as every ``interval_ms / 2`` (slack for timer jitter), with or
      without calls, and still sends GOAWAY to a client that pings faster than that more than
      ``max_ping_strikes`` times in a row.

    Both daemons and every client use :data:`KEEPALIVE` unless told otherwise; a client must not ping
    more often than the server it talks to permits.
    """

    interval_ms: int = 10_000
    # gRPC's default: on a slow, busy link a ping waits behind queued data; 5 s dropped live connections.
    timeout_ms: int = 20_000
    max_ping_strikes: int = 2

    def validate(self) -> None:
        for name, least in (("interval_ms", 2), ("timeout_ms", 1), ("max_ping_strikes", 0)):
            if getattr(self, name) < least:
                raise ValueError(f"{name}: {getattr(self, name)} is under {least}")

    @property
    def min_ping_interval_ms(self) -> int:
        """The shortest gap between pings the server accepts without a strike."""
        return self.interval_ms // 2

    def client_options(self) -> list[tuple[str, Any]]:
        return [
            ("grpc.keepalive_time_ms", self.interval_ms),
            ("grpc.keepalive_timeout_ms", self.timeout_ms),
            ("grpc.keepalive_permit_without_calls", 1),
            ("grpc.http2.max_pings_without_data", 0),
        ]

    def server_options(self) -> list[tuple[str, Any]]:
        return [
            # GRPC_ARG_HTTP2_MIN_RECV_PING_INTERVAL_WITHOUT_DATA_MS: its key has no "recv" in it.
            ("grpc.http2.min_ping_interval_without_data_ms", self.min_ping_interval_ms),
            ("grpc.keepalive_permit_without_calls", 1),
            ("grpc.http2.max_ping_strikes", self.max_ping_strikes),
        ]


KEEPALIVE = Keepalive()


def open_channel(
    target: str,
    max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
    *,
    tls: ClientTLS | None = None,
    token: str | None = None,
    keepalive: Keepalive = KEEPALIVE,
) -> grpc.Channel:
    """A channel to ``target`` with explicit limits, fast reconnects and ``keepalive``'s client half;
    TLS when ``tls`` is active, and ``token`` sent as ``authorization: Bearer`` on every call when given."""
    options = (
        message_options(max_message_bytes)
        + [
            ("grpc.enable_retries", 0),
            ("grpc.initial_reconnect_backoff_ms", 100),
            ("grpc.max_reconnect_backoff_ms", 2000),
        ]
        + keepalive.client_options()
    )
    return secure_channel(target, options, tls, token)


class PortInUse(OSError):
    """The address a daemon should listen on is held by another process (``errno`` EADDRINUSE)."""

    def __str__(self) -> str:
        return str(self.strerror)


def _port_in_use(address: str) -> bool:
    """Whether binding ``host:port`` fails because something already listens there."""
    host, _, port = address.rpartition(":")
    try:
        infos = socket.getaddrinfo(host.strip("[]") or None, int(port), type=socket.SOCK_STREAM)
    except (OSError, ValueError):
        return False
    for family, kind, proto, _name, sockaddr in infos:
        with socket.socket(family, kind, proto) as probe:
            # As gRPC binds: TIME_WAIT leftovers do not count, only a listener does.
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                probe.bind(sockaddr)
            except OSError as exc:
                if exc.errno == errno.EADDRINUSE:
                    return True
    return False


def port_in_use_error(what: str, address: str) -> PortInUse:
    """The error naming ``address`` when its port is taken; ``what`` names the setting or role."""
    port = address.rpartition(":")[2]
    return PortInUse(
        errno.EADDRINUSE,
        f"{what} {address}: port {port} is already in use (another daemon or process listens there); "
        "stop it or choose another port",
    )


def is_loopback(address: str) -> bool:
    """Whether ``host:port`` binds only loopback interfaces."""
    host = address.rsplit(":", 1)[0].strip("[]")
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


@dataclass(frozen=True)
class WireBytes:
    """Told the size of each message of one method as it crosses the wire: ``received(n)`` with
    the length of a request's bytes before they are parsed, ``sent(n)`` with a response's after it
    is serialized. Counting there costs a ``len``; counting a parsed message costs its ``ByteSize``,
    which encodes it again (~42 us for a 444 KB frame).
    """

    received: Callable[[int], Any]
    sent: Callable[[int], Any]


@dataclass(frozen=True)
class Service:
    """One gRPC service to host: a servicer and the descriptor of the service it implements.

    ``servicer=None``: pending, the daemon listens and answers UNAVAILABLE for it until attached.
    ``wire_bytes``: per method name, a :class:`WireBytes` told the size of its messages.
    ``parsers``: per method name, what turns a request's bytes into the object its handler takes,
    instead of the request message's ``FromString`` (it raises ``DecodeError`` as that does).
    """

    servicer: Any
    descriptor: ServiceDescriptor
    wire_bytes: Mapping[str, WireBytes] = field(default_factory=dict, compare=False)
    parsers: Mapping[str, Callable[[bytes], Any]] = field(default_factory=dict, compare=False)

    @property
    def full_name(self) -> str:
        return self.descriptor.full_name


class _Undecodable:
    """Stands in for a request whose bytes are not the expected message."""

    def __init__(self, type_name: str, error: Exception) -> None:
        self.message = f"request: not a valid {type_name} ({error})"


def _lenient(message_class: Any, parse: Callable[[bytes], Any] | None = None) -> Callable[[bytes], Any]:
    parse = parse or message_class.FromString

    def deserialize(data: bytes) -> Any:
        try:
            return parse(data)
        except DecodeError as exc:
            return _Undecodable(message_class.DESCRIPTOR.full_name, exc)

    return deserialize


def _checked_stream(requests: Iterator[Any]) -> Iterator[Any]:
    for request in requests:
        if isinstance(request, _Undecodable):
            raise InvalidArgument(request.message)
        yield request


def _guard(method: MethodDescriptor, behaviour: Callable[..., Any]) -> Callable[..., Any]:
    """Answer INVALID_ARGUMENT for undecodable requests instead of gRPC's INTERNAL."""
    if method.client_streaming:

        def streaming(requests: Iterator[Any], context: grpc.ServicerContext) -> Any:
            return behaviour(_checked_stream(requests), context)

        return streaming

    def unary(request: Any, context: grpc.ServicerContext) -> Any:
        if isinstance(request, _Undecodable):
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, request.message)
        return behaviour(request, context)

    return unary


def _counted(
    deserialize: Callable[[bytes], Any], serialize: Callable[[Any], bytes], counter: WireBytes
) -> tuple[Callable[[bytes], Any], Callable[[Any], bytes]]:
    """``deserialize`` and ``serialize`` telling ``counter`` the length of each message's bytes.

    A request's bytes count as they arrived, parsed or not (an undecodable one still crossed the wire).
    """
    received, sent = counter.received, counter.sent

    def counted_deserialize(data: bytes) -> Any:
        received(len(data))
        return deserialize(data)

    def counted_serialize(message: Any) -> bytes:
        data = serialize(message)
        sent(len(data))
        return data

    return counted_deserialize, counted_serialize


def service_handler(service: Service) -> grpc.GenericRpcHandler:
    """Method handlers for every RPC of ``service.descriptor``, with lenient request decoding."""
    handlers = {}
    for method in service.descriptor.methods:
        request_class = message_factory.GetMessageClass(method.input_type)
        response_class = message_factory.GetMessageClass(method.output_type)
        make = handler_kind(method.client_streaming, method.server_streaming).make
        deserialize = _lenient(request_class, service.parsers.get(method.name))
        serialize = response_class.SerializeToString
        counter = service.wire_bytes.get(method.name)
        if counter is not None:
            deserialize, serialize = _counted(deserialize, serialize, counter)
        handlers[method.name] = make(
            _guard(method, getattr(service.servicer, method.name)),
            request_deserializer=deserialize,
            response_serializer=serialize,
        )
    return grpc.method_handlers_generic_handler(service.full_name, handlers)


def _starting(method: MethodDescriptor) -> grpc.RpcMethodHandler:
    """A handler that answers UNAVAILABLE: the daemon listens but is still loading."""

    def refuse(_request: Any, context: grpc.ServicerContext) -> Any:
        context.abort(grpc.StatusCode.UNAVAILABLE, STARTING)

    return handler_kind(method.client_streaming, method.server_streaming).make(refuse)


class ServiceOff(grpc.ServerInterceptor):
    """Answer every call to a service this daemon does not host with UNIMPLEMENTED and ``message``.

    gRPC alone answers ``Method not found!``, which reads like a version mismatch; ``message``
    says the service is off and how to turn it on.
    """

    def __init__(self, descriptor: ServiceDescriptor, message: str) -> None:
        self.descriptor = descriptor
        self.message = message
        self._prefix = f"/{descriptor.full_name}/"

    def intercept_service(
        self, continuation: Callable[[grpc.HandlerCallDetails], Any], details: grpc.HandlerCallDetails
    ) -> Any:
        if not details.method.startswith(self._prefix):
            return continuation(details)
        method = self.descriptor.methods_by_name.get(details.method[len(self._prefix) :])
        if method is None:
            return continuation(details)

        def refuse(_request: Any, context: grpc.ServicerContext) -> Any:
            context.abort(grpc.StatusCode.UNIMPLEMENTED, self.message)

        return handler_kind(method.client_streaming, method.server_streaming).make(refuse)


class _Router(grpc.GenericRpcHandler):
    """Routes calls to each hosted service's handlers; a pending service's calls answer UNAVAILABLE.

    The handler table is replaced whole under a lock when a service is attached; gRPC's threads read it.
    """

    def __init__(self, services: Sequence[Service]) -> None:
        self._lock = threading.Lock()
        self._descriptors = {s.full_name: s.descriptor for s in services}
        self._handlers = {s.full_name: service_handler(s) for s in services if s.servicer is not None}

    def attach(self, service: Service) -> None:
        handler = service_handler(service)
        with self._lock:
            self._handlers = {**self._handlers, service.full_name: handler}

    def service(self, details: grpc.HandlerCallDetails) -> grpc.RpcMethodHandler | None:
        _, _, rest = details.method.partition("/")
        name, _, method = rest.partition("/")
        with self._lock:
            handler = self._handlers.get(name)
        if handler is not None:
            return handler.service(details)
        descriptor = self._descriptors.get(name)
        if descriptor is None or method not in descriptor.methods_by_name:
            return None
        return _starting(descriptor.methods_by_name[method])


class Daemon:
    """A gRPC server hosting ``services`` plus health and reflection."""

    def __init__(
        self,
        address: str,
        services: Sequence[Service],
        *,
        max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
        max_workers: int = 16,
        allow_insecure_public: bool = False,
        interceptors: Sequence[grpc.ServerInterceptor] = (),
        tls: ServerTLS | None = None,
        auth: ServerAuth | None = None,
        keepalive: Keepalive = KEEPALIVE,
        limits: ServingLimits | None = None,
        control_methods: Sequence[str] = (),
    ) -> None:
        tls = tls or ServerTLS()
        limits = limits or ServingLimits.for_workers(max_workers)
        # Admission right after auth: it keeps handler threads for health and ``control_methods``.
        self.admission = Admission(limits, max_workers, control_methods)
        interceptors = [self.admission, *interceptors]
        if not is_loopback(address) and not tls.enabled and not allow_insecure_public:
            raise ValueError(
                f"listen address {address!r} is not loopback and TLS is not configured; "
                "configure tls: cert and key (or set allow_insecure_public: true to bind it in plaintext anyway)"
            )
        # Auth runs before every other interceptor: a refused caller costs no metrics or logging work.
        if auth is not None and auth.enabled:
            tokens = auth.load()
            interceptors = [BearerAuthInterceptor(tokens), *interceptors]
            self.security = f"{tls.mode}, bearer tokens ({len(tokens)} accepted)"
            if not tls.enabled and not is_loopback(address):
                log.warning("bearer tokens reach %s in plaintext: configure tls", address)
        else:
            self.security = f"{tls.mode}, no auth"
        self.address = address
        self.services = list(services)
        self.health = health.HealthServicer()
        self._server = grpc.server(
            futures.ThreadPoolExecutor(max_workers=max_workers, thread_name_prefix="grpc"),
            # gRPC sets SO_REUSEPORT by default: a second daemon on this port would start, and the
            # kernel would split connections between the two. Off, the second bind fails.
            options=message_options(max_message_bytes) + [("grpc.so_reuseport", 0)] + keepalive.server_options(),
            interceptors=list(interceptors),
            maximum_concurrent_rpcs=limits.max_concurrent_rpcs,
        )
        self._router = _Router(self.services)
        self._server.add_generic_rpc_handlers([self._router])
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self._server)
        names = [s.full_name for s in self.services]
        reflection.enable_server_reflection(
            names + [health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, reflection.SERVICE_NAME],
            self._server,
        )
        try:
            if tls.enabled:
                self.port = self._server.add_secure_port(address, tls.credentials())
            else:
                self.port = self._server.add_insecure_port(address)
        except RuntimeError:  # grpcio raises "Failed to bind" without the reason
            self.port = 0
        if self.port == 0:
            if _port_in_use(address):
                raise port_in_use_error("cannot listen on", address)
            raise OSError(f"cannot bind {address}")
        self._stopped = threading.Event()
        self._draining = threading.Event()

    def _set_health(self, status: int) -> None:
        self.health.set("", status)
        for service in self.services:
            self.health.set(service.full_name, status)

    @property
    def pending(self) -> list[str]:
        """Services that wait for :meth:`attach`."""
        return [s.full_name for s in self.services if s.servicer is None]

    def start(self) -> int:
        """Start listening; returns the bound port. Health is SERVING unless a service is pending."""
        self._set_health(health_pb2.HealthCheckResponse.NOT_SERVING)
        self._server.start()
        log.info("listening on %s (port %d, %s)", self.address, self.port, self.security)
        if not self.pending:
            self._set_health(health_pb2.HealthCheckResponse.SERVING)
        return self.port

    def attach(self, service: Service) -> None:
        """Supply a pending service's servicer; health turns SERVING when none is pending."""
        if service.full_name not in self.pending:
            raise ValueError(f"{service.full_name} is not a pending service of this daemon")
        self._router.attach(service)
        self.services = [service if s.full_name == service.full_name else s for s in self.services]
        if not self.pending and not self._draining.is_set():
            self._set_health(health_pb2.HealthCheckResponse.SERVING)
            log.info("serving %s", ", ".join(s.full_name for s in self.services))

    def stop(self, grace: float = 10.0) -> None:
        """Drain: report NOT_SERVING, refuse new calls, let in-flight calls finish within ``grace``."""
        if self._stopped.is_set():
            return
        self._draining.set()
        self._set_health(health_pb2.HealthCheckResponse.NOT_SERVING)
        self._server.stop(grace).wait()
        self.admission.watchdog.close()
        self._stopped.set()

    def wait(self) -> None:
        """Block until stopped."""
        self._stopped.wait()

    def run_until_signal(
        self,
        on_stop: Callable[[], None] | None = None,
        grace: float = 10.0,
        load: Callable[[], None] | None = None,
    ) -> None:
        """Serve until SIGTERM/SIGINT, then drain and call ``on_stop``.

        ``load``: called once the daemon listens (it loads the models and :meth:`attach` es the pending
        services); if it raises, the daemon stops and the exception propagates. A signal during
        ``load`` abandons it (nothing is served yet) and the daemon stops at once.
        """
        loading = threading.Event()

        def handle(signum: int, _frame: Any) -> None:
            log.info("signal %d: %s", signum, "stopping the load" if loading.is_set() else "draining")
            # Stop from another thread: a signal handler must return promptly.
            threading.Thread(target=self.stop, args=(0 if loading.is_set() else grace,), daemon=True).start()

        signal.signal(signal.SIGTERM, handle)
        signal.signal(signal.SIGINT, handle)
        self.start()
        abandoned = False
        if load is not None:
            # The load runs in its own thread, so a signal never lands inside it (raising there, e.g.
            # in the middle of importing torch, could leave the interpreter unable to exit).
            failure: list[BaseException] = []

            def run_load() -> None:
                try:
                    load()
                except BaseException as exc:  # noqa: BLE001 - handed to the main thread
                    failure.append(exc)

            loading.set()
            loader = threading.Thread(target=run_load, name="load", daemon=True)
            loader.start()
            while loader.is_alive() and not self._stopped.is_set():
                loader.join(0.2)
            loading.clear()
            if failure:
                self.stop(grace=0)
                raise failure[0]
            abandoned = loader.is_alive()
        while not self._stopped.wait(0.5):
            pass
        if on_stop is not None:
            on_stop()
        if abandoned:
            # Nothing was served; the load thread may be anywhere (an import, a model's constructor).
            # Leave without waiting for it: flush the logs and exit.
            log.info("stopped while loading")
            logging.shutdown()
            os._exit(0)
