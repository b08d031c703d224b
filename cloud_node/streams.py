"""One ``Infer`` stream: reassemble each request's feature frames, run it, frame the result.

Requests are independent: a bad request gets an :class:`InferResult` carrying its error, and the
stream goes on serving the others. Frames of different requests may interleave.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Iterator

import grpc

from compressor import Assembler, CodecError, to_chunks
from protos.cleave.v1 import split_inference_pb2 as si_pb2
from protos.errors import InvalidArgument, ResourceExhausted, WireError, status_of

from .sessions import SessionManager

log = logging.getLogger(__name__)


class _Pending:
    __slots__ = ("assembler", "session_id")

    def __init__(self, session_id: str, max_bytes: int) -> None:
        self.session_id = session_id
        self.assembler = Assembler(max_bytes=max_bytes)


def serve_stream(
    frames: Iterable[si_pb2.InferFrame], sessions: SessionManager, chunk_bytes: int
) -> Iterator[si_pb2.InferResult]:
    """Turn a stream of feature frames into a stream of results, one request at a time."""
    limits = sessions.limits
    pending: dict[int, _Pending] = {}
    failed: set[int] = set()  # requests already answered with an error; ignore their later frames
    for frame in frames:
        rid = frame.request_id
        if rid in failed:
            if frame.last:
                failed.discard(rid)
            continue
        try:
            entry = pending.get(rid)
            if entry is None:
                if not frame.session_id:
                    raise InvalidArgument("session_id: required on the first frame of a request")
                if len(pending) >= limits.max_pending_requests:
                    raise ResourceExhausted(
                        f"request_id {rid}: more than {limits.max_pending_requests} requests in assembly"
                    )
                entry = pending[rid] = _Pending(frame.session_id, limits.max_request_bytes)
            try:
                entry.assembler.add(frame.chunks)
            except CodecError as exc:
                raise InvalidArgument(f"chunks: {exc}") from exc
            if not frame.last:
                continue
            del pending[rid]
            try:
                features = entry.assembler.finish()
            except CodecError as exc:
                raise InvalidArgument(f"chunks: {exc}") from exc
            session = sessions.get(entry.session_id)
            outputs, timing = session.run(features)
        except Exception as exc:  # noqa: BLE001 - one request's failure must not end the stream
            if not isinstance(exc, WireError):
                log.error("request %d failed", rid, exc_info=exc)
            pending.pop(rid, None)
            if not frame.last:
                failed.add(rid)
            yield _error(rid, exc)
            continue
        groups = list(to_chunks(outputs, chunk_bytes)) or [[]]
        for i, group in enumerate(groups):
            last = i == len(groups) - 1
            yield si_pb2.InferResult(request_id=rid, chunks=group, last=last, timing=timing if last else None)


def _error(request_id: int, exc: BaseException) -> si_pb2.InferResult:
    code, message = status_of(exc)
    value = code.value[0] if isinstance(code, grpc.StatusCode) else int(code)
    return si_pb2.InferResult(request_id=request_id, last=True, error=si_pb2.RequestError(code=value, message=message))
