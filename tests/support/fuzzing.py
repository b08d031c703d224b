"""Building blocks for fuzzing the daemons over gRPC: status checks, hypothesis strategies for
random and mutated messages, and a fast seeded generator of bad requests for the memory test.

Two kinds of inputs:

- *random*: messages whose fields take arbitrary values (unknown enum numbers, huge and negative
  dims, lying sizes, random bytes), and raw bytes that are not a message at all;
- *mutated*: a valid encoded request with one field or chunk changed. Each mutation says whether
  the daemon must refuse it (an inconsistency the decoder can see: a CRC, a size, a shape, a
  chunk out of order) or may serve it (a different but valid scale, zero point or tensor order).
"""

from __future__ import annotations

import random
import zlib
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

import grpc
from google.protobuf.descriptor import ServiceDescriptor
from hypothesis import strategies as st

from compressor.quant import qmax
from protos.cleave.v1 import compression_pb2 as cpb
from protos.cleave.v1 import edge_pb2, tensor_pb2
from protos.cleave.v1 import split_inference_pb2 as si_pb2

#: The only statuses a daemon may answer bad input with (never INTERNAL, UNKNOWN, or a deadline).
ALLOWED = frozenset(
    {
        grpc.StatusCode.INVALID_ARGUMENT,
        grpc.StatusCode.NOT_FOUND,
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        grpc.StatusCode.FAILED_PRECONDITION,
        grpc.StatusCode.OUT_OF_RANGE,
    }
)
ALLOWED_VALUES = frozenset(code.value[0] for code in ALLOWED)
CALL_TIMEOUT = 30.0  # generous: the machine is shared; a call that needs it is a hang

#: How many calls and messages the run sent; the last test reports it.
STATS: Counter = Counter()


class Refused(Exception):
    """Not an error: carries the allowed status a call was answered with."""


def check_error(err: grpc.RpcError, where: str) -> grpc.StatusCode:
    """Assert ``err`` is an allowed status with a message; returns its code."""
    code = err.code()
    assert code != grpc.StatusCode.DEADLINE_EXCEEDED, f"{where}: no answer within {CALL_TIMEOUT}s (a hang)"
    assert code in ALLOWED, f"{where}: {code.name}: {err.details()}"
    assert err.details(), f"{where}: {code.name} with an empty message"
    return code


def check_request_error(error: si_pb2.RequestError, where: str) -> None:
    """Per-request errors inside a stream obey the same rule."""
    assert error.code in ALLOWED_VALUES, f"{where}: request error {error.code}: {error.message}"
    assert error.message, f"{where}: request error {error.code} with an empty message"


def unary(method: Callable, request, where: str):
    """Call a unary-response method; returns ``(response, None)`` or ``(None, code)``."""
    STATS["calls"] += 1
    STATS["messages"] += 1
    try:
        return method(request, timeout=CALL_TIMEOUT), None
    except grpc.RpcError as err:
        return None, check_error(err, where)


def streaming(method: Callable, requests: Sequence, where: str, stream_request: bool = True):
    """Call a streaming-response method and drain it; returns ``(responses, None or code)``."""
    STATS["calls"] += 1
    STATS["messages"] += len(requests) if stream_request else 1
    replies = []
    try:
        arg = iter(list(requests)) if stream_request else requests
        for reply in method(arg, timeout=CALL_TIMEOUT):
            replies.append(reply)
        return replies, None
    except grpc.RpcError as err:
        return replies, check_error(err, where)


def client_stream(method: Callable, requests: Sequence, where: str):
    """Call a stream-request, unary-response method; returns ``(response, None)`` or ``(None, code)``."""
    STATS["calls"] += 1
    STATS["messages"] += len(requests)
    try:
        return method(iter(list(requests)), timeout=CALL_TIMEOUT), None
    except grpc.RpcError as err:
        return None, check_error(err, where)


# -- raw bytes on every method ---------------------------------------------------------------------


@dataclass(frozen=True)
class RawMethod:
    path: str
    client_streaming: bool
    server_streaming: bool

    def callable(self, channel: grpc.Channel) -> Callable:
        kind = {
            (False, False): channel.unary_unary,
            (False, True): channel.unary_stream,
            (True, False): channel.stream_unary,
            (True, True): channel.stream_stream,
        }[(self.client_streaming, self.server_streaming)]
        return kind(self.path, request_serializer=None, response_deserializer=None)


def raw_methods(service: ServiceDescriptor) -> list[RawMethod]:
    return [
        RawMethod(f"/{service.full_name}/{m.name}", m.client_streaming, m.server_streaming) for m in service.methods
    ]


