"""JPEG and WebP payloads: an (N, C, H, W) float image batch as per-channel 8-bit codes, one
image file per image.

This is the "send the camera frame" baseline of split inference: the cloud-only candidate with
the input compressed the way images usually travel. The float input (normally ImageNet-normalised)
is mapped to 8-bit codes per channel with min-max affine parameters (kept in the message, so the
cloud recovers the same value range), then each image is a baseline JPEG or a lossy WebP.

Decoding checks each image's format, declared size, mode and frame count before Pillow
decompresses anything.
"""

from __future__ import annotations

import io
import struct
from typing import Any

import numpy as np

from compressor._arrays import as_float32
from compressor.clipping import clip_range_array
from compressor.errors import CodecError
from compressor.quant import affine_params_array, dequantize_array, quantize_array
from protos.cleave.v1 import tensor_pb2

_LEN = struct.Struct("<I")
_MODES = {1: "L", 3: "RGB"}
#: Pillow's format name per wire name; a payload is opened only as its own format.
FORMATS = {"jpeg": "JPEG", "webp": "WEBP"}


def max_payload(numel: int, images: int) -> int:
    """An upper bound on an honest JPEG or WebP payload for ``numel`` 8-bit samples in ``images`` images."""
    return 2 * numel + 2048 * images


def encode_images(x: Any, quality: int, msg: tensor_pb2.Tensor, fmt: str) -> bytes:
    """Encode ``x`` (N, C, H, W), C in {1, 3}, one ``fmt`` file per image (``fmt`` is ``"jpeg"``
    or ``"webp"``, lossy at ``quality``); fills the affine fields of ``msg``."""
    from PIL import Image  # only image encodings need Pillow

    if x.ndim != 4 or x.shape[1] not in _MODES:
        raise CodecError(f"x.shape: {fmt} encodes (N, 1 or 3, H, W) image batches, got {tuple(x.shape)}")
    xf = as_float32(x)
    if xf.size and not np.isfinite(xf).all():
        raise CodecError(f"x: {fmt} encoding needs finite values (found NaN or inf)")
    lo, hi = clip_range_array(xf, "minmax", 1, 8)
    scales, zero_points = affine_params_array(lo, hi, 8)
    codes = quantize_array(xf, 8, scales, zero_points, lo, hi, 1)
    msg.bits, msg.axis = 8, 1
    msg.scales.extend(scales.reshape(-1).tolist())
    msg.zero_points.extend(zero_points.reshape(-1).tolist())
    parts = []
    for image in codes:
        buf = io.BytesIO()
        pixels = image.transpose(1, 2, 0) if image.shape[0] == 3 else image[0]
        Image.fromarray(np.ascontiguousarray(pixels)).save(buf, format=FORMATS[fmt], quality=quality)
        data = buf.getvalue()
        parts += [_LEN.pack(len(data)), data]
    return b"".join(parts)


def decode_images(buf: np.ndarray | bytes, msg: tensor_pb2.Tensor, shape: tuple[int, ...], fmt: str) -> np.ndarray:
    """Decode a JPEG or WebP payload (already CRC-checked and un-zstd'd) into float32 numpy of
    ``shape``; each image must be a single still ``fmt`` image of the shape's size and mode."""
    from PIL import Image, UnidentifiedImageError  # only image encodings need Pillow

    name = FORMATS[fmt]
    n, c, h, w = shape
    data = memoryview(bytes(buf))
    images, offset = [], 0
    for i in range(n):
        if offset + _LEN.size > len(data):
            raise CodecError(f"tensor.payload: image {i} of {n} is missing")
        (length,) = _LEN.unpack_from(data, offset)
        offset += _LEN.size
        if length > len(data) - offset:
            raise CodecError(f"tensor.payload: image {i} claims {length} bytes, {len(data) - offset} remain")
        try:
            image = Image.open(io.BytesIO(data[offset : offset + length]), formats=[name])
            # Lossy WebP has no grey mode: Pillow stores a grey image as RGB (or RGBA with alpha).
            mode = _MODES[c] if name == "JPEG" else "RGB"
            if image.size != (w, h) or image.mode != mode:
                raise CodecError(
                    f"tensor.payload: image {i} is {image.mode} {image.size[0]}x{image.size[1]}, "
                    f"the shape says {mode} {w}x{h}"
                )
            if getattr(image, "n_frames", 1) != 1:
                raise CodecError(f"tensor.payload: image {i} has {image.n_frames} frames, not one")
            if c == 1 and name != "JPEG":
                image = image.convert("L")
            pixels = np.asarray(image)
        except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
            raise CodecError(f"tensor.payload: image {i} is not a valid {name} ({exc})") from None
        images.append(pixels.reshape(h, w, c).transpose(2, 0, 1))
        offset += length
    if offset != len(data):
        raise CodecError(f"tensor.payload: {len(data) - offset} bytes after the last image")
    q = np.stack(images) if images else np.zeros(shape, np.uint8)
    scales = np.asarray(msg.scales, np.float32)
    zero_points = np.asarray(msg.zero_points, np.int32)
    return dequantize_array(q, scales, zero_points, 1)
