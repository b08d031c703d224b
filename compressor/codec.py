"""Tensor <-> ``cleave.v1.Tensor``: encode with an :class:`EncodingSpec`, decode with limits.

Encoding: raw bytes, fp16, or affine codes bit-packed at ``bits`` each (see :mod:`quant`,
:mod:`bitpack`), then optionally zstd. The message records everything needed to decode:
``raw_size`` (bytes before zstd), ``payload_size`` and ``crc32`` (of the payload as sent).

Decoding trusts nothing: every field is checked against the others and against
:class:`CodecLimits` before any buffer is allocated, and every failure is a :class:`CodecError`
that names the field.
"""

from __future__ import annotations

import zlib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from math import prod

import numpy as np
import torch

from compressor import jpeg, zstd
from compressor.bitpack import BIT_WIDTHS, pack, packed_size, unpack
from compressor.clipping import clip_range
from compressor.errors import CodecError
from compressor.quant import dequantize, qmax, quantize
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
    torch: torch.dtype
    numpy: np.dtype


_DTYPES = [
    _DType(tensor_pb2.FLOAT32, torch.float32, np.dtype("<f4")),
    _DType(tensor_pb2.FLOAT16, torch.float16, np.dtype("<f2")),
    _DType(tensor_pb2.UINT8, torch.uint8, np.dtype("u1")),
    _DType(tensor_pb2.INT8, torch.int8, np.dtype("i1")),
    _DType(tensor_pb2.INT32, torch.int32, np.dtype("<i4")),
    _DType(tensor_pb2.INT64, torch.int64, np.dtype("<i8")),
    _DType(tensor_pb2.BOOL, torch.bool, np.dtype("?")),
]
_BY_TORCH = {d.torch: d for d in _DTYPES}
_BY_WIRE = {d.wire: d for d in _DTYPES}
_FLOAT32 = _BY_WIRE[tensor_pb2.FLOAT32]
_WIDTHS = ",".join(map(str, BIT_WIDTHS))


def encode(x: torch.Tensor, spec: EncodingSpec) -> tensor_pb2.Tensor:
    """Encode ``x`` (any device, any strides) as ``spec`` asks.

    ``raw`` keeps ``x``'s dtype (float32, float16, uint8, int8, int32, int64 or bool); ``fp16``
    and ``affine`` need a floating ``x`` and decode to float32. Affine quantization runs on
    ``x``'s device, so a GPU tensor crosses to the host already shrunk to codes.

    Raises:
        CodecError: an unsupported dtype, a non-float tensor for fp16 / affine, an axis out of
            range, or non-finite values for affine.
    """
    x = x.detach()
    msg = tensor_pb2.Tensor(shape=x.shape, encoding=_ENCODING[spec.encoding])
    if spec.encoding == "raw":
        dtype = _BY_TORCH.get(x.dtype)
        if dtype is None:
            names = ", ".join(str(d.torch).removeprefix("torch.") for d in _DTYPES)
            raise CodecError(f"x.dtype: {x.dtype} cannot be sent raw; use one of {names}")
        msg.dtype = dtype.wire
        data = _host_bytes(x)
    elif spec.encoding == "fp16":
        _require_float(x, spec)
        msg.dtype = tensor_pb2.FLOAT32
        data = _host_bytes(x.to(torch.float16))
    elif spec.encoding == "jpeg":
        _require_float(x, spec)
        msg.dtype = tensor_pb2.FLOAT32
        data = jpeg.encode_jpeg(x, spec.quality, msg)
    else:
        _require_float(x, spec)
        msg.dtype = tensor_pb2.FLOAT32
        data = _encode_affine(x, spec, msg)
    _set_payload(msg, data, spec)
    return msg


def decode(msg: tensor_pb2.Tensor, limits: CodecLimits = CodecLimits()) -> torch.Tensor:
    """Decode and validate a wire tensor; the result is a new CPU tensor.

    Raises:
        CodecError: whose message starts with the offending field, e.g. ``tensor.crc32``.
    """
    dtype, shape, numel = _check_header(msg, limits)
    payload = msg.payload
    if len(payload) != msg.payload_size:
        raise CodecError(f"tensor.payload_size: {msg.payload_size}, but the payload has {len(payload)} bytes")
    crc = zlib.crc32(payload)
    if crc != msg.crc32:
        raise CodecError(f"tensor.crc32: {msg.crc32:#010x} does not match the payload ({crc:#010x})")
    if msg.codec == tensor_pb2.ZSTD:
        try:
            buf = zstd.decompress(payload, msg.raw_size)
        except ValueError as e:
            raise CodecError(f"tensor.payload: {e}") from None
    else:
        buf = np.frombuffer(bytearray(payload), np.uint8)  # a writable copy: the result owns its memory

    if msg.encoding == tensor_pb2.RAW:
        if dtype.torch is torch.bool and buf.size and buf.max() > 1:
            raise CodecError("tensor.payload: a BOOL byte is neither 0 nor 1")
        return torch.from_numpy(buf.view(dtype.numpy)).reshape(shape)
    if msg.encoding == tensor_pb2.JPEG:
        if len(buf) != msg.raw_size:
            raise CodecError(f"tensor.raw_size: {msg.raw_size}, but the payload decodes to {len(buf)} bytes")
        return jpeg.decode_jpeg(buf, msg, shape)
    if msg.encoding == tensor_pb2.FP16:
        # torch's half -> float is vectorised; numpy's is ~35x slower on activations full of zeros.
        return torch.from_numpy(buf.view("<f2")).to(torch.float32).reshape(shape)
    q = torch.from_numpy(unpack(buf, msg.bits, numel)).reshape(shape)
    axis = None if msg.axis == -1 else msg.axis
    scales = torch.tensor(list(msg.scales), dtype=torch.float32)
    zero_points = torch.tensor(list(msg.zero_points), dtype=torch.int32)
    return dequantize(q, scales, zero_points, axis)