def send_raw(channel: grpc.Channel, method: RawMethod, messages: list[bytes], where: str) -> None:
    """Send ``messages`` (bytes) to ``method``; the answer must be OK or an allowed status."""
    call = method.callable(channel)
    if method.client_streaming and method.server_streaming:
        streaming(call, messages, where)
    elif method.client_streaming:
        client_stream(call, messages, where)
    elif method.server_streaming:
        streaming(call, messages[0], where, stream_request=False)
    else:
        unary(call, messages[0], where)


def mutate_bytes(rng: random.Random, data: bytes) -> bytes:
    """One random byte-level edit of a serialized message."""
    buf = bytearray(data)
    op = rng.randrange(6)
    if op == 0 and buf:
        buf[rng.randrange(len(buf))] ^= rng.randrange(1, 256)
    elif op == 1:
        pos = rng.randrange(len(buf) + 1)
        buf[pos:pos] = rng.randbytes(rng.randrange(1, 9))
    elif op == 2 and buf:
        start = rng.randrange(len(buf))
        del buf[start : start + rng.randrange(1, 9)]
    elif op == 3 and buf:
        del buf[rng.randrange(len(buf)) :]
    elif op == 4:
        buf += data  # a repeated message merges: fields repeat or override
    else:
        buf += rng.randbytes(rng.randrange(1, 17))
    return bytes(buf)


# -- structured random messages ------------------------------------------------------------------

UINT32 = st.integers(0, 2**32 - 1)
UINT64 = st.integers(0, 2**64 - 1)
INT32 = st.integers(-(2**31), 2**31 - 1)
#: proto3 enums are open: any int32 travels, known or not.
ENUM = st.one_of(st.integers(0, 8), INT32)
SMALL_OR_HUGE_UINT = st.one_of(st.integers(0, 70), st.sampled_from([2**31, 2**32 - 1, 2**63, 2**64 - 1]), UINT64)
DIM = st.one_of(st.integers(-3, 70), st.sampled_from([2**31 - 1, 2**31, 2**40, 2**62, 2**63 - 1, -(2**63), -(2**31)]))
TEXT = st.text(max_size=12)
FLOAT32 = st.floats(width=32)


@st.composite
def wire_tensors(draw, with_payload: bool = True) -> tensor_pb2.Tensor:
    """A Tensor with arbitrary fields; sizes and CRC are often made consistent with the payload,
    so that decoding gets past the first checks."""
    payload = draw(st.binary(max_size=1024)) if with_payload else b""
    t = tensor_pb2.Tensor(
        dtype=draw(ENUM),
        shape=draw(st.lists(DIM, max_size=10)),
        encoding=draw(ENUM),
        bits=draw(st.one_of(st.integers(0, 10), UINT32)),
        axis=draw(st.one_of(st.integers(-2, 5), INT32)),
        scales=draw(st.lists(FLOAT32, max_size=4)),
        zero_points=draw(st.lists(st.one_of(st.integers(-2, 300), INT32), max_size=4)),
        codec=draw(ENUM),
        payload=payload,
    )
    t.raw_size = draw(st.one_of(st.just(len(payload)), SMALL_OR_HUGE_UINT))
    t.payload_size = draw(st.one_of(st.just(len(payload)), SMALL_OR_HUGE_UINT))
    t.crc32 = draw(st.one_of(st.just(zlib.crc32(payload)), UINT32))
    return t


def tensor_chunks() -> st.SearchStrategy[tensor_pb2.TensorChunk]:
    return st.builds(
        lambda index, header, data: tensor_pb2.TensorChunk(index=index, header=header, data=data),
        index=st.one_of(st.integers(0, 3), UINT32),
        header=st.one_of(st.none(), wire_tensors(with_payload=False), wire_tensors()),
        data=st.binary(max_size=512),
    )


def infer_frames(session_ids: Sequence[str]) -> st.SearchStrategy[list[si_pb2.InferFrame]]:
    frame = st.builds(
        si_pb2.InferFrame,
        session_id=st.one_of(st.sampled_from(list(session_ids)), TEXT),
        request_id=st.one_of(st.integers(0, 3), UINT64),
        chunks=st.lists(tensor_chunks(), max_size=3),
        last=st.booleans(),
    )
    return st.lists(frame, min_size=1, max_size=6)


CLIPS = ["", "minmax", "percentile", "percentile(percentile=99.9)", "percentile(percentile=0)", "aciq", "fixed"]


