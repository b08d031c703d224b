"""One ``Infer`` stream: reassemble each request's feature frames, run it, frame the result.

Requests are independent: a bad request gets an :class:`InferResult` carrying its error, and the
stream goes on serving the others. Frames of different requests may interleave.

Nothing untrusted is held without a bound: the session is looked up on a request's first frame,
each feature's header is checked against the session's cut (count, dtype, shape, batch) as it
arrives, before its payload is accepted, and the bytes a header announces are taken from three
budgets (the request's, the stream's and the daemon's) before they are received; past any of
them the request answers RESOURCE_EXHAUSTED.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Iterator

import grpc

from compressor import Assembler, BudgetExceeded, ByteBudget, CodecError
from compressor.framing import CHUNK_DATA_FIELD, WALK_FROM, PayloadsApart, add_chunks, parse_apart, to_pieces
from protos.cleave.v1 import split_inference_pb2 as si_pb2
from protos.errors import InvalidArgument, ResourceExhausted, WireError, status_of

from .sessions import Session, SessionManager

log = logging.getLogger(__name__)


_CHUNKS_FIELD = si_pb2.InferFrame.DESCRIPTOR.fields_by_name["chunks"].number


def parse_infer_frame(data: bytes, walk_from: int = WALK_FROM) -> si_pb2.InferFrame | PayloadsApart:
    """A feature frame, its chunks' data read in place (:func:`~compressor.framing.parse_apart`): protobuf's
    parse copied the features, reading each chunk's ``data`` copied them again, and the assembled tensor's
    payload once more (with the caches cold after the previous request's tail).

    A frame whose chunks' data is under half its bytes is parsed whole: the views keep the whole frame
    alive while its request is pending, and the request's budget counts only its data (a frame padded with
    an unknown field, or with a chunk's data sent twice, would hold up to limits.max_message_bytes per
    pending request against a budget charged a few bytes); protobuf's parse is dropped after the chunks'
    data is copied out, and that data is small."""
    return parse_apart(si_pb2.InferFrame, data, _CHUNKS_FIELD, CHUNK_DATA_FIELD, walk_from, min_payload_share=0.5)


PARSERS = {"Infer": parse_infer_frame}
"""What ``Service(..., parsers=...)`` takes for ``SplitInference``."""


class _Pending:
    __slots__ = ("assembler", "session")

    def __init__(self, session: Session, max_bytes: int, budget: ByteBudget) -> None:
        self.session = session
        self.assembler = Assembler(
            max_bytes=max_bytes,
            max_tensors=len(session.cut.live),
            budget=budget,
            check_header=session.check_header,
        )


def serve_stream(
    frames: Iterable[si_pb2.InferFrame | PayloadsApart], sessions: SessionManager, chunk_bytes: int
) -> Iterator[si_pb2.InferResult]:
    """Turn a stream of feature frames (or their ``PayloadsApart``) into a stream of results, one request at a time."""
    limits = sessions.limits
    budget = ByteBudget(limits.max_stream_bytes, "limits.max_stream_bytes", parent=sessions.buffered)
    pending: dict[int, _Pending] = {}
    failed: set[int] = set()  # requests already answered with an error; ignore their later frames
    try:
        for item in frames:
            frame, datas = (item.message, item.payloads) if isinstance(item, PayloadsApart) else (item, None)
            rid = frame.request_id
            if not rid and not frame.session_id and not frame.chunks and not frame.last:
                continue  # a heartbeat from an idle client (it keeps limits.stream_idle_s from ending the stream)
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
                    session = sessions.get(frame.session_id)
                    entry = pending[rid] = _Pending(session, limits.max_request_bytes, budget)
                try:
                    entry.assembler.add(frame.chunks, datas)
                except CodecError as exc:
                    raise InvalidArgument(f"chunks: {exc}") from exc
                except BudgetExceeded as exc:
                    raise ResourceExhausted(f"request_id {rid}: {exc}") from exc
                if not frame.last:
                    continue
                del pending[rid]
                try:
                    features, payloads = entry.assembler.finish_apart()
                except CodecError as exc:
                    raise InvalidArgument(f"chunks: {exc}") from exc
                outputs, timing = entry.session.run(features, payloads)
            except Exception as exc:  # noqa: BLE001 - one request's failure must not end the stream
                if not isinstance(exc, WireError):
                    log.error("request %d failed", rid, exc_info=exc)
                dropped = pending.pop(rid, None)
                if dropped is not None:
                    dropped.assembler.discard()
                if not frame.last:
                    failed.add(rid)
                yield _error(rid, exc)
                continue
            groups = list(to_pieces(outputs, chunk_bytes)) or [[]]
            for i, group in enumerate(groups):
                last = i == len(groups) - 1
                result = si_pb2.InferResult(request_id=rid, last=last, timing=timing if last else None)
                add_chunks(result.chunks, group)  # built in the result: the outputs' bytes are copied once
                yield result
    finally:
        # The stream ended (or was cancelled) with requests half received: give their bytes back.
        for entry in pending.values():
            entry.assembler.discard()


def _error(request_id: int, exc: BaseException) -> si_pb2.InferResult:
    code, message = status_of(exc)
    value = code.value[0] if isinstance(code, grpc.StatusCode) else int(code)
    return si_pb2.InferResult(request_id=request_id, last=True, error=si_pb2.RequestError(code=value, message=message))
