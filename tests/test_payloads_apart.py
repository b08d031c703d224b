"""An app's request, and the cloud's feature frames, parsed with their payloads read in place
(compressor.framing.split_payloads): the same message and payloads protobuf gives, protobuf's own parse
for anything unusual, and the Assembler's checks on data held apart."""

from __future__ import annotations

import pytest
import torch
from google.protobuf.message import DecodeError

from cloud_node.streams import parse_infer_frame
from compressor import RAW_UNCOMPRESSED, Assembler, CodecError, EncodingSpec, decode, decode_array, encode
from compressor.framing import PayloadsApart, field_key, split_payloads, varint
from edge_node.servicer import parse_infer_request
from protos.cleave.v1 import edge_pb2, tensor_pb2
from protos.cleave.v1 import split_inference_pb2 as si_pb2

INPUTS = 2  # EdgeInferRequest.inputs
PAYLOAD = field_key(10)  # Tensor.payload, length-delimited


def _tensor(spec: str = "fp32", shape: tuple[int, ...] = (1, 3, 8, 8)) -> tensor_pb2.Tensor:
    x = torch.rand(shape, generator=torch.Generator().manual_seed(sum(shape)))
    return encode(x, RAW_UNCOMPRESSED if spec == "raw" else EncodingSpec.parse(spec))


def _same_as_protobuf(data: bytes) -> None:
    """split_payloads gives protobuf's message (payloads cleared) and protobuf's payloads."""
    whole = edge_pb2.EdgeInferRequest.FromString(data)
    split = split_payloads(data, INPUTS)
    assert split is not None
    stripped, payloads = split
    apart = edge_pb2.EdgeInferRequest.FromString(stripped)
    assert [bytes(p) for p in payloads] == [t.payload for t in whole.inputs]
    for tensor in whole.inputs:
        tensor.ClearField("payload")
    assert apart == whole
    assert apart.SerializeToString() == whole.SerializeToString()


@pytest.mark.parametrize("spec", ["raw", "fp16", "int8", "int4+zstd"])
def test_requests_split_into_protobufs_message_and_payloads(spec: str) -> None:
    t = _tensor(spec)
    _same_as_protobuf(edge_pb2.EdgeInferRequest(request_id=9, inputs=[t], model="m").SerializeToString())
    _same_as_protobuf(edge_pb2.EdgeInferRequest(inputs=[t, _tensor(spec, (2, 3, 4, 4))]).SerializeToString())
    _same_as_protobuf(edge_pb2.EdgeInferRequest(request_id=1).SerializeToString())  # no inputs
    _same_as_protobuf(edge_pb2.EdgeInferRequest(inputs=[tensor_pb2.Tensor(shape=[1])]).SerializeToString())


def test_a_tensor_with_two_payloads_keeps_the_last_as_protobuf_does() -> None:
    t = _tensor()
    body = t.SerializeToString() + PAYLOAD + varint(3) + b"abc"
    data = edge_pb2.EdgeInferRequest(request_id=4).SerializeToString() + field_key(INPUTS) + varint(len(body)) + body
    _same_as_protobuf(data)
    assert bytes(split_payloads(data, INPUTS)[1][0]) == b"abc"


def test_fields_out_of_order_and_unknown_fields_are_kept() -> None:
    t = _tensor()
    payload = t.payload
    t.ClearField("payload")
    unknown = field_key(15, 0) + varint(300) + field_key(14, 5) + b"\x01\x02\x03\x04" + field_key(13, 1) + bytes(8)
    body = PAYLOAD + varint(len(payload)) + payload + unknown + t.SerializeToString()
    data = field_key(INPUTS) + varint(len(body)) + body + field_key(20) + varint(2) + b"hi"
    _same_as_protobuf(data)


@pytest.mark.parametrize(
    "data",
    [
        field_key(INPUTS, 0) + varint(5),  # inputs as a varint
        field_key(INPUTS) + varint(2) + field_key(10, 0) + varint(1),  # a payload that is a varint
        field_key(INPUTS) + varint(50) + b"short",  # a tensor longer than the message
        field_key(INPUTS) + varint(3) + PAYLOAD + varint(9) + b"x",  # a payload longer than its tensor
        b"\x80\x80",  # a truncated varint
        field_key(7, 3),  # a group
        b"\x00\x01",  # field 0
    ],
)
def test_anything_unusual_is_left_to_protobuf(data: bytes) -> None:
    assert split_payloads(data, INPUTS) is None


