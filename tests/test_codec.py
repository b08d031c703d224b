"""Tensor codec: bit packing, clipping, quantization, EncodingSpec, and decode's validation."""

from __future__ import annotations

import math
import tracemalloc
import zlib
from fractions import Fraction

import numpy as np
import pytest
import torch
import zstandard

from compressor import (
    RAW_UNCOMPRESSED,
    CodecError,
    CodecLimits,
    EncodingSpec,
    clip_range,
    clipper_names,
    decode,
    decode_array,
    decode_many,
    encode,
    encode_many,
    pack,
    packed_size,
    register_clipper,
    unpack,
)
from protos.cleave.v1 import tensor_pb2

BITS = (2, 3, 4, 5, 6, 8)


def _reseal(msg: tensor_pb2.Tensor) -> tensor_pb2.Tensor:
    """Make payload_size and crc32 agree with a tampered payload, so deeper checks are reached."""
    msg.payload_size = len(msg.payload)
    msg.crc32 = zlib.crc32(msg.payload)
    return msg


def _activations(*shape: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g) * torch.linspace(0.1, 3.0, shape[1]).reshape(1, -1, 1, 1) + 0.5


# ---------------------------------------------------------------------------------------- bitpack


def _reference_pack(values: np.ndarray, bits: int) -> bytes:
    planes = np.unpackbits(values[:, None], axis=1, count=bits, bitorder="little")
    return np.packbits(planes.reshape(-1), bitorder="little").tobytes()


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("count", [0, 1, 7, 1000, 1001])
def test_bitpack_round_trip_and_layout(bits: int, count: int) -> None:
    values = np.random.default_rng(bits * 7919 + count).integers(0, 1 << bits, count, dtype=np.uint8)
    packed = pack(values, bits)
    assert len(packed) == math.ceil(count * bits / 8) == packed_size(count, bits)
    assert packed == _reference_pack(values, bits)  # little-endian bit stream, as documented
    out = unpack(packed, bits, count)
    assert out.dtype == np.uint8 and out.flags.writeable
    np.testing.assert_array_equal(out, values)


def test_bitpack_rejects_bad_input() -> None:
    with pytest.raises(ValueError, match="data: 3 bytes, expected 4"):
        unpack(bytes(3), 4, 8)
    with pytest.raises(ValueError, match="data: 5 bytes, expected 4"):
        unpack(bytes(5), 4, 8)
    with pytest.raises(ValueError, match="does not fit in 3 bits"):
        pack(np.array([1, 8], np.uint8), 3)
    with pytest.raises(ValueError, match="bits: 7"):
        pack(np.zeros(4, np.uint8), 7)
    with pytest.raises(ValueError, match="not uint8"):
        pack(np.zeros(4, np.int32), 4)


# ----------------------------------------------------------------------------------- round trips

RAW_DTYPES = [torch.float32, torch.float16, torch.uint8, torch.int8, torch.int32, torch.int64, torch.bool]


@pytest.mark.parametrize("codec", ["zstd", "none"])
@pytest.mark.parametrize("dtype", RAW_DTYPES)
def test_raw_round_trip_is_bit_exact(dtype: torch.dtype, codec: str) -> None:
    g = torch.Generator().manual_seed(1)
    if dtype.is_floating_point:
        x = (torch.randn(3, 5, 7, generator=g) * 100).to(dtype)
        x.view(-1)[:3] = torch.tensor([float("nan"), float("inf"), -0.0], dtype=dtype)
    elif dtype is torch.bool:
        x = torch.rand(3, 5, 7, generator=g) > 0.5
    else:
        info = torch.iinfo(dtype)
        low, high = max(info.min, -(2**40)), min(info.max, 2**40)
        x = torch.randint(low, high, (3, 5, 7), generator=g, dtype=dtype)
    msg = encode(x, EncodingSpec(codec=codec))
    assert msg.encoding == tensor_pb2.RAW and msg.raw_size == x.numel() * x.element_size()
    y = decode(msg)
    assert y.dtype == dtype and y.shape == x.shape
    assert y.numpy().tobytes() == x.numpy().tobytes()  # bit exact, NaN payloads and -0.0 included


@pytest.mark.parametrize("codec", ["zstd", "none"])
def test_fp16_round_trip_equals_half_cast(codec: str) -> None:
    x = _activations(2, 8, 9, 9)
    msg = encode(x, EncodingSpec(encoding="fp16", codec=codec))
    assert msg.dtype == tensor_pb2.FLOAT32 and msg.encoding == tensor_pb2.FP16
    assert msg.raw_size == 2 * x.numel()
    y = decode(msg)
    assert y.dtype == torch.float32
    assert torch.equal(y, x.half().float())


