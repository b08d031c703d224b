"""Errors that carry a gRPC status, and the decorator that turns them into one.

Logic code raises :class:`WireError` subclasses (plain exceptions, testable without a server);
servicers wrap their methods with :func:`maps_errors` so that each becomes the matching status
with its message, and anything unexpected becomes INTERNAL without killing the server.
"""

from __future__ import annotations

import functools
import inspect
import logging
from collections.abc import Callable
from typing import Any, TypeVar

import grpc

log = logging.getLogger(__name__)


class WireError(Exception):
    """An error with a gRPC status code; the message should name what was wrong."""

    code: grpc.StatusCode = grpc.StatusCode.UNKNOWN

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class InvalidArgument(WireError):
    code = grpc.StatusCode.INVALID_ARGUMENT


class NotFound(WireError):
    code = grpc.StatusCode.NOT_FOUND


class FailedPrecondition(WireError):
    code = grpc.StatusCode.FAILED_PRECONDITION


class ResourceExhausted(WireError):
    code = grpc.StatusCode.RESOURCE_EXHAUSTED


class Unavailable(WireError):
    code = grpc.StatusCode.UNAVAILABLE


class DeadlineExceeded(WireError):
    code = grpc.StatusCode.DEADLINE_EXCEEDED


class PermissionDenied(WireError):
    code = grpc.StatusCode.PERMISSION_DENIED


_BY_CODE = {cls.code: cls for cls in WireError.__subclasses__()}


def from_rpc_error(err: grpc.RpcError) -> WireError:
    """Map a client-side ``grpc.RpcError`` back to the matching :class:`WireError`."""
    code = err.code() if hasattr(err, "code") else grpc.StatusCode.UNKNOWN
    details = err.details() if hasattr(err, "details") else str(err)
    cls = _BY_CODE.get(code, WireError)
    exc = cls(details or code.name)
    exc.code = code
    return exc


def enum_name(enum: Any, value: int, field: str) -> str:
    """The name of ``value`` in the protobuf ``enum``; InvalidArgument naming ``field`` when it has none.

    proto3 enums are open: a peer may send any int32, and ``Enum.Name`` raises ValueError on unknown
    values, which would otherwise surface as INTERNAL.
    """
    try:
        return enum.Name(value)
    except ValueError:
        known = ", ".join(enum.keys())
        raise InvalidArgument(f"{field}: {value} is not a known value ({known})") from None


def status_of(exc: BaseException) -> tuple[grpc.StatusCode, str]:
    """The status a servicer answers for ``exc``."""
    if isinstance(exc, WireError):
        return exc.code, exc.message
    return grpc.StatusCode.INTERNAL, f"internal error: {type(exc).__name__}: {exc}"


F = TypeVar("F", bound=Callable[..., Any])


def maps_errors(method: F) -> F:
    """Wrap a servicer method (unary or streaming) so errors become statuses, not crashes.

    Servicers raise :class:`WireError` rather than calling ``context.abort`` themselves: the abort
    happens here, outside the ``try``, so it is never mistaken for a failure of the method.
    """

    def fail(context: grpc.ServicerContext, exc: BaseException) -> None:
        if isinstance(exc, grpc.RpcError) and not context.is_active():
            # The client cancelled or its deadline passed while we read its stream: nobody to answer.
            # Abort all the same (quietly): a unary method returning None would make grpc log
            # "Exception serializing message!" with a traceback.
            log.debug("%s: the client went away (%s)", method.__qualname__, exc)
            context.abort(grpc.StatusCode.CANCELLED, "the client went away")
        code, message = status_of(exc)
        if code == grpc.StatusCode.INTERNAL:
            log.error("%s failed", method.__qualname__, exc_info=exc)
        context.abort(code, message)

    if inspect.isgeneratorfunction(method):

        @functools.wraps(method)
        def stream(self: Any, request: Any, context: grpc.ServicerContext) -> Any:
            try:
                yield from method(self, request, context)
            except Exception as exc:  # noqa: BLE001 - every failure must reach the client as a status
                error = exc
            else:
                return
            fail(context, error)

        return stream  # type: ignore[return-value]

    @functools.wraps(method)
    def unary(self: Any, request: Any, context: grpc.ServicerContext) -> Any:
        try:
            return method(self, request, context)
        except Exception as exc:  # noqa: BLE001
            error = exc
        fail(context, error)

    return unary  # type: ignore[return-value]
