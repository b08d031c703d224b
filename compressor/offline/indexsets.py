"""Compact text encoding of index sets, for JSON plans that stay a few KB.

A set of channel or neuron indices is written as a bitmask (bit ``i`` set when ``i`` is in the set),
little-endian within each byte, in unpadded URL-safe base64. Half of 3072 FFN neurons costs 512
characters instead of ~7 KB as a JSON list. Decoding validates every character and the length, so
a plan from the wire can be trusted to give back a sorted list of non-negative ints.
"""

from __future__ import annotations

import base64
import binascii
from collections.abc import Iterable

MAX_INDEX = 1 << 24  # no layer has 16M channels; bounds what a hostile plan can make us allocate


def encode_indices(indices: Iterable[int]) -> str:
    """``[0, 3, 4]`` -> ``"GQ"``; the empty set is ``""``."""
    items = sorted({int(i) for i in indices})
    if not items:
        return ""
    if items[0] < 0 or items[-1] >= MAX_INDEX:
        raise ValueError(f"indices must lie in [0, {MAX_INDEX}), got {items[0]}..{items[-1]}")
    mask = bytearray((items[-1] >> 3) + 1)
    for i in items:
        mask[i >> 3] |= 1 << (i & 7)
    return base64.urlsafe_b64encode(bytes(mask)).rstrip(b"=").decode("ascii")


def decode_indices(text: str, field: str = "indices") -> list[int]:
    """Inverse of :func:`encode_indices`; ValueError naming ``field`` on malformed input."""
    if not isinstance(text, str):
        raise ValueError(f"{field}: expected a string, got {type(text).__name__}")
    if not text:
        return []
    if len(text) > (MAX_INDEX // 8) * 4 // 3 + 4:
        raise ValueError(f"{field}: {len(text)} characters is too long")
    try:
        mask = base64.b64decode(text + "=" * (-len(text) % 4), altchars=b"-_", validate=True)
    except (binascii.Error, ValueError) as exc:
        raise ValueError(f"{field}: not an index bitmask ({exc})") from None
    return [(byte_i << 3) + bit for byte_i, byte in enumerate(mask) if byte for bit in range(8) if byte >> bit & 1]
