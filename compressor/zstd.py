"""zstd for tensor payloads: cached contexts, and decompression that cannot be made to over-allocate.

Contexts are cached per thread and per (level, threads, codes): zstandard's objects must not be
shared between threads, and reuse skips re-allocating their tables (measured: ~10 us per call,
about 15% of compressing a 16 KB tensor, noise for large ones).

Quantized codes at level 1 (the default, ``codes=True``) become one of two frames, whichever a
sample says (:func:`compress_codes`):

- *literals only*: every byte a Huffman-coded literal, no LZ match, made with zstd's sequence API
  (``ZSTD_compressSequences`` given no sequences) through zstandard's CFFI backend. Packed codes
  of a post-ReLU activation are a small, skewed alphabet with few repeats: at level 1, 94% of the
  8-bit output bytes and 88% of the 4-bit ones were literals anyway, and the ~7,500 matches per
  frame (mostly runs of zeros) cost more to decode than the literals they replace. Measured on
  resnet50's layer1 activation, one core, interleaved (the ``zstd_levels`` table of ``python -m
  benchmarks.codec`` has both frames): 8-bit codes 492,833 B against 492,532 B, decompressed in
  0.63 ms against 0.74 ms, compressed (the sample included) in ~40% less time; 4-bit codes
  172,301 B against 171,263 B (+0.6%), 0.26 ms against 0.34 ms, ~35% less time to compress. The
  same network's layer2-layer4 codes are within 0.4% of their size with matches at 4 and 8 bits.
- *with LZ matches*: zstd's level-1 strategy with :data:`CODES_PARAMS` (matches of at least 7
  bytes, the smallest match table zstd allows), for codes that repeat (an image's codes are 6-55%
  larger as literals only, resnet50's max-pooled stem 10-17%; most 2-bit codes), and for codes under
  :data:`MIN_LITERALS_BYTES`, where choosing costs more time than it can save.

Either is a choice of the sender only: any zstd decoder reads both. Without the CFFI backend (no
``cffi``) every frame of codes has matches. Raw and fp16 bytes keep zstd's own levels.
"""

from __future__ import annotations

import threading

import numpy as np
import zstandard

from compressor.blocked import reusable_output

try:  # zstandard's CFFI backend: its binding of libzstd's whole API, here for ZSTD_compressSequences
    from zstandard.backend_cffi import ffi as _ffi
    from zstandard.backend_cffi import lib as _lib
except ImportError:  # no cffi: frames of codes keep their LZ matches
    _ffi = _lib = None

_local = threading.local()


#: zstd parameters for quantized codes at level 1 when the frame has LZ matches (see above): level 1's
#: strategy (fast) and search, with a 128 KiB window, a 64-entry match table (zstd's minimum) and
#: 7-byte minimum matches.
#: Measured against a 1024-entry table (hash_log 10), interleaved on one core, resnet50 layer1
#: codes: 4-bit 171,263 B in 1.15 ms against 173,040 B in 1.34 ms; 8-bit 492,532 B in 1.95 ms
#: against 495,303 B in 2.05 ms (decompression 0.48 against 0.57 ms and 0.99 against 1.00 ms).
CODES_PARAMS = {"window_log": 17, "hash_log": 6, "chain_log": 6, "min_match": 7}
CODES_LEVEL = 1

