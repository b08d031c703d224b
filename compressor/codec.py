"""Tensor <-> ``cleave.v1.Tensor``: encode with an :class:`EncodingSpec`, decode with limits.

Encoding: raw bytes, fp16, or affine codes bit-packed at ``bits`` each (see :mod:`quant`,
:mod:`bitpack`), then optionally zstd. The message records everything needed to decode:
``raw_size`` (bytes before zstd), ``payload_size`` and ``crc32`` (of the payload as sent).

Decoding trusts nothing: every field is checked against the others and against
:class:`CodecLimits` before any buffer is allocated, and every failure is a :class:`CodecError`
that names the field.
"""

from __future__ import annotations

import functools
import math
import sys
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from math import prod
from typing import Any

import numpy as np

try:  # ISA-L's CRC-32 (carry-less multiply): zlib's checksum, bit for bit; 500 KB warm: 0.039 ms, zlib 0.134
    from isal.isal_zlib import crc32
except ImportError:  # zlib's: ~3.7 GB/s (2-core EPYC VM, stop 28)
    from zlib import crc32

from compressor import blocked, clipping, entropy, half, jpeg, zstd
from compressor._arrays import as_float32, is_tensor, torch_or_none
from compressor.bitpack import BIT_WIDTHS, pack_array, packed_size, unpack_array
from compressor.clipping import clip_range_array
from compressor.errors import CodecError
from compressor.quant import affine_params_array, dequantize_array, qmax, quantize_array
from compressor.spec import EncodingSpec
from protos.cleave.v1 import tensor_pb2


@dataclass(frozen=True)
class CodecLimits:
    """Bounds a decoder enforces on untrusted messages before allocating anything."""

    max_elements: int = 1 << 28
    max_payload_bytes: int = 1 << 30
    max_dims: int = 8


@dataclass(frozen=True)
class _DType:
    wire: int
    name: str  # the torch dtype's attribute name, and numpy's name for the same type
    numpy: np.dtype


_DTYPES = [
    _DType(tensor_pb2.FLOAT32, "float32", np.dtype("<f4")),
    _DType(tensor_pb2.FLOAT16, "float16", np.dtype("<f2")),
    _DType(tensor_pb2.UINT8, "uint8", np.dtype("u1")),
    _DType(tensor_pb2.INT8, "int8", np.dtype("i1")),
    _DType(tensor_pb2.INT32, "int32", np.dtype("<i4")),
    _DType(tensor_pb2.INT64, "int64", np.dtype("<i8")),
    _DType(tensor_pb2.BOOL, "bool", np.dtype("?")),
]
_BY_NAME = {d.name: d for d in _DTYPES}
_BY_WIRE = {d.wire: d for d in _DTYPES}
_FLOAT32 = _BY_WIRE[tensor_pb2.FLOAT32]
_WIDTHS = ",".join(map(str, BIT_WIDTHS))


def encode(x: Any, spec: EncodingSpec, tables: entropy.EntropyTables | None = None) -> tensor_pb2.Tensor:
    """:func:`encode_apart`, the payload put in the tensor."""
    msg, payload = encode_apart(x, spec, tables)
    msg.payload = payload
    return msg


