"""One wire, two implementations: what the numpy codec writes, a torch implementation reads, and back.

The codec runs its math in numpy (blocked and fused for speed, see compressor/blocked.py). Here a
plain torch implementation of the same wire format, written from the spec in compressor/quant.py
and compressor/bitpack.py (saturate, divide by the float32 scale, round half to even, add the zero
point, clamp; little-endian bit stream), encodes and decodes independently:

- every message the codec makes from a numpy array or a torch tensor (the same bytes either way)
  carries exactly the codes and parameters the torch implementation computes, and decodes, on
  both sides, to the same float32 bits;
- every payload the torch implementation packs, the codec decodes to the torch implementation's values.

Hypothesis draws shapes (across the codec's block boundaries, which are made small here),
distributions (post-ReLU, signed, constant, sparse), bit widths, per-tensor or per-channel,
every built-in clipping method and both codecs.
"""

from __future__ import annotations

import zlib

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from compressor import EncodingSpec, blocked, clip_range, decode, decode_array, encode, zstd
from compressor.bitpack import BIT_WIDTHS
from compressor.errors import CodecError
from protos.cleave.v1 import tensor_pb2

torch = pytest.importorskip("torch")

CLIPS = ("", ":percentile(percentile=99)", ":aciq", ":aciq(prior=gauss)", ":fixed(lo=-0.5,hi=1.5)")


@pytest.fixture(autouse=True)
def small_blocks(monkeypatch: pytest.MonkeyPatch) -> None:
    """Blocks of 40 elements: small tensors cross many block boundaries (and end mid-block)."""
    monkeypatch.setattr(blocked, "BLOCK", 40)


# ------------------------------------------------------------------ the torch implementation


def torch_params(lo: float, hi: float, bits: int) -> tuple[float, int]:
    """Scale and zero point of [lo, hi] as the wire format defines them (float64 steps)."""
    top = (1 << bits) - 1
    lo0, hi0 = min(lo, 0.0), max(hi, 0.0)
    scale = max((hi0 - lo0) / top, float(np.finfo(np.float32).tiny))
    if lo == hi and lo != 0:
        scale = abs(lo)
    if hi0 == lo0:
        scale = 1.0
    s32 = torch.tensor(scale, dtype=torch.float32)
    if float(s32) < scale:
        s32 = torch.nextafter(s32, torch.tensor(float("inf")))
    return float(s32), min(max(round(-lo0 / float(s32)), 0), top)


def torch_codes(x: torch.Tensor, bits: int, scales, zero_points, lo, hi, axis: int | None) -> torch.Tensor:
    """clamp(round_half_even(clamp(x, lo, hi) / s) + z, 0, qmax) in float32, per group."""
    shape = [1] * x.ndim
    if axis is not None:
        shape[axis] = -1
    as_t = lambda v: torch.as_tensor(np.asarray(v, np.float32)).reshape(shape)  # noqa: E731
    lo_t, hi_t = as_t(lo), as_t(hi)
    clamped = torch.minimum(torch.maximum(x, lo_t), torch.maximum(hi_t, lo_t))
    q = torch.round(clamped / as_t(scales)) + as_t(zero_points)  # torch.round: half to even
    return q.clamp(0, (1 << bits) - 1).to(torch.uint8)


def torch_pack(codes: torch.Tensor, bits: int) -> bytes:
    """Value i at bits [i*bits, (i+1)*bits) of a little-endian bit stream, zero-padded."""
    flat = codes.reshape(-1).to(torch.int64)
    planes = (flat[:, None] >> torch.arange(bits)) & 1  # bit k of value i is stream bit i*bits + k
    stream = planes.reshape(-1)
    stream = torch.cat([stream, stream.new_zeros(-stream.numel() % 8)])
    weights = 1 << torch.arange(8)
    return bytes((stream.reshape(-1, 8) * weights).sum(1).to(torch.uint8).tolist())


def torch_unpack(payload: bytes, bits: int, count: int) -> torch.Tensor:
    data = torch.tensor(list(payload), dtype=torch.int64)
    stream = ((data[:, None] >> torch.arange(8)) & 1).reshape(-1)[: count * bits]
    return (stream.reshape(count, bits) << torch.arange(bits)).sum(1).to(torch.uint8)


