"""Regenerate tests/golden/codec_golden.json: digests of what the codec puts on the wire.

For fixed seeded inputs and every encoding / bits / per-channel / clipping / zstd combination in
:func:`cases`, records sha256 (first 16 hex digits) of the serialised ``cleave.v1.Tensor`` and of
the float32 bytes it decodes to, as ``"<message> <decoded>"``. The committed file was made by the
torch implementation of the codec (commit 616bc3d, before the numpy rewrite, run with
``PYTHONPATH`` on a ``git archive`` of that commit); tests/test_codec_golden.py checks that the
current codec produces the same messages and decodes them to the same values, with and without
torch. Running this on the current code reproduces the file except the ``aciq`` entries, whose
statistics are now summed in float64 (see compressor/aciq.py; test_codec_golden compares those
ranges with the torch implementation instead).

    python -m tests.golden.make_codec_golden [OUT.json]      # from the repository root; defaults to the committed path
"""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path

import numpy as np

OUT = Path(__file__).with_name("codec_golden.json")

CLIPS = (
    "",
    ":percentile",
    ":percentile(percentile=99.9)",
    ":percentile(percentile=60)",
    ":aciq",
    ":aciq(prior=gauss)",
    ":aciq(half=off)",
    ":aciq(half=on)",
    ":fixed(lo=-1.5,hi=2.25)",
)
AFFINE_CODECS = ("+none", "+zstd1")
CODECS = ("+none", "+zstd1", "+zstd3", "+zstd-5")


def inputs() -> dict[str, np.ndarray]:
    """Seeded float32 tensors: post-ReLU, signed Gaussian, heavy-tailed, constant, sparse, odd sizes."""
    rng = np.random.default_rng(15)
    relu = np.maximum(rng.standard_normal((1, 16, 28, 28)), 0).astype(np.float32)
    return {
        "relu": relu,
        "gauss": (rng.standard_normal((2, 5, 7, 9)) * 3 + 0.5).astype(np.float32),
        "laplace": rng.laplace(0.0, 0.7, (3, 4, 11)).astype(np.float32),
        "const": np.full((1, 3, 5, 5), -2.75, np.float32),
        "sparse": (np.where(rng.random((1, 6, 13, 3)) < 0.9, 0, rng.exponential(4.0, (1, 6, 13, 3)))).astype(
            np.float32
        ),
        "row": rng.uniform(-8, 3, (1, 4, 1, 1)).astype(np.float32),
    }


def cases() -> list[str]:
    """Every spec text the fixture covers."""
    out = [f"{enc}{codec}" for enc in ("raw", "fp16") for codec in CODECS]
    for bits in (2, 3, 4, 5, 6, 8):
        for c in ("", "c"):
            for clip in CLIPS:
                out += [f"int{bits}{c}{clip}{codec}" for codec in AFFINE_CODECS]
    out += ["int4+zstd3", "int4+zstd-5", "int8+zstd3", "int8+zstd-1"]
    return out


def digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()[:16]


def generate() -> dict[str, dict[str, str]]:
    from compressor import EncodingSpec, decode, encode

    try:
        import torch
    except ImportError:
        torch = None
    result: dict[str, dict[str, str]] = {}
    for name, arr in inputs().items():
        x = torch.from_numpy(arr.copy()) if torch is not None else arr
        row = result[name] = {}
        for text in cases():
            msg = encode(x, EncodingSpec.parse(text))
            y = decode(msg)
            y = y.numpy() if hasattr(y, "numpy") else y
            wire, values = msg.SerializeToString(deterministic=True), np.ascontiguousarray(y).tobytes()
            row[text] = f"{digest(wire)} {digest(values)}"
    return result


def main() -> None:
    out = Path(sys.argv[1]) if len(sys.argv) > 1 else OUT
    out.write_text(json.dumps(generate(), indent=1, sort_keys=True) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
