"""Chunked framing of tensor sequences: to_chunks groups and the Assembler's validation."""

from __future__ import annotations

import pytest
import torch

from compressor import Assembler, CodecError, EncodingSpec, decode, encode, to_chunks
from compressor.framing import add_chunks, chunks_wire, header_of, to_pieces
from protos.cleave.v1 import split_inference_pb2, tensor_pb2

RAW = EncodingSpec(codec="none")  # payload size = raw size, so the tests control chunk counts


def _tensors(*sizes: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(sum(sizes))
    return [torch.randn(n, generator=g) for n in sizes]


def _group_bytes(group: list[tensor_pb2.TensorChunk]) -> int:
    return sum(len(c.data) + (c.header.ByteSize() if c.HasField("header") else 0) for c in group)


def _round_trip(xs: list[torch.Tensor], max_chunk_bytes: int, spec: EncodingSpec = RAW) -> list:
    msgs = [encode(x, spec) for x in xs]
    groups = list(to_chunks(msgs, max_chunk_bytes))
    for group in groups:
        assert group and _group_bytes(group) <= max_chunk_bytes
    assembler = Assembler()
    for group in groups:
        frame = split_inference_pb2.InferFrame(session_id="s", request_id=1, chunks=group)
        assembler.add(split_inference_pb2.InferFrame.FromString(frame.SerializeToString()).chunks)
    out = assembler.finish()
    assert out == msgs
    if spec.encoding == "raw":  # lossless: the decoded tensors are the originals
        for x, msg in zip(xs, out, strict=True):
            assert torch.equal(decode(msg), x)
    return groups


def _chunks(xs: list[torch.Tensor], max_chunk_bytes: int) -> list[tensor_pb2.TensorChunk]:
    return [c for group in to_chunks([encode(x, RAW) for x in xs], max_chunk_bytes) for c in group]


def test_one_small_tensor_is_one_chunk_with_its_header() -> None:
    groups = _round_trip(_tensors(10), 1 << 20)
    assert len(groups) == 1 and len(groups[0]) == 1
    chunk = groups[0][0]
    assert chunk.index == 0 and chunk.HasField("header") and chunk.header.payload == b""
    assert len(chunk.data) == 40 and chunk.header.payload_size == 40


def test_many_small_tensors_share_groups() -> None:
    xs = _tensors(*range(1, 60))
    groups = _round_trip(xs, 4096)
    assert sum(len(g) for g in groups) >= len(xs)
    assert len(groups) < len(xs) // 4  # shared, not one frame per tensor
    firsts = [c for g in groups for c in g if c.HasField("header")]
    assert [c.index for c in firsts] == list(range(len(xs)))  # exactly one header per tensor


def test_five_megabyte_tensor_spans_several_bounded_frames() -> None:
    x = torch.randn(5 * (1 << 20) // 4 + 3)  # just over 5 MiB of float32
    groups = _round_trip([x], 1 << 20)
    assert len(groups) == 6
    for group in groups:
        frame = split_inference_pb2.InferFrame(session_id="s" * 36, request_id=2**63, chunks=group, last=True)
        assert frame.ByteSize() < (1 << 20) + 64  # far under gRPC's 4 MiB default
    assert [c.HasField("header") for g in groups for c in g] == [True] + [False] * 5


@pytest.mark.parametrize("max_chunk_bytes", [200, 333, 1000, 4096, 1 << 16])
def test_mixed_sequences_at_any_chunk_size(max_chunk_bytes: int) -> None:
    xs = [torch.randn(3, 7), torch.zeros(0), torch.randn(40_000), torch.tensor(2.5), torch.randn(300)]
    _round_trip(xs, max_chunk_bytes)
    _round_trip(xs, max_chunk_bytes, EncodingSpec.parse("int6:percentile"))


def test_chunks_can_arrive_one_at_a_time() -> None:
    xs = _tensors(100, 2000, 5)
    assembler = Assembler()
    for chunk in _chunks(xs, 500):
        assembler.add([chunk])
    assert [torch.equal(decode(m), x) for m, x in zip(assembler.finish(), xs, strict=True)] == [True] * 3
    assert assembler.finish() == []  # finish() leaves the assembler empty for the next sequence


# A small payload, and one over framing._COPY_UNDER (header_of builds those two ways).
_HEADER_CASES = [((2, 3, 4), "c"), ((1, 64, 64, 64), "c+none")]


def test_a_request_whose_deadline_passed_while_queued_is_never_sent() -> None:
    """InferStream writes a request when gRPC takes it, which waits while the link is stalled; one the
    edge stopped waiting for meanwhile (``forget``: its deadline passed, the tail ran locally) is dropped
    from the queue, so the requests behind it go out at once when the link is back."""
    from edge_node.cloud_link import InferStream

    msgs = [encode(x, RAW) for x in _tensors(10, 10, 10)]
    stream = InferStream(None, "0123456789abcdef" * 2, 3, 8000, lambda _stream: None)
    for request_id in (1, 2, 3, 4):
        stream.submit(request_id, msgs)
    stream.forget(2)
    stream.forget(4)
    stream.close()
    sent = [split_inference_pb2.InferFrame.FromString(f) for f in stream._frames()]
    assert [f.request_id for f in sent] == [1, 3] and all(f.last for f in sent)
    assert stream.pending == 2  # 1 and 3 still wait for their results


@pytest.mark.parametrize(("shape", "tail"), _HEADER_CASES)
def test_header_of_drops_only_the_payload(shape: tuple[int, ...], tail: str) -> None:
    msg = encode(torch.randn(shape), EncodingSpec.parse(f"int5{tail}"))
    assert (msg.payload_size > 128 << 10) == (tail == "c+none")
    header = header_of(msg)
    assert header.payload == b"" and msg.payload != b""
    header.payload = msg.payload
    assert header == msg


def test_to_chunks_checks_its_input() -> None:
    msg = encode(torch.randn(10), RAW)
    msg.payload_size += 1
    with pytest.raises(CodecError, match=r"tensors\[0\]\.payload_size"):
        list(to_chunks([msg]))
    big_header = encode(torch.randn(300, 1), EncodingSpec.parse("int8c0"))  # 300 scales
    with pytest.raises(CodecError, match=r"tensors\[0\]: header is \d+ bytes, over max_chunk_bytes 1000"):
        list(to_chunks([big_header], 1000))


# -------------------------------------------------------------------------------------- rejections


def _add_all(assembler: Assembler, chunks: list[tensor_pb2.TensorChunk]) -> None:
    for chunk in chunks:
        assembler.add([chunk])


def test_missing_header_is_rejected() -> None:
    chunks = _chunks(_tensors(100, 100), 10_000)
    chunks[1].ClearField("header")
    with pytest.raises(CodecError, match=r"chunk 1: data for tensor 1 before its header"):
        _add_all(Assembler(), chunks)


def test_second_header_is_rejected() -> None:
    chunks = _chunks(_tensors(100), 200)
    chunks[1].header.CopyFrom(chunks[0].header)
    with pytest.raises(CodecError, match=r"chunk 1: second header for tensor 0"):
        _add_all(Assembler(), chunks)


def test_out_of_order_index_is_rejected() -> None:
    chunks = _chunks(_tensors(10, 10, 10), 10_000)
    with pytest.raises(CodecError, match=r"chunk 1: tensor index 2 out of order \(expected 0 or 1\)"):
        _add_all(Assembler(), [chunks[0], chunks[2]])
    with pytest.raises(CodecError, match=r"chunk 0: tensor index 1 out of order \(expected 0\)"):
        _add_all(Assembler(), [chunks[1]])
    with pytest.raises(CodecError, match=r"chunk 2: tensor index 0 out of order"):
        _add_all(Assembler(), [chunks[0], chunks[1], chunks[0]])


def test_data_after_completion_is_rejected() -> None:
    chunks = _chunks(_tensors(10), 10_000)
    extra = tensor_pb2.TensorChunk(index=0, data=b"\x00")
    with pytest.raises(CodecError, match=r"chunk 1: data for tensor 0 after its payload was complete"):
        _add_all(Assembler(), [*chunks, extra])


def test_data_beyond_payload_size_is_rejected() -> None:
    chunks = _chunks(_tensors(100), 10_000)
    chunks[0].data += b"\x00"
    with pytest.raises(CodecError, match=r"chunk 0: data for tensor 0 beyond its payload_size 400"):
        _add_all(Assembler(), chunks)


def test_fewer_bytes_than_payload_size_is_rejected() -> None:
    chunks = _chunks(_tensors(100, 60), 150)
    first_of_second = next(i for i, c in enumerate(chunks) if c.index == 1)
    short = chunks[: first_of_second - 1] + chunks[first_of_second:]  # drop tensor 0's last slice
    with pytest.raises(CodecError, match=r"chunk \d+: tensor 0 got \d+ of its payload_size 400 bytes"):
        _add_all(Assembler(), short)
    assembler = Assembler()
    _add_all(assembler, chunks[:-1])  # the last tensor ends short
    with pytest.raises(CodecError, match=r"end after chunk \d+: tensor 1 got \d+ of its payload_size 240 "):
        assembler.finish()


def test_max_bytes_is_enforced_while_receiving() -> None:
    groups = list(to_chunks([encode(x, RAW) for x in _tensors(100, 300_000)], 1 << 16))
    assert len(groups) > 10
    assembler = Assembler(max_bytes=1 << 20)
    # Refused when tensor 1's header arrives (chunk 1 of the first frame), not at finish().
    with pytest.raises(CodecError, match=r"chunk 1: tensor 1 announces payload_size 1200000, which exceeds"):
        assembler.add(groups[0])


def test_bytes_held_never_exceed_max_bytes() -> None:
    chunks = _chunks(_tensors(*[1000] * 10), 3000)
    assembler = Assembler(max_bytes=20_000)
    with pytest.raises(CodecError, match="exceeds max_bytes 20000"):
        for chunk in chunks:
            assembler.add([chunk])
            assert assembler.bytes_held <= 20_000


def test_header_with_payload_and_too_many_tensors_are_rejected() -> None:
    chunks = _chunks(_tensors(10, 10, 10), 10_000)
    with pytest.raises(CodecError, match=r"chunk 2: more than max_tensors 2"):
        _add_all(Assembler(max_tensors=2), chunks)
    chunks[0].header.payload = b"sneaky"
    with pytest.raises(CodecError, match=r"chunk 0: header of tensor 0 carries payload bytes"):
        _add_all(Assembler(), chunks)


def test_assembler_starts_over_after_an_error() -> None:
    xs = _tensors(50, 60)
    assembler = Assembler()
    with pytest.raises(CodecError):
        assembler.add([_chunks(xs, 10_000)[1]])
    assert assembler.bytes_held == 0
    assembler.add(_chunks(xs, 10_000))
    assert [torch.equal(decode(m), x) for m, x in zip(assembler.finish(), xs, strict=True)] == [True, True]


def test_shared_budget_is_taken_on_header_arrival_and_given_back() -> None:
    from compressor import BudgetExceeded, ByteBudget

    daemon = ByteBudget(10_000, "daemon")
    stream = ByteBudget(6_000, "stream", parent=daemon)
    msgs = [encode(x, RAW) for x in _tensors(1000)]  # 4000 payload bytes
    (first, *rest) = [c for group in to_chunks(msgs, 100) for c in group]
    a, b = Assembler(budget=stream), Assembler(budget=stream)
    a.add([first])  # the header takes all 4000 announced bytes (plus its own) before any arrive
    assert stream.held == daemon.held > 4000
    with pytest.raises(BudgetExceeded, match="stream: "):
        b.add([first])
    assert stream.held == daemon.held < 6000  # the refused sequence took nothing and holds nothing
    a.add(rest)
    assert a.finish() == msgs and stream.held == daemon.held == 0
    a.add([first])
    a.discard()  # a stream ending half-way gives its bytes back
    assert stream.held == daemon.held == 0


def test_check_header_refuses_before_any_payload_is_taken() -> None:
    from compressor import ByteBudget

    budget = ByteBudget(1 << 20, "b")
    seen = []

    def check(index: int, header: tensor_pb2.Tensor) -> None:
        seen.append((index, tuple(header.shape)))
        if index == 1:
            raise CodecError("features[1]: no")

    msgs = [encode(x, RAW) for x in _tensors(10, 20)]
    assembler = Assembler(budget=budget, check_header=check)
    with pytest.raises(CodecError, match=r"features\[1\]: no"):
        for group in to_chunks(msgs, 1 << 20):
            assembler.add(group)
    assert seen == [(0, (10,)), (1, (20,))] and budget.held == 0


@pytest.mark.parametrize("sizes, max_chunk_bytes", [((7,), 1 << 20), ((300, 5, 1000), 1024), ((0, 64), 256)])
def test_chunks_built_in_the_frame_are_the_same_bytes(sizes: tuple[int, ...], max_chunk_bytes: int) -> None:
    """What the edge and the cloud send (to_pieces + add_chunks) is what to_chunks' groups make."""
    msgs = [encode(x, RAW) for x in _tensors(*sizes)]
    expected = [
        split_inference_pb2.InferFrame(request_id=3, chunks=group).SerializeToString()
        for group in to_chunks(msgs, max_chunk_bytes)
    ]
    sent = []
    for group in to_pieces(msgs, max_chunk_bytes):
        frame = split_inference_pb2.InferFrame(request_id=3)
        add_chunks(frame.chunks, group)
        sent.append(frame.SerializeToString())
    assert sent == expected
    assert len(sent) > 1 or max_chunk_bytes == 1 << 20  # the small limits do split


@pytest.mark.parametrize(
    "sizes, max_chunk_bytes",
    [((7,), 1 << 20), ((300, 5, 1000), 1024), ((0, 64), 256), ((40_000,), 1 << 20), ((1,) * 130, 1 << 20)],
)
def test_chunks_serialized_in_pieces_are_the_frames_bytes(sizes: tuple[int, ...], max_chunk_bytes: int) -> None:
    """The edge's frames (head, chunks_wire, last, joined) are the bytes of the InferFrame built whole,
    for the first frame (session id) and the others, last or not, with empty data, a 160,000-byte
    chunk (a 3-byte length) and tensor indices past 127 (2-byte varints) included."""
    msgs = [encode(x, RAW) for x in _tensors(*sizes)]
    groups = list(to_pieces(msgs, max_chunk_bytes))
    assert any(not data for group in groups for _, _, data in group) == (0 in sizes)
    for i, group in enumerate(groups):
        session, last = ("abc" if i == 0 else ""), i == len(groups) - 1
        whole = split_inference_pb2.InferFrame(session_id=session, request_id=300 + i, last=last)
        add_chunks(whole.chunks, group)
        head = split_inference_pb2.InferFrame(session_id=session, request_id=300 + i).SerializeToString()
        tail = split_inference_pb2.InferFrame(last=last).SerializeToString()
        sent = b"".join([head, *chunks_wire(3, group), tail])
        assert sent == whole.SerializeToString()
        assert split_inference_pb2.InferFrame.FromString(sent) == whole


@pytest.mark.parametrize("request_id", [1, 127, 128, 300, 2**40])
def test_an_edge_requests_frames_are_the_inferframes_bytes(request_id: int) -> None:
    """What InferStream.submit queues (its session's field serialized once, the request id written by
    hand) is the bytes of each InferFrame built whole, over several frames."""
    from edge_node.cloud_link import InferStream

    msgs = [encode(x, RAW) for x in _tensors(3000, 10, 5000)]
    stream = InferStream(None, "0123456789abcdef" * 2, 3, 8000, lambda _stream: None)
    stream.submit(request_id, msgs)
    stream.close()
    frames = list(stream._frames())
    groups = list(to_chunks(msgs, 8000))
    assert len(groups) > 2
    expected = [
        split_inference_pb2.InferFrame(
            session_id=stream.session_id if i == 0 else "", request_id=request_id, chunks=g, last=i == len(groups) - 1
        ).SerializeToString()
        for i, g in enumerate(groups)
    ]
    assert frames == expected


@pytest.mark.parametrize(("shape", "tail"), _HEADER_CASES)
def test_header_of_keeps_every_field_but_the_payload(shape: tuple[int, ...], tail: str) -> None:
    # Scales, zero points, bits, axis and codec set.
    msg = encode(torch.randn(shape), EncodingSpec.parse(f"int6{tail}"))
    assert (msg.payload_size > 128 << 10) == (tail == "c+none")
    header = header_of(msg)
    assert not header.payload
    expected = tensor_pb2.Tensor()
    expected.CopyFrom(msg)
    expected.ClearField("payload")
    assert header == expected


@pytest.mark.parametrize("spec", ["fp32", "int8", "int4+zstd"])
@pytest.mark.parametrize("max_chunk_bytes", [1 << 20, 300])
def test_payloads_apart_give_the_same_frames(spec: str, max_chunk_bytes: int) -> None:
    from compressor import encode_apart

    xs = _tensors(1000, 37, 0)
    whole = [encode(x, EncodingSpec.parse(spec)) for x in xs]
    apart = [encode_apart(x, EncodingSpec.parse(spec)) for x in xs]
    headers, payloads = [h for h, _ in apart], [p for _, p in apart]
    assert [h.payload for h in headers] == [b""] * 3
    assert [p for p in payloads] == [t.payload for t in whole]
    framed = [b"".join(chunks_wire(3, g)) for g in to_pieces(whole, max_chunk_bytes)]
    assert [b"".join(chunks_wire(3, g)) for g in to_pieces(headers, max_chunk_bytes, payloads)] == framed
    with pytest.raises(CodecError, match=r"tensors\[0\].payload_size"):
        list(to_pieces(headers, max_chunk_bytes, [b"x", *payloads[1:]]))
    with pytest.raises(CodecError, match=r"tensors\[0\].payload: set"):
        list(to_pieces(whole, max_chunk_bytes, payloads))