def torch_dequantize(codes: torch.Tensor, scales, zero_points, axis: int | None, shape) -> torch.Tensor:
    view = [1] * len(shape)
    if axis is not None:
        view[axis] = -1
    s = torch.tensor(list(scales), dtype=torch.float32).reshape(view)
    z = torch.tensor(list(zero_points), dtype=torch.float32).reshape(view)
    return (codes.reshape(shape).to(torch.float32) - z) * s


# --------------------------------------------------------------------------------- inputs


@st.composite
def tensors(draw: st.DrawFn) -> np.ndarray:
    shape = draw(st.lists(st.integers(1, 7), min_size=1, max_size=4))
    shape[-1] = draw(st.integers(1, 97))  # up to a few hundred elements: several 40-element blocks
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    kind = draw(st.sampled_from(["relu", "signed", "constant", "sparse", "ints"]))
    x = rng.standard_normal(shape) * draw(st.sampled_from([1e-3, 1.0, 40.0]))
    if kind == "relu":
        x = np.maximum(x, 0)
    elif kind == "constant":
        x = np.full(shape, draw(st.sampled_from([0.0, -2.75, 1.5, 1e-30])))
    elif kind == "sparse":
        x = np.where(rng.random(shape) < 0.8, 0.0, np.abs(x))
    elif kind == "ints":  # ties: x / s lands on .5 often
        x = rng.integers(-3, 9, shape) * 0.5
    return x.astype(np.float32)


SPECS = st.builds(
    lambda bits, per_channel, clip, codec: EncodingSpec.parse(f"int{bits}{'c' if per_channel else ''}{clip}{codec}"),
    st.sampled_from(BIT_WIDTHS),
    st.booleans(),
    st.sampled_from(CLIPS),
    st.sampled_from(["+none", "+zstd1"]),
)
SETTINGS = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


def _payload(msg: tensor_pb2.Tensor) -> bytes:
    if msg.codec == tensor_pb2.ZSTD:
        return zstd.decompress(msg.payload, msg.raw_size).tobytes()
    return msg.payload


# ---------------------------------------------------------------------------------- tests


@SETTINGS
@given(x=tensors(), spec=SPECS)
def test_the_codec_writes_what_torch_computes_and_both_sides_decode_it_the_same(x: np.ndarray, spec) -> None:
    if spec.per_channel and x.ndim < 2:
        spec = EncodingSpec.parse(str(spec).replace("c", "c0", 1))
    from_array = encode(x, spec)
    from_tensor = encode(torch.from_numpy(x.copy()), spec)
    assert from_array.SerializeToString(deterministic=True) == from_tensor.SerializeToString(deterministic=True)

    axis = None if from_array.axis == -1 else from_array.axis
    t = torch.from_numpy(x.copy())
    lo, hi = clip_range(t, spec.clip, axis, spec.bits, **spec.clip_kwargs)
    lo, hi = lo.reshape(-1).tolist(), hi.reshape(-1).tolist()
    params = [torch_params(a, b, spec.bits) for a, b in zip(lo, hi, strict=True)]
    assert list(from_array.scales) == [s for s, _ in params]
    assert list(from_array.zero_points) == [z for _, z in params]
    codes = torch_codes(t, spec.bits, from_array.scales, from_array.zero_points, lo, hi, axis)
    assert _payload(from_array) == torch_pack(codes, spec.bits)

    want = torch_dequantize(codes, from_array.scales, from_array.zero_points, axis, x.shape)
    np.testing.assert_array_equal(decode_array(from_array).view(np.uint32), want.numpy().view(np.uint32))
    np.testing.assert_array_equal(decode(from_tensor).numpy().view(np.uint32), want.numpy().view(np.uint32))