@pytest.mark.parametrize("data", [field_key(INPUTS) + varint(50) + b"short", b"\x80\x80", b"\x00\x01"])
def test_the_edge_answers_bad_bytes_with_protobufs_error(data: bytes) -> None:
    with pytest.raises(DecodeError) as apart:
        parse_infer_request(data, walk_from=0)
    with pytest.raises(DecodeError) as whole:
        edge_pb2.EdgeInferRequest.FromString(data)
    assert str(apart.value) == str(whole.value)


def test_the_edge_reads_the_payload_in_place_and_checks_it() -> None:
    t = _tensor("raw")
    data = edge_pb2.EdgeInferRequest(inputs=[t]).SerializeToString()
    parsed = parse_infer_request(data, walk_from=0)
    assert isinstance(parsed, PayloadsApart)
    (payload,) = parsed.payloads
    assert isinstance(payload, memoryview) and payload.obj is data  # a view, not a copy
    assert (decode_array(parsed.message.inputs[0], payload=payload) == decode_array(t)).all()
    corrupt = bytearray(data)
    corrupt[-20] ^= 1  # a byte of the payload
    parsed = parse_infer_request(bytes(corrupt), walk_from=0)
    with pytest.raises(Exception, match="tensor.crc32"):
        decode_array(parsed.message.inputs[0], payload=parsed.payloads[0])


def _frame(spec: str, max_chunk_bytes: int = 1 << 20) -> si_pb2.InferFrame:
    from compressor.framing import add_chunks, to_pieces

    frame = si_pb2.InferFrame(session_id="s" * 16, request_id=3, last=True)
    tensors = [_tensor(spec, (1, 8, 16, 16)), _tensor(spec, (1, 4, 8, 8))]
    for group in to_pieces(tensors, max_chunk_bytes):
        add_chunks(frame.chunks, group)
    return frame


@pytest.mark.parametrize("spec", ["raw", "int8", "int4+zstd"])
@pytest.mark.parametrize("max_chunk_bytes", [1 << 20, 700])
def test_a_frames_chunks_assemble_the_same_with_their_data_apart(spec: str, max_chunk_bytes: int) -> None:
    frame = _frame(spec, max_chunk_bytes)
    parsed = parse_infer_frame(frame.SerializeToString(), walk_from=0)
    assert isinstance(parsed, PayloadsApart)
    assert len(parsed.payloads) == len(frame.chunks)
    whole = Assembler()
    whole.add(frame.chunks)
    expected = whole.finish()
    apart = Assembler()
    apart.add(parsed.message.chunks, parsed.payloads)
    headers, payloads = apart.finish_apart()
    assert [bytes(p) for p in payloads] == [t.payload for t in expected]
    assert all(not h.payload for h in headers)
    for header, payload, tensor in zip(headers, payloads, expected, strict=True):
        assert (decode(header, payload=payload) == decode(tensor)).all()
        header.payload = bytes(payload)
        assert header == tensor
    again = Assembler()  # finish() still gives whole tensors from data held apart
    again.add(parsed.message.chunks, parsed.payloads)
    assert again.finish() == expected


def test_data_apart_is_checked_as_chunk_data_is() -> None:
    frame = _frame("raw")
    parsed = parse_infer_frame(frame.SerializeToString(), walk_from=0)
    short = [*parsed.payloads[:-1], parsed.payloads[-1][:-4]]  # the last tensor 4 bytes short
    assembler = Assembler()
    assembler.add(parsed.message.chunks, short)
    with pytest.raises(CodecError, match="tensor 1 got 1020 of its payload_size 1024 bytes"):
        assembler.finish_apart()
    long = [*parsed.payloads[:-1], bytes(parsed.payloads[-1]) + b"xx"]
    with pytest.raises(CodecError, match="data for tensor 1 beyond its payload_size 1024"):
        Assembler().add(parsed.message.chunks, long)


def test_an_unusual_frame_is_parsed_whole() -> None:
    data = _frame("raw").SerializeToString() + field_key(3, 0) + varint(1)  # chunks as a varint
    assert isinstance(parse_infer_frame(data, walk_from=0), si_pb2.InferFrame)
    with pytest.raises(DecodeError):
        parse_infer_frame(b"\x80\x80", walk_from=0)