def tensor_encodings() -> st.SearchStrategy[tensor_pb2.TensorEncoding]:
    return st.builds(
        tensor_pb2.TensorEncoding,
        encoding=ENUM,
        bits=st.one_of(st.integers(0, 10), UINT32),
        per_channel=st.booleans(),
        clip=st.one_of(st.sampled_from(CLIPS), st.text(max_size=20)),
        codec=ENUM,
        level=st.one_of(st.integers(-10, 25), INT32),
        quality=st.one_of(st.integers(0, 101), UINT32),
    )


def cut_keys(names: Sequence[str]) -> st.SearchStrategy[str]:
    """Cut names and indices, valid or not (unicode digits, huge numbers, signs, blanks)."""
    return st.one_of(
        st.sampled_from(list(names)),
        st.integers(0, 100).map(str),
        st.sampled_from(["", "-1", "+3", " 7", "7 ", "²", "٣", "1e3", "99999999999999999999", "cloud", "edge"]),
        TEXT,
    )


def edge_requests(valid: Sequence[tensor_pb2.Tensor]) -> st.SearchStrategy[edge_pb2.EdgeInferRequest]:
    inputs = st.one_of(
        st.lists(wire_tensors(), max_size=3),
        st.lists(st.sampled_from(list(valid)), min_size=0, max_size=3),
    )
    return st.builds(
        edge_pb2.EdgeInferRequest,
        request_id=st.one_of(st.integers(0, 5), UINT64),
        inputs=inputs,
        model=st.one_of(st.sampled_from(["", "resnet18"]), TEXT),
    )


# -- mutations of valid tensors ------------------------------------------------------------------


class Tensors(list):
    """A list of wire tensors that prints as headers only (hypothesis prints failing examples)."""

    def __repr__(self) -> str:
        heads = []
        for t in self:
            fields = {f.name: v for f, v in t.ListFields() if f.name != "payload"}
            heads.append(f"Tensor({fields}, payload={len(t.payload)} bytes)")
        return "[" + ", ".join(heads) + "]"


def _copy(t: tensor_pb2.Tensor) -> tensor_pb2.Tensor:
    out = tensor_pb2.Tensor()
    out.CopyFrom(t)
    return out


def _other(draw, current: int, values: Iterable[int]) -> int:
    return draw(st.sampled_from([v for v in values if v != current]))


#: Mutations the decoder (or the shape check after it) must refuse.
REJECTED = (
    "flip_payload_byte",
    "truncate_payload",
    "extend_payload",
    "payload_size",
    "raw_size",
    "crc32",
    "dtype",
    "shape",
    "encoding",
    "codec",
    "bits",
    "axis",
    "scales_count",
    "bad_scale",
    "bad_zero_point",
    "drop_tensor",
    "extra_tensor",
)
#: Mutations that leave a valid request meaning something else: it may be served.
SERVABLE = ("scale_value", "zero_point_value")