def _bound(msg: tensor_pb2.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Half a step per element (per-channel scales broadcast), plus float32 rounding slack."""
    scales = torch.tensor(list(msg.scales))
    if msg.axis >= 0:
        shape = [1] * x.ndim
        shape[msg.axis] = -1
        scales = scales.reshape(shape)
    return scales / 2 + 1e-6 * x.abs().max()


@pytest.mark.parametrize("codec", ["zstd", "none"])
@pytest.mark.parametrize("clip", ["minmax", "percentile"])
@pytest.mark.parametrize("per_channel", [False, True])
@pytest.mark.parametrize("bits", BITS)
def test_affine_error_is_within_half_a_step(bits: int, per_channel: bool, clip: str, codec: str) -> None:
    x = _activations(2, 8, 12, 12, seed=bits)
    x[0, 3, 0, 0] = 40.0  # an outlier that percentile clipping saturates
    params = (("percentile", 99.0),) if clip == "percentile" else ()
    spec = EncodingSpec("affine", bits, per_channel, 1, clip, params, codec)
    msg = encode(x, spec)
    assert msg.bits == bits and msg.axis == (1 if per_channel else -1)
    assert len(msg.scales) == len(msg.zero_points) == (8 if per_channel else 1)
    assert msg.raw_size == packed_size(x.numel(), bits)
    y = decode(msg)
    assert y.dtype == torch.float32 and y.shape == x.shape

    lo, hi = clip_range(x, clip, 1 if per_channel else None, bits, **dict(params))
    if per_channel:
        lo, hi = lo.reshape(1, -1, 1, 1), hi.reshape(1, -1, 1, 1)
    expected = torch.maximum(torch.minimum(x, hi), lo)  # values outside the range go to its edges
    assert ((y - expected).abs() <= _bound(msg, x)).all()
    if clip == "percentile":
        assert y[0, 3, 0, 0] < 20.0  # the outlier really was clipped


@pytest.mark.parametrize("spec", ["raw", "fp16", "int4", "int3c", "int8c0+none"])
def test_zero_dim_and_empty_tensors(spec: str) -> None:
    s = EncodingSpec.parse(spec)
    shapes = [(2, 0, 3), (3, 0), (0, 5)] if s.per_channel else [(), (0,), (2, 0, 3)]
    for shape in shapes:
        x = torch.full(shape, 1.5)
        y = decode(encode(x, s))
        assert y.shape == x.shape and y.dtype == torch.float32
        assert torch.equal(y, x)


@pytest.mark.parametrize("spec", ["raw", "fp16", "int8", "int5c", "int4c-1:percentile"])
def test_non_contiguous_input(spec: str) -> None:
    base = _activations(1, 6, 10, 8)
    x = base.transpose(1, 3)[:, ::2]  # (1, 4, 10, 6), strided
    assert not x.is_contiguous()
    y = decode(encode(x, EncodingSpec.parse(spec)))
    z = decode(encode(x.contiguous(), EncodingSpec.parse(spec)))
    assert y.shape == x.shape and torch.equal(y, z)
    if spec == "raw":
        assert torch.equal(y, x)


@pytest.mark.parametrize("bits", BITS)
def test_constant_tensors_round_trip_exactly(bits: int) -> None:
    for value in (0.0, 3.7, -2.5, 1e-30, -3e38):
        x = torch.full((2, 3, 4), value)
        for spec in (EncodingSpec("affine", bits), EncodingSpec("affine", bits, per_channel=True)):
            assert torch.equal(decode(encode(x, spec)), x), (value, spec)
    # per channel: every channel its own constant
    x = torch.tensor([0.0, -1.25, 7.0, 1e-3]).reshape(1, 4, 1, 1).expand(2, 4, 3, 3)
    assert torch.equal(decode(encode(x, EncodingSpec("affine", bits, per_channel=True))), x)


def test_ranges_excluding_zero_keep_the_guarantee() -> None:
    x = torch.linspace(100.0, 101.0, 1000)  # the grid must still reach 0 (zero point in [0, qmax])
    msg = encode(x, EncodingSpec.parse("int8"))
    assert msg.zero_points[0] == 0
    assert ((decode(msg) - x).abs() <= _bound(msg, x)).all()


def test_negative_axis_and_other_axes() -> None:
    x = _activations(2, 3, 4, 5)
    for axis, channels in ((-1, 5), (0, 2), (2, 4)):
        msg = encode(x, EncodingSpec("affine", 6, per_channel=True, axis=axis))
        assert msg.axis == axis % 4 and len(msg.scales) == channels
        assert ((decode(msg) - x).abs() <= _bound(msg, x)).all()


def test_encode_rejects_what_it_cannot_represent() -> None:
    ints = torch.arange(10)
    with pytest.raises(CodecError, match=r"x\.dtype: fp16 encodes floating"):
        encode(ints, EncodingSpec.parse("fp16"))
    with pytest.raises(CodecError, match=r"x\.dtype: affine encodes floating"):
        encode(ints, EncodingSpec.parse("int8"))
    with pytest.raises(CodecError, match=r"x\.dtype: torch\.float64 cannot be sent raw"):
        encode(torch.zeros(3, dtype=torch.float64), EncodingSpec())
    for bad in (float("nan"), float("inf")):
        with pytest.raises(CodecError, match="finite"):
            encode(torch.tensor([1.0, bad]), EncodingSpec.parse("int4"))
    with pytest.raises(CodecError, match=r"spec\.axis: 4 is out of range"):
        encode(torch.zeros(2, 3), EncodingSpec("affine", 8, per_channel=True, axis=4))
    with pytest.raises(CodecError, match=r"spec\.axis"):
        encode(torch.tensor(1.0), EncodingSpec.parse("int8c"))


def test_float64_and_bfloat16_can_be_quantized() -> None:
    x = _activations(1, 4, 3, 3).double()
    assert decode(encode(x, EncodingSpec.parse("fp16"))).dtype == torch.float32
    y = decode(encode(x.bfloat16(), EncodingSpec.parse("int8")))
    assert y.dtype == torch.float32 and (y - x.bfloat16().float()).abs().max() < 0.1


def test_many_helpers_and_indexed_errors() -> None:
    xs = [torch.arange(6, dtype=torch.int32).reshape(2, 3), torch.ones(4)]
    msgs = encode_many(xs, EncodingSpec())
    assert all(torch.equal(a, b) for a, b in zip(decode_many(msgs), xs, strict=True))
    msgs[1].crc32 ^= 1
    with pytest.raises(CodecError, match=r"^tensors\[1\]\.crc32"):
        decode_many(msgs)


@pytest.mark.parametrize("p", [100.0, 99.99, 99.0, 75.0, 50.0, 50.004])
def test_percentile_clipper_is_nearest_rank_on_both_tails(p: float) -> None:
    x = torch.randn(2, 5, 5000, generator=torch.Generator().manual_seed(3))  # 10_000 per channel
    lo, hi = clip_range(x, "percentile", 1, 8, percentile=p)
    rows = x.movedim(1, 0).reshape(5, -1).sort(dim=1).values
    n = rows.shape[1]
    k = max(math.ceil(Fraction(str(p)) * n / 100), (n + 2) // 2)  # 1-based rank of hi, >= the median
    assert p != 99.99 or k == 9999
    assert torch.equal(hi, rows[:, k - 1]) and torch.equal(lo, rows[:, n - k])
    lo_t, hi_t = clip_range(x, "percentile", None, 8, percentile=p)
    flat = x.reshape(-1).sort().values
    k = max(math.ceil(Fraction(str(p)) * flat.numel() / 100), (flat.numel() + 2) // 2)
    assert lo_t.shape == () and lo_t == flat[flat.numel() - k] and hi_t == flat[k - 1]


def test_custom_clipper_is_used_by_encode() -> None:
    calls = []

    def half_range(rows: torch.Tensor, bits: int, fraction: float = 0.5) -> tuple[torch.Tensor, torch.Tensor]:
        calls.append((tuple(rows.shape), bits))
        lo, hi = torch.aminmax(rows, dim=1)
        return lo * fraction, hi * fraction

    register_clipper("test_half_range", half_range, replace=True)  # replace: the test may run twice
    x = torch.linspace(-4.0, 4.0, 64).reshape(1, 4, 4, 4)
    msg = encode(x, EncodingSpec.parse("int4c:test_half_range(fraction=0.25)"))
    assert calls == [((4, 16), 4)]  # one row per channel, and the bit width
    y = decode(msg)
    assert y.max() <= 1.0 + 1e-6 and y.min() >= -1.0 - 1e-6  # saturated at a quarter of the range
    with pytest.raises(CodecError, match=r"clip_params: .*unexpected keyword argument 'nope'"):
        EncodingSpec.parse("int4:test_half_range(nope=1)")
    with pytest.raises(ValueError, match="already registered"):
        register_clipper("test_half_range", half_range)


def test_unknown_clipper_lists_the_registered_ones() -> None:
    with pytest.raises(CodecError, match=r"EncodingSpec\.clip: unknown clipping method 'nosuch'") as err:
        EncodingSpec(encoding="affine", clip="nosuch")
    registered = str(err.value).split("registered: ")[1]
    assert registered.split(", ") == sorted(clipper_names())
    assert {"minmax", "percentile", "aciq", "fixed"} <= set(clipper_names())


# ------------------------------------------------------------------------------ decode validation


def _affine_msg(**spec: object) -> tensor_pb2.Tensor:
    return encode(_activations(1, 4, 5, 5), EncodingSpec(encoding="affine", **spec))


def _corrupt(mutate, base: tensor_pb2.Tensor | None = None) -> tensor_pb2.Tensor:
    msg = tensor_pb2.Tensor()
    msg.CopyFrom(base if base is not None else _affine_msg(bits=4, per_channel=True))
    mutate(msg)
    return msg


def _trim_payload(msg: tensor_pb2.Tensor) -> None:
    msg.payload = msg.payload[:-4]


def _flip_bit(msg: tensor_pb2.Tensor) -> None:
    data = bytearray(msg.payload)
    data[len(data) // 2] ^= 0x10
    msg.payload = bytes(data)


CORRUPTIONS = {
    "truncated payload": (_trim_payload, r"tensor\.payload_size: \d+, but the payload has"),
    "flipped bit": (_flip_bit, r"tensor\.crc32"),
    "payload_size lie": (lambda m: setattr(m, "payload_size", m.payload_size + 1), r"tensor\.payload_size"),
    "raw_size larger": (lambda m: setattr(m, "raw_size", m.raw_size + 1), r"tensor\.raw_size"),
    "raw_size smaller": (lambda m: setattr(m, "raw_size", m.raw_size - 1), r"tensor\.raw_size"),
    "bits 7": (lambda m: setattr(m, "bits", 7), r"tensor\.bits: 7 is not one of 2,3,4,5,6,8"),
    "bits 0": (lambda m: setattr(m, "bits", 0), r"tensor\.bits: 0"),
    "axis out of range": (lambda m: setattr(m, "axis", 4), r"tensor\.axis: 4"),
    "axis -2": (lambda m: setattr(m, "axis", -2), r"tensor\.axis: -2"),
    "too few scales": (lambda m: m.scales.pop(), r"tensor\.scales: 3 values, expected 4"),
    "too many zero points": (lambda m: m.zero_points.append(0), r"tensor\.zero_points: 5 values"),
    "negative scale": (lambda m: m.scales.__setitem__(1, -0.5), r"tensor\.scales: .*finite and > 0"),
    "zero scale": (lambda m: m.scales.__setitem__(1, 0.0), r"tensor\.scales"),
    "NaN scale": (lambda m: m.scales.__setitem__(0, float("nan")), r"tensor\.scales"),
    "zero point 16": (lambda m: m.zero_points.__setitem__(2, 16), r"tensor\.zero_points: .*\[0, 15\]"),
    "zero point -1": (lambda m: m.zero_points.__setitem__(2, -1), r"tensor\.zero_points"),
    "unknown dtype": (lambda m: setattr(m, "dtype", 42), r"tensor\.dtype: 42 is not a known DType"),
    "unset dtype": (lambda m: setattr(m, "dtype", 0), r"tensor\.dtype: 0"),
    "unknown encoding": (lambda m: setattr(m, "encoding", 9), r"tensor\.encoding: 9"),
    "unknown codec": (lambda m: setattr(m, "codec", 7), r"tensor\.codec: 7"),
    "negative dim": (lambda m: m.shape.__setitem__(1, -4), r"tensor\.shape\[1\]: -4 is negative"),
    "affine as int32": (lambda m: setattr(m, "dtype", tensor_pb2.INT32), r"tensor\.dtype: AFFINE"),
}


@pytest.mark.parametrize("name", list(CORRUPTIONS))
def test_decode_rejects_corruption_naming_the_field(name: str) -> None:
    mutate, pattern = CORRUPTIONS[name]
    with pytest.raises(CodecError, match=pattern):
        decode(_corrupt(mutate))


@pytest.mark.parametrize(
    ("scale", "zero_point", "pattern"),
    [
        (-0.5, 0, r"tensor\.scales: every scale must be finite and > 0"),
        (0.0, 0, r"tensor\.scales"),
        (float("nan"), 0, r"tensor\.scales"),
        (float("inf"), 0, r"tensor\.scales"),
        (0.25, 16, r"tensor\.zero_points: every zero point must be in \[0, 15\]"),
        (0.25, -1, r"tensor\.zero_points"),
    ],
)
def test_per_tensor_parameters_are_checked_like_per_channel_ones(scale: float, zero_point: int, pattern: str) -> None:
    msg = encode(_activations(1, 4, 3, 3), EncodingSpec("affine", 4))
    assert msg.axis == -1 and len(msg.scales) == 1
    msg.scales[0], msg.zero_points[0] = scale, zero_point
    with pytest.raises(CodecError, match=pattern):
        decode(msg)


@pytest.mark.parametrize("codec", ["zstd", "none"])
def test_truncated_payload_with_consistent_sizes_is_still_rejected(codec: str) -> None:
    def trim_and_reseal(msg: tensor_pb2.Tensor) -> None:
        _trim_payload(msg)
        _reseal(msg)

    msg = _corrupt(trim_and_reseal, _affine_msg(bits=4, codec=codec))
    # zstd: the frame is cut short; none: the payload no longer matches raw_size.
    with pytest.raises(CodecError, match=r"tensor\.payload"):
        decode(msg)


def test_stray_affine_fields_on_raw_are_rejected() -> None:
    raw = encode(torch.ones(4), EncodingSpec())
    with pytest.raises(CodecError, match=r"tensor\.bits: set, but only AFFINE"):
        decode(_corrupt(lambda m: setattr(m, "bits", 8), raw))
    with pytest.raises(CodecError, match=r"tensor\.scales"):
        decode(_corrupt(lambda m: m.scales.append(1.0), raw))
    fp16 = encode(torch.ones(4), EncodingSpec("fp16"))
    with pytest.raises(CodecError, match=r"tensor\.dtype: FP16 decodes to FLOAT32"):
        decode(_corrupt(lambda m: setattr(m, "dtype", tensor_pb2.INT32), fp16))


def test_bool_payload_must_be_zero_or_one() -> None:
    msg = encode(torch.tensor([True, False, True]), EncodingSpec(codec="none"))
    msg.payload = b"\x01\x02\x00"
    with pytest.raises(CodecError, match=r"tensor\.payload: a BOOL byte"):
        decode(_reseal(msg))


def test_huge_shapes_are_rejected_before_allocating() -> None:
    msg = tensor_pb2.Tensor(
        dtype=tensor_pb2.FLOAT32,
        shape=[1 << 20, 1 << 20],
        encoding=tensor_pb2.RAW,
        codec=tensor_pb2.NONE,
        raw_size=4 << 40,
        payload_size=0,
    )
    tracemalloc.start()
    try:
        with pytest.raises(CodecError, match=r"tensor\.shape: 1099511627776 elements exceed max_elements"):
            decode(msg)
        assert tracemalloc.get_traced_memory()[1] < 1 << 20
    finally:
        tracemalloc.stop()


def test_limits_are_configurable() -> None:
    msg = encode(torch.zeros(2, 3, 4), EncodingSpec())
    assert decode(msg, CodecLimits(max_elements=24, max_dims=3)).shape == (2, 3, 4)
    with pytest.raises(CodecError, match=r"tensor\.shape: 24 elements exceed max_elements 23"):
        decode(msg, CodecLimits(max_elements=23))
    with pytest.raises(CodecError, match=r"tensor\.shape: 3 dims exceed max_dims 2"):
        decode(msg, CodecLimits(max_dims=2))
    with pytest.raises(CodecError, match=r"tensor\.payload_size: \d+ exceeds max_payload_bytes 8"):
        decode(msg, CodecLimits(max_payload_bytes=8))


def _zstd_msg(payload: bytes, elements: int) -> tensor_pb2.Tensor:
    """A raw float32 message claiming `elements` values, carrying an arbitrary zstd payload."""
    msg = tensor_pb2.Tensor(
        dtype=tensor_pb2.FLOAT32,
        shape=[elements],
        encoding=tensor_pb2.RAW,
        codec=tensor_pb2.ZSTD,
        raw_size=4 * elements,
        payload=payload,
    )
    return _reseal(msg)


def test_zstd_bomb_declaring_its_real_size_is_rejected() -> None:
    bomb = zstandard.ZstdCompressor().compress(bytes(16 << 20))  # 16 MiB of zeros, ~1 KB on the wire
    pattern = r"tensor\.payload: zstd frame declares 16777216 bytes, raw_size is 40000"
    with pytest.raises(CodecError, match=pattern):
        decode(_zstd_msg(bomb, 10_000))


def test_zstd_payload_larger_than_zstd_ever_writes_is_refused_from_the_header() -> None:
    # zstd never writes more than ZSTD_COMPRESSBOUND(raw_size) bytes: a bigger payload is refused
    # before it is read, so a tiny raw_size cannot come with megabytes to hold and scan.
    msg = _zstd_msg(bytes(2000), 100)
    with pytest.raises(CodecError, match=r"tensor\.payload_size: 2000, but zstd never needs more than \d+ bytes"):
        decode(msg)


def test_zstd_bomb_lying_about_its_size_is_stopped_at_raw_size() -> None:
    # A frame whose header claims 40000 bytes but whose blocks hold 64 MiB.
    honest = zstandard.ZstdCompressor(write_content_size=False).compress(bytes(64 << 20))
    header = zstandard.frame_header_size(honest)
    window = honest[5:6]  # no content size and not single-segment: magic, descriptor, window byte
    liar = b"\x28\xb5\x2f\xfd" + bytes([0x40]) + window + (40_000 - 256).to_bytes(2, "little") + honest[header:]
    assert zstandard.get_frame_parameters(liar).content_size == 40_000
    tracemalloc.start()
    try:
        with pytest.raises(CodecError, match=r"tensor\.payload: "):
            decode(_zstd_msg(liar, 10_000))
        assert tracemalloc.get_traced_memory()[1] < 4 << 20  # nothing near 64 MiB was held
    finally:
        tracemalloc.stop()


def _affine_zstd_msg(payload: bytes, count: int) -> tensor_pb2.Tensor:
    """8-bit affine codes of ``count`` values, per tensor, with ``payload`` as their zstd frame."""
    msg = tensor_pb2.Tensor(
        dtype=tensor_pb2.FLOAT32,
        shape=[count],
        encoding=tensor_pb2.AFFINE,
        bits=8,
        axis=-1,
        scales=[0.5],
        zero_points=[3],
        codec=tensor_pb2.ZSTD,
        raw_size=count,
        payload=payload,
    )
    return _reseal(msg)


def test_affine_zstd_frames_are_held_to_raw_size_too() -> None:
    # Affine payloads decompress in one call (read-only output): the same limits must hold.
    honest = zstandard.ZstdCompressor(write_content_size=False).compress(bytes(64 << 20))
    header = zstandard.frame_header_size(honest)
    liar = b"\x28\xb5\x2f\xfd" + bytes([0x40]) + honest[5:6] + (40_000 - 256).to_bytes(2, "little") + honest[header:]
    tracemalloc.start()
    try:
        with pytest.raises(CodecError, match=r"tensor\.payload: corrupt zstd data"):
            decode(_affine_zstd_msg(liar, 40_000))
        assert tracemalloc.get_traced_memory()[1] < 4 << 20  # nothing near 64 MiB was held
    finally:
        tracemalloc.stop()
    zeros = zstandard.ZstdCompressor().compress(bytes(400))
    for bad in (zeros + zeros, zeros + b"trailing garbage"):
        with pytest.raises(CodecError, match=r"tensor\.payload: corrupt zstd data"):
            decode(_affine_zstd_msg(bad, 400))
    frame = zstandard.ZstdCompressor().compress(bytes(range(100)))
    with pytest.raises(CodecError, match=r"tensor\.payload: zstd frame declares 100 bytes, raw_size is 99"):
        decode(_affine_zstd_msg(frame, 99))
    want = (torch.arange(100, dtype=torch.float32) - 3) * 0.5
    assert torch.equal(decode(_affine_zstd_msg(frame, 100)), want)


def test_zstd_frames_must_declare_their_size_and_end_cleanly() -> None:
    no_size = zstandard.ZstdCompressor(write_content_size=False).compress(bytes(400))
    with pytest.raises(CodecError, match=r"tensor\.payload: zstd frame does not declare its content size"):
        decode(_zstd_msg(no_size, 100))
    frame = zstandard.ZstdCompressor().compress(bytes(400))
    with pytest.raises(CodecError, match=r"tensor\.payload"):
        decode(_zstd_msg(frame + b"trailing garbage", 100))
    with pytest.raises(CodecError, match=r"tensor\.payload: zstd data expands beyond raw_size"):
        decode(_zstd_msg(frame + frame, 100))
    assert torch.equal(decode(_zstd_msg(frame, 100)), torch.zeros(100))


@pytest.mark.parametrize("garbage", [b"", b"\x00" * 16, b"not zstd, not at all", b"\x28\xb5\x2f\xfd\xff\xff"])
def test_garbage_zstd_is_rejected(garbage: bytes) -> None:
    with pytest.raises(CodecError, match=r"tensor\.payload"):
        decode(_zstd_msg(garbage, 100))


# ------------------------------------------------------------------------------------ EncodingSpec

DOCUMENTED = {
    "raw": EncodingSpec(),
    "fp32": EncodingSpec(),
    "fp16": EncodingSpec(encoding="fp16"),
    "fp16+none": EncodingSpec(encoding="fp16", codec="none"),
    "int8": EncodingSpec(encoding="affine", bits=8),
    "int4": EncodingSpec(encoding="affine", bits=4),
    "int4c": EncodingSpec(encoding="affine", bits=4, per_channel=True),
    "int6c0": EncodingSpec(encoding="affine", bits=6, per_channel=True, axis=0),
    "int2c-1": EncodingSpec(encoding="affine", bits=2, per_channel=True, axis=-1),
    "int3:percentile": EncodingSpec(encoding="affine", bits=3, clip="percentile"),
    "int4c:percentile(percentile=99.9)+zstd9t2": EncodingSpec(
        "affine", 4, True, 1, "percentile", (("percentile", 99.9),), "zstd", 9, 2
    ),
    "int5:percentile(percentile=99)": EncodingSpec(
        "affine",
        5,
        clip="percentile",
        clip_params={"percentile": 99},  # a mapping is accepted
    ),
    "int8+zstd-5": EncodingSpec(encoding="affine", level=-5),
    "raw+zstdt4": EncodingSpec(threads=4),
    "raw+zstd3": EncodingSpec(level=3),
    "int8+none": EncodingSpec(encoding="affine", codec="none"),
}


@pytest.mark.parametrize("text", list(DOCUMENTED))
def test_spec_parse_and_str_round_trip(text: str) -> None:
    spec = EncodingSpec.parse(text)
    assert spec == DOCUMENTED[text]
    assert EncodingSpec.parse(str(spec)) == spec
    assert str(spec) == (text if text != "fp32" else "raw")
    hash(spec)  # frozen and hashable, clip params included


def test_spec_str_of_floats_never_uses_plus() -> None:
    spec = EncodingSpec("affine", clip="percentile", clip_params=(("percentile", 1e20 / 1e18),))
    assert EncodingSpec.parse(str(spec)) == spec
    big = EncodingSpec("affine", clip="test_identity_clip", clip_params=(("scale", 1e20),))
    assert "+" not in str(big) and EncodingSpec.parse(str(big)) == big


def _identity_clip(rows: torch.Tensor, bits: int, scale: float = 1.0, mode: str = "x"):
    return torch.aminmax(rows, dim=1)


register_clipper("test_identity_clip", _identity_clip)


@pytest.mark.parametrize(
    ("text", "pattern"),
    [
        ("", r"encoding ''"),
        ("int7", r"bits: 7 is not one of"),
        ("int4x", r"encoding 'int4x'"),
        ("float16", r"encoding 'float16'"),
        ("fp16:percentile", r"clip 'percentile' applies only to int"),
        ("int4:nosuch", r"unknown clipping method 'nosuch'"),
        ("int4:Percentile", r"clip: 'Percentile' is not name"),
        ("int4:percentile(percentile)", r"parameter 'percentile' is not key=value"),
        ("int4:percentile(percentile=1;2)", r"value '1;2'"),
        ("int4:percentile(q=99)", r"clip_params: .*'q'"),
        ("int4:percentile(percentile=1,percentile=2)", r"a key appears twice"),
        ("int4+lz4", r"codec 'lz4'"),
        ("int4+zstd99", r"level: 99"),
        ("raw+zstd0", r"level: 0"),
        ("raw+none+none", r"codec 'none\+none'"),
        ("int4:test_identity_clip(mode=UPPER)", r"value 'UPPER'"),
    ],
)
def test_spec_parse_rejects_bad_text_naming_the_part(text: str, pattern: str) -> None:
    with pytest.raises(ValueError, match=pattern) as info:
        EncodingSpec.parse(text)
    assert isinstance(info.value, CodecError)


def test_spec_fields_the_encoding_ignores_must_stay_default() -> None:
    with pytest.raises(CodecError, match=r"EncodingSpec\.bits: 4 is set but only affine uses it"):
        EncodingSpec(encoding="fp16", bits=4)
    with pytest.raises(CodecError, match=r"EncodingSpec\.axis: 0 is set but only per-channel affine"):
        EncodingSpec(encoding="affine", axis=0)
    with pytest.raises(CodecError, match=r"EncodingSpec\.level"):
        EncodingSpec(codec="none", level=9)
    with pytest.raises(CodecError, match=r"EncodingSpec\.threads: -1"):
        EncodingSpec(threads=-1)
    with pytest.raises(CodecError, match=r"EncodingSpec\.per_channel: 1 is not a bool"):
        EncodingSpec(encoding="affine", per_channel=1)


@pytest.mark.parametrize(
    "text", ["raw", "fp16+none", "int8", "int4c", "int3:percentile(percentile=99.5)+zstd12", "int2+none"]
)
def test_spec_proto_round_trip(text: str) -> None:
    spec = EncodingSpec.parse(text)
    msg = spec.to_proto()
    wire = tensor_pb2.TensorEncoding.FromString(msg.SerializeToString())
    assert EncodingSpec.from_proto(wire) == spec


def test_spec_from_proto_defaults_and_validation() -> None:
    te = tensor_pb2.TensorEncoding
    assert EncodingSpec.from_proto(te()) == EncodingSpec(codec="none")  # "unset: raw fp32, no codec"
    int8 = te(encoding=tensor_pb2.AFFINE, codec=tensor_pb2.ZSTD)  # bits and level unset: 8 and 3
    assert EncodingSpec.from_proto(int8) == EncodingSpec.parse("int8")
    cases = [
        (te(encoding=tensor_pb2.AFFINE, bits=7), r"TensorEncoding\.bits: 7 is not one of 2,3,4,5,6,8"),
        (te(encoding=11), r"TensorEncoding\.encoding: 11"),
        (te(codec=5), r"TensorEncoding\.codec: 5"),
        (te(encoding=tensor_pb2.AFFINE, clip="nosuch"), r"TensorEncoding\.clip: unknown clipping method"),
        (te(encoding=tensor_pb2.AFFINE, clip="percentile(x"), r"TensorEncoding\.clip"),
        (te(encoding=tensor_pb2.RAW, per_channel=True), r"TensorEncoding\.per_channel"),
        (te(codec=tensor_pb2.ZSTD, level=40), r"TensorEncoding\.level: 40"),
        (te(codec=tensor_pb2.NONE, level=5), r"TensorEncoding\.level: 5 is set but only zstd"),
    ]
    for msg, pattern in cases:
        with pytest.raises(CodecError, match=pattern):
            EncodingSpec.from_proto(msg)


# ------------------------------------------------------------------ read-only arrays (the ONNX edge)


@pytest.mark.parametrize("codec", ["none", "zstd1"])
@pytest.mark.parametrize("dtype", [np.float32, np.float16, np.int64, np.uint8, np.bool_])
def test_read_only_raw_decode_is_a_view_that_refuses_writes(dtype: type, codec: str) -> None:
    x = (np.arange(2 * 3 * 5) % 2 if dtype is np.bool_ else np.arange(2 * 3 * 5) - 7).astype(dtype).reshape(2, 3, 5)
    msg = encode(x, EncodingSpec.parse(f"raw+{codec}"))
    view = decode_array(msg, writable=False)
    assert view.dtype == x.dtype and np.array_equal(view, x)
    assert not view.flags.writeable
    with pytest.raises(ValueError, match="read-only"):
        view[0, 0, 0] = 1
    # The default still hands back an array the caller owns: writing to it changes nothing else.
    owned = decode_array(msg)
    assert owned.flags.writeable
    owned[...] = 0
    assert np.array_equal(decode_array(msg, writable=False), x)


@pytest.mark.parametrize("text", ["fp16", "fp16+none", "int8", "int4", "int4c+none"])
def test_read_only_decode_of_other_encodings_gives_the_same_values(text: str) -> None:
    msg = encode(_activations(1, 4, 6, 6).numpy(), EncodingSpec.parse(text))
    assert np.array_equal(decode_array(msg, writable=False), decode_array(msg))


def test_the_torch_edge_reads_a_raw_input_in_place() -> None:
    """The torch edge decodes a request's 602 KB input without a second copy of it (a copy of the payload
    is made by reading it from the message; the old writable copy made another), with the same values and
    no warning from torch about the read-only memory under it."""
    import warnings

    from edge_node.torch_backend import TorchBackend

    x = torch.rand(1, 3, 224, 224)
    msg = tensor_pb2.Tensor.FromString(encode(x, RAW_UNCOMPRESSED).SerializeToString())
    backend = TorchBackend(None)  # decode needs no model
    with warnings.catch_warnings(record=True) as caught:  # the filters in force, warnings recorded
        backend.decode(msg)  # the first read-only array, where torch would warn
    assert not caught, [str(w.message) for w in caught]
    tracemalloc.start()
    try:
        decoded = backend.decode(msg)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert torch.equal(decoded, x)
    assert peak < 1.5 * x.numel() * 4, f"decoding held {peak} bytes for a {x.numel() * 4}-byte payload"


def _torch_minmax(rows: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.aminmax(rows, dim=1)


@pytest.fixture()
def from_numpy_needs_writable(monkeypatch: pytest.MonkeyPatch) -> None:
    """torch.from_numpy refuses a read-only array here (torch itself only warns, once a process)."""
    from_numpy = torch.from_numpy

    def checked(a: np.ndarray) -> torch.Tensor:
        assert a.flags.writeable, "torch.from_numpy was handed a read-only array"
        return from_numpy(a)

    monkeypatch.setattr(torch, "from_numpy", checked)


@pytest.mark.usefixtures("from_numpy_needs_writable")
@pytest.mark.parametrize(
    "text",
    [
        "raw",
        "raw+zstd1",
        "fp16",
        "fp16+none",
        "int8",
        "int4",
        "int4+zstd1",
        "int4c",
        "int3:percentile",
        "int8:aciq",
        "int4:test_torch_minmax",
        "int4c:test_torch_minmax",
        "jpeg",
        "webp",
    ],
)
def test_every_encoding_reads_a_received_raw_tensor_without_writing_to_it(text: str) -> None:
    """What the ONNX edge does with a request's RAW input (a read-only view over the message's
    bytes): encode it for the cloud. Same bytes as from a writable copy; nothing writes into it."""
    register_clipper("test_torch_minmax", _torch_minmax, replace=True)  # a torch estimator: gets a tensor
    x = _activations(1, 3, 16, 16).clamp(0, 1).numpy()
    received = decode_array(encode(x, EncodingSpec.parse("raw")), writable=False)
    assert not received.flags.writeable
    spec = EncodingSpec.parse(text)
    assert encode(received, spec).SerializeToString() == encode(x.copy(), spec).SerializeToString()
    assert np.array_equal(received, x)


@pytest.mark.usefixtures("from_numpy_needs_writable")
def test_the_torch_decode_still_gets_a_writable_tensor() -> None:
    x = torch.arange(12, dtype=torch.float32).reshape(3, 4)
    for text in ("raw", "raw+zstd1", "fp16"):
        y = decode(encode(x, EncodingSpec.parse(text)))
        y += 1  # in place: torch's tensor owns writable memory
        assert torch.equal(y, x + 1)