def encode_apart(
    x: Any, spec: EncodingSpec, tables: entropy.EntropyTables | None = None
) -> tuple[tensor_pb2.Tensor, bytes]:
    """The tensor :func:`encode` gives, its ``payload`` left empty, and the payload: a sender that
    writes the bytes itself (the edge's frames, :func:`compressor.framing.chunks_wire`) copies the
    payload once, where putting it in the message and reading it back out copied it twice more.

    Encode ``x`` (a torch tensor on any device with any strides, or a numpy array) as ``spec`` asks.

    ``raw`` keeps ``x``'s dtype (float32, float16, uint8, int8, int32, int64 or bool); ``fp16``
    and ``affine`` need a floating ``x`` and decode to float32. The math runs in numpy on the host
    (a CPU float32 tensor is used in place, without a copy), so a tensor and the equal array give
    the same bytes, with or without torch installed. ``entropy`` rounds ``x`` (a bottleneck's
    latent) to integers and range-codes them with ``tables``.

    Raises:
        CodecError: an unsupported dtype, a non-float tensor for fp16 / affine, an axis out of
            range, or non-finite values for affine.
    """
    x = x.detach() if is_tensor(x) else np.asarray(x)
    msg = tensor_pb2.Tensor(shape=x.shape, encoding=_ENCODING[spec.encoding])
    if spec.encoding == "raw":
        dtype = _BY_NAME.get(_dtype_name(x))
        if dtype is None:
            names = ", ".join(d.name for d in _DTYPES)
            raise CodecError(f"x.dtype: {x.dtype} cannot be sent raw; use one of {names}")
        msg.dtype = dtype.wire
        data = _host_bytes(x)
    elif spec.encoding == "fp16":
        _require_float(x, spec)
        msg.dtype = tensor_pb2.FLOAT32
        data = _to_half(x)
    elif spec.encoding in jpeg.FORMATS:
        _require_float(x, spec)
        msg.dtype = tensor_pb2.FLOAT32
        data = jpeg.encode_images(x, spec.quality, msg, spec.encoding)
    elif spec.encoding == "entropy":
        _require_float(x, spec)
        if tables is None:
            raise CodecError("encoding: entropy needs the bottleneck's tables (a model with a bottleneck)")
        data = entropy.encode_symbols(np.rint(as_float32(x)).astype(np.int32), tables)
        # The short header: dtype (FLOAT32), codec (NONE) and raw_size (= payload_size) are implied
        # by the encoding, so they are left unset (7 of a pooled latent's ~28 header bytes).
        payload = _set_payload(msg, data, spec)
        for implied in ("codec", "raw_size"):
            msg.ClearField(implied)
        return msg, payload
    else:
        _require_float(x, spec)
        msg.dtype = tensor_pb2.FLOAT32
        data = _encode_affine(x, spec, msg)
    return msg, _set_payload(msg, data, spec)


def decode(
    msg: tensor_pb2.Tensor,
    limits: CodecLimits = CodecLimits(),
    tables: entropy.EntropyTables | None = None,
    *,
    payload: bytes | memoryview | None = None,
) -> Any:
    """Decode and validate a wire tensor: a new CPU ``torch.Tensor`` where torch is installed,
    else the numpy array :func:`decode_array` returns (the same values, sharing memory).
    ``payload``: as :func:`decode_array` takes it.

    Raises:
        CodecError: whose message starts with the offending field, e.g. ``tensor.crc32``.
    """
    out = decode_array(msg, limits, tables, payload=payload)
    torch = torch_or_none()
    return out if torch is None else torch.from_numpy(out)


def decode_array(
    msg: tensor_pb2.Tensor,
    limits: CodecLimits = CodecLimits(),
    tables: entropy.EntropyTables | None = None,
    *,
    writable: bool = True,
    payload: bytes | memoryview | None = None,
) -> np.ndarray:
    """:func:`decode` into a new, writable numpy array (needs no torch). An ``ENTROPY`` tensor
    needs the receiving model's ``tables``; its symbol count is the header's shape, which the
    caller has checked against the session's cut.

    ``writable=False``, for a caller that only reads the result (e.g. hands it to ONNX Runtime): a
    ``RAW`` tensor comes back as a read-only view over the message's payload (or its decompressed
    bytes) instead of a copy; numpy refuses writes to it. Other encodings build a new array anyway.

    Raises:
        CodecError: whose message starts with the offending field, e.g. ``tensor.crc32``.
    """
    dtype, shape, numel = _check_header(msg, limits)
    if payload is None:
        payload = msg.payload
    if len(payload) != msg.payload_size:
        raise CodecError(f"tensor.payload_size: {msg.payload_size}, but the payload has {len(payload)} bytes")
    crc = crc32(payload)
    if crc != msg.crc32:
        raise CodecError(f"tensor.crc32: {msg.crc32:#010x} does not match the payload ({crc:#010x})")
    if msg.codec == tensor_pb2.ZSTD:
        try:
            # RAW returns the buffer itself and FP16 may hand it to torch.from_numpy; the others only read it.
            own = msg.encoding == tensor_pb2.FP16 or (writable and msg.encoding == tensor_pb2.RAW)
            buf = zstd.decompress(payload, msg.raw_size, writable=own)
        except ValueError as e:
            raise CodecError(f"tensor.payload: {e}") from None
    elif msg.encoding == tensor_pb2.FP16 or (writable and msg.encoding == tensor_pb2.RAW):
        buf = np.frombuffer(bytearray(payload), np.uint8)  # a writable copy: the result owns its memory
    else:
        buf = np.frombuffer(payload, np.uint8)  # read in place: decoding writes a new array, or RAW's reader only reads

    if msg.encoding == tensor_pb2.RAW:
        if dtype.name == "bool" and buf.size and buf.max() > 1:
            raise CodecError("tensor.payload: a BOOL byte is neither 0 nor 1")
        return buf.view(dtype.numpy).reshape(shape)
    if msg.encoding in _IMAGE_ENCODINGS:
        if len(buf) != msg.raw_size:
            raise CodecError(f"tensor.raw_size: {msg.raw_size}, but the payload decodes to {len(buf)} bytes")
        return jpeg.decode_images(buf, msg, shape, _IMAGE_ENCODINGS[msg.encoding])
    if msg.encoding == tensor_pb2.FP16:
        return _from_half(buf.view("<f2")).reshape(shape)
    if msg.encoding == tensor_pb2.ENTROPY:
        if tables is None:
            raise CodecError("tensor.encoding: ENTROPY, but this model has no bottleneck tables")
        return entropy.decode_symbols(buf, tables, shape).astype(np.float32)
    if msg.bits in (4, 8) and msg.axis == -1:  # the defaults, per tensor: unpacked and scaled in blocks
        dequantize = blocked.dequantize4 if msg.bits == 4 else blocked.dequantize8
        return dequantize(buf, numel, msg.scales[0], msg.zero_points[0]).reshape(shape)
    q = unpack_array(buf, msg.bits, numel).reshape(shape)
    axis = None if msg.axis == -1 else msg.axis
    scales = np.asarray(msg.scales, np.float32)
    zero_points = np.asarray(msg.zero_points, np.int32)
    return dequantize_array(q, scales, zero_points, axis)


