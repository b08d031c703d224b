"""The JPEG encoding: image batches round trip closely, and bad payloads are refused by field."""

from __future__ import annotations

import io
import struct
import zlib

import pytest
import torch
from PIL import Image

from cleave_cli.images import synthetic_images
from compressor import CodecError, EncodingSpec, decode, encode
from protos.cleave.v1 import tensor_pb2


@pytest.fixture(scope="module")
def images() -> torch.Tensor:
    return synthetic_images(2, (1, 3, 64, 64), seed=4)


def reseal(msg: tensor_pb2.Tensor, payload: bytes) -> tensor_pb2.Tensor:
    msg.payload, msg.payload_size, msg.raw_size, msg.crc32 = payload, len(payload), len(payload), zlib.crc32(payload)
    return msg


def test_round_trip_is_close_and_smaller_than_8_bit_codes(images: torch.Tensor) -> None:
    msg = encode(images, EncodingSpec.parse("jpeg"))
    out = decode(msg)
    assert out.shape == images.shape and out.dtype == torch.float32
    span = float(images.max() - images.min())
    assert float((out - images).abs().mean()) < 0.03 * span
    assert msg.payload_size < encode(images, EncodingSpec.parse("int8c+none")).payload_size
    low = encode(images, EncodingSpec.parse("jpeg30"))
    assert low.payload_size < msg.payload_size


def test_grayscale_and_spec_text() -> None:
    gray = synthetic_images(1, (1, 1, 32, 48), seed=1)
    assert decode(encode(gray, EncodingSpec.parse("jpeg"))).shape == (1, 1, 32, 48)
    spec = EncodingSpec.parse("jpeg75")
    assert str(spec) == "jpeg75" and spec.codec == "none" and EncodingSpec.from_proto(spec.to_proto()) == spec
    with pytest.raises(CodecError, match="quality"):
        EncodingSpec.parse("jpeg101")


def test_encode_refuses_non_images() -> None:
    with pytest.raises(CodecError, match="x.shape"):
        encode(torch.zeros(1, 4, 8, 8), EncodingSpec.parse("jpeg"))
    with pytest.raises(CodecError, match="finite"):
        encode(torch.full((1, 3, 8, 8), float("nan")), EncodingSpec.parse("jpeg"))


@pytest.mark.parametrize(
    "corrupt, field",
    [
        (lambda m, p: reseal(m, p[:-7]), "payload"),
        (lambda m, p: reseal(m, p + b"\x00\x01"), "after the last image"),
        (lambda m, p: reseal(m, struct.pack("<I", 10**6) + p[4:]), "claims"),
        (lambda m, p: reseal(m, struct.pack("<I", 5) + b"hello" + p[4 + struct.unpack("<I", p[:4])[0] :]), "JPEG"),
        (lambda m, p: (m.shape.__setitem__(3, 65), m)[1], "64x64"),
        (lambda m, p: (setattr(m, "bits", 4), m)[1], "bits"),
        (lambda m, p: (setattr(m, "raw_size", 10**9), m)[1], "raw_size"),
    ],
)
def test_bad_payloads_are_refused(images: torch.Tensor, corrupt, field: str) -> None:
    msg = encode(images, EncodingSpec.parse("jpeg"))
    bad = corrupt(msg, bytes(msg.payload))
    with pytest.raises(CodecError, match=field):
        decode(bad)


# WebP: the same layout and validation, each image a lossy WebP.


def _webp_file(image: Image.Image, **save: object) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="WEBP", **save)
    return buf.getvalue()


def _replace_first_image(msg: tensor_pb2.Tensor, image: bytes) -> tensor_pb2.Tensor:
    payload = bytes(msg.payload)
    (first,) = struct.unpack("<I", payload[:4])
    return reseal(msg, struct.pack("<I", len(image)) + image + payload[4 + first :])


def test_webp_round_trips_closely_and_beats_jpeg_at_equal_quality(images: torch.Tensor) -> None:
    msg = encode(images, EncodingSpec.parse("webp"))
    assert msg.encoding == tensor_pb2.WEBP
    out = decode(msg)
    assert out.shape == images.shape and out.dtype == torch.float32
    span = float(images.max() - images.min())
    assert float((out - images).abs().mean()) < 0.03 * span
    assert msg.payload_size < encode(images, EncodingSpec.parse("jpeg")).payload_size
    assert encode(images, EncodingSpec.parse("webp30")).payload_size < msg.payload_size
    gray = synthetic_images(1, (1, 1, 32, 48), seed=1)
    assert decode(encode(gray, EncodingSpec.parse("webp"))).shape == (1, 1, 32, 48)
    spec = EncodingSpec.parse("webp75")
    assert str(spec) == "webp75" and spec.codec == "none" and EncodingSpec.from_proto(spec.to_proto()) == spec
    with pytest.raises(CodecError, match="quality"):
        EncodingSpec.parse("webp0")


def test_hostile_webp_payloads_are_refused(images: torch.Tensor) -> None:
    """A WebP message whose images are a JPEG, an animation, a huge canvas, or garbage is refused
    naming the payload, before Pillow decodes pixels."""
    jpeg_bytes = bytes(encode(images[:1], EncodingSpec.parse("jpeg")).payload)[4:]
    still = Image.new("RGB", (64, 64), (10, 200, 30))
    animation = _webp_file(still, save_all=True, append_images=[Image.new("RGB", (64, 64))], duration=10)
    huge = _webp_file(Image.new("RGB", (4000, 4000)), quality=1)  # ~28 KB that decodes to 48 MB
    cases = [
        (jpeg_bytes, "not a valid WEBP"),
        (animation, "frames"),
        (huge, "4000x4000"),
        (b"RIFF\xff\xff\xff\x7fWEBPVP8 " + b"\x00" * 40, "not a valid WEBP"),
        (_webp_file(still)[:-20], "not a valid WEBP"),
    ]
    for image, match in cases:
        msg = encode(images, EncodingSpec.parse("webp"))
        with pytest.raises(CodecError, match=match):
            decode(_replace_first_image(msg, image))
    msg = encode(images, EncodingSpec.parse("webp"))
    msg.raw_size = 10**9
    with pytest.raises(CodecError, match="raw_size"):
        decode(msg)
