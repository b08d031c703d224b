"""`EncodingSpec`: how a sender encodes a tensor, with a compact text form and a wire form.

Text grammar (``EncodingSpec.parse`` / ``str(spec)``; no spaces)::

    spec     := encoding [":" clip] ["+" codec]
    encoding := "raw" | "fp32"                 raw bytes of the tensor's own dtype ("fp32" is an alias)
              | "fp16"                         floats sent as IEEE half
              | "int" BITS ["c" [AXIS]]        affine, BITS in 2,3,4,5,6,8; "c": per channel
                                               along AXIS (default 1, may be negative)
              | "jpeg" [QUALITY]               an image batch (N, C, H, W) as JPEGs of its 8-bit
                                               per-channel codes; QUALITY 1-100, default 90;
                                               the codec defaults to none (zstd gains nothing)
              | "webp" [QUALITY]               the same as lossy WebPs (QUALITY default 90)
              | "entropy"                      a learned bottleneck's integer latent, range-coded with
                                               the model's tables (see compressor.entropy); codec none
    clip     := NAME ["(" KEY "=" VALUE {"," KEY "=" VALUE} ")"]
                                               clipping method (int only; default "minmax");
                                               VALUE is an int, a float or a lowercase identifier
    codec    := "none" | "zstd" [LEVEL] ["t" THREADS]
                                               default "zstd" at level 1, single-threaded

Examples: ``raw``, ``fp16+none``, ``int8``, ``int4c``, ``int6c0``, ``int3:percentile``,
``int4c:percentile(percentile=99.9)+zstd9t2``, ``int8+zstd-5``, ``jpeg``, ``jpeg75``, ``webp80``. ``str`` writes the
shortest form (defaults omitted), and ``parse(str(spec)) == spec`` for every valid spec.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from compressor import clipping
from compressor.bitpack import BIT_WIDTHS
from compressor.errors import CodecError
from protos.cleave.v1 import tensor_pb2

ENCODINGS = ("raw", "fp16", "affine", "jpeg", "webp", "entropy")
#: Encodings that send an image batch as image files (lossy, at a quality).
IMAGE_ENCODINGS = ("jpeg", "webp")
DEFAULT_QUALITY = 90
CODECS = ("zstd", "none")
MIN_LEVEL, MAX_LEVEL = -(1 << 17), 22  # zstd's negative "fast" levels down to ZSTD_minCLevel()
# Level 1: on resnet activations (benchmarks/codec.py) it compresses 4-bit codes 2.27x against 2.13x at
# level 3, at 2-4x its speed; the fast levels (-1 to -5) gain at most ~1.5x in speed but reach only 1.28-1.40x.
# Quantized codes at level 1 go as literals only where that costs few bytes (compressor.zstd.compress_codes):
# ~10% less time to decode a resnet50 activation, ~20% to encode, at 2.33x instead of 2.34x for 4-bit codes.
DEFAULT_LEVEL = 1

_ENCODING_TO_PROTO = {
    "raw": tensor_pb2.RAW,
    "fp16": tensor_pb2.FP16,
    "affine": tensor_pb2.AFFINE,
    "jpeg": tensor_pb2.JPEG,
    "webp": tensor_pb2.WEBP,
    "entropy": tensor_pb2.ENTROPY,
}
_ENCODING_FROM_PROTO = {v: k for k, v in _ENCODING_TO_PROTO.items()}
_ENCODING_FROM_PROTO[tensor_pb2.ENCODING_UNSPECIFIED] = "raw"
_CODEC_TO_PROTO = {"zstd": tensor_pb2.ZSTD, "none": tensor_pb2.NONE}
_CODEC_FROM_PROTO = {v: k for k, v in _CODEC_TO_PROTO.items()}
# tensor.proto: an unset TensorEncoding means "raw fp32, no codec".
_CODEC_FROM_PROTO[tensor_pb2.CODEC_UNSPECIFIED] = "none"

_SPEC = re.compile(r"(?P<enc>[^:+]*)(?::(?P<clip>[^+]*))?(?:\+(?P<codec>.*))?\Z")
_INT = re.compile(r"int(?P<bits>\d+)(?:(?P<c>c)(?P<axis>-?\d+)?)?\Z")
_IMAGE = re.compile(r"(?P<fmt>jpeg|webp)(?P<quality>\d+)?\Z")
_ZSTD = re.compile(r"zstd(?P<level>-?\d+)?(?:t(?P<threads>\d+))?\Z")
_CLIP = re.compile(r"(?P<name>[a-z][a-z0-9_]*)(?:\((?P<params>[^()]*)\))?\Z")
_KEY = re.compile(r"[a-z_][a-z0-9_]*\Z")
_INT_VALUE = re.compile(r"-?\d+\Z")
_FLOAT_VALUE = re.compile(r"-?(?:\d+\.\d*|\.\d+|\d+)(?:e-?\d+)?\Z")
_WORD_VALUE = re.compile(r"[a-z_][a-z0-9_.]*\Z")

ClipParams = tuple[tuple[str, Any], ...]


@dataclass(frozen=True)
class EncodingSpec:
    """What the sender wants done to a tensor before it goes on the wire.

    Attributes:
        encoding: ``"raw"`` (bytes of the tensor's dtype), ``"fp16"`` or ``"affine"``.
        bits: affine code width, one of 2, 3, 4, 5, 6, 8.
        per_channel: affine: one scale / zero point per channel along ``axis``.
        axis: the channel axis for ``per_channel`` (negative counts from the end).
        clip: affine: a clipping method registered in :mod:`compressor.clipping`.
        clip_params: keyword arguments of the clipping method, as ``((key, value), ...)``.
        codec: ``"zstd"`` or ``"none"``.
        level: zstd level (1..22, or negative for zstd's fast modes).
        threads: zstd worker threads; 0 compresses on the calling thread.
        quality: jpeg and webp only: image quality, 1-100.

    Fields an encoding or codec does not use must keep their defaults, so that equal specs
    mean equal behaviour and the text form is unambiguous. Invalid values raise
    :class:`CodecError` naming the field.
    """

    encoding: str = "raw"
    bits: int = 8
    per_channel: bool = False
    axis: int = 1
    clip: str = "minmax"
    clip_params: ClipParams = ()
    codec: str = "zstd"
    level: int = DEFAULT_LEVEL
    threads: int = 0
    quality: int = DEFAULT_QUALITY

    def __post_init__(self) -> None:
        params = _normalise_params(self.clip_params, "EncodingSpec.clip_params")
        object.__setattr__(self, "clip_params", params)  # accept lists / mappings, store hashable
        _validate("EncodingSpec", **self._fields())

    def _fields(self) -> dict[str, Any]:
        return {name: getattr(self, name) for name in self.__dataclass_fields__}

    @property
    def clip_kwargs(self) -> dict[str, Any]:
        """``clip_params`` as keyword arguments for the clipping method."""
        return dict(self.clip_params)

    @classmethod
    def parse(cls, text: str) -> EncodingSpec:
        """Read the compact text form (see the module docstring); CodecError names the bad part."""
        match = _SPEC.match(text.strip())
        if match is None:
            raise CodecError(f"encoding spec {text!r}: expected encoding[:clip][+codec]")
        fields: dict[str, Any] = {}
        enc = match["enc"]
        if enc in ("raw", "fp32"):
            fields["encoding"] = "raw"
        elif enc == "fp16":
            fields["encoding"] = "fp16"
        elif enc == "entropy":
            fields.update(encoding="entropy", codec="none")
        elif m := _IMAGE.match(enc):
            fields.update(encoding=m["fmt"], codec="none")
            if m["quality"] is not None:
                fields["quality"] = int(m["quality"])
        elif m := _INT.match(enc):
            fields.update(encoding="affine", bits=int(m["bits"]), per_channel=bool(m["c"]))
            if m["axis"] is not None:
                fields["axis"] = int(m["axis"])
        else:
            raise CodecError(
                f"encoding spec {text!r}: encoding {enc!r} is not raw, fp32, fp16, int<bits>[c[<axis>]], "
                "jpeg[<q>], webp[<q>] or entropy"
            )
        if match["clip"] is not None:
            where = f"encoding spec {text!r}: clip"
            if fields["encoding"] != "affine":
                raise CodecError(f"{where} {match['clip']!r} applies only to int encodings")
            fields["clip"], fields["clip_params"] = _parse_clip(match["clip"], where)
        if match["codec"] is not None:
            fields.update(_parse_codec(match["codec"], text))
        try:
            return cls(**fields)
        except CodecError as e:
            raise CodecError(f"encoding spec {text!r}: {e}") from None

    def __str__(self) -> str:
        if self.encoding == "affine":
            out = f"int{self.bits}"
            if self.per_channel:
                out += "c" if self.axis == 1 else f"c{self.axis}"
            if self.clip != "minmax" or self.clip_params:
                out += ":" + self.clip_text()
        elif self.encoding in IMAGE_ENCODINGS:
            out = self.encoding + ("" if self.quality == DEFAULT_QUALITY else str(self.quality))
            return out + (f"+{self._codec_text()}" if self.codec == "zstd" else "")
        elif self.encoding == "entropy":
            return "entropy"
        else:
            out = self.encoding
        if self.codec == "none":
            out += "+none"
        elif self.level != DEFAULT_LEVEL or self.threads:
            out += "+zstd" + (str(self.level) if self.level != DEFAULT_LEVEL else "")
            out += f"t{self.threads}" if self.threads else ""
        return out

    def _codec_text(self) -> str:
        out = "zstd" + (str(self.level) if self.level != DEFAULT_LEVEL else "")
        return out + (f"t{self.threads}" if self.threads else "")

    def clip_text(self) -> str:
        """The clip part of the text form: ``name`` or ``name(key=value,...)``."""
        if not self.clip_params:
            return self.clip
        return f"{self.clip}({','.join(f'{k}={_format_value(v)}' for k, v in self.clip_params)})"

    def to_proto(self) -> tensor_pb2.TensorEncoding:
        """The wire form. ``axis`` and ``threads`` have no field there: the receiver of a
        ``TensorEncoding`` uses axis 1 and picks its own threads; clip parameters travel inside
        ``clip`` in the text syntax."""
        msg = tensor_pb2.TensorEncoding(encoding=_ENCODING_TO_PROTO[self.encoding], codec=_CODEC_TO_PROTO[self.codec])
        if self.encoding == "affine":
            msg.bits = self.bits
            msg.per_channel = self.per_channel
            msg.clip = self.clip_text()
        if self.codec == "zstd":
            msg.level = self.level
        if self.encoding in IMAGE_ENCODINGS:
            msg.quality = self.quality
        return msg

    @classmethod
    def from_proto(cls, msg: tensor_pb2.TensorEncoding) -> EncodingSpec:
        """Validate a wire ``TensorEncoding``. Unset fields take their defaults: encoding raw,
        bits 8, clip minmax, level 1, and codec **none** (the proto's "unset: raw fp32, no codec").

        Raises:
            CodecError: naming the field, e.g. ``"TensorEncoding.bits: 7 is not one of ..."``.
        """
        where = "TensorEncoding"
        if msg.encoding not in _ENCODING_FROM_PROTO:
            raise CodecError(f"{where}.encoding: {msg.encoding} is not a known Encoding")
        if msg.codec not in _CODEC_FROM_PROTO:
            raise CodecError(f"{where}.codec: {msg.codec} is not a known Codec")
        fields: dict[str, Any] = {
            "encoding": _ENCODING_FROM_PROTO[msg.encoding],
            "bits": msg.bits or 8,
            "per_channel": msg.per_channel,
            "codec": _CODEC_FROM_PROTO[msg.codec],
            "level": msg.level or DEFAULT_LEVEL,
            "quality": msg.quality or DEFAULT_QUALITY,
        }
        if msg.clip:
            fields["clip"], fields["clip_params"] = _parse_clip(msg.clip, f"{where}.clip")
        _validate(where, **{**cls()._fields(), **fields})
        return cls(**fields)


def _parse_clip(text: str, where: str) -> tuple[str, ClipParams]:
    m = _CLIP.match(text)
    if m is None:
        raise CodecError(f"{where}: {text!r} is not name or name(key=value,...)")
    if m["params"] is None:
        return m["name"], ()
    params = []
    for item in m["params"].split(","):
        key, sep, raw = item.partition("=")
        if not sep or not _KEY.match(key):
            raise CodecError(f"{where}: parameter {item!r} is not key=value")
        params.append((key, _parse_value(raw, f"{where}: parameter {key!r}")))
    return m["name"], tuple(params)


def _parse_codec(text: str, spec_text: str) -> dict[str, Any]:
    if text == "none":
        return {"codec": "none"}
    m = _ZSTD.match(text)
    if m is None:
        raise CodecError(f"encoding spec {spec_text!r}: codec {text!r} is not none or zstd[<level>][t<threads>]")
    out: dict[str, Any] = {"codec": "zstd"}
    if m["level"] is not None:
        out["level"] = int(m["level"])
    if m["threads"] is not None:
        out["threads"] = int(m["threads"])
    return out


def _parse_value(raw: str, where: str) -> int | float | str:
    if _INT_VALUE.match(raw):
        return int(raw)
    if _FLOAT_VALUE.match(raw):
        return float(raw)
    if _WORD_VALUE.match(raw):
        return raw
    raise CodecError(f"{where}: value {raw!r} is not a number or a lowercase identifier")


def _format_value(value: int | float | str) -> str:
    # repr round-trips floats; drop "e+" because "+" separates the codec part.
    return repr(value).replace("e+", "e") if isinstance(value, float) else str(value)


def _normalise_params(params: Any, where: str) -> ClipParams:
    items: Iterable[Any] = params.items() if isinstance(params, Mapping) else params
    try:
        pairs = tuple((key, value) for key, value in items)
    except (TypeError, ValueError):
        raise CodecError(f"{where}: {params!r} is not a sequence of (key, value) pairs") from None
    return pairs


def _validate(
    where: str,
    *,
    encoding: Any,
    bits: Any,
    per_channel: Any,
    axis: Any,
    clip: Any,
    clip_params: ClipParams,
    codec: Any,
    level: Any,
    threads: Any,
    quality: Any = DEFAULT_QUALITY,
) -> None:
    """Check every field; raise CodecError("<where>.<field>: ...") on the first bad one."""

    def fail(field: str, why: str) -> CodecError:
        return CodecError(f"{where}.{field}: {why}")

    def is_int(v: Any) -> bool:
        return isinstance(v, int) and not isinstance(v, bool)

    defaults = EncodingSpec.__dataclass_fields__
    if encoding not in ENCODINGS:
        raise fail("encoding", f"{encoding!r} is not one of {', '.join(ENCODINGS)}")
    if not is_int(bits) or bits not in BIT_WIDTHS:
        raise fail("bits", f"{bits!r} is not one of {','.join(map(str, BIT_WIDTHS))}")
    if not isinstance(per_channel, bool):
        raise fail("per_channel", f"{per_channel!r} is not a bool")
    if not is_int(axis):
        raise fail("axis", f"{axis!r} is not an int")
    if not isinstance(clip, str):
        raise fail("clip", f"{clip!r} is not a string")
    try:
        clipping.get_clipper(clip)
    except ValueError as e:
        raise fail("clip", str(e)) from None
    for key, value in clip_params:
        if not isinstance(key, str) or not _KEY.match(key):
            raise fail("clip_params", f"key {key!r} is not a lowercase identifier")
        if isinstance(value, bool) or not isinstance(value, (int, float, str)):
            raise fail("clip_params", f"{key}={value!r}: values are ints, floats or identifiers")
        if isinstance(value, float) and not math.isfinite(value):
            raise fail("clip_params", f"{key}={value!r} is not finite")
        if isinstance(value, str) and not _WORD_VALUE.match(value):
            raise fail("clip_params", f"{key}={value!r} is not a lowercase identifier")
    if len({key for key, _ in clip_params}) != len(clip_params):
        raise fail("clip_params", "a key appears twice")
    try:
        clipping.check_params(clip, dict(clip_params))
    except ValueError as e:
        raise fail("clip_params", str(e)) from None
    if codec not in CODECS:
        raise fail("codec", f"{codec!r} is not one of {', '.join(CODECS)}")
    if not is_int(level) or not (MIN_LEVEL <= level <= MAX_LEVEL) or level == 0:
        raise fail("level", f"{level!r} is not a zstd level in [{MIN_LEVEL}, -1] or [1, {MAX_LEVEL}]")
    if encoding == "entropy" and codec != "none":
        raise fail("codec", f"{codec!r}: an entropy-coded stream takes no byte codec (none)")
    if not is_int(threads) or threads < 0:
        raise fail("threads", f"{threads!r} is not a non-negative int")
    if not is_int(quality) or not 1 <= quality <= 100:
        raise fail("quality", f"{quality!r} is not a JPEG / WebP quality in [1, 100]")

    # Fields the encoding / codec ignores must stay at their defaults.
    used_by = {
        "bits": "affine",
        "per_channel": "affine",
        "clip": "affine",
        "clip_params": "affine",
        "axis": "per-channel affine",
        "level": "zstd",
        "threads": "zstd",
        "quality": "jpeg or webp",
    }
    in_use = {
        "jpeg or webp": encoding in IMAGE_ENCODINGS,
        "affine": encoding == "affine",
        "per-channel affine": encoding == "affine" and per_channel,
        "zstd": codec == "zstd",
    }
    values = {
        "bits": bits,
        "per_channel": per_channel,
        "clip": clip,
        "clip_params": clip_params,
        "axis": axis,
        "level": level,
        "threads": threads,
        "quality": quality,
    }
    for field, user in used_by.items():
        if not in_use[user] and values[field] != defaults[field].default:
            raise fail(field, f"{values[field]!r} is set but only {user} uses it")


#: Raw bytes, no codec: for model inputs and outputs, which are small or already incompressible.
RAW_UNCOMPRESSED = EncodingSpec(encoding="raw", codec="none")