def check_header(msg: tensor_pb2.Tensor, limits: CodecLimits = CodecLimits()) -> tuple[str, tuple[int, ...]]:
    """Validate everything but the payload bytes, as :func:`decode` does first; allocates nothing.

    A server calls this on a tensor's header (e.g. a chunk's ``header``) as soon as it arrives, to
    refuse a tensor it would not accept before buffering or decompressing its payload.

    Returns:
        the dtype (its name, as torch and numpy spell it: ``"float32"``) and the shape :func:`decode`
        would return.

    Raises:
        CodecError: naming the offending field, as :func:`decode` does.
    """
    dtype, shape, _ = _check_header(msg, limits)
    return dtype.name, shape


def encode_many(xs: Iterable[Any], spec: EncodingSpec) -> list[tensor_pb2.Tensor]:
    """:func:`encode` each tensor with the same spec."""
    return [encode(x, spec) for x in xs]


def decode_many(msgs: Iterable[tensor_pb2.Tensor], limits: CodecLimits = CodecLimits()) -> list[Any]:
    """:func:`decode` each message; a CodecError says which one failed (``tensors[i].field``)."""
    out = []
    for i, msg in enumerate(msgs):
        try:
            out.append(decode(msg, limits))
        except CodecError as e:
            raise CodecError(f"tensors[{i}].{str(e).removeprefix('tensor.')}") from None
    return out


_ENCODING = {
    "raw": tensor_pb2.RAW,
    "fp16": tensor_pb2.FP16,
    "affine": tensor_pb2.AFFINE,
    "jpeg": tensor_pb2.JPEG,
    "webp": tensor_pb2.WEBP,
    "entropy": tensor_pb2.ENTROPY,
}
#: Wire encodings whose payload is one image file per image, and their format.
_IMAGE_ENCODINGS = {tensor_pb2.JPEG: "jpeg", tensor_pb2.WEBP: "webp"}


def _dtype_name(x: Any) -> str:
    """``float32``, ``bool``, ...: torch's dtype name, or numpy's whatever the byte order."""
    return str(x.dtype).removeprefix("torch.") if is_tensor(x) else _numpy_name(x.dtype)


@functools.lru_cache(maxsize=64)
def _numpy_name(dtype: np.dtype) -> str:
    """``dtype.name``, remembered: numpy computes it in Python, ~4.5 us a call (a third of encoding a
    1x1000 output raw)."""
    return dtype.name


