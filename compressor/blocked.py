"""Per-tensor affine encoding in cache-sized blocks: quantize and pack, fused.

:func:`quant.quantize_array` followed by :func:`bitpack.pack_array` makes full-size temporaries (a
float32 copy of the tensor, then its uint8 codes) and walks each one from memory again. Here every
step of a block of :data:`BLOCK` elements runs while the block is in the core's cache, in reused
per-thread scratch buffers, and only the packed bytes are written out (measured on a 1x256x56x56
activation: 0.49 ms instead of 0.62 ms). Decoding the default 4-bit codes runs in blocks too
(:func:`dequantize4`): not for the arithmetic, but to make no payload-sized temporaries.
Each element goes through the same float32 operations as the unfused functions (rounding half to
even by adding 2**23 where the values are known to lie in ``[0, 255]``: the same integer, see
:func:`quantize_pack`), so the bytes are identical (``tests/test_codec_cross.py`` checks this against
an independent reference).

:func:`min_max` finds a tensor's range in the same blocks: each block is read from memory once and
its second reduction runs from cache (measured: 0.25-0.30 ms instead of 0.35-0.45 ms for two
whole-tensor passes on the same activation).
"""

from __future__ import annotations

import threading

import numpy as np

from compressor.bitpack import pack_array, packed_size
from compressor.quant import per_tensor_steps, qmax

#: Elements per block: the float32 scratch (256 KiB) stays in L2. Measured on a 1x256x56x56 activation
#: (4-bit, ms of CPU): 16K 0.65, 32K 0.56, 64K 0.50, 128K 0.47-0.55, 256K 0.52-0.59, 1M 0.60.
BLOCK = 1 << 16

_local = threading.local()


