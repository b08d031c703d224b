"""The wire format does not move: the numpy codec against the torch codec it replaced.

tests/golden/codec_golden.json holds digests of the messages the torch implementation (commit
616bc3d) produced for seeded inputs and every encoding / bits / per-channel / clipping / zstd
combination, and of what it decoded them to (see tests/golden/make_codec_golden.py). The current
codec must produce the same messages and decode them to the same bytes, from torch tensors, from
numpy arrays, and in a process where torch cannot be imported at all.

ACIQ is the one exception: its statistics (means over a row) are now summed in float64, while the
torch version summed in float32 in torch's order, so its float32 range may differ in the last bits.
Those ranges are compared with a reference copy of the torch implementation instead.

zstd frames of quantized codes at level 1 are the sender's choice of zstd parameters, which moved
(compressor/zstd.py: faster and smaller on activations); any zstd decoder reads both. For those,
what the frame holds is compared: the message with its payload decompressed must be the golden
``+none`` message, and it must decode to the golden values. Every other zstd frame is byte-exact.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest

from compressor import EncodingSpec, clip_range, decode, decode_array, encode, zstd
from protos.cleave.v1 import tensor_pb2
from tests.golden.make_codec_golden import OUT, cases, digest, inputs

ROOT = Path(__file__).resolve().parent.parent
GOLDEN = json.loads(OUT.read_text())


def _digests(msg, decoded: np.ndarray) -> str:
    return f"{digest(msg.SerializeToString(deterministic=True))} {digest(np.ascontiguousarray(decoded).tobytes())}"


def matches_golden(name: str, text: str, msg, decoded: np.ndarray) -> bool:
    """Whether ``msg`` (encoded from input ``name`` with spec ``text``) and what it decoded to are the
    golden ones; for zstd-1 frames of codes, the frame's content (see the module's docstring)."""
    want = GOLDEN[name][text]
    if text.startswith("int") and text.endswith("+zstd1"):
        unpacked = tensor_pb2.Tensor()
        unpacked.CopyFrom(msg)
        unpacked.payload = zstd.decompress(msg.payload, msg.raw_size).tobytes()
        unpacked.codec = tensor_pb2.NONE
        unpacked.payload_size = len(unpacked.payload)
        unpacked.crc32 = zlib.crc32(unpacked.payload)
        msg = unpacked
        want = GOLDEN[name][text.removesuffix("+zstd1") + "+none"].split()[0] + " " + want.split()[1]
    return _digests(msg, decoded) == want


def _byte_exact(text: str) -> bool:
    return ":aciq" not in text


def test_the_fixture_covers_every_case() -> None:
    assert set(GOLDEN) == set(inputs())
    for name in GOLDEN:
        assert set(GOLDEN[name]) == set(cases())
    assert len(cases()) > 200


@pytest.mark.parametrize("name", sorted(inputs()))
def test_torch_tensors_encode_and_decode_as_the_torch_codec_did(name: str) -> None:
    torch = pytest.importorskip("torch")
    x = torch.from_numpy(inputs()[name])
    wrong = []
    for text in filter(_byte_exact, cases()):
        msg = encode(x, EncodingSpec.parse(text))
        y = decode(msg)
        assert isinstance(y, torch.Tensor) and y.dtype == torch.float32
        if not matches_golden(name, text, msg, y.numpy()):
            wrong.append(text)
    assert wrong == []


@pytest.mark.parametrize("name", sorted(inputs()))
def test_numpy_arrays_and_torch_tensors_give_the_same_bytes(name: str) -> None:
    torch = pytest.importorskip("torch")
    arr = inputs()[name]
    for text in cases():  # aciq included: both go through the same numpy path
        spec = EncodingSpec.parse(text)
        from_array = encode(arr, spec)
        from_tensor = encode(torch.from_numpy(arr.copy()), spec)
        assert from_array.SerializeToString(deterministic=True) == from_tensor.SerializeToString(deterministic=True)
        np.testing.assert_array_equal(decode_array(from_array), decode(from_tensor).numpy())


def test_strided_and_float64_tensors_encode_as_their_float32_contiguous_copy() -> None:
    torch = pytest.importorskip("torch")
    x = torch.from_numpy(inputs()["gauss"]).double()
    strided = x.transpose(2, 3)  # not contiguous
    for text in ("int4", "int3c:percentile", "int8:aciq+zstd1", "fp16"):
        spec = EncodingSpec.parse(text)
        got = encode(strided, spec).SerializeToString(deterministic=True)
        want = encode(np.ascontiguousarray(strided.float().numpy()), spec).SerializeToString(deterministic=True)
        assert got == want, text


def _aciq_torch(rows, bits: int, prior: str = "laplace", half: str = "auto"):
    """The torch ACIQ clipper as it was at 616bc3d (float32 statistics), for reference."""
    import torch

    from compressor.aciq import optimal_ratio

    def scale(center):
        dev = rows - center[:, None]
        return dev.abs().mean(1) if prior == "laplace" else dev.pow(2).mean(1).sqrt()

    mn, mx = torch.aminmax(rows, dim=1)
    mean = rows.mean(1)
    alpha = optimal_ratio(bits, prior) * scale(mean)
    lo, hi = torch.maximum(mn, mean - alpha), torch.minimum(mx, mean + alpha)
    if half != "off":
        one_sided = mn >= 0
        if bool(one_sided.any()):
            pos = rows.clamp(min=0)
            count = (rows > 0).sum(1).clamp(min=1)
            tail = pos.sum(1) / count if prior == "laplace" else (pos.pow(2).sum(1) / count).sqrt()
            hi_half = torch.minimum(mx, optimal_ratio(bits, prior, half=True) * tail)
            lo = torch.where(one_sided, mn, lo)
            hi = torch.where(one_sided, hi_half, hi)
    return lo, torch.maximum(hi, lo)


@pytest.mark.parametrize("name", sorted(inputs()))
@pytest.mark.parametrize("params", [{}, {"prior": "gauss"}, {"half": "off"}, {"half": "on"}])
def test_aciq_ranges_match_the_torch_implementation_to_float32_rounding(name: str, params: dict) -> None:
    torch = pytest.importorskip("torch")
    x = torch.from_numpy(inputs()[name])
    for bits in (2, 4, 8):
        for axis in (None, 1):
            lo, hi = clip_range(x, "aciq", axis, bits, **params)
            rows = x.reshape(1, -1) if axis is None else x.movedim(axis, 0).reshape(x.shape[axis], -1)
            ref_lo, ref_hi = _aciq_torch(rows, bits, **params)
            # float32 sums of n values drift by about eps * log2(n) relative; float64 ones do not.
            rtol = 4 * np.finfo(np.float32).eps * math.log2(rows.shape[1] + 1)
            np.testing.assert_allclose(lo.reshape(-1).numpy(), ref_lo.numpy(), rtol=rtol, atol=0)
            np.testing.assert_allclose(hi.reshape(-1).numpy(), ref_hi.numpy(), rtol=rtol, atol=0)


_NO_TORCH = """
import sys
sys.modules["torch"] = None  # import torch now raises ImportError
sys.modules["isal"] = None  # and the codec checksums with zlib's CRC-32, not ISA-L's
try:
    import torch
