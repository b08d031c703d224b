"""Streaming a sequence of wire tensors as ``TensorChunk`` groups, and putting it back together.

A sender calls :func:`to_chunks` and puts each yielded group in one frame (``InferFrame.chunks``),
so no frame depends on gRPC's 4 MiB default message limit however large the tensors are. The
receiver feeds every frame's chunks to one :class:`Assembler` and calls ``finish()`` after the
last frame. The assembler holds at most ``max_bytes`` of untrusted input, and checks the limit
as data arrives rather than at the end; a :class:`ByteBudget` shared by several assemblers bounds
what they hold together (a stream's requests, a daemon's streams).
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

from google.protobuf.message import DecodeError

from compressor.errors import CodecError
from protos.cleave.v1 import tensor_pb2

# The fields a header keeps (every one but the payload) and, of those, the ones with presence: copied
# only when set. Read from the descriptor once, so a field added to Tensor is carried without edits here.
_HEADER_FIELDS = tuple(f.name for f in tensor_pb2.Tensor.DESCRIPTOR.fields if f.name != "payload")
_PRESENCE = frozenset(
    f.name for f in tensor_pb2.Tensor.DESCRIPTOR.fields if f.has_presence and f.name in _HEADER_FIELDS
)


# Under this many payload bytes, header_of copies the whole tensor and clears its payload: two calls
# into protobuf cost less than listing the fields in Python, most of all with the caches cold after a
# model's compute (a 4 KB result: 29 us against 67; 50 KB of int8 codes: 38 against 74; at 180 KB about even).
_COPY_UNDER = 128 << 10


def header_of(tensor: tensor_pb2.Tensor) -> tensor_pb2.Tensor:
    """A copy of ``tensor`` without its payload (a large payload's bytes are not copied)."""
    if tensor.payload_size < _COPY_UNDER:
        header = tensor_pb2.Tensor()
        header.CopyFrom(tensor)
        header.ClearField("payload")
        return header
    # One constructor call: ListFields() would also copy the payload out, only to drop it.
    return tensor_pb2.Tensor(
        **{name: getattr(tensor, name) for name in _HEADER_FIELDS if name not in _PRESENCE or tensor.HasField(name)}
    )


Piece = tuple[int, tensor_pb2.Tensor | None, bytes]
"""One chunk before it is a message: the tensor's index, its header (first chunk only, else None), the data."""


def to_chunks(
    tensors: Sequence[tensor_pb2.Tensor], max_chunk_bytes: int = 1 << 20
) -> Iterator[list[tensor_pb2.TensorChunk]]:
    """Split ``tensors`` into groups of chunks of at most ``max_chunk_bytes`` each.

    A group's size counts its payload slices and its headers' serialized sizes, so a frame made
    of one group is ``max_chunk_bytes`` plus a few bytes of framing per chunk. Each tensor's first
    chunk carries its header (the tensor without its payload); small tensors share a group, large
    ones span several. A sender that puts each group in a frame builds the chunks in the frame
    instead (:func:`to_pieces` and :func:`add_chunks`): a chunk put into a frame is copied, data included.

    Raises:
        CodecError: a tensor's ``payload_size`` disagrees with its payload, or a header alone is
            larger than ``max_chunk_bytes``.
    """
    for group in to_pieces(tensors, max_chunk_bytes):
        chunks = []
        for index, header, data in group:
            chunk = tensor_pb2.TensorChunk(index=index, data=data)
            if header is not None:
                chunk.header.CopyFrom(header)
            chunks.append(chunk)
        yield chunks


def add_chunks(chunks: Any, group: list[Piece]) -> None:
    """Build one group of :func:`to_pieces` in a frame's repeated ``chunks`` field, copying the data once."""
    for index, header, data in group:
        chunk = chunks.add(index=index, data=data)
        if header is not None:
            chunk.header.CopyFrom(header)


def chunks_wire(field_number: int, group: list[Piece]) -> list[bytes]:
    """The serialized form of :func:`add_chunks`' chunks as field ``field_number`` of a message, in
    pieces for ``b"".join``: each chunk's data is referenced, so the join copies it once (building the
    chunks in a message and serializing it copies it twice). Measured per frame, interleaved, with
    one tensor of int4 / int8 / fp32 codes: 26 KB 13.5 us against 13.1, 67 KB 15.5 against 17.5,
    293 KB 30.4 against 46.3.

    Protobuf writes a message's fields in field-number order, and a message's serialization followed
    by more fields parses as one message. So ``InferFrame(session_id=s, request_id=r)``'s bytes,
    then these pieces for ``chunks`` (field 3), then ``InferFrame(last=True)``'s bytes are exactly what
    ``SerializeToString()`` of the whole frame gives (``tests/test_framing.py`` checks this).
    """
    tag = field_key(field_number)
    pieces = []
    for index, header, data in group:
        # A TensorChunk's fields in number order (index, header, data), each left out when unset or empty.
        head = _INDEX_KEY + varint(index) if index else b""
        if header is not None:
            header_bytes = header.SerializeToString()
            head += _HEADER_KEY + varint(len(header_bytes)) + header_bytes
        data_key = _DATA_KEY + varint(len(data)) if data else b""
        pieces += (tag + varint(len(head) + len(data_key) + len(data)), head, data_key, data)
    return pieces


def varint(value: int) -> bytes:
    """``value`` (>= 0) as a protobuf base-128 varint."""
    out = bytearray()
    while value > 0x7F:
        out.append(value & 0x7F | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def field_key(field_number: int, wire_type: int = 2) -> bytes:
    """A field's key: its number and wire type (2: length-delimited; 0: varint)."""
    return varint(field_number << 3 | wire_type)


_CHUNK_FIELDS = tensor_pb2.TensorChunk.DESCRIPTOR.fields_by_name
if [f.name for f in sorted(_CHUNK_FIELDS.values(), key=lambda f: f.number)] != ["index", "header", "data"]:
    raise RuntimeError("TensorChunk's fields changed: chunks_wire writes index, header and data only, in that order")
_INDEX_KEY = field_key(_CHUNK_FIELDS["index"].number, 0)
_HEADER_KEY = field_key(_CHUNK_FIELDS["header"].number)
_DATA_KEY = field_key(_CHUNK_FIELDS["data"].number)


def to_pieces(
    tensors: Sequence[tensor_pb2.Tensor], max_chunk_bytes: int = 1 << 20, payloads: Sequence[bytes] | None = None
) -> Iterator[list[Piece]]:
    """:func:`to_chunks`' groups, as (index, header or None, data) tuples; the same checks and errors.

    ``payloads``: the tensors' payloads, when they are apart (``compressor.encode_apart``): each
    tensor, its ``payload`` empty, is then its own header.
    """
    if max_chunk_bytes < 1:
        raise ValueError(f"max_chunk_bytes: {max_chunk_bytes} is not positive")
    group: list[Piece] = []
    used = 0
    for index, tensor in enumerate(tensors):
        payload = tensor.payload if payloads is None else payloads[index]
        if tensor.payload_size != len(payload):
            raise CodecError(
                f"tensors[{index}].payload_size: {tensor.payload_size}, but the payload has {len(payload)} bytes"
            )
        if payloads is None:
            header = header_of(tensor)
        elif tensor.payload:
            raise CodecError(f"tensors[{index}].payload: set, but its payload was given apart")
        else:
            header = tensor
        header_bytes = header.ByteSize()
        if header_bytes > max_chunk_bytes:
            raise CodecError(
                f"tensors[{index}]: header is {header_bytes} bytes, over max_chunk_bytes {max_chunk_bytes}"
            )
        offset = 0
        first = True
        while first or offset < len(payload):
            need = (header_bytes if first else 0) + (1 if offset < len(payload) else 0)
            if group and used + need > max_chunk_bytes:
                yield group
                group, used = [], 0
            room = max_chunk_bytes - used - (header_bytes if first else 0)
            data = payload[offset : offset + room]  # the whole payload, not a copy, when it fits
            group.append((index, header if first else None, data))
            if first:
                used += header_bytes
                first = False
            used += len(data)
            offset += len(data)
    if group:
        yield group


class BudgetExceeded(Exception):
    """Holding more bytes would pass a :class:`ByteBudget`; the message names the budget.

    Not a :class:`CodecError`: the input may be fine, the receiver is full (RESOURCE_EXHAUSTED).
    """


class ByteBudget:
    """Bytes held against ``limit``, thread-safe; a take also counts against ``parent``, if any.

    Args:
        limit: the most bytes held at once.
        name: how errors name the budget, e.g. ``"limits.max_stream_bytes"``.
        parent: a budget this one is part of (a stream's, inside the daemon's).
    """

    def __init__(self, limit: int, name: str, parent: ByteBudget | None = None) -> None:
        self.limit = limit
        self.name = name
        self.parent = parent
        self._held = 0
        self._lock = threading.Lock()

    @property
    def held(self) -> int:
        return self._held

    def take(self, n: int) -> None:
        """Count ``n`` more bytes, or raise BudgetExceeded (and count nothing) if this or a parent is full."""
        with self._lock:
            if self._held + n > self.limit:
                raise BudgetExceeded(f"{self.name}: {n} more bytes would pass {self.limit} ({self._held} held)")
            if self.parent is not None:
                self.parent.take(n)
            self._held += n

    def give(self, n: int) -> None:
        """Return ``n`` bytes taken before."""
        with self._lock:
            self._held -= n
            if self.parent is not None:
                self.parent.give(n)


class Assembler:
    """Rebuilds the tensors of one sequence from its chunks, validating as they arrive.

    Rules: tensor indices start at 0 and increase by one; a tensor's first chunk carries its
    header and no other chunk does; a tensor receives exactly ``header.payload_size`` bytes
    before the next one starts. Errors are :class:`CodecError`\\ s naming the chunk, e.g.
    ``"chunk 3: data for tensor 1 before its header"``.

    Args:
        max_bytes: bound on payload plus header bytes held for the whole sequence; a header
            announcing more than what is left is rejected on arrival.
        max_tensors: bound on the number of tensors in the sequence.
        budget: shared with other assemblers; each header takes what it announces from it on
            arrival (BudgetExceeded when it cannot), given back by ``finish()`` or ``discard()``.
        check_header: called as ``check_header(index, header)`` when a tensor's header arrives,
            before any of its payload is taken; raises (e.g. CodecError) to refuse the tensor.
    """

    def __init__(
        self,
        max_bytes: int = 1 << 30,
        max_tensors: int = 1024,
        budget: ByteBudget | None = None,
        check_header: Callable[[int, tensor_pb2.Tensor], None] | None = None,
    ) -> None:
        self.max_bytes = max_bytes
        self.max_tensors = max_tensors
        self.budget = budget
        self.check_header = check_header
        self._taken = 0  # bytes taken from ``budget`` for this sequence
        self._reset()

    def discard(self) -> None:
        """Drop the sequence received so far and give its bytes back to the budget."""
        self._reset()

    def _reset(self) -> None:
        if self._taken:
            assert self.budget is not None
            self.budget.give(self._taken)
            self._taken = 0
        self._done: list[tensor_pb2.Tensor] = []  # complete tensors, their payloads apart:
        self._payloads: list[bytes | memoryview] = []  # one each
        self._header: tensor_pb2.Tensor | None = None  # the tensor being received
        self._pieces: list[bytes | memoryview] = []
        self._received = 0
        self._held = 0  # bytes held for the whole sequence, headers included
        self._chunks = 0

    @property
    def bytes_held(self) -> int:
        """Payload and header bytes received so far in this sequence."""
        return self._held

    def add(self, chunks: Iterable[tensor_pb2.TensorChunk], datas: Sequence[bytes | memoryview] | None = None) -> None:
        """Take the next chunks of the sequence (e.g. one frame's ``chunks``).

        ``datas``: each chunk's data, when it is held apart from the chunk (views over the bytes a
        frame arrived in: :func:`split_payloads`); None: each chunk's ``data``.

        On a CodecError the sequence is dropped (memory released) and the assembler starts over.
        """
        try:
            for i, chunk in enumerate(chunks):
                self._add(chunk, chunk.data if datas is None else datas[i])
                self._chunks += 1
        except Exception:  # CodecError, BudgetExceeded, or whatever check_header raises
            self._reset()
            raise

    def _add(self, chunk: tensor_pb2.TensorChunk, data: bytes | memoryview) -> None:
        where = f"chunk {self._chunks}"
        current = len(self._done)  # index of the tensor being received, if any
        if self._header is not None and chunk.index == current:
            if chunk.HasField("header"):
                raise CodecError(f"{where}: second header for tensor {current}")
        elif chunk.index == current + (self._header is not None):
            if self._header is not None:
                self._complete(where)
            if not chunk.HasField("header"):
                raise CodecError(f"{where}: data for tensor {chunk.index} before its header")
            self._start(where, chunk.header)
        else:
            expected = f"{current} or {current + 1}" if self._header is not None else f"{current}"
            raise CodecError(f"{where}: tensor index {chunk.index} out of order (expected {expected})")
        self._receive(where, data)

    def _start(self, where: str, header: tensor_pb2.Tensor) -> None:
        index = len(self._done)
        if index >= self.max_tensors:
            raise CodecError(f"{where}: more than max_tensors {self.max_tensors} tensors")
        if header.payload:
            raise CodecError(f"{where}: header of tensor {index} carries payload bytes")
        if self.check_header is not None:
            self.check_header(index, header)
        size = header.ByteSize()
        if self._held + size + header.payload_size > self.max_bytes:
            raise CodecError(
                f"{where}: tensor {index} announces payload_size {header.payload_size}, which exceeds "
                f"max_bytes {self.max_bytes} ({self._held} bytes already held)"
            )
        if self.budget is not None:
            self.budget.take(size + header.payload_size)
            self._taken += size + header.payload_size
        self._held += size
        self._header = tensor_pb2.Tensor()
        self._header.CopyFrom(header)  # ours to fill in; the caller's chunk stays untouched
        self._pieces = []
        self._received = 0

    def _receive(self, where: str, data: bytes | memoryview) -> None:
        if not data:
            return
        assert self._header is not None
        index = len(self._done)
        if self._received + len(data) > self._header.payload_size:
            if self._received == self._header.payload_size:
                state = "after its payload was complete"
            else:
                state = f"beyond its payload_size {self._header.payload_size}"
            raise CodecError(f"{where}: data for tensor {index} {state}")
        self._pieces.append(data)
        self._received += len(data)
        self._held += len(data)

    def _complete(self, where: str) -> None:
        assert self._header is not None
        index = len(self._done)
        if self._received != self._header.payload_size:
            raise CodecError(
                f"{where}: tensor {index} got {self._received} of its payload_size {self._header.payload_size} bytes"
            )
        pieces = self._pieces
        self._done.append(self._header)
        self._payloads.append(pieces[0] if len(pieces) == 1 else b"".join(pieces))
        self._header, self._pieces, self._received = None, [], 0

    def finish(self) -> list[tensor_pb2.Tensor]:
        """The complete tensors, in order; the assembler is then empty and can take a new sequence.

        Raises:
            CodecError: the last tensor is short of its ``payload_size``.
        """
        tensors, payloads = self.finish_apart()
        for tensor, payload in zip(tensors, payloads, strict=True):
            tensor.payload = payload if isinstance(payload, bytes) else bytes(payload)
        return tensors

    def finish_apart(self) -> tuple[list[tensor_pb2.Tensor], list[bytes | memoryview]]:
        """:meth:`finish`, each tensor's payload apart from it (its ``payload`` left empty): a tensor
        that came in one chunk keeps that chunk's data as it was given (a view over a frame's bytes,
        not copied again). Decode them with ``decode(tensor, payload=...)``."""
        if self._header is not None:
            try:
                self._complete(f"end after chunk {self._chunks - 1}")
            except CodecError:
                self._reset()
                raise
        done = self._done, self._payloads
        self._reset()
        return done


_PAYLOAD_FIELD = tensor_pb2.Tensor.DESCRIPTOR.fields_by_name["payload"].number
CHUNK_DATA_FIELD = _CHUNK_FIELDS["data"].number


def _read_varint(data: bytes, pos: int, end: int) -> tuple[int, int]:
    """The varint at ``pos`` and the position after it; ValueError past ``end`` or over 10 bytes."""
    value = shift = 0
    while True:
        if pos >= end or shift > 63:
            raise ValueError("truncated or overlong varint")
        byte = data[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            return value, pos
        shift += 7


def _next_field(data: bytes, pos: int, end: int) -> tuple[int, int, int, int]:
    """(field number, wire type, start of the value, end of the field) of the field at ``pos``.

    For a length-delimited field the value starts after its length. ValueError for what a walk
    this simple leaves to protobuf's parser: groups, field 0, unknown wire types, a field past ``end``,
    a key over 5 bytes (protobuf refuses those: the walk must not accept what protobuf's parse would not).
    """
    key, after_key = _read_varint(data, pos, end)
    if after_key - pos > 5:
        raise ValueError("key over 5 bytes")
    pos = after_key
    number, wire_type = key >> 3, key & 7
    if number == 0:
        raise ValueError("field 0")
    if wire_type == 0:
        _, after = _read_varint(data, pos, end)
    elif wire_type == 1:
        after = pos + 8
    elif wire_type == 5:
        after = pos + 4
    elif wire_type == 2:
        length, pos = _read_varint(data, pos, end)
        after = pos + length
    else:
        raise ValueError(f"wire type {wire_type}")
    if after > end:
        raise ValueError("field past the end")
    return number, wire_type, pos, after


WALK_FROM = 64 << 10
"""Messages under this many bytes are parsed whole: the walk is Python, protobuf's parse and copies are
C, and with the caches cold the walk costs what copying about 64 KB three times does (an Infer frame
parsed and assembled, one run: 8 KB 140 us whole against 162 walked, 64 KB 231 against 234, 256 KB
305 against 216)."""


MAX_WALK_FIELDS = 4096
"""The most fields :func:`split_payloads` reads (a message's and its tensors') before it leaves the message
to protobuf: a request or frame has a few dozen, and a walk costs ~0.6 us of Python per field where
protobuf's parse costs ~0.015 (4 MB of 2-byte fields: 1.3 s against 0.03; 2 MB of empty tensors, 200 MB
of memoryviews)."""


def split_payloads(
    data: bytes, tensors_field: int, payload_field: int = _PAYLOAD_FIELD
) -> tuple[bytes, list[memoryview]] | None:
    """A message's bytes without the payloads of the tensors in its repeated field ``tensors_field``,
    and those payloads, in order, as views over ``data``: read without copying them. A "tensor" is
    any message whose bytes field ``payload_field`` is its payload: a ``Tensor`` (``payload``, the
    default) or a ``TensorChunk`` (its ``data``: ``payload_field=CHUNK_DATA_FIELD``).

    Parsing a message copies every bytes field into protobuf's memory, and reading a bytes field
    copies it again into a Python object: twice 0.6 MB for an app's 224x224 image, with the caches
    cold after a model's compute. Parsed from the bytes returned here, the message is the same but for
    its tensors' empty ``payload``; each tensor's payload is the one protobuf would have kept (the
    last, if a tensor carries several) or empty. None when the walk meets anything it leaves to
    protobuf's own parser (a group, an unknown wire type, a truncated or malformed field, a tensor
    field or payload that is not length-delimited), or more than :data:`MAX_WALK_FIELDS` fields: parse
    ``data`` whole then, with its errors.
    """
    end = len(data)
    pieces: list[bytes] = []
    payloads: list[memoryview] = []
    view = memoryview(data)
    pos = copied = 0
    fields = MAX_WALK_FIELDS
    try:
        while pos < end:
            fields -= 1
            if fields < 0:
                return None
            number, wire_type, start, after = _next_field(data, pos, end)
            if number == tensors_field:
                if wire_type != 2:
                    return None
                # This tensor's bytes without its payload fields (the header's few bytes are copied).
                kept: list[bytes] = []
                payload = view[0:0]
                inner = kept_from = start
                while inner < after:
                    fields -= 1
                    if fields < 0:
                        return None
                    field, inner_type, value, inner_after = _next_field(data, inner, after)
                    if field == payload_field:
                        if inner_type != 2:
                            return None
                        kept.append(data[kept_from:inner])
                        payload = view[value:inner_after]
                        kept_from = inner_after
                    inner = inner_after
                if kept_from != start:  # it carried a payload: write the field again, shorter
                    kept.append(data[kept_from:after])
                    body = b"".join(kept)
                    pieces += (data[copied:pos], field_key(number), varint(len(body)), body)
                    copied = after
                payloads.append(payload)
            pos = after
    except ValueError:
        return None
    if not copied:
        return data, payloads
    pieces.append(data[copied:])
    return b"".join(pieces), payloads


class PayloadsApart:
    """A message parsed without its tensors' payloads, and those payloads, one per tensor, as views over
    the bytes it arrived in (:func:`split_payloads`). What :func:`parse_apart` gives a handler."""

    __slots__ = ("message", "payloads")

    def __init__(self, message: Any, payloads: list[memoryview]) -> None:
        self.message = message
        self.payloads = payloads


def parse_apart(
    message_type: Any,
    data: bytes,
    tensors_field: int,
    payload_field: int = _PAYLOAD_FIELD,
    walk_from: int = WALK_FROM,
    min_payload_share: float = 0.0,
) -> Any:
    """``message_type`` parsed from ``data`` with its tensors' payloads read in place (a
    :class:`PayloadsApart`), or parsed whole, as protobuf parses it, with protobuf's errors
    (``DecodeError``): a message under ``walk_from`` bytes (walking costs more than the copies there),
    one the walk leaves to protobuf (anything unusual), and one whose payloads are under
    ``min_payload_share`` of its bytes (views over the rest would keep it alive uncounted)."""
    split = split_payloads(data, tensors_field, payload_field) if len(data) >= walk_from else None
    if split is not None and sum(map(len, split[1])) >= min_payload_share * len(data):
        try:
            return PayloadsApart(message_type.FromString(split[0]), split[1])
        except DecodeError:
            pass  # the whole message's own error, below
    return message_type.FromString(data)
