"""The ASGI app: backends, bearer-token auth, typed errors as HTTP statuses with the v2 error body."""

from __future__ import annotations

import collections
import hashlib
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import grpc
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException

from protos.errors import ResourceExhausted, Unavailable, WireError
from runtime.admission import ServingLimits
from runtime.security import TokenSet

from .. import __version__

if TYPE_CHECKING:
    from ..jobs import JobManager
    from ..openinference import OpenInference
    from ..sessions import SessionManager

log = logging.getLogger(__name__)

# gRPC status -> HTTP status, as grpc-gateway and Google's APIs map them (FAILED_PRECONDITION is a
# conflict with the resource's state here: 409, as "job is RUNNING, not SUCCEEDED").
HTTP_STATUS = {
    grpc.StatusCode.INVALID_ARGUMENT: 400,
    grpc.StatusCode.OUT_OF_RANGE: 400,
    grpc.StatusCode.UNAUTHENTICATED: 401,
    grpc.StatusCode.PERMISSION_DENIED: 403,
    grpc.StatusCode.NOT_FOUND: 404,
    grpc.StatusCode.FAILED_PRECONDITION: 409,
    grpc.StatusCode.ALREADY_EXISTS: 409,
    grpc.StatusCode.ABORTED: 409,
    grpc.StatusCode.RESOURCE_EXHAUSTED: 429,
    grpc.StatusCode.CANCELLED: 499,
    grpc.StatusCode.UNIMPLEMENTED: 501,
    grpc.StatusCode.UNAVAILABLE: 503,
    grpc.StatusCode.DEADLINE_EXCEEDED: 504,
}

#: Paths answered without a token: health (like gRPC health), the console's page (it holds no data
#: and asks for the token), and the API's description.
OPEN_PATHS = frozenset({"/", "/v2/health/live", "/v2/health/ready", "/docs", "/openapi.json", "/favicon.ico"})


class PayloadTooLarge(ResourceExhausted):
    """A request body over a limit, refused while it is read (HTTP 413)."""


@dataclass
class Backends:
    """What the routes call; None until the daemon's load thread has built it (then 503)."""

    inference: OpenInference | None = None
    jobs: JobManager | None = None
    sessions: SessionManager | None = None
    jobs_off: str = "the Compression service is off on this cloud (start cleave-cloud with --jobs-dir DIR)"

    def attach(self, servicer: Any) -> None:
        """Take the backend behind a gRPC servicer the daemon just built (one implementation, two faces)."""
        if hasattr(servicer, "backend"):  # KServeServicer
            self.inference = servicer.backend
        if hasattr(servicer, "manager"):  # CompressionServicer
            self.jobs = servicer.manager
        if hasattr(servicer, "sessions"):  # SplitInferenceServicer
            self.sessions = servicer.sessions

    def need_inference(self) -> OpenInference:
        if self.inference is None:
            raise Unavailable("the cloud is loading its models; retry when /v2/health/ready answers 200")
        return self.inference

    def need_jobs(self, enabled: bool) -> JobManager:
        if not enabled:
            raise Unimplemented(self.jobs_off)
        if self.jobs is None:
            raise Unavailable("the cloud is starting its job manager; retry in a moment")
        return self.jobs


class Unimplemented(WireError):
    code = grpc.StatusCode.UNIMPLEMENTED