except ImportError:
    pass
else:
    raise SystemExit("torch is importable")
import numpy as np
import compressor.codec
from compressor import EncodingSpec, decode, decode_array, encode
from tests.golden.make_codec_golden import cases, inputs
from tests.test_codec_golden import matches_golden

checked = 0
for name, x in inputs().items():
    for text in cases():
        msg = encode(x, EncodingSpec.parse(text))
        y = decode(msg)
        assert type(y) is np.ndarray and y.dtype == np.float32 and y.shape == x.shape, text
        np.testing.assert_array_equal(y, decode_array(msg))
        if ":aciq" not in text:
            assert matches_golden(name, text, msg, y), (name, text)
            checked += 1
raw = encode(np.arange(12, dtype=np.int64).reshape(3, 4), EncodingSpec.parse("raw"))
np.testing.assert_array_equal(decode(raw), np.arange(12).reshape(3, 4))
from compressor import CodecError, register_clipper
register_clipper("test_torch_only", lambda rows, bits: (rows.min(1), rows.max(1)), replace=True)
try:
    encode(inputs()["gauss"], EncodingSpec.parse("int4:test_torch_only"))
except CodecError as e:
    assert "spec.clip: clipping method 'test_torch_only' is a torch estimator" in str(e), e
else:
    raise AssertionError("a torch clipper ran without torch")
assert "torch" not in [m.split(".")[0] for m in sys.modules if sys.modules[m] is not None]
import zlib
assert compressor.codec.crc32 is zlib.crc32
print("checked", checked)
"""


@pytest.mark.integration
def test_the_codec_imports_and_matches_the_golden_bytes_without_torch() -> None:
    proc = subprocess.run(
        [sys.executable, "-c", _NO_TORCH],
        cwd=ROOT,
        env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    expected = len(inputs()) * len([t for t in cases() if _byte_exact(t)])
    assert proc.stdout.split() == ["checked", str(expected)]


@pytest.mark.parametrize("kind", ["normal", "relu", "ties", "sorted"])
def test_percentile_selection_equals_a_full_sort(kind: str) -> None:
    """The per-tensor fast path (select past a sampled threshold) must pick the same order statistics."""
    from fractions import Fraction

    from compressor.clipping import percentile

    rng = np.random.default_rng(11)
    for n in (5_000, 80_000, 802_816):
        raw = {
            "normal": rng.standard_normal(n),
            "relu": np.maximum(rng.standard_normal(n), 0),
            "ties": rng.integers(0, 5, n).astype(float),
            "sorted": np.sort(rng.laplace(size=n)),
        }[kind]
        row = raw.astype(np.float32)
        ordered = np.sort(row)
        for p in (99.99, 99.95, 99.9, 99.0):
            k_hi = max(min(math.ceil(Fraction(str(p)) * n / 100), n), (n + 2) // 2)
            lo, hi = percentile(row[None, :], 8, percentile=p)
            assert (lo[0], hi[0]) == (ordered[n - k_hi], ordered[k_hi - 1]), (n, p)