@st.composite
def mutated_tensors(draw, originals: Sequence[tensor_pb2.Tensor]) -> tuple[list[tensor_pb2.Tensor], bool, str]:
    """``(tensors, must_reject, what)``: ``originals`` with one change."""
    tensors = Tensors(_copy(t) for t in originals)
    i = draw(st.integers(0, len(tensors) - 1))
    t = tensors[i]
    affine = t.encoding == tensor_pb2.AFFINE
    options = list(REJECTED) + (list(SERVABLE) if affine else [])
    what = draw(st.sampled_from(options))
    n = len(t.payload)
    if what == "flip_payload_byte":
        buf = bytearray(t.payload)
        buf[draw(st.integers(0, n - 1))] ^= draw(st.integers(1, 255))
        t.payload = bytes(buf)
    elif what == "truncate_payload":
        t.payload = t.payload[: n - draw(st.integers(1, min(n, 64)))]
    elif what == "extend_payload":
        t.payload += draw(st.binary(min_size=1, max_size=64))
    elif what == "payload_size":
        t.payload_size = draw(st.one_of(st.integers(0, 2 * n), UINT64).filter(lambda v: v != n))
    elif what == "raw_size":
        t.raw_size = draw(st.one_of(st.integers(0, 2 * t.raw_size + 8), UINT64).filter(lambda v: v != t.raw_size))
    elif what == "crc32":
        t.crc32 ^= draw(st.integers(1, 2**32 - 1))
    elif what == "dtype":
        t.dtype = _other(draw, t.dtype, range(-1, 10))
    elif what == "shape":
        old = list(t.shape)
        new = draw(
            st.one_of(
                st.lists(DIM, max_size=6),
                st.permutations(old).map(list),
                st.just(old + [1]),
                st.just(old[:-1]),
                st.integers(0, len(old) - 1).flatmap(
                    lambda j: st.integers(-3, 3).filter(bool).map(lambda d: old[:j] + [old[j] + d] + old[j + 1 :])
                ),
            ).filter(lambda s: s != old)
        )
        del t.shape[:]
        t.shape.extend(new)
    elif what == "encoding":
        t.encoding = _other(draw, t.encoding, range(0, 6))
    elif what == "codec":
        t.codec = _other(draw, t.codec, range(0, 4))
    elif what == "bits":
        t.bits = _other(draw, t.bits, [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 16, 32, 2**32 - 1])
    elif what == "axis":
        t.axis = _other(draw, t.axis, [-2, -1, 0, 1, 2, 3, 4, 2**31 - 1])
    elif what == "scales_count":
        if t.scales and draw(st.booleans()):
            t.scales.pop()
        else:
            t.scales.append(draw(st.floats(2.0**-20, 1.0, width=32)))
    elif what == "bad_scale":
        value = draw(st.sampled_from([0.0, -0.0, -1.0, float("nan"), float("inf"), float("-inf")]))
        if t.scales:
            t.scales[draw(st.integers(0, len(t.scales) - 1))] = value
        else:
            t.scales.append(value)
    elif what == "bad_zero_point":
        bad = st.one_of(st.integers(-(2**31), -1), st.integers(qmax(t.bits) + 1, 2**31 - 1)) if affine else INT32
        if t.zero_points:
            t.zero_points[draw(st.integers(0, len(t.zero_points) - 1))] = draw(bad)
        else:
            t.zero_points.append(draw(INT32.filter(bool)))
    elif what == "drop_tensor":
        del tensors[i]
    elif what == "extra_tensor":
        tensors.append(_copy(t))
    elif what == "scale_value":
        t.scales[draw(st.integers(0, len(t.scales) - 1))] = draw(st.floats(2.0**-20, 2.0**20, width=32))
    elif what == "zero_point_value":
        t.zero_points[draw(st.integers(0, len(t.zero_points) - 1))] = draw(st.integers(0, qmax(t.bits)))
    return tensors, what in REJECTED, what


#: Chunk-level mutations of a valid chunked request; every one must be refused.
CHUNK_MUTATIONS = (
    "drop_chunk",
    "duplicate_chunk",
    "swap_chunks",
    "chunk_index",
    "strip_header",
    "extra_header",
    "header_payload",
)


@st.composite
def mutated_chunks(
    draw, groups: Sequence[Sequence[tensor_pb2.TensorChunk]]
) -> tuple[list[list[tensor_pb2.TensorChunk]], str]:
    """``(groups, what)``: the chunk groups of a valid request with one chunk-level change."""
    flat = [(g, c) for g, group in enumerate(groups) for c in range(len(group))]
    out = [[_copy_chunk(c) for c in group] for group in groups]
    what = draw(st.sampled_from(CHUNK_MUTATIONS))
    g, c = draw(st.sampled_from(flat))
    chunk = out[g][c]
    if what == "drop_chunk":
        del out[g][c]
    elif what == "duplicate_chunk":
        out[g].insert(c, _copy_chunk(chunk))
    elif what == "swap_chunks":
        g2, c2 = draw(st.sampled_from([p for p in flat if out[p[0]][p[1]] != chunk] or [(g, c)]))
        out[g][c], out[g2][c2] = out[g2][c2], out[g][c]
        if (g2, c2) == (g, c):  # nothing to swap with: drop instead
            del out[g][c]
    elif what == "chunk_index":
        chunk.index = _other(draw, chunk.index, [0, 1, 2, 3, 2**32 - 1])
    elif what == "strip_header":
        headed = [p for p in flat if groups[p[0]][p[1]].HasField("header")]
        hg, hc = draw(st.sampled_from(headed))
        out[hg][hc].ClearField("header")
    elif what == "extra_header":
        plain = [p for p in flat if not groups[p[0]][p[1]].HasField("header")]
        if plain:
            pg, pc = draw(st.sampled_from(plain))
            out[pg][pc].header.CopyFrom(next(c for grp in groups for c in grp if c.HasField("header")).header)
        else:
            out[g].insert(c + 1, _copy_chunk(chunk))  # a second header for the same tensor
    elif what == "header_payload":
        headed = [p for p in flat if groups[p[0]][p[1]].HasField("header")]
        hg, hc = draw(st.sampled_from(headed))
        out[hg][hc].header.payload = draw(st.binary(min_size=1, max_size=16))
    return out, what