def error_response(status: int, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
    """The KServe v2 error body: ``{"error": message}``."""
    return JSONResponse({"error": message}, status_code=status, headers=headers)


def status_of(exc: WireError) -> int:
    if isinstance(exc, PayloadTooLarge):
        return 413
    return HTTP_STATUS.get(exc.code, 500)


def client_of(request: Request) -> str:
    """Who is calling, for per-client quotas, exactly as the gRPC face names it (same token, same client)."""
    value = request.headers.get("authorization")
    if value:
        return "token:" + hashlib.sha256(value.encode()).hexdigest()[:16]
    host = request.client.host if request.client else ""
    return "peer:" + (f"ipv6:[{host}]" if ":" in host else f"ipv4:{host}")


class BearerAuth:
    """ASGI middleware: every path but :data:`OPEN_PATHS` needs ``Authorization: Bearer <token>``.

    A refused request gets 401 with ``WWW-Authenticate: Bearer`` and the v2 error body; its body is
    never read. Tokens are checked in constant time by :class:`runtime.security.TokenSet`.
    """

    def __init__(self, app: Callable[..., Awaitable[None]], tokens: TokenSet) -> None:
        self.app = app
        self.tokens = tokens

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http" or scope["path"] in OPEN_PATHS:
            await self.app(scope, receive, send)
            return
        token = None
        for key, value in scope.get("headers", ()):
            if key == b"authorization":
                scheme, _, rest = value.decode("latin-1").partition(" ")
                token = rest.strip() if scheme.lower() == "bearer" else ""
                break
        if token and self.tokens.accepts(token):
            await self.app(scope, receive, send)
            return
        reason = "invalid bearer token" if token else "missing 'Authorization: Bearer <token>' header"
        log.info("refused HTTP %s %s: %s", scope.get("method"), scope["path"], reason)
        response = error_response(401, reason, {"WWW-Authenticate": "Bearer"})
        await response(scope, receive, send)


class Admission:
    """ASGI middleware: the gRPC port's call limits (``limits:``) for HTTP requests.

    At most ``max_concurrent_rpcs`` requests in progress, of which at most ``max_streams`` long
    ones (server-sent events, uploads), ``max_streams_per_client`` per client; past a limit the
    request answers 429 naming it. Health passes always. The counters belong to the server's event
    loop thread (the only one that runs this), so they need no lock.
    """

    OPEN = frozenset({"/v2/health/live", "/v2/health/ready"})

    def __init__(self, app: Callable[..., Awaitable[None]], limits: ServingLimits) -> None:
        self.app = app
        self.limits = limits
        self.calls = 0
        self.streams: collections.Counter[str] = collections.Counter()

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http" or scope["path"] in self.OPEN:
            await self.app(scope, receive, send)
            return
        path = scope["path"]
        long = path.endswith("/events") or path == "/api/v1/uploads"
        who = _client_key(scope) if long else ""
        refusal = None
        if self.calls >= self.limits.max_concurrent_rpcs:
            refusal = f"calls: {self.calls} in progress (limits.max_concurrent_rpcs {self.limits.max_concurrent_rpcs})"
        elif long and sum(self.streams.values()) >= self.limits.max_streams:
            refusal = f"streams: {sum(self.streams.values())} open (limits.max_streams {self.limits.max_streams})"
        elif long and self.streams[who] >= self.limits.max_streams_per_client:
            refusal = (
                f"streams: this client has {self.streams[who]} open "
                f"(limits.max_streams_per_client {self.limits.max_streams_per_client})"
            )
        if refusal is not None:
            await error_response(429, refusal)(scope, receive, send)
            return
        self.calls += 1
        if long:
            self.streams[who] += 1
        try:
            await self.app(scope, receive, send)
        finally:
            self.calls -= 1
            if long:
                self.streams[who] -= 1
                if not self.streams[who]:
                    del self.streams[who]


def _client_key(scope: dict) -> str:
    for key, value in scope.get("headers", ()):
        if key == b"authorization":
            return "token:" + hashlib.sha256(value).hexdigest()[:16]
    client = scope.get("client")
    return "peer:" + (client[0] if client else "")


async def read_body(request: Request, limit: int, what: str) -> bytes:
    """The request body, refused with 413 as soon as it passes ``limit`` bytes (declared or received)."""
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > limit:
        raise PayloadTooLarge(f"request body: {declared} bytes exceed the limit of {limit} ({what})")
    parts = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise PayloadTooLarge(f"request body: more than the limit of {limit} bytes ({what})")
        parts.append(chunk)
    return b"".join(parts)


def build_app(
    backends: Backends,
    *,
    tokens: TokenSet | None = None,
    limits: ServingLimits | None = None,
    jobs_enabled: bool = False,
    title: str = "Cleave cloud",
) -> Any:
    """The cloud's ASGI app over ``backends``; with ``tokens``, every route but health needs one."""
    from . import console, jobs, v2

    app = FastAPI(
        title=title,
        version=__version__,
        description=(
            "The cloud daemon's HTTP face: the KServe v2 Open Inference Protocol (with Triton's binary "
            "tensor, model configuration, repository index and statistics extensions), the compression "
            'job API, and a web console at `/`. Errors answer `{"error": "..."}`.'
        ),
        redoc_url=None,
    )

    @app.exception_handler(WireError)
    async def wire_error(_request: Request, exc: WireError) -> JSONResponse:
        return error_response(status_of(exc), exc.message)

    @app.exception_handler(RequestValidationError)
    async def invalid(_request: Request, exc: RequestValidationError) -> JSONResponse:
        first = exc.errors()[0] if exc.errors() else {}
        where = ".".join(str(p) for p in first.get("loc", ()) if p not in ("query", "path", "body"))
        return error_response(400, f"{where or 'request'}: {first.get('msg', 'invalid')}")

    @app.exception_handler(HTTPException)
    async def http_error(_request: Request, exc: HTTPException) -> JSONResponse:
        return error_response(exc.status_code, str(exc.detail), getattr(exc, "headers", None))

    app.include_router(v2.router(backends))
    app.include_router(jobs.router(backends, jobs_enabled))
    app.include_router(console.router(backends, jobs_enabled))
    # The last added runs first: auth, then admission (a refused caller takes no slot).
    if limits is not None:
        app.add_middleware(Admission, limits=limits)
    if tokens is not None:
        app.add_middleware(BearerAuth, tokens=tokens)
    return app
