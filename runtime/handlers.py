"""gRPC's four method-handler constructors, by which sides of a method stream.

Everything that builds or rebuilds a method handler (the service handlers, the auth refusal, the
metrics wrapper) picks the constructor here, so the four kinds are spelled out once.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import grpc


class HandlerKind(NamedTuple):
    attribute: str  # where an ``RpcMethodHandler`` keeps the behaviour of this kind ("unary_unary", ...)
    make: Callable[..., grpc.RpcMethodHandler]  # ``grpc.unary_unary_rpc_method_handler`` and siblings


_KINDS = {
    (False, False): HandlerKind("unary_unary", grpc.unary_unary_rpc_method_handler),
    (False, True): HandlerKind("unary_stream", grpc.unary_stream_rpc_method_handler),
    (True, False): HandlerKind("stream_unary", grpc.stream_unary_rpc_method_handler),
    (True, True): HandlerKind("stream_stream", grpc.stream_stream_rpc_method_handler),
}


def handler_kind(request_streaming: bool, response_streaming: bool) -> HandlerKind:
    """The kind of a method whose requests and/or responses stream."""
    return _KINDS[(bool(request_streaming), bool(response_streaming))]
