"""float32 <-> float16 by bit operations (compressor.half): exact, for every half and a wide sample
of floats, against numpy's casts and torch's."""

from __future__ import annotations

import numpy as np
import pytest

from compressor.half import from_half_bits, to_half_bits

ALL_HALVES = np.arange(1 << 16, dtype=np.uint32).astype(np.uint16)


def _floats() -> np.ndarray:
    """Random bit patterns, every half's value and its float32 neighbours, the midpoints (ties)
    between consecutive halves, and the specials."""
    rng = np.random.default_rng(7)
    values = ALL_HALVES.view(np.float16).astype(np.float32)
    finite = values[np.isfinite(values)]
    finite = np.unique(finite)
    near = values.view(np.uint32).astype(np.int64)
    mids = ((finite[:-1].astype(np.float64) + finite[1:]) / 2).astype(np.float32)
    return np.concatenate(
        [
            rng.integers(0, 1 << 32, 1 << 20, dtype=np.uint64).astype(np.uint32).view(np.float32),
            np.concatenate([near - 1, near, near + 1]).astype(np.uint32).view(np.float32),
            mids,
            np.float32([0.0, -0.0, np.inf, -np.inf, np.nan, 65504, 65519.99, 65520, 1e-8, -6e-8, 3e38]),
        ]
    )


def test_every_half_decodes_exactly() -> None:
    got = from_half_bits(ALL_HALVES)
    want = ALL_HALVES.view(np.float16).astype(np.float32)
    nan = np.isnan(want)
    assert np.array_equal(got.view(np.uint32)[~nan], want.view(np.uint32)[~nan])
    assert np.isnan(got[nan]).all()
    assert np.array_equal(np.signbit(got), np.signbit(want))


def test_floats_round_to_nearest_even_half() -> None:
    x = _floats()
    got = to_half_bits(x)
    with np.errstate(all="ignore"):
        want = x.astype(np.float16).view(np.uint16)
    nan = np.isnan(x)
    assert np.array_equal(got[~nan], want[~nan])
    assert np.isnan(got[nan].view(np.float16)).all()
    assert np.array_equal(got >> 15, (x.view(np.uint32) >> 31).astype(np.uint16))


def test_the_bits_equal_torch_including_nan_payloads() -> None:
    torch = pytest.importorskip("torch")
    x = _floats()
    assert np.array_equal(to_half_bits(x), torch.from_numpy(x).half().numpy().view(np.uint16))
    want = torch.from_numpy(ALL_HALVES.view(np.float16).copy()).float().numpy()
    assert np.array_equal(from_half_bits(ALL_HALVES).view(np.uint32), want.view(np.uint32))


def test_shapes() -> None:
    x = np.arange(24, dtype=np.float32).reshape(2, 3, 4) / 7
    assert to_half_bits(x).shape == (24,)
    assert from_half_bits(to_half_bits(x).reshape(2, 3, 4)).shape == (2, 3, 4)
    assert to_half_bits(np.zeros(0, np.float32)).size == 0 and from_half_bits(np.zeros(0, np.uint16)).size == 0