def _copy_chunk(c: tensor_pb2.TensorChunk) -> tensor_pb2.TensorChunk:
    out = tensor_pb2.TensorChunk()
    out.CopyFrom(c)
    return out


# -- Compression messages ------------------------------------------------------------------------


def upload_streams(valid_files: Sequence[tuple[int, bytes]]) -> st.SearchStrategy[list[cpb.UploadChunk]]:
    """A header (random fields, or a valid file's) then data chunks, or data without a header."""
    header = st.builds(
        cpb.UploadHeader,
        name=TEXT,
        format=ENUM,
        architecture=st.one_of(st.sampled_from(["", "resnet18", "bert"]), TEXT),
        config_json=st.one_of(st.sampled_from(["", "{}", "{", "[1]"]), TEXT),
        num_classes=st.one_of(st.integers(0, 10), UINT32),
        input_shape=st.lists(st.one_of(st.integers(-2, 64), st.integers(-(2**63), 2**63 - 1)), max_size=5),
        total_bytes=SMALL_OR_HUGE_UINT,
        sha256=st.one_of(st.just(""), st.text(alphabet="0123456789abcdef", min_size=64, max_size=64), TEXT),
    )

    @st.composite
    def from_valid(draw) -> list[cpb.UploadChunk]:
        fmt, data = draw(st.sampled_from(list(valid_files)))
        buf = bytearray(data)
        edit = draw(st.sampled_from(["flip", "truncate", "extend", "none"]))
        if edit == "flip":
            for _ in range(draw(st.integers(1, 4))):
                buf[draw(st.integers(0, len(buf) - 1))] ^= draw(st.integers(1, 255))
        elif edit == "truncate":
            del buf[draw(st.integers(1, len(buf) - 1)) :]
        elif edit == "extend":
            buf += draw(st.binary(min_size=1, max_size=64))
        parts = [bytes(buf[i : i + 256]) for i in range(0, len(buf), 256)]
        head = cpb.UploadHeader(name="fuzz", format=fmt, total_bytes=draw(st.sampled_from([0, len(buf), len(data)])))
        return [cpb.UploadChunk(header=head)] + [cpb.UploadChunk(data=p) for p in parts]

    data_chunk = st.binary(max_size=300).map(lambda b: cpb.UploadChunk(data=b))
    random_stream = st.tuples(
        st.one_of(header.map(lambda h: cpb.UploadChunk(header=h)), data_chunk, st.just(cpb.UploadChunk())),
        st.lists(st.one_of(data_chunk, header.map(lambda h: cpb.UploadChunk(header=h))), max_size=4),
    ).map(lambda hr: [hr[0], *hr[1]])
    return st.one_of(random_stream, from_valid())


def job_specs() -> st.SearchStrategy[cpb.JobSpec]:
    """Specs that are wrong in at least one way: no job ever gets queued (and runs) by fuzzing."""
    model = st.one_of(
        st.just(cpb.ModelRef()),
        st.builds(cpb.ModelRef, model_id=TEXT),
        st.builds(cpb.ModelRef, torchvision=TEXT.map(lambda s: "nope-" + s)),
        st.builds(cpb.ModelRef, transformer=TEXT.map(lambda s: "nope-" + s), config_json=TEXT),
    )
    prune = st.builds(
        cpb.PruneOptions,
        ratio=FLOAT32,
        layer_ratios=st.dictionaries(TEXT, FLOAT32, max_size=2),
        ignored_layers=st.lists(TEXT, max_size=2),
        round_to=UINT32,
        importance=TEXT,
        head_ratio=FLOAT32,
        ffn_ratio=FLOAT32,
    )
    return st.builds(
        cpb.JobSpec,
        engine=st.one_of(st.sampled_from(["", "prune", "prune_cnn", "prune_transformer", "quantize", "sweep"]), TEXT),
        model=model,
        prune=prune,
        quantize=st.builds(cpb.QuantizeOptions, bits=st.one_of(st.integers(0, 9), UINT32), clip=TEXT),
        sweep=st.builds(
            cpb.SweepOptions,
            ratios=st.lists(FLOAT32, max_size=3),
            bits=st.lists(UINT32, max_size=3),
            parallelism=UINT32,
        ),
        dataset_id=st.one_of(st.just(""), TEXT),
        params=st.dictionaries(TEXT, TEXT, max_size=2),
    )
