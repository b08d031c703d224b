"""Dense packing of small unsigned integers (2 to 8 bits each) into bytes.

Layout: value ``i`` occupies bits ``[i*bits, (i+1)*bits)`` of a little-endian bit stream, i.e.
bit ``k`` of the stream is bit ``k % 8`` of byte ``k // 8``; the last byte is zero-padded. This is
what ``np.packbits(np.unpackbits(v[:, None], axis=1, count=bits, bitorder="little"),
bitorder="little")`` produces, but computed without the 8x bit-array expansion: values are
grouped so that each group fills a whole number of bytes (4 values of 2 bits make 1 byte, 8 of
3 bits make 3 bytes, ...), each group is OR-ed into one machine word, and the word's low bytes
are the group's bytes.
"""

from __future__ import annotations

from math import gcd

import numpy as np

BIT_WIDTHS: tuple[int, ...] = (2, 3, 4, 5, 6, 8)


def packed_size(count: int, bits: int) -> int:
    """Bytes needed for ``count`` values of ``bits`` bits: ``ceil(count * bits / 8)``."""
    return (count * bits + 7) // 8


def _layout(bits: int) -> tuple[int, int, np.dtype]:
    """(values per group, bytes per group, little-endian word dtype holding one group)."""
    if bits not in BIT_WIDTHS:
        raise ValueError(f"bits: {bits} is not one of {','.join(map(str, BIT_WIDTHS))}")
    per_group = 8 // gcd(8, bits)
    group_bytes = per_group * bits // 8
    word = np.dtype("u1") if group_bytes == 1 else np.dtype("<u4") if group_bytes <= 4 else np.dtype("<u8")
    return per_group, group_bytes, word


def pack(values: np.ndarray, bits: int) -> bytes:
    """Pack uint8 ``values`` (each < 2**bits) into ``packed_size(values.size, bits)`` bytes.

    Raises:
        ValueError: ``bits`` is not a supported width, ``values`` is not uint8, or a value does
            not fit in ``bits`` bits.
    """
    _layout(bits)
    if values.dtype != np.uint8:
        raise ValueError(f"values: dtype {values.dtype} is not uint8")
    flat = values.reshape(-1)
    if flat.size and bits < 8 and int(flat.max()) >> bits:
        raise ValueError(f"values: {int(flat.max())} does not fit in {bits} bits")
    return pack_array(flat, bits).tobytes()


def pack_array(values: np.ndarray, bits: int) -> np.ndarray:
    """:func:`pack` without the range check, into a uint8 array (``values`` itself for 8 bits).

    The caller guarantees uint8 values below ``2**bits`` (the quantizer's codes are). 4-bit codes,
    the default, pack two per byte in two vectorised passes over 16-bit words: for the word
    ``lo | hi << 8``, ``(w | w >> 4)`` has ``lo | hi << 4`` in its low byte.
    """
    per_group, group_bytes, word = _layout(bits)
    flat = values.reshape(-1)
    count = flat.size
    if bits == 8:
        return flat
    groups = -(-count // per_group)
    if groups * per_group != count:
        padded = np.zeros(groups * per_group, np.uint8)
        padded[:count] = flat
        flat = padded
    if bits == 4:
        pairs = flat.view("<u2")
        merged = np.right_shift(pairs, 4)
        np.bitwise_or(merged, pairs, out=merged)
        out = np.empty(groups, np.uint8)
        np.copyto(out, merged, casting="unsafe")  # the low byte of each word
        return out
    # A group's codes are the byte lanes of one word (4 codes in a u32, 8 in a u64); lane i moves
    # down by i * (8 - bits) bits to sit at bit bits * i. One shift / mask / OR per lane, vectorised.
    lanes = _lane_word(per_group)
    words = flat.view(lanes)
    mask = (1 << bits) - 1
    acc = np.bitwise_and(words, lanes.type(mask))
    tmp = np.empty_like(words)
    for i in range(1, per_group):
        np.right_shift(words, lanes.type(i * (8 - bits)), out=tmp)
        np.bitwise_and(tmp, lanes.type(mask << (bits * i)), out=tmp)
        acc |= tmp
    if group_bytes == 1:
        return acc.astype(np.uint8)  # the low byte of each word
    as_bytes = acc.view(np.uint8).reshape(groups, lanes.itemsize)[:, :group_bytes]
    return np.ascontiguousarray(as_bytes).reshape(-1)[: packed_size(count, bits)]


def _lane_word(per_group: int) -> np.dtype:
    """The little-endian word whose byte lanes hold one group of codes (4 or 8)."""
    return np.dtype("<u4") if per_group == 4 else np.dtype("<u8")


def unpack(data: bytes | bytearray | memoryview | np.ndarray, bits: int, count: int) -> np.ndarray:
    """Inverse of :func:`pack`: ``count`` uint8 values from exactly ``packed_size(count, bits)`` bytes.

    Returns a new, writable array (for ``bits == 8`` too), so callers may hand it to torch.

    Raises:
        ValueError: ``bits`` is not supported, ``count`` is negative, or ``len(data)`` is not
            exactly ``packed_size(count, bits)``.
    """
    per_group, group_bytes, word = _layout(bits)
    if count < 0:
        raise ValueError(f"count: {count} is negative")
    buf = np.frombuffer(data, np.uint8) if not isinstance(data, np.ndarray) else data.reshape(-1)
    if buf.dtype != np.uint8:
        raise ValueError(f"data: dtype {buf.dtype} is not uint8")
    expected = packed_size(count, bits)
    if buf.size != expected:
        raise ValueError(f"data: {buf.size} bytes, expected {expected} for {count} values of {bits} bits")
    return unpack_array(buf, bits, count, writable=True)


def unpack_array(buf: np.ndarray, bits: int, count: int, *, writable: bool = False) -> np.ndarray:
    """:func:`unpack` of a uint8 array of the right size (checked by the caller); for 8 bits the
    result is ``buf`` itself unless ``writable`` asks for a copy. 4-bit bytes widen to 16-bit words
    ``(b << 4 | b) & 0x0F0F``, whose two bytes are the two codes in order."""
    per_group, group_bytes, word = _layout(bits)
    if bits == 8:
        return buf.copy() if writable else buf
    groups = -(-count // per_group)
    if bits == 4:
        words = buf.astype("<u2")
        shifted = np.left_shift(words, 4)
        np.bitwise_or(shifted, words, out=shifted)
        np.bitwise_and(shifted, 0x0F0F, out=shifted)
        return shifted.view(np.uint8)[:count]
    if word.itemsize == group_bytes and buf.size == groups * group_bytes:
        words = buf.view(word)
    else:
        # Widen each group's bytes to a full word (and zero-fill the short last group).
        grid = np.zeros((groups, word.itemsize), np.uint8)
        tail = np.zeros(groups * group_bytes, np.uint8)
        tail[: buf.size] = buf
        grid[:, :group_bytes] = tail.reshape(groups, group_bytes)
        words = grid.view(word).reshape(groups)
    mask = word.type((1 << bits) - 1)
    out = np.empty((groups, per_group), np.uint8)
    for i in range(per_group):  # column-wise: much faster than broadcasting over a tiny axis
        out[:, i] = (words >> word.type(bits * i)) & mask
    return out.reshape(-1)[:count]
