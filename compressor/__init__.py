"""Cleave's compression library: the tensor codec (wire format) and its building blocks.

- :class:`EncodingSpec` says how to encode (raw / fp16 / affine 2-8 bits, clipping, zstd);
  :func:`encode` and :func:`decode` convert between ``torch.Tensor`` (or numpy arrays:
  :func:`decode_array`) and ``cleave.v1.Tensor``, with :class:`CodecLimits` bounding what a decoder
  accepts. None of this needs torch (``tests/test_layers.py`` checks every module here).
- :func:`to_chunks` and :class:`Assembler` stream tensor sequences as bounded ``TensorChunk`` groups.
- :func:`register_clipper` adds clipping-range estimators that specs can name.

The offline side, which needs torch and never runs on a request's path, is :mod:`compressor.offline`:
structured pruning (CNN, Transformer plans), post-training weight quantization and LAPQ.
"""

from compressor import aciq  # registers the "aciq" clipper
from compressor.bitpack import pack, packed_size, unpack
from compressor.clipping import clip_range, clipper_names, get_clipper, register_clipper
from compressor.codec import (
    CodecLimits,
    check_header,
    decode,
    decode_array,
    decode_many,
    encode,
    encode_apart,
    encode_many,
)
from compressor.errors import CodecError
from compressor.framing import Assembler, BudgetExceeded, ByteBudget, to_chunks
from compressor.quant import dequantize, quantize
from compressor.spec import RAW_UNCOMPRESSED, EncodingSpec

__all__ = [
    "Assembler",
    "BudgetExceeded",
    "ByteBudget",
    "CodecError",
    "CodecLimits",
    "EncodingSpec",
    "RAW_UNCOMPRESSED",
    "aciq",
    "check_header",
    "clip_range",
    "clipper_names",
    "decode",
    "decode_array",
    "decode_many",
    "dequantize",
    "encode",
    "encode_apart",
    "encode_many",
    "get_clipper",
    "pack",
    "packed_size",
    "quantize",
    "register_clipper",
    "to_chunks",
    "unpack",
]