def _require_float(x: Any, spec: EncodingSpec) -> None:
    # kind "f": numpy's floating types, as np.issubdtype(dtype, np.floating) says, in 0.06 us instead of 1.7.
    floating = x.is_floating_point() if is_tensor(x) else x.dtype.kind == "f"
    if not floating:
        raise CodecError(f"x.dtype: {spec.encoding} encodes floating tensors, got {x.dtype}")


def _host_bytes(x: Any) -> np.ndarray:
    """``x``'s values as a flat uint8 view of contiguous little-endian host memory."""
    arr = x.cpu().contiguous().numpy() if is_tensor(x) else np.ascontiguousarray(x)
    arr = arr.reshape(-1)
    return arr.astype(arr.dtype.newbyteorder("<"), copy=False).view(np.uint8)


def _loaded_torch() -> Any:
    """torch if this process already imported it (a half conversion is no reason to load it)."""
    return sys.modules.get("torch")


def _to_half(x: Any) -> np.ndarray:
    """float16 bytes of ``x`` (round to nearest even): torch's SIMD conversion where torch is
    loaded, else :mod:`compressor.half` (both faster than numpy's cast; all three give the same bits)."""
    torch = _loaded_torch()
    if is_tensor(x):
        return _host_bytes(x.to(torch.float16))
    if torch is not None:
        xf = np.ascontiguousarray(x, dtype=np.float32)
        if xf.flags.writeable:  # torch.from_numpy warns on a read-only array (a received RAW input)
            return torch.from_numpy(xf).to(torch.float16).numpy().reshape(-1).view(np.uint8)
    return half.to_half_bits(x).astype("<u2", copy=False).view(np.uint8)


def _from_half(h: np.ndarray) -> np.ndarray:
    """float32 of little-endian float16 ``h`` (exact either way; torch's loop is the faster)."""
    torch = _loaded_torch()
    if torch is not None:
        return torch.from_numpy(h.astype(np.float16, copy=False)).to(torch.float32).numpy()
    return half.from_half_bits(h.view("<u2"))


def _encode_affine(x: Any, spec: EncodingSpec, msg: tensor_pb2.Tensor) -> np.ndarray:
    xf = as_float32(x)
    if xf.size:
        mn, mx = _value_range(xf)
        if not (np.isfinite(mn) and np.isfinite(mx)):
            raise CodecError("x: affine encoding needs finite values (found NaN or inf)")
    axis = None
    if spec.per_channel:
        if not -xf.ndim <= spec.axis < xf.ndim:
            raise CodecError(f"spec.axis: {spec.axis} is out of range for a {xf.ndim}-d tensor")
        axis = spec.axis % xf.ndim
    covers = spec.clip == "minmax" and clipping.get_clipper("minmax") is clipping.minmax  # not replaced
    if covers and axis is None and xf.size:
        lo, hi = np.asarray(mn, np.float32), np.asarray(mx, np.float32)  # already known: no second pass
    else:
        try:
            lo, hi = clip_range_array(xf, spec.clip, axis, spec.bits, **spec.clip_kwargs)
        except (TypeError, ValueError) as e:
            raise CodecError(f"spec.clip: {e}") from None
    scales, zero_points = affine_params_array(lo, hi, spec.bits)
    msg.bits = spec.bits
    msg.axis = -1 if axis is None else axis
    msg.scales.extend(scales.reshape(-1).tolist())
    msg.zero_points.extend(zero_points.reshape(-1).tolist())
    if axis is None:  # per tensor, the default: in cache-sized blocks, into this thread's reused buffer
        flat = xf.reshape(-1)
        out = blocked.reusable_output(packed_size(flat.size, spec.bits))  # _set_payload copies it out
        return blocked.quantize_pack(flat, spec.bits, scales, zero_points, lo, hi, covers, out)
    q = quantize_array(xf, spec.bits, scales, zero_points, lo, hi, axis, covers=covers)
    return pack_array(q.reshape(-1), spec.bits)


