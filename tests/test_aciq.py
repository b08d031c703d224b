"""ACIQ: the analytical constants, clipping against a grid search, half-Laplace, per-channel bits,
bias correction, and the codec's ``aciq`` clipper on the wire."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from compressor import EncodingSpec, decode, encode
from compressor.aciq import (
    PAPER_GAUSS,
    PAPER_LAPLACE,
    aciq,
    allocate_channel_bits,
    bias_correct,
    expected_mse,
    optimal_ratio,
)
from compressor.clipping import clip_range
from compressor.quant import dequantize, quantize


def _mse(x: torch.Tensor, bits: int, lo: torch.Tensor, hi: torch.Tensor) -> float:
    return float((dequantize(*quantize(x, bits, lo, hi, None), None) - x).pow(2).mean())


@pytest.mark.parametrize("bits", range(2, 9))
def test_constants_reproduce_the_papers_table(bits: int) -> None:
    assert optimal_ratio(bits, "laplace", grid="paper") == pytest.approx(PAPER_LAPLACE[bits], abs=0.015)
    assert optimal_ratio(bits, "gauss", grid="paper") == pytest.approx(PAPER_GAUSS[bits], abs=0.015)


def test_constants_minimise_the_expected_error() -> None:
    for prior in ("laplace", "gauss"):
        for half in (False, True):
            r = optimal_ratio(4, prior, half=half)
            best = expected_mse(r, 4, prior, half=half, grid="affine")
            assert best <= expected_mse(r * 0.97, 4, prior, half=half, grid="affine")
            assert best <= expected_mse(r * 1.03, 4, prior, half=half, grid="affine")
    # Wider steps on the affine grid (2^M - 1 of them) clip harder than the paper's 2^M bins.
    assert optimal_ratio(2, "laplace") < optimal_ratio(2, "laplace", grid="paper")


def _samples(kind: str) -> torch.Tensor:
    g = torch.Generator().manual_seed(1)
    if kind == "laplace":
        u = torch.rand(100_000, generator=g) - 0.5
        return 0.2 - 1.5 * u.sign() * torch.log1p(-2 * u.abs())
    if kind == "gauss":
        return 1.0 + 2.0 * torch.randn(100_000, generator=g)
    u = torch.rand(100_000, generator=g) - 0.5  # ReLU of a zero-mean Laplace: half-Laplace
    return torch.relu(-u.sign() * torch.log1p(-2 * u.abs()))


@pytest.mark.parametrize("kind", ["laplace", "gauss", "half"])
@pytest.mark.parametrize("bits", [2, 3, 4, 6])
def test_clipping_is_no_worse_than_a_grid_search(kind: str, bits: int) -> None:
    x = _samples(kind)
    prior = "gauss" if kind == "gauss" else "laplace"
    lo, hi = clip_range(x, "aciq", None, bits, prior=prior)
    ours = _mse(x, bits, lo, hi)
    mn, mx, center = x.min(), x.max(), x.mean()
    grid = []
    for a in torch.linspace(0.02, 1.0, 150):
        if kind == "half":
            glo, ghi = torch.tensor(0.0), mx * a
        else:
            r = (mx - mn) / 2 * a
            glo, ghi = torch.maximum(mn, center - r), torch.minimum(mx, center + r)
        grid.append(_mse(x, bits, glo, ghi))
    assert ours <= min(grid) * 1.01
    assert ours < _mse(x, bits, mn, mx)  # and better than min-max


def test_half_laplace_is_detected_after_relu() -> None:
    x = _samples("half")
    lo, hi = aciq(x.reshape(1, -1), 3)
    b = x[x > 0].mean()
    assert float(lo) == 0.0
    assert float(hi) == pytest.approx(optimal_ratio(3, "laplace", half=True) * float(b), rel=1e-4)
    # Forced two-sided, the same data gets a range around the mean instead.
    lo2, hi2 = aciq(x.reshape(1, -1), 3, half="off")
    assert float(hi2) != pytest.approx(float(hi))


def test_per_channel_rows_get_their_own_ranges() -> None:
    x = torch.stack([_samples("laplace")[:5000] * s for s in (0.5, 1.0, 4.0)])
    lo, hi = clip_range(x, "aciq", 0, 4)
    assert lo.shape == hi.shape == (3,)
    assert float(hi[0]) < float(hi[1]) < float(hi[2])


@pytest.mark.parametrize("mean_bits", [2, 3.5, 4, 6])
def test_channel_bit_allocation_sums_to_the_budget(mean_bits: float) -> None:
    alphas = torch.tensor([0.1, 0.5, 1.0, 2.0, 4.0, 8.0, 16.0, 0.3])
    bits = allocate_channel_bits(alphas, mean_bits, min_bits=1, max_bits=8)
    assert int(bits.sum()) == round(len(alphas) * mean_bits)
    order = alphas.argsort()
    assert torch.all(bits[order].diff() >= 0)  # wider channels never get fewer bits
    assert int(bits.min()) >= 1 and int(bits.max()) <= 8


def test_channel_bit_allocation_follows_the_two_thirds_law() -> None:
    # alpha ratio 8^(3/2): 2^M ratio 8, so the real-valued optimum puts the channels 3 bits apart;
    # rounding to an integer budget of 10 bits keeps at least 2 of them.
    bits = allocate_channel_bits(torch.tensor([1.0, 8.0**1.5]), 5)
    assert int(bits.sum()) == 10
    assert int(bits[1] - bits[0]) >= 2


def test_bias_correction_reduces_output_bias() -> None:
    g = torch.Generator().manual_seed(0)
    w = torch.randn(16, 8, 3, 3, generator=g) * 0.2 + torch.linspace(-0.1, 0.1, 16)[:, None, None, None]
    lo, hi = clip_range(w, "aciq", 0, 2)
    w_q = dequantize(*quantize(w, 2, lo, hi, 0), 0)
    w_c = bias_correct(w, w_q)
    x = torch.relu(torch.randn(8, 8, 16, 16, generator=g)) + 0.5  # non-zero-mean inputs, as after a ReLU
    y = F.conv2d(x, w)

    def bias(weight: torch.Tensor) -> float:
        return float((F.conv2d(x, weight) - y).mean(dim=(0, 2, 3)).abs().mean())

    assert bias(w_c) < 0.5 * bias(w_q)
    # Mean and deviation norm per channel are restored exactly.
    assert torch.allclose(w_c.mean(dim=(1, 2, 3)), w.mean(dim=(1, 2, 3)), atol=1e-6)


@pytest.mark.parametrize("text", ["int4:aciq", "int3c:aciq(prior=gauss)", "int2:aciq(half=off)+none"])
def test_aciq_round_trips_through_the_codec(text: str) -> None:
    spec = EncodingSpec.parse(text)
    assert EncodingSpec.parse(str(spec)) == spec
    assert EncodingSpec.from_proto(spec.to_proto()) == spec
    g = torch.Generator().manual_seed(2)
    x = torch.relu(torch.randn(2, 8, 16, 16, generator=g)) * torch.rand(1, 8, 1, 1, generator=g)
    y = decode(encode(x, spec))
    assert y.shape == x.shape and y.dtype == torch.float32
    minmax = EncodingSpec.parse(text.split(":")[0])
    err, err_minmax = float((y - x).pow(2).mean()), float((decode(encode(x, minmax)) - x).pow(2).mean())
    assert err < err_minmax


def test_bad_aciq_params_are_refused() -> None:
    with pytest.raises(Exception, match="prior"):
        encode(torch.randn(4, 4), EncodingSpec.parse("int4:aciq(prior=cauchy)"))
    with pytest.raises(Exception, match="clip"):
        EncodingSpec.parse("int4:aciq(bogus=1)")
