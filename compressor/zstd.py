"""zstd for tensor payloads: cached contexts, and decompression that cannot be made to over-allocate.

Contexts are cached per thread and per (level, threads, codes): zstandard's objects must not be
shared between threads, and reuse skips re-allocating their tables (measured: ~10 us per call,
about 15% of compressing a 16 KB tensor, noise for large ones).

Quantized codes at level 1 (the default) get zstd's level-1 strategy with :data:`CODES_PARAMS`:
matches of at least 7 bytes and the smallest match table zstd allows (64 entries, in L1 cache).
Packed 2-8 bit codes are a small alphabet that zstd's Huffman stage compresses; short matches there
cost more to find than they save, and a small table forgets all but recent, likely repeats.
Measured on a resnet50 activation (``python -m benchmarks.codec``, the ``zstd_levels`` table):
4-bit codes 2.34x against zstd level 1's 2.27x, in ~25% less time to compress and ~10% less to
decompress; 8-bit codes 1.63x against 1.61x. Smaller than a 1024-entry table on every resnet50
stage's 2-, 4- and 8-bit codes but one (the input's 4-bit codes, by 0.1%). It is a choice of the
sender only: any zstd decoder reads the frames.
Raw and fp16 bytes keep zstd's own levels (on a photo, these parameters lose 5% of the ratio).
"""

from __future__ import annotations

import threading

import numpy as np
import zstandard

_local = threading.local()


#: zstd parameters for quantized codes at level 1 (see above): level 1's strategy (fast) and search,
#: with a 128 KiB window, a 64-entry match table (zstd's minimum) and 7-byte minimum matches.
#: Measured against a 1024-entry table (hash_log 10), interleaved on one core, resnet50 layer1
#: codes: 4-bit 171,263 B in 1.15 ms against 173,040 B in 1.34 ms; 8-bit 492,532 B in 1.95 ms
#: against 495,303 B in 2.05 ms (decompression 0.48 against 0.57 ms and 0.99 against 1.00 ms).
CODES_PARAMS = {"window_log": 17, "hash_log": 6, "chain_log": 6, "min_match": 7}
CODES_LEVEL = 1


def _compressor(level: int, threads: int, codes: bool = False) -> zstandard.ZstdCompressor:
    cache = getattr(_local, "compressors", None)
    if cache is None:
        cache = _local.compressors = {}
    codes = codes and level == CODES_LEVEL
    cctx = cache.get((level, threads, codes))
    if cctx is None:
        # write_content_size: the decoder relies on the frame declaring its size.
        if codes:
            params = zstandard.ZstdCompressionParameters.from_level(
                level, threads=threads, write_content_size=True, **CODES_PARAMS
            )
            cctx = zstandard.ZstdCompressor(compression_params=params)
        else:
            cctx = zstandard.ZstdCompressor(level=level, threads=threads, write_content_size=True)
        cache[(level, threads, codes)] = cctx
    return cctx


def _decompressor() -> zstandard.ZstdDecompressor:
    dctx = getattr(_local, "decompressor", None)
    if dctx is None:
        dctx = _local.decompressor = zstandard.ZstdDecompressor()
    return dctx


def compress_bound(size: int) -> int:
    """The most bytes zstd's one-shot compressor can produce for ``size`` input bytes (``ZSTD_COMPRESSBOUND``)."""
    margin = ((128 << 10) - size) >> 11 if size < (128 << 10) else 0
    return size + (size >> 8) + margin


def compress(data: bytes | memoryview | np.ndarray, level: int = 3, threads: int = 0, *, codes: bool = False) -> bytes:
    """One zstd frame holding ``data`` (any contiguous buffer), with its content size declared.
    ``codes``: ``data`` is packed quantization codes (at level 1: :data:`CODES_PARAMS`)."""
    return _compressor(level, threads, codes).compress(data)


def decompress(payload: bytes, size: int, *, writable: bool = True) -> np.ndarray:
    """Decompress one zstd frame that must hold exactly ``size`` bytes.

    The frame must declare its content size, and it must equal ``size``; output is written into
    a ``size``-byte buffer and decoding stops there, so a frame that would expand further is
    rejected without ever holding more than ``size`` bytes. Trailing garbage is rejected too.

    Returns:
        a new uint8 array of length ``size``: writable, or with ``writable=False`` a read-only view
        of zstd's one-shot output (a caller that only reads it saves ~20% of the time: zstd
        decodes in one call into a buffer of the declared size, instead of a streamed loop).

    Raises:
        ValueError: describing what was wrong with the frame.
    """
    try:
        declared = zstandard.get_frame_parameters(payload).content_size
    except zstandard.ZstdError as e:
        raise ValueError(f"not a zstd frame ({e})") from None
    if declared == zstandard.CONTENTSIZE_UNKNOWN:
        raise ValueError("zstd frame does not declare its content size")
    if declared != size:
        raise ValueError(f"zstd frame declares {declared} bytes, raw_size is {size}")
    if not writable:
        try:
            data = _decompressor().decompress(payload, allow_extra_data=False)  # into `declared` bytes
        except zstandard.ZstdError as e:
            raise ValueError(f"corrupt zstd data ({e})") from None
        if len(data) != size:
            raise ValueError(f"zstd frame holds {len(data)} bytes, raw_size is {size}")
        return np.frombuffer(data, np.uint8)
    out = np.empty(size, np.uint8)
    view = memoryview(out)
    filled = 0
    try:
        with _decompressor().stream_reader(payload) as reader:
            while filled < size:
                n = reader.readinto(view[filled:])
                if n == 0:
                    break
                filled += n
            extra = reader.read(1)  # past the end: more output, or trailing bytes that are not a frame
    except zstandard.ZstdError as e:
        raise ValueError(f"corrupt zstd data ({e})") from None
    if filled != size:
        raise ValueError(f"zstd frame holds {filled} bytes, raw_size is {size}")
    if extra:
        raise ValueError(f"zstd data expands beyond raw_size {size}")
    return out