def _value_range(xf: np.ndarray) -> tuple[np.float32, np.float32]:
    """``(lo, hi)``: ``xf``'s least and largest values (NaN and inf propagate into both), except that
    for a finite tensor without negative values that is not constant, ``lo`` is 0.

    That ``lo`` gives the same message as the least value would: per-tensor parameters widen the range
    to include 0 (the grid starts at 0 either way), the zero point is 0, and ``[0, hi]`` still covers
    every value, so the codes are the same (see :func:`quant.per_tensor_steps`). Only a constant tensor
    ``c > 0`` needs its least value (it gets ``scale = c``), and one value below the max rules that
    out. So a post-ReLU activation, the usual input, costs one reduction, not two
    (:func:`blocked.non_negative_max`)."""
    if not xf.flags.c_contiguous:
        return xf.min(), xf.max()
    flat = xf.reshape(-1)
    hi = blocked.non_negative_max(flat)
    if hi is None:  # negative values, inf or NaN: both reductions, in cache-sized blocks
        return blocked.min_max(flat)
    zero = np.float32(0.0)
    if hi == 0 or flat[0] != hi or flat[-1] != hi:  # all +0.0, or a value below the max: not a constant c > 0
        return zero, hi
    return flat.min(), hi


def _set_payload(msg: tensor_pb2.Tensor, data: bytes | np.ndarray, spec: EncodingSpec) -> bytes:
    """Compress ``data`` as ``spec`` asks and describe it in ``msg``; the payload, not put in ``msg``."""
    raw_size = len(data) if isinstance(data, bytes) else data.nbytes
    if spec.codec == "zstd":
        payload = zstd.compress(data, spec.level, spec.threads, codes=spec.encoding == "affine")
        msg.codec = tensor_pb2.ZSTD
    else:
        payload = data if isinstance(data, bytes) else data.tobytes()
        msg.codec = tensor_pb2.NONE
    msg.raw_size = raw_size
    msg.payload_size = len(payload)
    msg.crc32 = crc32(payload)
    return payload


def _check_header(msg: tensor_pb2.Tensor, limits: CodecLimits) -> tuple[_DType, tuple[int, ...], int]:
    """Everything but the payload bytes; returns (dtype, shape, element count)."""
    short = msg.encoding == tensor_pb2.ENTROPY  # dtype and codec may be left unset (implied)
    dtype = _FLOAT32 if short and msg.dtype == tensor_pb2.DTYPE_UNSPECIFIED else _BY_WIRE.get(msg.dtype)
    if dtype is None:
        raise CodecError(f"tensor.dtype: {msg.dtype} is not a known DType")
    if msg.encoding not in _ENCODING.values():
        raise CodecError(f"tensor.encoding: {msg.encoding} is not a known Encoding")
    implied_codec = short and msg.codec == tensor_pb2.CODEC_UNSPECIFIED
    if msg.codec not in (tensor_pb2.NONE, tensor_pb2.ZSTD) and not implied_codec:
        raise CodecError(f"tensor.codec: {msg.codec} is not a known Codec")
    shape = tuple(msg.shape)
    if len(shape) > limits.max_dims:
        raise CodecError(f"tensor.shape: {len(shape)} dims exceed max_dims {limits.max_dims}")
    for i, dim in enumerate(shape):
        if dim < 0:
            raise CodecError(f"tensor.shape[{i}]: {dim} is negative")
    numel = prod(shape)  # Python ints: a lying shape cannot overflow this
    if numel > limits.max_elements:
        raise CodecError(f"tensor.shape: {numel} elements exceed max_elements {limits.max_elements}")

    if msg.encoding == tensor_pb2.AFFINE:
        _check_affine(msg, shape)
        expected = packed_size(numel, msg.bits)
    elif msg.encoding in _IMAGE_ENCODINGS:
        name = jpeg.FORMATS[_IMAGE_ENCODINGS[msg.encoding]]
        if len(shape) != 4 or shape[1] not in (1, 3):
            raise CodecError(f"tensor.shape: {name} needs (N, 1 or 3, H, W), got {shape}")
        if msg.bits != 8 or msg.axis != 1:
            raise CodecError(
                f"tensor.bits/axis: {name} carries 8-bit codes per channel (axis 1), got {msg.bits}/{msg.axis}"
            )
        _check_affine(msg, shape)
        # The size of a JPEG or WebP is not a function of the shape; bound it instead.
        if msg.raw_size > jpeg.max_payload(numel, shape[0]):
            raise CodecError(f"tensor.raw_size: {msg.raw_size} is too large for {numel} {name} samples")
        expected = msg.raw_size
    elif msg.encoding == tensor_pb2.ENTROPY:
        if len(shape) != 4 or dtype is not _FLOAT32 or msg.codec == tensor_pb2.ZSTD:
            raise CodecError(f"tensor.encoding: ENTROPY carries a FLOAT32 (N, C, H, W) with codec NONE, got {shape}")
        if msg.bits or msg.scales or msg.zero_points or msg.axis:
            raise CodecError("tensor.bits: set, but only AFFINE uses bits, axis, scales and zero points")
        # The size of a range-coded stream is not a function of the shape; bound it instead. An
        # unset raw_size (the short header) is the payload_size: there is no byte codec.
        size, field = (msg.raw_size, "raw_size") if msg.raw_size else (msg.payload_size, "payload_size")
        if size > entropy.max_payload(shape):
            raise CodecError(f"tensor.{field}: {size} is more than {list(shape)} symbols can take")
        if msg.raw_size and msg.payload_size != msg.raw_size:
            raise CodecError(f"tensor.payload_size: {msg.payload_size}, but codec NONE needs {msg.raw_size}")
        expected = msg.raw_size
    else:
        for field in ("bits", "scales", "zero_points"):
            if getattr(msg, field):
                raise CodecError(f"tensor.{field}: set, but only AFFINE uses it")
        if msg.axis:
            raise CodecError(f"tensor.axis: {msg.axis}, but only AFFINE uses it")
        if msg.encoding == tensor_pb2.FP16:
            if dtype is not _FLOAT32:
                raise CodecError("tensor.dtype: FP16 decodes to FLOAT32 only")
            expected = 2 * numel
        else:
            expected = dtype.numpy.itemsize * numel
    if msg.raw_size != expected:
        raise CodecError(f"tensor.raw_size: {msg.raw_size}, but dtype, encoding and shape give {expected}")
    if msg.payload_size > limits.max_payload_bytes:
        raise CodecError(
            f"tensor.payload_size: {msg.payload_size} exceeds max_payload_bytes {limits.max_payload_bytes}"
        )
    if msg.codec == tensor_pb2.NONE and msg.payload_size != msg.raw_size:
        raise CodecError(f"tensor.payload_size: {msg.payload_size}, but codec NONE needs {msg.raw_size}")
    if msg.codec == tensor_pb2.ZSTD and msg.payload_size > zstd.compress_bound(msg.raw_size):
        raise CodecError(
            f"tensor.payload_size: {msg.payload_size}, but zstd never needs more than "
            f"{zstd.compress_bound(msg.raw_size)} bytes for raw_size {msg.raw_size}"
        )
    return dtype, shape, numel