@SETTINGS
@given(data=st.data(), bits=st.sampled_from(BIT_WIDTHS), per_channel=st.booleans(), compressed=st.booleans())
def test_payloads_packed_by_torch_decode_to_the_torch_values(
    data: st.DataObject, bits: int, per_channel: bool, compressed: bool
) -> None:
    shape = data.draw(st.lists(st.integers(1, 6), min_size=2, max_size=4))
    count = int(np.prod(shape))
    groups = shape[1] if per_channel else 1
    top = (1 << bits) - 1
    codes = torch.tensor(data.draw(st.lists(st.integers(0, top), min_size=count, max_size=count)), dtype=torch.uint8)
    scales = [float(np.float32(s)) for s in data.draw(st.lists(st.floats(1e-6, 1e3), min_size=groups, max_size=groups))]
    zero_points = data.draw(st.lists(st.integers(0, top), min_size=groups, max_size=groups))
    raw = torch_pack(codes, bits)
    payload = zstandard_frame(raw) if compressed else raw
    msg = tensor_pb2.Tensor(
        dtype=tensor_pb2.FLOAT32,
        shape=shape,
        encoding=tensor_pb2.AFFINE,
        bits=bits,
        axis=1 if per_channel else -1,
        scales=scales,
        zero_points=zero_points,
        codec=tensor_pb2.ZSTD if compressed else tensor_pb2.NONE,
        raw_size=len(raw),
        payload=payload,
        payload_size=len(payload),
        crc32=zlib.crc32(payload),
    )
    want = torch_dequantize(codes, scales, zero_points, 1 if per_channel else None, shape).numpy()
    np.testing.assert_array_equal(decode_array(msg).view(np.uint32), want.view(np.uint32))
    np.testing.assert_array_equal(decode(msg).numpy().view(np.uint32), want.view(np.uint32))
    assert torch.equal(torch_unpack(_payload(msg), bits, count), codes)


def zstandard_frame(raw: bytes) -> bytes:
    import zstandard

    return zstandard.ZstdCompressor(level=1, write_content_size=True).compress(raw)


@pytest.mark.parametrize("bits", BIT_WIDTHS)
@pytest.mark.parametrize("count", [1, 39, 40, 41, 79, 80, 81, 1001])
def test_blocked_encoding_equals_the_unfused_functions_at_every_block_edge(bits: int, count: int) -> None:
    from compressor.bitpack import pack_array
    from compressor.quant import affine_params_array, quantize_array

    rng = np.random.default_rng(bits * 1000 + count)
    top = (1 << bits) - 1
    for lo, hi in ((0.0, 1.7), (-0.5, 1.25), (-3.0, -1.0)):
        lo, hi = np.asarray(lo, np.float32), np.asarray(hi, np.float32)
        s, z = affine_params_array(lo, hi, bits)
        # Values at and one float step around the rounding ties (k + 1/2 - z) * s, where x / s and any
        # shortcut for it (x times 1 / s) part ways, and where rounding half to even decides.
        ties = ((np.arange(count) % top) + np.float32(0.5) - np.float32(z)).astype(np.float32) * s
        near = [np.nextafter(ties, np.float32(d)) for d in (np.inf, -np.inf)]
        x1 = np.maximum(rng.standard_normal(count), 0).astype(np.float32)
        x2 = (rng.standard_normal(count) * 3 + 1).astype(np.float32)
        for x in (x1, x2, ties, *near, np.concatenate([ties, *near])):
            for a, b, covers in ((lo, hi, False), (x.min(), x.max(), True)):  # covers: x's own min-max range
                sa, za = affine_params_array(a, b, bits)
                want = pack_array(quantize_array(x, bits, sa, za, a, b, None, covers=covers), bits)
                got = blocked.quantize_pack(x, bits, sa, za, a, b, covers)
                assert got.tobytes() == want.tobytes()


@pytest.mark.parametrize("count", [0, 1, 39, 40, 41, 79, 80, 81, 159, 160, 161, 1001])
@pytest.mark.parametrize("zero_point", [0, 7, 15])
@pytest.mark.parametrize("bits", [4, 8])
def test_blocked_decoding_equals_torch_at_every_block_edge(count: int, zero_point: int, bits: int) -> None:
    """Blocks of 80 codes (40 bytes at 4 bits, 80 at 8): counts that end mid-block, on a block's edge
    and on a padding nibble."""
    rng = np.random.default_rng(count + 100 * zero_point + bits)
    codes = torch.from_numpy(rng.integers(0, 1 << bits, count, dtype=np.uint8))
    payload = torch_pack(codes, bits)
    scale = float(np.float32(0.3712))
    dequantize = blocked.dequantize4 if bits == 4 else blocked.dequantize8
    got = dequantize(np.frombuffer(payload, np.uint8), count, scale, zero_point)
    want = torch_dequantize(codes, [scale], [zero_point], None, (count,)).numpy()
    assert got.dtype == np.float32 and got.shape == (count,)
    np.testing.assert_array_equal(got.view(np.uint32), want.view(np.uint32))


