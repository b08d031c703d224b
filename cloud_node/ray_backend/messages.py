"""What a front door sends a tail replica and what comes back: encoded bytes and plain values.

Features cross the process boundary as the serialized ``tensor_pb2.Tensor`` messages the edge sent
(never as pickled tensors); the replica decodes them, with the same limits the front door applies.
Needs neither ray nor torch, so the front door and tests can build and read these anywhere.
"""

from __future__ import annotations

from dataclasses import dataclass

from compressor import EncodingSpec

#: The ``part`` that names the whole model (KServe), instead of a cut index.
WHOLE_MODEL = "whole"


@dataclass(frozen=True)
class TailRequest:
    """One request for a model's deployment: run ``part`` (a cut index, or :data:`WHOLE_MODEL`)."""

    part: int | str
    features: tuple[bytes, ...]  # serialized tensor_pb2.Tensor, one per live value of the cut
    result_spec: EncodingSpec  # how to encode the outputs
    max_elements: int  # the front door's codec limits, applied again where the bytes are decoded
    max_payload_bytes: int


@dataclass(frozen=True)
class TailReply:
    """The outputs (serialized ``tensor_pb2.Tensor``), or ``error`` = (WireError class name, message)."""

    outputs: tuple[bytes, ...] = ()
    error: tuple[str, str] | None = None
    queue_ms: float = 0.0  # waiting in the replica for its batch
    decode_ms: float = 0.0
    compute_ms: float = 0.0  # the whole batch's run when batched
    encode_ms: float = 0.0
    batch_size: int = 1  # requests in the batch that ran this one
    replica: str = ""  # which replica answered (Serve's replica id)