def _check_affine(msg: tensor_pb2.Tensor, shape: Sequence[int]) -> None:
    if msg.dtype != tensor_pb2.FLOAT32:
        raise CodecError("tensor.dtype: AFFINE decodes to FLOAT32 only")
    if msg.bits not in BIT_WIDTHS:
        raise CodecError(f"tensor.bits: {msg.bits} is not one of {_WIDTHS}")
    if msg.axis == -1:
        groups = 1
    elif 0 <= msg.axis < len(shape):
        groups = shape[msg.axis]
    else:
        raise CodecError(f"tensor.axis: {msg.axis} is neither -1 nor a dimension of a {len(shape)}-d shape")
    if len(msg.scales) != groups:
        raise CodecError(f"tensor.scales: {len(msg.scales)} values, expected {groups}")
    if len(msg.zero_points) != groups:
        raise CodecError(f"tensor.zero_points: {len(msg.zero_points)} values, expected {groups}")
    if groups == 1:  # per tensor: the same checks on Python numbers, without ~10 tiny array operations
        scale, zero_point = msg.scales[0], msg.zero_points[0]
        scales_ok, zero_points_ok = math.isfinite(scale) and scale > 0, 0 <= zero_point <= qmax(msg.bits)
    else:
        scales = np.asarray(msg.scales, np.float32)
        scales_ok = bool(np.isfinite(scales).all() and (scales > 0).all())
        zero_points = np.asarray(msg.zero_points, np.int64)
        zero_points_ok = not zero_points.size or (zero_points.min() >= 0 and zero_points.max() <= qmax(msg.bits))
    if not scales_ok:
        raise CodecError("tensor.scales: every scale must be finite and > 0")
    if not zero_points_ok:
        raise CodecError(f"tensor.zero_points: every zero point must be in [0, {qmax(msg.bits)}]")