#: A frame of codes is literals only when, on a sample of the codes (:data:`SAMPLE_PIECES` evenly
#: spaced pieces, together at most a quarter of the codes and :data:`SAMPLE_BYTES`), that frame is at
#: most this much larger than one with LZ matches. What it buys on a resnet50 activation: 10-15% less
#: time to decode the tensor, 12-20% less to encode it (see above).
LITERALS_TOLERANCE = 0.03
SAMPLE_PIECES, SAMPLE_BYTES = 4, 32 << 10
#: Codes shorter than this keep their matches: sampling them costs more time than the literals save
#: (measured on 16-50 KB of codes: encode +25-35% when both frames were made, decode -0-9%).
MIN_LITERALS_BYTES = 64 << 10


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
    ``codes``: ``data`` is packed quantization codes (at level 1 on the calling thread:
    :func:`compress_codes`; with worker threads, :data:`CODES_PARAMS`)."""
    if codes and level == CODES_LEVEL and not threads and _lib is not None:
        return compress_codes(data)
    return _compressor(level, threads, codes).compress(data)


def compress_codes(data: bytes | memoryview | np.ndarray) -> bytes:
    """Packed quantization codes as one level-1 zstd frame: literals only where that costs at most
    :data:`LITERALS_TOLERANCE` more bytes than LZ matches on a sample of ``data`` (or the sample's
    matches cover under 1% of it), and ``data`` has at least :data:`MIN_LITERALS_BYTES`; else with
    matches (:data:`CODES_PARAMS`). The choice depends on the bytes only: the same codes give the same
    frame. Needs zstandard's CFFI backend (see :func:`compress`)."""
    flat = np.frombuffer(data, np.uint8)
    matches = _compressor(CODES_LEVEL, 0, codes=True)
    if flat.size < MIN_LITERALS_BYTES:
        return matches.compress(flat)
    piece = min(SAMPLE_BYTES, flat.size // 4) // SAMPLE_PIECES
    step = flat.size // SAMPLE_PIECES
    sample = np.concatenate([flat[i * step : i * step + piece] for i in range(SAMPLE_PIECES)])
    with_matches = matches.compress(sample)
    literals = sum(block.get("literal_bytes", 0) for block in frame_blocks(with_matches))
    # Matches for under 1% of the sample: the frames are alike, and one without matches decodes faster.
    if literals >= 0.99 * sample.size or _literals_win(len(compress_literals(sample)), len(with_matches)):
        return compress_literals(flat)
    return matches.compress(flat)


def _literals_win(literal_bytes: int, match_bytes: int) -> bool:
    return literal_bytes <= match_bytes * (1 + LITERALS_TOLERANCE)


def compress_literals(data: bytes | memoryview | np.ndarray) -> bytes:
    """One zstd frame of ``data`` (any contiguous buffer) with no LZ match: zstd's level-1 literals
    (Huffman-coded per 128 KiB block, or stored raw or as one repeated byte where that is smaller),
    a :data:`CODES_PARAMS` window and the content size declared. Needs zstandard's CFFI backend."""
    if _lib is None:
        raise RuntimeError("zstd literals-only frames need zstandard's CFFI backend (install cffi)")
    src = _ffi.from_buffer(data)
    bound = compress_bound(len(src))
    out = reusable_output(bound, slot="literals")  # the frame is copied out of it
    cctx = _literals_context()
    written = _check(_lib.ZSTD_compressSequences(cctx, _ffi.from_buffer(out), bound, _ffi.NULL, 0, src, len(src)))
    return out[:written].tobytes()


def _check(code: int) -> int:
    if _lib.ZSTD_isError(code):
        raise RuntimeError(f"zstd: {_ffi.string(_lib.ZSTD_getErrorName(code)).decode()}")
    return code


def _literals_context() -> object:
    """This thread's libzstd compression context for :func:`compress_literals`."""
    cctx = getattr(_local, "literals", None)
    if cctx is None:
        raw = _lib.ZSTD_createCCtx()
        if raw == _ffi.NULL:
            raise MemoryError("zstd: cannot allocate a compression context")
        cctx = _ffi.gc(raw, _lib.ZSTD_freeCCtx)
        _check(_lib.ZSTD_CCtx_setParameter(cctx, _lib.ZSTD_c_compressionLevel, CODES_LEVEL))
        _check(_lib.ZSTD_CCtx_setParameter(cctx, _lib.ZSTD_c_windowLog, CODES_PARAMS["window_log"]))
        _check(_lib.ZSTD_CCtx_setParameter(cctx, _lib.ZSTD_c_contentSizeFlag, 1))
        _local.literals = cctx
    return cctx


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


def frame_blocks(frame: bytes) -> list[dict[str, int]]:
    """The blocks of one zstd frame, from their headers (RFC 8878, sections 3.1.1.2 to 3.1.1.3.2.1):
    each block's type and size, and for a compressed block how its literals are stored (raw, RLE,
    Huffman-coded), how many output bytes are literals, the literals section's size and the number of
    sequences (LZ matches; each copies earlier output)."""
    magic, descriptor = int.from_bytes(frame[:4], "little"), frame[4]
    if magic != 0xFD2FB528:
        raise ValueError("not a zstd frame")
    single_segment, fcs_flag = descriptor >> 5 & 1, descriptor >> 6
    pos = 5 + (not single_segment) + (0, 1, 2, 4)[descriptor & 3] + (single_segment, 2, 4, 8)[fcs_flag]
    blocks = []
    while True:
        header = int.from_bytes(frame[pos : pos + 3], "little")
        last, kind, size = header & 1, header >> 1 & 3, header >> 3
        pos += 3
        block = {"type": ("raw", "rle", "compressed", "reserved")[kind], "size": size}
        if kind == 2:
            b = frame[pos : pos + size]
            lit_type, size_format = b[0] & 3, b[0] >> 2 & 3
            if lit_type < 2:  # raw or RLE literals: a 1-3 byte header, then the bytes or one byte
                head = (1, 2, 1, 3)[size_format]
                regen = int.from_bytes(b[:head], "little") >> (3 if size_format in (0, 2) else 4)
                section = head + (regen if lit_type == 0 else 1)
            else:  # Huffman-coded (2) or with the previous block's table (3)
                head = (3, 3, 4, 5)[size_format]
                bits = (10, 10, 14, 18)[size_format]
                v = int.from_bytes(b[:head], "little") >> 4
                regen, section = v & ((1 << bits) - 1), head + (v >> bits)
            n = b[section]
            sequences = (
                n
                if n < 128
                else ((n - 128) << 8) + b[section + 1]
                if n < 255
                else b[section + 1] + (b[section + 2] << 8) + 0x7F00
            )
            block.update(literals=("raw", "rle", "huffman", "huffman")[lit_type], literal_bytes=regen)
            block.update(literals_section=section, sequences=sequences)
        blocks.append(block)
        pos += 1 if kind == 1 else size
        if last:
            return blocks


def literals_frames_work() -> bool:
    """Whether zstandard's CFFI backend here makes literals-only frames that zstandard decodes:
    ``ZSTD_compressSequences`` is in libzstd's experimental API, which a later zstandard (bundling a
    later libzstd) may change. Checked once at import; where it fails, frames of codes keep matches."""
    if _lib is None:
        return False
    data = bytes(range(64)) * 64
    try:
        frame = compress_literals(data)
        return zstandard.ZstdDecompressor().decompress(frame) == data and frame_blocks(frame)[0]["sequences"] == 0
    except Exception:  # noqa: BLE001 - any failure of the binding means: do not use it
        return False


if not literals_frames_work():
    _ffi = _lib = None