def test_small_messages_are_parsed_whole() -> None:
    """Under WALK_FROM bytes the walk costs more than protobuf's copies: protobuf parses them."""
    from compressor.framing import WALK_FROM

    frame = _frame("raw").SerializeToString()
    assert len(frame) < WALK_FROM
    assert isinstance(parse_infer_frame(frame), si_pb2.InferFrame)
    small = edge_pb2.EdgeInferRequest(inputs=[_tensor("raw")]).SerializeToString()
    assert isinstance(parse_infer_request(small), edge_pb2.EdgeInferRequest)
    large = edge_pb2.EdgeInferRequest(inputs=[_tensor("raw", (1, 3, 128, 128))]).SerializeToString()
    assert len(large) >= WALK_FROM and isinstance(parse_infer_request(large), PayloadsApart)


# Review findings (branch review): what protobuf refuses, the walk must not accept; a hostile message
# must not cost the walk much more than protobuf's parse; views must not keep alive much more than the
# bytes a budget counts.

_TENSOR = tensor_pb2.Tensor(payload=b"abc", payload_size=3).SerializeToString()
_OVERLONG_INPUTS_KEY = bytes([field_key(INPUTS)[0] | 0x80]) + b"\x80" * 4 + b"\x00"  # 6 bytes: upb refuses it
_OVERLONG_PAYLOAD_KEY = bytes([PAYLOAD[0] | 0x80]) + b"\x80" * 4 + b"\x00"


@pytest.mark.parametrize(
    "data",
    [
        _OVERLONG_INPUTS_KEY + varint(len(_TENSOR)) + _TENSOR,  # the tensor field's key over 5 bytes
        field_key(INPUTS) + varint(len(_TENSOR) + 5) + _TENSOR.replace(PAYLOAD, _OVERLONG_PAYLOAD_KEY),
    ],
)
def test_an_overlong_key_is_refused_as_protobuf_refuses_it(data: bytes) -> None:
    with pytest.raises(DecodeError):
        edge_pb2.EdgeInferRequest.FromString(data)
    assert split_payloads(data, INPUTS) is None
    with pytest.raises(DecodeError):
        parse_infer_request(data, walk_from=0)


@pytest.mark.parametrize(
    "field",
    [field_key(15, 0) + varint(0), field_key(INPUTS) + varint(0), field_key(INPUTS) + varint(2) + PAYLOAD + b"\x00"],
)
def test_a_message_of_many_tiny_fields_is_left_to_protobuf(field: bytes) -> None:
    """Walking 4 MB of 2-byte fields took ~1.3 s of Python (protobuf: 0.03 s), and 2 MB of empty tensors
    ~200 MB of memoryviews: a walk stops after a bound on the fields it reads."""
    data = field * 20_000
    edge_pb2.EdgeInferRequest.FromString(data)  # protobuf parses it
    assert split_payloads(data, INPUTS) is None


def test_a_frame_padded_around_its_data_is_not_held_by_views() -> None:
    """A pending request's data views keep their whole frame alive, but its budget counts only the data:
    64 pending requests of 64 MB frames with a byte of data each held 4 GB against max_stream_bytes."""
    header = tensor_pb2.Tensor(dtype=tensor_pb2.UINT8, shape=[1], payload_size=1)
    frame = si_pb2.InferFrame(session_id="s", request_id=1)
    frame.chunks.add(index=0, header=header, data=b"x")
    chunk = frame.chunks[0].SerializeToString()
    chunk = chunk.replace(b"\x1a\x01x", b"\x1a" + varint(1 << 20) + bytes(1 << 20) + b"\x1a\x01x")  # data twice
    padded = [
        frame.SerializeToString() + field_key(15) + varint(1 << 20) + bytes(1 << 20),  # an unknown field
        si_pb2.InferFrame(session_id="s", request_id=1).SerializeToString() + b"\x1a" + varint(len(chunk)) + chunk,
    ]
    for data in padded:
        whole = si_pb2.InferFrame.FromString(data)
        assert [c.data for c in whole.chunks] == [b"x"]
        parsed = parse_infer_frame(data)
        if isinstance(parsed, PayloadsApart):
            held = sum(len(d) for d in parsed.payloads)
            assert all(len(d.obj) <= 2 * held for d in parsed.payloads), "views pin a frame 2x over their data"
        else:
            assert parsed == whole
