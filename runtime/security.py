"""TLS, mutual TLS and bearer tokens: settings in, gRPC credentials and an auth interceptor out.

Servers read :class:`ServerTLS` (certificate, key, and the CA that client certificates must chain to
for mutual TLS) and :class:`ServerAuth` (accepted bearer tokens, inline, from a file or from an
environment variable). Clients read :class:`ClientTLS` and :class:`ClientAuth`. All four map from the
``tls:`` / ``auth:`` sections of the daemons' YAML; relative paths are resolved against the YAML's
folder with ``resolved(base)``.

Tokens are secrets: they never appear in a repr, a log line or an error message, and they are
compared as SHA-256 digests with :func:`hmac.compare_digest`, so neither their content nor their
length shows in the time a check takes.
"""

from __future__ import annotations

import collections
import dataclasses
import hashlib
import hmac
import logging
import os
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc

from .handlers import handler_kind
from .settings import Settings

log = logging.getLogger(__name__)

# Health stays open: load balancers and orchestrators probe it without credentials, and it reveals
# nothing but SERVING / NOT_SERVING. Every other method (Cleave, KServe, reflection) needs a token.
OPEN_METHOD_PREFIXES: tuple[str, ...] = ("/grpc.health.v1.Health/",)


def _read(path: str, what: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as exc:
        raise ValueError(f"{what}: cannot read {path}: {exc.strerror}") from exc


def _resolve(path: str, base: Path) -> str:
    if not path:
        return path
    p = Path(path).expanduser()
    return str(p if p.is_absolute() else base / p)


def _resolved(settings: Any, base: str | os.PathLike, names: Iterable[str]) -> Any:
    return dataclasses.replace(settings, **{n: _resolve(getattr(settings, n), Path(base)) for n in names})


@dataclass(frozen=True)
class ServerTLS(Settings):
    """A server's TLS: on when ``cert`` is set; mutual TLS with ``require_client_cert``.

    Attributes:
        cert: PEM certificate chain the server presents.
        key: PEM private key of ``cert``.
        ca: PEM CA bundle client certificates are verified against (mutual TLS only).
        require_client_cert: mutual TLS: refuse clients that present no certificate signed by ``ca``.
    """

    cert: str = ""
    key: str = ""
    ca: str = ""
    require_client_cert: bool = False

    def validate(self) -> None:
        if bool(self.cert) != bool(self.key):
            raise ValueError("cert and key go together (give both or neither)")
        if self.require_client_cert and not self.ca:
            raise ValueError("require_client_cert needs ca (the CA client certificates must chain to)")
        if self.ca and not self.require_client_cert:
            # gRPC does not even request a client certificate unless it is required: a lone ca would be ignored.
            raise ValueError("ca verifies client certificates: set require_client_cert: true with it")
        if self.require_client_cert and not self.cert:
            raise ValueError("require_client_cert needs cert and key: mutual TLS is TLS first")

    @property
    def enabled(self) -> bool:
        return bool(self.cert)

    @property
    def mode(self) -> str:
        """How peers are checked, for logs: "plaintext", "TLS" or "mutual TLS"."""
        if not self.enabled:
            return "plaintext"
        return "mutual TLS" if self.require_client_cert else "TLS"

    def resolved(self, base: str | os.PathLike) -> ServerTLS:
        """This setting with relative paths taken relative to ``base`` (the config file's folder)."""
        return _resolved(self, base, ("cert", "key", "ca"))

    def credentials(self) -> grpc.ServerCredentials:
        """Read the files now (a missing file fails at start, naming it)."""
        pair = (_read(self.key, "tls.key"), _read(self.cert, "tls.cert"))
        roots = _read(self.ca, "tls.ca") if self.ca else None
        return grpc.ssl_server_credentials(
            [pair], root_certificates=roots, require_client_auth=self.require_client_cert
        )


@dataclass(frozen=True)
class ClientTLS(Settings):
    """A client's TLS: on when ``enabled`` or any file is set.

    Attributes:
        enabled: use TLS even when no file below is set (the server's certificate is then checked
            against the system's roots).
        ca: PEM CA bundle the server's certificate must chain to.
        cert, key: the client's own certificate and key, for servers that require mutual TLS.
        server_name: the name expected in the server's certificate when it differs from the host
            in the target address (an IP, or a name behind a tunnel).
    """

    enabled: bool = False
    ca: str = ""
    cert: str = ""
    key: str = ""
    server_name: str = ""

    def validate(self) -> None:
        if bool(self.cert) != bool(self.key):
            raise ValueError("cert and key go together (give both or neither)")

    @property
    def active(self) -> bool:
        return self.enabled or bool(self.ca or self.cert or self.server_name)

    def resolved(self, base: str | os.PathLike) -> ClientTLS:
        return _resolved(self, base, ("ca", "cert", "key"))

    def credentials(self) -> grpc.ChannelCredentials:
        return grpc.ssl_channel_credentials(
            root_certificates=_read(self.ca, "tls.ca") if self.ca else None,
            private_key=_read(self.key, "tls.key") if self.key else None,
            certificate_chain=_read(self.cert, "tls.cert") if self.cert else None,
        )

    def options(self) -> list[tuple[str, Any]]:
        return [("grpc.ssl_target_name_override", self.server_name)] if self.server_name else []


class TokenSet:
    """Accepted bearer tokens, kept as digests and checked in constant time."""

    def __init__(self, tokens: Iterable[str]) -> None:
        self._digests = [_digest(t) for t in tokens]
        if not self._digests:
            raise ValueError("auth: no tokens (give tokens, tokens_file or tokens_env)")

    def __len__(self) -> int:
        return len(self._digests)

    def __repr__(self) -> str:
        return f"TokenSet({len(self)} tokens)"

    def accepts(self, token: str) -> bool:
        digest = _digest(token)
        ok = False
        for known in self._digests:  # every digest is compared: the time does not depend on which matched
            ok |= hmac.compare_digest(digest, known)
        return ok


def _digest(token: str) -> bytes:
    return hashlib.sha256(token.encode()).digest()


def _token_lines(text: str) -> list[str]:
    lines = (line.strip() for line in text.splitlines())
    return [line for line in lines if line and not line.startswith("#")]


@dataclass(frozen=True)
class ServerAuth(Settings):
    """Bearer tokens a server accepts; on when any source is set. Tokens of all sources add up.

    Attributes:
        tokens: inline tokens (prefer a file or an environment variable: configs get copied around).
        tokens_file: a file with one token per line; blank lines and ``#`` comments are skipped.
        tokens_env: the name of an environment variable holding tokens, comma- or newline-separated.
    """

    tokens: list[str] = field(default_factory=list, repr=False)
    tokens_file: str = ""
    tokens_env: str = ""

    @property
    def enabled(self) -> bool:
        return bool(self.tokens or self.tokens_file or self.tokens_env)

    def resolved(self, base: str | os.PathLike) -> ServerAuth:
        return _resolved(self, base, ("tokens_file",))

    def load(self) -> TokenSet:
        """The accepted tokens; fails naming the source (never a token) when one is unusable."""
        found = [t.strip() for t in self.tokens if t.strip()]
        if self.tokens_file:
            found += _token_lines(_read(self.tokens_file, "auth.tokens_file").decode())
        if self.tokens_env:
            value = os.environ.get(self.tokens_env)
            if value is None:
                raise ValueError(f"auth.tokens_env: environment variable {self.tokens_env} is not set")
            found += _token_lines(value.replace(",", "\n"))
        return TokenSet(found)


@dataclass(frozen=True)
class ClientAuth(Settings):
    """The bearer token a client sends; the first source set wins: ``token``, ``token_file``, ``token_env``."""

    token: str = field(default="", repr=False)
    token_file: str = ""
    token_env: str = ""

    def resolved(self, base: str | os.PathLike) -> ClientAuth:
        return _resolved(self, base, ("token_file",))

    def load(self) -> str | None:
        """The token, or None when no source is set."""
        if self.token:
            return self.token.strip()
        if self.token_file:
            lines = _token_lines(_read(self.token_file, "token_file").decode())
            if not lines:
                raise ValueError(f"token_file: {self.token_file} holds no token")
            return lines[0]
        if self.token_env:
            value = os.environ.get(self.token_env, "").strip()
            if not value:
                raise ValueError(f"token_env: environment variable {self.token_env} is not set")
            return value
        return None


# -- server side -------------------------------------------------------------------------------------


def _bearer(metadata: Sequence[tuple[str, Any]] | None) -> str | None:
    for key, value in metadata or ():
        if key == "authorization":
            scheme, _, token = (value.decode() if isinstance(value, bytes) else value).partition(" ")
            return token.strip() if scheme.lower() == "bearer" else None
    return None


def _refusal(handler: grpc.RpcMethodHandler, message: str) -> grpc.RpcMethodHandler:
    """A handler of the same kind as ``handler`` that answers UNAUTHENTICATED without reading the request."""

    def refuse(_request: Any, context: grpc.ServicerContext) -> Any:
        context.abort(grpc.StatusCode.UNAUTHENTICATED, message)

    make = handler_kind(handler.request_streaming, handler.response_streaming).make
    return make(refuse)  # no deserializer: the refused request's bytes are never parsed


class BearerAuthInterceptor(grpc.ServerInterceptor):
    """Refuses every call without ``authorization: Bearer <token>`` for an accepted token, with UNAUTHENTICATED.

    Methods under :data:`OPEN_METHOD_PREFIXES` (health) pass. Put it first among a server's
    interceptors, so that no later one (metrics, logging) does work for a refused caller.
    """

    def __init__(self, tokens: TokenSet, open_prefixes: Sequence[str] = OPEN_METHOD_PREFIXES) -> None:
        self.tokens = tokens
        self.open_prefixes = tuple(open_prefixes)

    def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], grpc.RpcMethodHandler | None],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler | None:
        handler = continuation(handler_call_details)
        method = handler_call_details.method
        if handler is None or method.startswith(self.open_prefixes):
            return handler
        token = _bearer(handler_call_details.invocation_metadata)
        if token and self.tokens.accepts(token):
            return handler
        reason = "invalid bearer token" if token else "missing 'authorization: Bearer <token>' metadata"
        log.info("refused %s: %s", method, reason)
        return _refusal(handler, reason)


