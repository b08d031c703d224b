"""The lossless bounds ``benchmarks/feature_entropy.py`` compares a split's bytes with."""

from __future__ import annotations

import numpy as np

from benchmarks.feature_entropy import codes_of, measure_point
from compressor import codec
from compressor.quant import dequantize_array
from compressor.spec import EncodingSpec


def _features(rng: np.random.Generator, n: int = 6) -> np.ndarray:
    """N x 4 x 8 x 8 features whose channels differ in scale by up to 100x (a per-tensor grid leaves the
    narrow ones few codes), post-ReLU as most cuts are."""
    scales = np.array([0.01, 0.1, 1.0, 1.0], np.float32).reshape(1, 4, 1, 1)
    return np.maximum(rng.standard_normal((n, 4, 8, 8)).astype(np.float32) * scales, 0)


def test_the_codes_read_back_are_the_ones_the_message_dequantizes() -> None:
    x = _features(np.random.default_rng(0), 1)
    for encoding in ("int6", "int5c", "int4c", "int3c"):
        msg = codec.encode(x, EncodingSpec.parse(encoding))
        q = codes_of(msg)
        axis = None if msg.axis == -1 else msg.axis
        got = dequantize_array(q, np.asarray(msg.scales, np.float32), np.asarray(msg.zero_points, np.int32), axis)
        np.testing.assert_array_equal(got, codec.decode_array(msg), err_msg=encoding)


def test_the_bounds_are_ordered_and_zstd_stays_above_the_ideal_one() -> None:
    row = measure_point(_features(np.random.default_rng(1)), "cut", "int6", calibration=2, top1=1.0)
    b = row["bytes"]
    # Per-channel tables fitted to each message can only do better than one table for all channels; on
    # independent values zstd cannot beat them, and with a 100x spread of scales it is far above.
    assert b["per_channel"] < b["pooled"] < b["payload"] < b["message"]
    assert row["payload_over_per_channel"] > 1.2
    assert row["values"] == 4 * 8 * 8 and row["top1"] == 1.0