def _scratch() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """This thread's (float32, uint8, uint16) block buffers, allocated once per thread (384 KiB,
    kept while the thread lives: encoding threads are few, a request's or a stream's)."""
    bufs = getattr(_local, "bufs", None)
    if bufs is None or bufs[0].size != BLOCK:
        bufs = _local.bufs = (np.empty(BLOCK, np.float32), np.empty(BLOCK, np.uint8), np.empty(BLOCK // 2, np.uint16))
    return bufs


#: 2**23: for float32 ``0 <= f < 2**22``, ``f + 2**23`` rounds (half to even, the default mode)
#: to the integer ``2**23 + rint(f)``, whose low mantissa byte is ``rint(f)`` for ``rint(f) <= 255``.
_ROUND = np.float32(1 << 23)

#: The largest packed output kept per thread for reuse (:func:`reusable_output`); larger ones are new.
MAX_REUSED_BYTES = 2 << 20


def min_max(flat: np.ndarray) -> tuple[np.float32, np.float32]:
    """``(flat.min(), flat.max())`` of a contiguous 1-d float32 array, block by block: NaN and inf
    propagate as they do there. ``flat`` must not be empty."""
    if flat.size <= BLOCK:
        return flat.min(), flat.max()
    starts = range(0, flat.size, BLOCK)
    los, his = np.empty(len(starts), np.float32), np.empty(len(starts), np.float32)
    for i, start in enumerate(starts):
        block = flat[start : start + BLOCK]
        los[i], his[i] = np.minimum.reduce(block), np.maximum.reduce(block)
    return los.min(), his.max()


def non_negative_max(flat: np.ndarray) -> np.float32 | None:
    """``flat.max()`` when every value of a contiguous 1-d float32 ``flat`` is finite and has no sign bit
    (``-0.0`` has one), else None. ``flat`` must not be empty.

    One reduction per block, of the values' uint32 bit patterns: finite floats without a sign bit are the
    patterns below +inf's and order as those do, so the largest pattern is the largest float, bit for bit.
    The first block with a sign bit, inf or NaN ends the loop (a signed tensor pays for one block). Half
    of :func:`min_max`'s reductions, and integer ones. A post-ReLU 1x256x56x56 activation, one core,
    interleaved, load 6: 0.48 ms against 0.57 for :func:`min_max` read from memory, 0.15 against 0.23
    from L3 (a signed one: 0.61 against 0.57, 0.23 against 0.23); where memory is not contended, both
    are bound by the one read from memory (0.28-0.33 ms against 0.27-0.30 in ``benchmarks.codec``)."""
    patterns = flat.view(np.uint32)
    top = 0
    for start in range(0, flat.size, BLOCK):
        block_top = int(np.maximum.reduce(patterns[start : start + BLOCK]))
        if block_top >= _INF_BITS:
            return None
        top = max(top, block_top)
    return np.array(top, np.uint32).view(np.float32)[()]


#: +inf's float32 bit pattern: the patterns below it are the finite floats without a sign bit.
_INF_BITS = 0x7F800000


def reusable_output(nbytes: int, slot: str = "out") -> np.ndarray:
    """A uint8 buffer of ``nbytes`` owned by this thread and handed out again by its next call: for
    packed codes that the caller copies out (zstd, ``tobytes``) before it encodes again. Saves the
    page faults of a fresh buffer per tensor (~100 for a 400 KB payload, 5-10% of an encode).
    ``slot``: one buffer per name, for outputs alive at the same time (the packed codes, and the
    zstd frame made from them: :func:`compressor.zstd.compress_literals`)."""
    if nbytes > MAX_REUSED_BYTES:
        return np.empty(nbytes, np.uint8)
    buf = getattr(_local, slot, None)
    if buf is None or buf.size < nbytes:
        buf = np.empty(max(nbytes, 1 << 16), np.uint8)
        setattr(_local, slot, buf)
    return buf[:nbytes]


def quantize_pack(
    flat: np.ndarray,
    bits: int,
    scale: np.ndarray,
    zero_point: np.ndarray,
    lo: np.ndarray,
    hi: np.ndarray,
    covers: bool,
    out: np.ndarray | None = None,
) -> np.ndarray:
    """``pack_array(quantize_array(flat, bits, scale, zero_point, lo, hi, None, covers=covers), bits)``
    for a contiguous 1-d float32 ``flat`` and per-tensor (0-d) parameters, block by block, into
    ``out`` (``packed_size(flat.size, bits)`` bytes; new by default)."""
    s32, z, low, high, clamp = per_tensor_steps(qmax(bits), scale, zero_point, lo, hi, covers)
    n = flat.size
    if out is None:
        out = np.empty(packed_size(n, bits), np.uint8)
    fbuf, qbuf, wbuf = _scratch()
    zf = np.float32(z)
    for start in range(0, n, BLOCK):
        x = flat[start : start + BLOCK]
        k = x.size
        f = fbuf[:k]
        np.divide(x, s32, out=f)
        if clamp:
            np.clip(f, low, high, out=f)
        first = start * bits // 8  # BLOCK is a multiple of 8: blocks start on whole bytes
        q = out[first : first + k] if bits == 8 else qbuf[:k]
        if z == 0:
            # f is in [low, high], within [-z, qmax - z] = [0, qmax]: rint(f) is the low byte of f + 2**23.
            np.add(f, _ROUND, out=f)
            np.copyto(q, f.view(np.uint32), casting="unsafe")
        else:
            np.rint(f, out=f)
            np.add(f, zf, out=q, casting="unsafe")
        if bits == 8:
            continue
        dest = out[first : first + packed_size(k, bits)]
        if bits == 4 and k % 2 == 0:
            pairs = q.view("<u2")
            w = wbuf[: k // 2]
            np.right_shift(pairs, 4, out=w)
            np.bitwise_or(w, pairs, out=w)
            np.copyto(dest, w, casting="unsafe")  # the low byte of each word: lo | hi << 4
        else:
            dest[...] = pack_array(q, bits)
    return out


def dequantize4(buf: np.ndarray, count: int, scale: np.float32, zero_point: int) -> np.ndarray:
    """``dequantize_array(unpack_array(buf, 4, count), scale, zero_point, None)`` for per-tensor 4-bit
    codes, block by block into a new float32 array: each block widens its bytes to 16-bit words
    ``(b << 4 | b) & 0x0F0F`` (whose two bytes are its two codes, in order) in this thread's scratch,
    then ``(q - z) * s`` (``q * s`` when ``z`` is 0) in float32, as :func:`quant.dequantize_array` does.

    The whole-tensor version makes two 16-bit temporaries the size of the payload. Where glibc
    returns freed memory to the system (its default; the daemons keep it, ``runtime/memory.py``),
    each is page faults afresh: in one process interleaved with other codecs, a 1x256x56x56
    activation's whole decode took 3.1 ms against 1.4 ms in blocks. Hot, the blocked arithmetic
    alone takes 0.46 ms against 0.55-0.66 ms (one core, interleaved)."""
    out = np.empty(count, np.float32)
    s, z = np.float32(scale), np.float32(zero_point)
    words, spread = _scratch_words()
    step = words.size
    for start in range(0, buf.size, step):
        b = buf[start : start + step]
        k = b.size
        w, t = words[:k], spread[:k]
        np.copyto(w, b)
        np.multiply(w, 16, out=t)  # b << 4 (a vectorised multiply; numpy's shift is slower)
        np.bitwise_or(t, w, out=t)
        np.bitwise_and(t, 0x0F0F, out=t)
        o = out[2 * start : 2 * start + 2 * k]  # the last block may end on a padding nibble
        _scale(t.view(np.uint8)[: o.size], s, z, o)
    return out


def dequantize8(buf: np.ndarray, count: int, scale: np.float32, zero_point: int) -> np.ndarray:
    """:func:`dequantize4` for 8-bit codes (``buf`` holds ``count`` of them): the same float32 steps
    in blocks of 2 * BLOCK codes, each converted and scaled while in cache (0.30 ms against 0.42 for
    one mixed uint8 * float32 multiply over a 1x256x56x56 tensor, interleaved, one core)."""
    out = np.empty(count, np.float32)
    s, z = np.float32(scale), np.float32(zero_point)
    step = 2 * BLOCK
    for start in range(0, count, step):
        _scale(buf[start : start + step], s, z, out[start : start + step])
    return out


def _scale(codes: np.ndarray, s: np.float32, z: np.float32, o: np.ndarray) -> None:
    """``o = (float32(codes) - z) * s`` (``- z`` skipped when 0), as :func:`quant.dequantize_array`:
    converting first, then scaling in place, is faster than one mixed uint8 * float32 multiply."""
    np.copyto(o, codes)
    if z:
        np.subtract(o, z, out=o)
    np.multiply(o, s, out=o)


def _scratch_words() -> tuple[np.ndarray, np.ndarray]:
    """This thread's two uint16 buffers for :func:`dequantize4`: BLOCK words (2 * BLOCK codes) each,
    256 KiB in all. Measured per 1x256x56x56 decode (ms of CPU): BLOCK / 4 words 0.54, BLOCK / 2 0.48,
    BLOCK 0.46, 2 * BLOCK 0.49."""
    bufs = getattr(_local, "words", None)
    if bufs is None or bufs[0].size != BLOCK:
        bufs = _local.words = (np.empty(BLOCK, np.uint16), np.empty(BLOCK, np.uint16))
    return bufs