# -- client side -------------------------------------------------------------------------------------


class _CallDetails(
    collections.namedtuple(
        "_CallDetails", ("method", "timeout", "metadata", "credentials", "wait_for_ready", "compression")
    ),
    grpc.ClientCallDetails,
):
    pass


class BearerTokenInterceptor(
    grpc.UnaryUnaryClientInterceptor,
    grpc.UnaryStreamClientInterceptor,
    grpc.StreamUnaryClientInterceptor,
    grpc.StreamStreamClientInterceptor,
):
    """Adds ``authorization: Bearer <token>`` to every call of a plaintext channel.

    gRPC's own token credentials (``access_token_call_credentials``) refuse to travel on an insecure
    channel. Composing them with ``local_channel_credentials`` works too, but only for loopback
    targets; this interceptor sends the token to any plaintext daemon (a loopback one, or one bound
    with ``allow_insecure_public``), and is what a plaintext channel with a token uses.
    """

    def __init__(self, token: str) -> None:
        self._header = ("authorization", f"Bearer {token}")

    def __repr__(self) -> str:
        return "BearerTokenInterceptor(<token>)"

    def _details(self, details: grpc.ClientCallDetails) -> _CallDetails:
        metadata = [m for m in (details.metadata or ()) if m[0] != "authorization"] + [self._header]
        return _CallDetails(
            details.method,
            details.timeout,
            metadata,
            details.credentials,
            getattr(details, "wait_for_ready", None),
            getattr(details, "compression", None),
        )

    def intercept_unary_unary(self, continuation, client_call_details, request):  # noqa: ANN001, ANN201
        return continuation(self._details(client_call_details), request)

    def intercept_unary_stream(self, continuation, client_call_details, request):  # noqa: ANN001, ANN201
        return continuation(self._details(client_call_details), request)

    def intercept_stream_unary(self, continuation, client_call_details, request_iterator):  # noqa: ANN001, ANN201
        return continuation(self._details(client_call_details), request_iterator)

    def intercept_stream_stream(self, continuation, client_call_details, request_iterator):  # noqa: ANN001, ANN201
        return continuation(self._details(client_call_details), request_iterator)


def secure_channel(
    target: str, options: list[tuple[str, Any]], tls: ClientTLS | None, token: str | None
) -> grpc.Channel:
    """A channel to ``target``: TLS when ``tls`` is active, with ``token`` sent on every call when given.

    Over TLS the token rides as gRPC call credentials composed with the channel's; without TLS (a
    loopback daemon) it is added by :class:`BearerTokenInterceptor`.
    """
    if tls is not None and tls.active:
        credentials = tls.credentials()
        if token:
            credentials = grpc.composite_channel_credentials(credentials, grpc.access_token_call_credentials(token))
        return grpc.secure_channel(target, credentials, options=options + tls.options())
    channel = grpc.insecure_channel(target, options=options)
    if token:
        channel = grpc.intercept_channel(channel, BearerTokenInterceptor(token))
    return channel