def check_header(msg: tensor_pb2.Tensor, limits: CodecLimits = CodecLimits()) -> tuple[torch.dtype, tuple[int, ...]]:
    """Validate everything but the payload bytes, as :func:`decode` does first; allocates nothing.

    A server calls this on a tensor's header (e.g. a chunk's ``header``) as soon as it arrives, to
    refuse a tensor it would not accept before buffering or decompressing its payload.

    Returns:
        the dtype and shape :func:`decode` would return.

    Raises:
        CodecError: naming the offending field, as :func:`decode` does.
    """
    dtype, shape, _ = _check_header(msg, limits)
    return dtype.torch, shape


def encode_many(xs: Iterable[torch.Tensor], spec: EncodingSpec) -> list[tensor_pb2.Tensor]:
    """:func:`encode` each tensor with the same spec."""
    return [encode(x, spec) for x in xs]


def decode_many(msgs: Iterable[tensor_pb2.Tensor], limits: CodecLimits = CodecLimits()) -> list[torch.Tensor]:
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
}


def _require_float(x: torch.Tensor, spec: EncodingSpec) -> None:
    if not x.is_floating_point():
        raise CodecError(f"x.dtype: {spec.encoding} encodes floating tensors, got {x.dtype}")


def _host_bytes(x: torch.Tensor) -> np.ndarray:
    """``x``'s values as a flat uint8 view of contiguous little-endian host memory."""
    arr = x.cpu().contiguous().numpy().reshape(-1)
    return arr.astype(arr.dtype.newbyteorder("<"), copy=False).view(np.uint8)


def _encode_affine(x: torch.Tensor, spec: EncodingSpec, msg: tensor_pb2.Tensor) -> bytes:
    xf = x.to(torch.float32)
    if xf.numel():
        lo, hi = torch.aminmax(xf.reshape(-1))  # NaN and inf both propagate into min / max
        if not (torch.isfinite(lo) and torch.isfinite(hi)):
            raise CodecError("x: affine encoding needs finite values (found NaN or inf)")
    axis = None
    if spec.per_channel:
        if not -xf.ndim <= spec.axis < xf.ndim:
            raise CodecError(f"spec.axis: {spec.axis} is out of range for a {xf.ndim}-d tensor")
        axis = spec.axis % xf.ndim
    try:
        lo, hi = clip_range(xf, spec.clip, axis, spec.bits, **spec.clip_kwargs)
    except (TypeError, ValueError) as e:
        raise CodecError(f"spec.clip: {e}") from None
    q, scales, zero_points = quantize(xf, spec.bits, lo, hi, axis)
    msg.bits = spec.bits
    msg.axis = -1 if axis is None else axis
    msg.scales.extend(scales.reshape(-1).tolist())
    msg.zero_points.extend(zero_points.reshape(-1).tolist())
    return pack(q.cpu().numpy().reshape(-1), spec.bits)


def _set_payload(msg: tensor_pb2.Tensor, data: bytes | np.ndarray, spec: EncodingSpec) -> None:
    raw_size = len(data) if isinstance(data, bytes) else data.nbytes
    if spec.codec == "zstd":
        payload = zstd.compress(data, spec.level, spec.threads)
        msg.codec = tensor_pb2.ZSTD
    else:
        payload = data if isinstance(data, bytes) else data.tobytes()
        msg.codec = tensor_pb2.NONE
    msg.raw_size = raw_size
    msg.payload = payload
    msg.payload_size = len(payload)
    msg.crc32 = zlib.crc32(payload)


def _check_header(msg: tensor_pb2.Tensor, limits: CodecLimits) -> tuple[_DType, tuple[int, ...], int]:
    """Everything but the payload bytes; returns (dtype, shape, element count)."""
    dtype = _BY_WIRE.get(msg.dtype)
    if dtype is None:
        raise CodecError(f"tensor.dtype: {msg.dtype} is not a known DType")
    if msg.encoding not in _ENCODING.values():
        raise CodecError(f"tensor.encoding: {msg.encoding} is not a known Encoding")
    if msg.codec not in (tensor_pb2.NONE, tensor_pb2.ZSTD):
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
    elif msg.encoding == tensor_pb2.JPEG:
        if len(shape) != 4 or shape[1] not in (1, 3):
            raise CodecError(f"tensor.shape: JPEG needs (N, 1 or 3, H, W), got {shape}")
        if msg.bits != 8 or msg.axis != 1:
            raise CodecError(
                f"tensor.bits/axis: JPEG carries 8-bit codes per channel (axis 1), got {msg.bits}/{msg.axis}"
            )
        _check_affine(msg, shape)
        # The size of a JPEG is not a function of the shape; bound it instead.
        if msg.raw_size > jpeg.max_payload(numel, shape[0]):
            raise CodecError(f"tensor.raw_size: {msg.raw_size} is too large for {numel} JPEG samples")
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
    scales = np.asarray(msg.scales, np.float32)
    if not (np.isfinite(scales).all() and (scales > 0).all()):
        raise CodecError("tensor.scales: every scale must be finite and > 0")
    zero_points = np.asarray(msg.zero_points, np.int64)
    if zero_points.size and (zero_points.min() < 0 or zero_points.max() > qmax(msg.bits)):
        raise CodecError(f"tensor.zero_points: every zero point must be in [0, {qmax(msg.bits)}]")
