"""``cleave wait``: block until a daemon's gRPC health reports SERVING.

A daemon binds its port at once and reports NOT_SERVING while it loads its models; a script that
starts one in the background runs ``cleave wait`` before its first call instead of sleeping.
"""

from __future__ import annotations

import time

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from cleave_cli.errors import not_grpc, speaks_no_grpc
from runtime.security import ClientTLS
from runtime.serving import open_channel

POLL_S = 0.1


class NotServing(TimeoutError):
    """The daemon did not report SERVING in time; the message says what it did report."""


def wait_serving(
    target: str, timeout: float, *, tls: ClientTLS | None = None, token: str | None = None, service: str = ""
) -> float:
    """Poll ``target``'s health until SERVING; returns the seconds waited. Raises :class:`NotServing`.

    ``service`` (a full gRPC service name): wait for that service, and fail at once on a daemon that
    does not host it; "" waits for the daemon as a whole."""
    with open_channel(target, tls=tls, token=token) as channel:
        return wait_channel_serving(channel, timeout, target, service)


def wait_channel_serving(channel: grpc.Channel, timeout: float, target: str, service: str = "") -> float:
    """:func:`wait_serving` over an open ``channel`` (``target`` names it in the error)."""
    start = time.monotonic()
    deadline = start + timeout
    last = "no answer yet"
    stub = health_pb2_grpc.HealthStub(channel)
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            break
        try:
            reply = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=min(max(left, 0.05), 2.0))
            if reply.status == health_pb2.HealthCheckResponse.SERVING:
                return time.monotonic() - start
            last = f"health {health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)} (still loading)"
        except grpc.RpcError as exc:
            last = f"{exc.code().name}: {exc.details()}"
            if exc.code() in (grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED):
                break  # waiting will not change the answer
            if speaks_no_grpc(exc.details() or ""):  # nor will it make a web server speak gRPC
                raise NotServing(not_grpc(target)) from None
            if exc.code() == grpc.StatusCode.NOT_FOUND and service:
                # A daemon reports every service it hosts from the moment it listens, loading or not.
                raise NotServing(
                    f"{target} does not serve {service}: is it the right daemon (cloud or edge)?"
                ) from None
        time.sleep(min(POLL_S, max(deadline - time.monotonic(), 0)))
    raise NotServing(f"{target} not SERVING after {timeout:g} s; last answer: {last}")
