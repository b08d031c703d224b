"""The HTTP server: uvicorn in its own thread and event loop, started and stopped with the daemon."""

from __future__ import annotations

import errno
import logging
import socket
import ssl
import threading
from typing import TYPE_CHECKING, Any

from runtime.security import ServerTLS
from runtime.serving import is_loopback, port_in_use_error

from ..config import HttpConfig

if TYPE_CHECKING:
    from ..config import CloudConfig
    from .app import Backends

log = logging.getLogger(__name__)


class HttpServer:
    """A running uvicorn server for ``app`` (thread ``http``); :meth:`stop` drains and closes it.

    The socket is bound here, in the caller's thread, so a port clash fails at start with the
    daemon's usual message instead of inside the server thread.
    """

    def __init__(self, app: Any, host: str, port: int, tls: ServerTLS, graceful_s: float = 5.0) -> None:
        import uvicorn  # the http extra; imported only when the HTTP face is on

        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError as exc:
            sock.close()
            if exc.errno == errno.EADDRINUSE:
                raise port_in_use_error("http.listen", f"{host}:{port}") from exc
            raise OSError(f"http.listen {host}:{port}: cannot bind ({exc.strerror or exc})") from exc
        sock.listen(128)
        self._socket = sock
        self.host = host
        self.port = sock.getsockname()[1]
        self.tls = tls.enabled
        options: dict[str, Any] = {}
        if tls.enabled:
            options = {"ssl_certfile": tls.cert, "ssl_keyfile": tls.key}
            if tls.require_client_cert:
                options |= {"ssl_ca_certs": tls.ca, "ssl_cert_reqs": ssl.CERT_REQUIRED}
        config = uvicorn.Config(
            app,
            log_level="warning",
            lifespan="off",
            access_log=False,
            timeout_graceful_shutdown=graceful_s,
            **options,
        )
        self._server = uvicorn.Server(config)
        # Off the main thread uvicorn installs no signal handlers: the daemon's own handle SIGTERM.
        self._thread = threading.Thread(target=self._server.run, kwargs={"sockets": [sock]}, name="http", daemon=True)
        self._thread.start()
        for _ in range(200):
            if self._server.started or not self._thread.is_alive():
                break
            self._thread.join(0.05)
        if not self._server.started:
            self.stop()
            raise OSError(f"http.listen {host}:{port}: the HTTP server did not start (see the log)")
        log.info("HTTP on %s (KServe v2, jobs REST API, console at /)", self.url)

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{'https' if self.tls else 'http'}://{host}:{self.port}"

    def stop(self) -> None:
        """Refuse new connections, let requests in flight finish (then cancel them), join the thread."""
        self._server.should_exit = True
        self._thread.join(timeout=30)
        self._socket.close()


def serve_http(
    config: HttpConfig,
    app: Any,
    *,
    tls: ServerTLS,
    allow_insecure_public: bool = False,
) -> HttpServer | None:
    """Start the HTTP face at ``config.listen``; None when it is off."""
    address = config.address()
    if address is None:
        return None
    host, port = address
    if not is_loopback(f"{host}:{port}") and not tls.enabled and not allow_insecure_public:
        raise ValueError(
            f"http.listen {config.listen!r} is not loopback and TLS is not configured; configure tls: "
            "cert and key (or set allow_insecure_public: true to serve HTTP on it in plaintext anyway)"
        )
    return HttpServer(app, host, port, tls)


def start_http(config: CloudConfig) -> tuple[HttpServer, Backends] | None:
    """The daemon's HTTP face per ``config.http`` (None when off), over backends attached later.

    Started before the models load, like the gRPC port: until :meth:`Backends.attach` has seen the
    servicers, ``/v2/health/ready`` answers 503 and the other routes 503 with a message.
    """
    if not config.http.enabled:
        return None
    try:
        from .app import Backends, build_app
    except ImportError as exc:
        needs = "the HTTP face needs the http extra (pip install 'cleave[http]')"
        raise ValueError(f"http.listen: {needs}: {exc}") from exc
    backends = Backends()
    tokens = config.auth.load() if config.auth.enabled else None
    app = build_app(backends, tokens=tokens, limits=config.limits, jobs_enabled=bool(config.jobs.dir))
    server = serve_http(config.http, app, tls=config.tls, allow_insecure_public=config.allow_insecure_public)
    assert server is not None
    return server, backends
