"""Channel and server builders shared by both daemons.

A :class:`Daemon` is a gRPC server with Cleave's defaults: explicit message-size limits (never
gRPC's 4 MiB default), ``grpc.health.v1`` and server reflection for every service it hosts, a
refusal to bind a non-loopback address without TLS unless told so, TLS / mutual TLS and bearer
tokens when configured (:mod:`protos.security`), and a draining stop (health
NOT_SERVING, finish in-flight calls, then close) on SIGTERM or SIGINT. Requests whose bytes do not
decode as the expected message answer INVALID_ARGUMENT naming the type, where gRPC alone would
answer INTERNAL.

A daemon listens before its models are loaded: a :class:`Service` given without a servicer is
*pending*; its calls answer UNAVAILABLE and health says NOT_SERVING until :meth:`Daemon.attach`
supplies the servicer, so a client can wait for SERVING (``cleave wait``) instead of guessing.
"""

from __future__ import annotations

import ipaddress
import logging
import signal
import threading
from collections.abc import Callable, Iterator, Sequence
from concurrent import futures
from dataclasses import dataclass
from typing import Any

import grpc
from google.protobuf import message_factory
from google.protobuf.descriptor import MethodDescriptor, ServiceDescriptor
from google.protobuf.message import DecodeError
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from .errors import InvalidArgument
from .handlers import handler_kind
from .security import BearerAuthInterceptor, ClientTLS, ServerAuth, ServerTLS, secure_channel

log = logging.getLogger(__name__)

DEFAULT_MAX_MESSAGE_BYTES = 64 << 20
STARTING = "the daemon is starting (loading its models): wait for health SERVING (`cleave wait`), then retry"


def message_options(max_message_bytes: int) -> list[tuple[str, Any]]:
    """Channel/server options that set both message-size limits explicitly."""
    return [
        ("grpc.max_send_message_length", max_message_bytes),
        ("grpc.max_receive_message_length", max_message_bytes),
    ]


def open_channel(
    target: str,
    max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
    *,
    tls: ClientTLS | None = None,
    token: str | None = None,
) -> grpc.Channel:
    """A channel to ``target`` with explicit limits and fast reconnects; TLS when ``tls`` is active,
    and ``token`` sent as ``authorization: Bearer`` on every call when given."""
    options = message_options(max_message_bytes) + [
        ("grpc.enable_retries", 0),
        ("grpc.initial_reconnect_backoff_ms", 100),
        ("grpc.max_reconnect_backoff_ms", 2000),
        ("grpc.keepalive_time_ms", 10_000),
        # gRPC's default: on a slow, busy link a ping waits behind queued data; 5 s dropped live connections.
        ("grpc.keepalive_timeout_ms", 20_000),
    ]
    return secure_channel(target, options, tls, token)


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
class Service:
    """One gRPC service to host: a servicer and the descriptor of the service it implements.

    ``servicer=None``: pending, the daemon listens and answers UNAVAILABLE for it until attached.
    """

    servicer: Any
    descriptor: ServiceDescriptor

    @property
    def full_name(self) -> str:
        return self.descriptor.full_name


class _Undecodable:
    """Stands in for a request whose bytes are not the expected message."""

    def __init__(self, type_name: str, error: Exception) -> None:
        self.message = f"request: not a valid {type_name} ({error})"


def _lenient(message_class: Any) -> Callable[[bytes], Any]:
    def deserialize(data: bytes) -> Any:
        try:
            return message_class.FromString(data)
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


def service_handler(service: Service) -> grpc.GenericRpcHandler:
    """Method handlers for every RPC of ``service.descriptor``, with lenient request decoding."""
    handlers = {}
    for method in service.descriptor.methods:
        request_class = message_factory.GetMessageClass(method.input_type)
        response_class = message_factory.GetMessageClass(method.output_type)
        make = handler_kind(method.client_streaming, method.server_streaming).make
        handlers[method.name] = make(
            _guard(method, getattr(service.servicer, method.name)),
            request_deserializer=_lenient(request_class),
            response_serializer=response_class.SerializeToString,
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


class _StopLoading(BaseException):
    """Raised in the main thread by a stop signal that arrives while the models load."""


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
    ) -> None:
        tls = tls or ServerTLS()
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
            options=message_options(max_message_bytes),
            interceptors=list(interceptors),
        )
        self._router = _Router(self.services)
        self._server.add_generic_rpc_handlers([self._router])
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self._server)
        names = [s.full_name for s in self.services]
        reflection.enable_server_reflection(
            names + [health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, reflection.SERVICE_NAME],
            self._server,
        )
        if tls.enabled:
            self.port = self._server.add_secure_port(address, tls.credentials())
        else:
            self.port = self._server.add_insecure_port(address)
        if self.port == 0:
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
            threading.Thread(target=self.stop, args=(grace,), daemon=True).start()
            if loading.is_set():
                raise _StopLoading  # in the main thread, out of load()

        signal.signal(signal.SIGTERM, handle)
        signal.signal(signal.SIGINT, handle)
        self.start()
        if load is not None:
            loading.set()
            try:
                load()
                loading.clear()
            except _StopLoading:
                pass  # the stop thread is draining; on_stop below cleans up what load built
            except BaseException:
                loading.clear()
                self.stop(grace=0)
                raise
            loading.clear()
        while not self._stopped.wait(0.5):
            pass
        if on_stop is not None:
            on_stop()
