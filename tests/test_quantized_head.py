"""The quantized edge head: int8 agrees with fp32, packed sub-8-bit heads are smaller and run,
artifacts round-trip through weights_only loading."""

from __future__ import annotations

import io

import pytest
import torch
import torch.nn.functional as F

from partitioner.quantized_head import PackedWeight, QuantizedHead, build_quantized_head, head_layers
from tests.support.quant import harness, harness_graph

pytestmark = [pytest.mark.slow]

CUT = "layer3_relu_1"  # the deepest cut before pooling: every conv of the model is on the edge


@pytest.fixture(scope="module")
def split() -> tuple[torch.nn.Module, torch.nn.Module]:
    return harness_graph().split(CUT)


@pytest.fixture(scope="module")
def int8_head(split) -> QuantizedHead:
    return build_quantized_head(split[0], harness().calibration(64))


def test_int8_head_agrees_with_fp32(split, int8_head: QuantizedHead) -> None:
    head, tail = split
    h = harness()
    x = h.test_x[:200]
    with torch.no_grad():
        refs = head(x)
    for ref, out in zip(refs, int8_head(x), strict=True):
        assert out.dtype == torch.float32 and out.shape == ref.shape
        # Measured 0.99966 (SQNR 31.4 dB) with 7-bit weights; 0.999 is SQNR >= 27 dB. A saturating
        # U8S8 kernel (8-bit weights on a CPU without VNNI) gave 0.9897 and fails here.
        assert float(F.cosine_similarity(out.flatten(), ref.flatten(), dim=0)) >= 0.999
    # Real int8 kernels: every convolution became a QLinearConv.
    assert int8_head.op_types.get("QLinearConv", 0) == len(head_layers(head))
    assert h.accuracy(lambda b: tail(*int8_head(b))) >= h.accuracy() - 0.01


def test_int8_weights_cannot_saturate_u8s8_kernels(int8_head: QuantizedHead) -> None:
    """Without VNNI, ONNX Runtime multiplies u8 activations by s8 weights with VPMADDUBSW, which adds
    pairs into int16 and saturates past 32767: weights must stay within +-64 (255 * 64 * 2 = 32640 fits)."""
    import onnx
    from onnx import numpy_helper

    model = onnx.load_from_string(int8_head._onnx)
    weights = {node.input[3] for node in model.graph.node if node.op_type == "QLinearConv"}
    assert weights
    for init in model.graph.initializer:
        if init.name in weights:
            w = numpy_helper.to_array(init)
            assert w.dtype.name == "int8" and int(abs(w.astype("int16")).max()) <= 64, init.name


def test_packed_head_is_smaller_and_runs(split, int8_head: QuantizedHead, tmp_path) -> None:
    head, tail = split
    h = harness()
    bits = {name: 4 for name in head_layers(head)}
    bits["conv1"] = 8
    packed = build_quantized_head(head, h.calibration(64), bits)
    assert packed.nbytes_on_disk < int8_head.nbytes_on_disk
    fp32_bytes = 4 * sum(p.numel() for p in head.parameters())
    assert int8_head.nbytes_on_disk < fp32_bytes / 2
    x = h.test_x[:100]
    with torch.no_grad():
        ref = head(x)[0]
    assert float(F.cosine_similarity(packed(x)[0].flatten(), ref.flatten(), dim=0)) >= 0.97
    path = packed.save(tmp_path / "head.qhead")
    assert path.stat().st_size == packed.nbytes_on_disk
    loaded = QuantizedHead.load(path)
    assert loaded.weight_bits == packed.weight_bits
    assert torch.equal(loaded(x)[0], packed(x)[0])


def test_packed_weight_round_trip() -> None:
    g = torch.Generator().manual_seed(0)
    w = torch.randn(8, 4, 3, 3, generator=g)
    for bits in (2, 3, 4, 6):
        p = PackedWeight.from_float(w, bits)
        assert len(p.codes) == (w.numel() * bits + 7) // 8
        err = float((p.dequantize() - w).pow(2).mean())
        assert err < float(w.pow(2).mean()) * (0.5 if bits == 2 else 0.1)


def test_bad_inputs_are_refused(split, tmp_path) -> None:
    head, _ = split
    x = harness().calibration(8)
    with pytest.raises(ValueError, match="not one of"):
        build_quantized_head(head, x, {"conv1": 7})
    with pytest.raises(ValueError, match="not layers"):
        build_quantized_head(head, x, {"nope": 4})
    buf = io.BytesIO()
    torch.save({"format": "something else"}, buf)
    (tmp_path / "bad").write_bytes(buf.getvalue())
    with pytest.raises(ValueError, match="artifact"):
        QuantizedHead.load(tmp_path / "bad")


def test_quantizing_a_head_with_shape_arithmetic_logs_nothing(caplog) -> None:
    """onnxruntime's quantizer warns (on the root logger, several lines each) for every integer tensor it
    rightly leaves alone: `cleave bundle` on Lite0, whose padding computes sizes, printed 250 of them."""
    import logging

    from torch import fx, nn

    class Padded(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 3)

        def forward(self, x: torch.Tensor) -> tuple[torch.Tensor]:
            h, w = x.size()[-2:]
            return (self.conv(F.pad(x, [0, h % 2, 0, w % 2])),)

    head = fx.symbolic_trace(Padded().eval())
    x = torch.rand(4, 3, 9, 9)
    with caplog.at_level(logging.WARNING):
        quantized = build_quantized_head(head, x, threads=1)
    assert quantized.op_types.get("QLinearConv", 0) == 1  # the convolution is int8; the size arithmetic is not
    assert [r.getMessage() for r in caplog.records] == []