@pytest.mark.parametrize("count", [1, 39, 40, 41, 79, 80, 81, 1001])
def test_blocked_min_max_is_the_tensors_and_propagates_nan_and_inf(count: int) -> None:
    x = np.random.default_rng(count).standard_normal(count).astype(np.float32)
    assert blocked.min_max(x) == (x.min(), x.max())
    for bad, where in ((np.nan, count - 1), (np.inf, count // 2), (-np.inf, 0)):
        y = x.copy()
        y[where] = bad
        lo, hi = blocked.min_max(y)
        np.testing.assert_array_equal([lo, hi], [y.min(), y.max()])  # NaN equals NaN here
        assert not (np.isfinite(lo) and np.isfinite(hi))
        with pytest.raises(CodecError, match="finite"):
            encode(y.reshape(1, -1), EncodingSpec.parse("int4"))


def _non_negative_inputs() -> list[np.ndarray]:
    rng = np.random.default_rng(7)
    relu = np.maximum(rng.standard_normal(203), 0).astype(np.float32)
    ends_at_max = relu.copy()
    ends_at_max[0] = ends_at_max[-1] = relu.max()  # the ends probe sees the max: the least value decides
    inputs = [relu, ends_at_max, relu[:1], np.zeros(130, np.float32), np.float32(1e-3) * relu]
    inputs += [np.full(121, c, np.float32) for c in (1.5, 1e-30, 1e-45, 3e38)]
    lifted = relu + np.float32(2.0)  # no zero at all: the least value is 2, lo is widened to 0 anyway
    inputs += [lifted, np.where(relu > 0, relu, np.float32(-0.0))]  # -0.0 has a sign bit: both reductions
    return inputs


@pytest.mark.parametrize("case", range(len(_non_negative_inputs())))
@pytest.mark.parametrize("text", ["int2", "int4", "int8", "int3+none", "int6", "int4c", "int4c1", "int8:percentile"])
def test_one_reduction_for_non_negative_tensors_gives_the_two_reductions_bytes(
    case: int, text: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A finite tensor without negative values is encoded from its max alone (lo 0 unless it is
    constant): the message must be the one its exact min and max give, for constants too."""
    x = _non_negative_inputs()[case].reshape(1, -1)
    spec = EncodingSpec.parse(text)
    fast = encode(x, spec)
    monkeypatch.setattr(blocked, "non_negative_max", lambda flat: None)  # always min and max, as before
    assert fast == encode(x, spec)


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
@pytest.mark.parametrize("where", [0, 45, 202])
def test_non_finite_values_are_refused_wherever_they_are(bad: float, where: int) -> None:
    x = np.maximum(np.random.default_rng(where).standard_normal(203), 0).astype(np.float32)
    x[where] = bad
    assert blocked.non_negative_max(x) is None
    with pytest.raises(CodecError, match="finite"):
        encode(x.reshape(1, -1), EncodingSpec.parse("int4"))


def test_non_negative_max_is_the_max_bit_for_bit() -> None:
    x = np.abs(np.random.default_rng(3).standard_normal(1001)).astype(np.float32)
    x[500] = np.float32(7.25)
    got = blocked.non_negative_max(x)
    assert got.dtype == np.float32 and got == x.max() == np.float32(7.25)
    assert blocked.non_negative_max(np.zeros(3, np.float32)) == 0
    x[999] = np.float32(-0.0)
    assert blocked.non_negative_max(x) is None


def test_packed_codes_in_the_reused_buffer_are_copied_out_before_the_next_encode() -> None:
    """Per-tensor codes go through one buffer per thread: each message must keep its own payload."""
    rng = np.random.default_rng(5)
    xs = [rng.standard_normal((2, 300)).astype(np.float32) * (k + 1) for k in range(3)]
    for text in ("int4", "int4+none", "int8+none"):
        msgs = [encode(x, EncodingSpec.parse(text)) for x in xs]
        for x, msg in zip(xs, msgs, strict=True):
            assert msg.SerializeToString() == encode(x, EncodingSpec.parse(text)).SerializeToString()
            assert np.abs(decode_array(msg) - x).max() <= msg.scales[0] / 2 * 1.001


def test_the_fast_crc32_is_zlibs_checksum() -> None:
    """The codec checksums with ISA-L where installed (tests/test_codec_golden.py runs it without)."""
    import compressor.codec

    rng = np.random.default_rng(3)
    for size in (0, 1, 15, 16, 17, 4095, 177_076, 1 << 20):
        data = rng.integers(0, 256, size, dtype=np.uint8).tobytes()
        assert compressor.codec.crc32(data) == zlib.crc32(data)
