"""The one exception type the codec raises for bad specs, bad tensors and bad wire input."""

from __future__ import annotations


class CodecError(ValueError):
    """A tensor, spec or wire message that cannot be encoded or decoded.

    The message starts with the field that was wrong, e.g.
    ``"tensor.bits: 7 is not one of 2,3,4,5,6,8"``, so a server can hand it back verbatim as an
    ``INVALID_ARGUMENT`` detail.
    """
