"""gRPC adapter for ``SplitInference``: each method delegates to the session logic."""

from __future__ import annotations

import math
import socket
import time
from collections.abc import Iterator

import grpc

from partitioner.profile import to_proto as profile_to_proto
from protos.cleave.v1 import split_inference_pb2 as si_pb2
from protos.cleave.v1 import split_inference_pb2_grpc as si_grpc
from protos.errors import InvalidArgument, ResourceExhausted, maps_errors
from runtime.admission import client_identity

from . import __version__
from .bundles import BundleStore
from .metrics import CloudMetrics
from .profiling import Profiler
from .sessions import SessionManager, cut_info
from .streams import serve_stream

MAX_PROBE_REPLY = 8 << 20  # downlink probes are bounded like everything else


MAX_PROFILE_ELEMENTS = 1 << 26  # a profile input of at most 256 MB of float32


def profile_shape(request: si_pb2.ProfileRequest, configured: tuple[int, ...]) -> tuple[int, ...] | None:
    """The input shape ``request`` asks a profile at (None: the model's own), checked against ``configured``."""
    if not request.input_shape:
        return None
    shape = tuple(request.input_shape)
    if len(shape) != len(configured) or 0 in shape:
        raise InvalidArgument(
            f"input_shape: {list(shape)} does not fit the model, whose inputs are shaped like {list(configured)}"
        )
    if math.prod(shape) > MAX_PROFILE_ELEMENTS:
        raise ResourceExhausted(f"input_shape: {list(shape)} is over {MAX_PROFILE_ELEMENTS} elements")
    return shape


class SplitInferenceServicer(si_grpc.SplitInferenceServicer):
    def __init__(
        self,
        sessions: SessionManager,
        chunk_bytes: int,
        metrics: CloudMetrics | None = None,
        bundles: BundleStore | None = None,
    ) -> None:
        self.sessions = sessions
        self.bundles = bundles if bundles is not None else BundleStore(None, {})
        self.metrics = metrics
        self.registry = sessions.registry
        self.chunk_bytes = chunk_bytes
        self.profiler = Profiler()

    def close(self) -> None:
        """After the drain: stop the batcher threads (queued requests run first) and the Ray backend's poller."""
        if self.sessions.batchers is not None:
            self.sessions.batchers.close()
        if self.sessions.remote is not None:
            self.sessions.remote.close()

    @maps_errors
    def GetInfo(self, request: si_pb2.GetInfoRequest, context: grpc.ServicerContext) -> si_pb2.GetInfoResponse:
        models = [self.registry.get(request.model)] if request.model else list(self.registry.models.values())
        reply = si_pb2.GetInfoResponse(
            models=[self.registry.info(m, request.include_cuts) for m in models],
            version=__version__,
            host=socket.gethostname(),
        )
        if request.include_pools:
            reply.backend, pools = self.sessions.pools()
            reply.pools.extend(p for p in pools if not request.model or p.model == request.model)
        return reply

    @maps_errors
    def Profile(self, request: si_pb2.ProfileRequest, context: grpc.ServicerContext) -> si_pb2.ProfileResponse:
        model = self.registry.get(request.model)
        limits = self.sessions.limits
        for name, cap in (
            ("repeats", limits.max_profile_repeats),
            ("warmup", limits.max_profile_warmup),
            ("batch", limits.max_profile_batch),
        ):
            value = getattr(request, name)
            if value > cap:
                raise InvalidArgument(f"{name}: {value} exceeds the limit of {cap} (limits.max_profile_{name})")
        shape = profile_shape(request, model.input_shape)
        try:
            profile = self.profiler.profile(
                model,
                batch=request.batch or None,
                repeats=request.repeats or min(10, limits.max_profile_repeats),
                warmup=request.warmup or min(3, limits.max_profile_warmup),
                refresh=request.refresh,
                input_shape=shape,
                time_left=context.time_remaining,
                active=context.is_active,
            )
        except RuntimeError as exc:
            if shape is None:
                raise
            first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            raise InvalidArgument(f"input_shape: {list(shape)}: the model does not run on it ({first})") from exc
        return profile_to_proto(profile)

    @maps_errors
    def OpenSession(
        self, request: si_pb2.OpenSessionRequest, context: grpc.ServicerContext
    ) -> si_pb2.OpenSessionResponse:
        session = self.sessions.open(request, owner=client_identity(context))
        return si_pb2.OpenSessionResponse(session_id=session.id, cut=cut_info(session.cut))

    @maps_errors
    def CloseSession(
        self, request: si_pb2.CloseSessionRequest, context: grpc.ServicerContext
    ) -> si_pb2.CloseSessionResponse:
        session = self.sessions.close(request.session_id)
        return si_pb2.CloseSessionResponse(requests=session.requests)

    @maps_errors
    def Infer(self, request_iterator: Iterator[si_pb2.InferFrame], context: grpc.ServicerContext):
        if self.metrics is None:
            yield from serve_stream(request_iterator, self.sessions, self.chunk_bytes)
            return
        # Bytes are counted as gRPC parses and serializes the messages (CloudMetrics.wire_bytes).
        yield from self.metrics.results(serve_stream(request_iterator, self.sessions, self.chunk_bytes))

    @maps_errors
    def GetBundle(self, request: si_pb2.GetBundleRequest, context: grpc.ServicerContext):
        if not request.model:
            raise InvalidArgument("model: required (the model whose edge bundle to send)")
        self.registry.get(request.model)  # NotFound naming the served models
        yield from self.bundles.chunks(request.model, self.chunk_bytes)

    @maps_errors
    def Probe(self, request_iterator: Iterator[si_pb2.ProbeMessage], context: grpc.ServicerContext):
        received = 0
        for message in request_iterator:
            received += len(message.data)
            now = time.time()
            if message.reply_bytes:
                if message.reply_bytes > MAX_PROBE_REPLY:
                    raise InvalidArgument(f"reply_bytes: at most {MAX_PROBE_REPLY}")
                yield si_pb2.ProbeMessage(seq=message.seq, data=bytes(message.reply_bytes), server_time=now)
            elif message.echo:
                yield si_pb2.ProbeMessage(seq=message.seq, data=message.data, echo=True, server_time=now)
            else:
                yield si_pb2.ProbeMessage(seq=message.seq, received_bytes=received, server_time=now)
