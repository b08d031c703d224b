"""The learned parts of a bottleneck: encoder (edge), decoder (cloud) and the factorized prior.

The encoder maps the features crossing a cut, (N, C, H, W), to a small latent (N, L, H/s, W/s)
that is rounded to integers and entropy-coded; the decoder maps the integers back to (N, C, H, W)
for the model's frozen tail. The prior is Ballé et al.'s factorized density ("Variational image
compression with a scale hyperprior", ICLR 2018, appendix 6.1): one small monotone network per
latent channel gives a cumulative distribution, and the probability of an integer ``q`` is
``cdf(q + 0.5) - cdf(q - 0.5)``. During training, additive uniform noise stands in for rounding
(its likelihood is the rate term); at export the prior becomes a table per channel
(:meth:`FactorizedPrior.tables`) that the range coder in :mod:`compressor.entropy` uses.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from compressor.entropy import EntropyTables

__all__ = [
    "KINDS",
    "AffineDecoder",
    "AffineEncoder",
    "BottleneckConfig",
    "Decoder",
    "Encoder",
    "FactorizedPrior",
    "init_affine",
    "init_pca",
    "make_modules",
    "round_ste",
]

#: Architectures: ``conv`` (projection + convolutional refinement, any latent width) and
#: ``affine`` (one step and offset per channel, latent = channels: few parameters).
KINDS = ("conv", "affine")


@dataclass(frozen=True)
class BottleneckConfig:
    """The architecture of a bottleneck at a cut with ``channels`` feature channels.

    Attributes:
        channels: channels of the features at the cut (the head's single output).
        latent: channels of the coded latent.
        hidden: channels of the encoder's and decoder's inner layer.
        stride: 1, or 2 to halve the latent's height and width.
        kind: ``conv`` or ``affine`` (:data:`KINDS`); an affine bottleneck codes every channel
            (``latent`` = ``channels``) at stride 1 and ignores ``hidden``.
    """

    channels: int
    latent: int = 8
    hidden: int = 32
    stride: int = 1
    kind: str = "conv"

    def __post_init__(self) -> None:
        for name in ("channels", "latent", "hidden"):
            value = getattr(self, name)
            if not isinstance(value, int) or not 1 <= value <= 4096:
                raise ValueError(f"bottleneck.{name}: {value!r} is not an integer in 1..4096")
        if self.stride not in (1, 2):
            raise ValueError(f"bottleneck.stride: {self.stride!r} is not 1 or 2")
        if self.kind not in KINDS:
            raise ValueError(f"bottleneck.kind: {self.kind!r} is not one of {', '.join(KINDS)}")
        if self.kind == "affine" and (self.latent != self.channels or self.stride != 1):
            raise ValueError(
                f"bottleneck.latent: an affine bottleneck codes every channel at stride 1 "
                f"(latent {self.latent}, stride {self.stride} for {self.channels} channels)"
            )

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class Encoder(nn.Module):
    """Runs on the edge after the head: a linear projection (1x1 conv; after 2x2 average pooling
    when the stride is 2) plus a non-linear refinement (conv3x3 C -> hidden, stride s, ReLU,
    conv1x1 hidden -> latent). :func:`init_pca` starts the projection at the features' principal
    components and the refinement at zero, so training starts from linear transform coding."""

    def __init__(self, config: BottleneckConfig) -> None:
        super().__init__()
        self.stride = config.stride
        self.project = nn.Conv2d(config.channels, config.latent, 1)
        self.conv1 = nn.Conv2d(config.channels, config.hidden, 3, stride=config.stride, padding=1)
        self.conv2 = nn.Conv2d(config.hidden, config.latent, 1)
        nn.init.zeros_(self.conv2.weight)
        nn.init.zeros_(self.conv2.bias)
        # 1 / the quantisation step, fixed: the weights stay O(1) whatever the features' scale, so
        # the optimiser's steps are relative ones (a step folded into the weights made them tiny or huge)
        self.register_buffer("scale", torch.ones(()))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        base = F.avg_pool2d(x, 2, ceil_mode=True) if self.stride != 1 else x
        return (self.project(base) + self.conv2(F.relu(self.conv1(x)))) * self.scale


class Decoder(nn.Module):
    """Runs in the cloud before the tail: [2x nearest upsampling to the cut's size] then a linear
    projection back to C channels (1x1 conv) plus a refinement (conv1x1 latent -> hidden, ReLU,
    conv3x3 hidden -> C, zero-initialised)."""

    def __init__(self, config: BottleneckConfig) -> None:
        super().__init__()
        self.stride = config.stride
        self.project = nn.Conv2d(config.latent, config.channels, 1)
        self.conv1 = nn.Conv2d(config.latent, config.hidden, 1)
        self.conv2 = nn.Conv2d(config.hidden, config.channels, 3, padding=1)
        nn.init.zeros_(self.conv2.weight)
        nn.init.zeros_(self.conv2.bias)
        self.register_buffer("scale", torch.ones(()))  # the quantisation step (see Encoder)

    def forward(self, y: torch.Tensor, size: tuple[int, int] | None = None) -> torch.Tensor:
        y = y * self.scale
        if self.stride != 1:
            y = F.interpolate(y, size=size, scale_factor=None if size else float(self.stride), mode="nearest")
        return self.project(y) + self.conv2(F.relu(self.conv1(y)))


class AffineEncoder(nn.Module):
    """One quantisation step and offset per channel: ``(x - offset) / step``, steps kept as logs
    (positive, and the optimiser's updates are relative). 2C parameters: with few training
    pictures there is little to overfit, and the factorized prior codes each channel alone.

    ``dead_zone`` (a buffer, 0 while training) moves every value that much towards zero before
    rounding, i.e. rounds ``|y|`` up only past ``n + 0.5 + dead_zone``: a rounding offset that
    sends the more probable, smaller symbols more often (fewer bits for about the same error)."""

    def __init__(self, config: BottleneckConfig) -> None:
        super().__init__()
        self.log_step = nn.Parameter(torch.zeros(config.channels))
        self.offset = nn.Parameter(torch.zeros(config.channels))
        self.register_buffer("dead_zone", torch.zeros(()))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = (x - self.offset[:, None, None]) * torch.exp(-self.log_step)[:, None, None]
        return y.sign() * (y.abs() - self.dead_zone).clamp_min(0)

    def macs(self, x: torch.Tensor) -> int:
        """Multiply-adds of one pass over ``x``: one per element (the dead zone's shift is not one)."""
        return int(x.numel())


class AffineDecoder(nn.Module):
    """The inverse affine map, with its own step and offset per channel (trained apart from the
    encoder's, so a bin can decode to where its features lie rather than to its centre).

    ``dead_zone`` (a buffer, the encoder's) decodes a non-zero symbol ``n`` at ``n + dead_zone``
    steps (``n - dead_zone`` below zero): the centre of the bin the encoder's dead zone sends to
    ``n``. 0 for artifacts written before it (their decoders learned their steps without one)."""

    def __init__(self, config: BottleneckConfig) -> None:
        super().__init__()
        self.log_step = nn.Parameter(torch.zeros(config.channels))
        self.offset = nn.Parameter(torch.zeros(config.channels))
        self.register_buffer("dead_zone", torch.zeros(()))

    def forward(self, y: torch.Tensor, size: tuple[int, int] | None = None) -> torch.Tensor:
        y = y + self.dead_zone * y.sign()
        return y * torch.exp(self.log_step)[:, None, None] + self.offset[:, None, None]

    def macs(self, y: torch.Tensor) -> int:
        """Multiply-adds of one pass over ``y``: one per element."""
        return int(y.numel())


def make_modules(config: BottleneckConfig) -> tuple[nn.Module, nn.Module]:
    """The (untrained) encoder and decoder of ``config.kind``."""
    if config.kind == "affine":
        return AffineEncoder(config), AffineDecoder(config)
    return Encoder(config), Decoder(config)


@torch.no_grad()
def init_affine(
    encoder: AffineEncoder,
    decoder: AffineDecoder,
    features: torch.Tensor,
    importance: torch.Tensor | None = None,
    levels: float = 14.0,
) -> None:
    """Start an affine bottleneck at uniform quantisation with ``levels`` steps across the largest
    feature value, each channel's step scaled by 1 / its ``importance`` (rate allocation: a channel
    the logits barely use gets a coarser step; with a linear tail the importance is the weight's
    column norm, and the step that equalises each channel's share of the logit error is 1 / it).
    The ratio is clamped to [1/4, 4]. Offsets start at 0 for non-negative features (exact zeros,
    e.g. after a ReLU, stay symbol 0), else at the channel mean."""
    c = features.shape[1]
    span = float((features.amax() - features.amin().clamp_max(0)).clamp_min(1e-6))
    step = torch.full((c,), span / levels)
    if importance is not None:
        rel = importance / importance.mean().clamp_min(1e-12)
        step = step / rel.clamp(0.25, 4.0)
    offset = torch.zeros(c) if features.amin() >= 0 else features.mean((0, 2, 3))
    for m in (encoder, decoder):
        m.log_step.copy_(step.log())
        m.offset.copy_(offset)


@torch.no_grad()
def init_pca(
    encoder: Encoder, decoder: Decoder, features: torch.Tensor, levels: float = 8.0, min_levels: float = 2.0
) -> None:
    """Start both projections at the principal components of the per-pixel feature vectors: the
    latent is the top-``latent`` components divided by one quantisation step, the decoder maps
    them back and adds the mean. The step is the first component's standard deviation /
    ``levels``, or smaller so that the last kept component still spans ``min_levels`` steps per
    standard deviation: a wide latent starts from every kept component coded, not rounded to 0
    (top-1 agreement on real photos needs most of them)."""
    x = F.avg_pool2d(features, 2, ceil_mode=True) if encoder.stride != 1 else features
    v = x.permute(0, 2, 3, 1).reshape(-1, x.shape[1]).double()
    mean = v.mean(0)
    _, s, vh = torch.linalg.svd(v - mean, full_matrices=False)
    k = encoder.project.out_channels
    basis = torch.zeros(k, v.shape[1], dtype=torch.float64)
    basis[: min(k, vh.shape[0])] = vh[:k]
    std = s / max(1.0, len(v) - 1) ** 0.5
    last = float(std[min(k, len(std)) - 1])
    fine = last / min_levels if min_levels > 0 else math.inf
    # never finer than 1/32 of the first component's deviation: its symbols stay inside the coder's +-255
    step = max(min(float(std[0]) / levels, fine), float(std[0]) / 32, 1e-6)
    encoder.project.weight.copy_(basis.float()[:, :, None, None])
    encoder.project.bias.copy_((-(basis @ mean)).float())
    encoder.scale.fill_(1 / step)
    decoder.project.weight.copy_(basis.T.float()[:, :, None, None])
    decoder.project.bias.copy_(mean.float())
    decoder.scale.fill_(step)


def round_ste(y: torch.Tensor) -> torch.Tensor:
    """Rounding in the forward pass, identity in the backward pass (straight-through)."""
    return y + (torch.round(y) - y).detach()


class FactorizedPrior(nn.Module):
    """A learned density per latent channel (filters (3, 3, 3)), Ballé's univariate monotone CDF."""

    def __init__(self, channels: int, filters: tuple[int, ...] = (3, 3, 3), init_scale: float = 10.0) -> None:
        super().__init__()
        dims = (1, *filters, 1)
        scale = init_scale ** (1 / (len(filters) + 1))
        self.matrices = nn.ParameterList()
        self.biases = nn.ParameterList()
        self.factors = nn.ParameterList()
        for i in range(len(filters) + 1):
            init = math.log(math.expm1(1 / scale / dims[i + 1]))
            self.matrices.append(nn.Parameter(torch.full((channels, dims[i + 1], dims[i]), init)))
            self.biases.append(nn.Parameter(torch.rand(channels, dims[i + 1], 1) - 0.5))
            if i < len(filters):
                self.factors.append(nn.Parameter(torch.zeros(channels, dims[i + 1], 1)))

    @property
    def channels(self) -> int:
        return int(self.matrices[0].shape[0])

    def _logits_cdf(self, x: torch.Tensor) -> torch.Tensor:
        """x: (C, 1, M) -> the logit of each channel's CDF at each value, (C, 1, M)."""
        for i, matrix in enumerate(self.matrices):
            x = torch.matmul(F.softplus(matrix), x) + self.biases[i]
            if i < len(self.factors):
                x = x + torch.tanh(self.factors[i]) * torch.tanh(x)
        return x

    def likelihood(self, y: torch.Tensor) -> torch.Tensor:
        """P(round(y) = y) per element of (N, C, H, W) ``y`` (y holds integers or noisy values)."""
        n, c, h, w = y.shape
        v = y.permute(1, 0, 2, 3).reshape(c, 1, -1)
        lower = self._logits_cdf(v - 0.5)
        upper = self._logits_cdf(v + 0.5)
        sign = -torch.sign(lower + upper).detach()  # evaluate in the tail where sigmoid is accurate
        p = (torch.sigmoid(sign * upper) - torch.sigmoid(sign * lower)).abs()
        return p.clamp_min(1e-9).reshape(c, n, h, w).permute(1, 0, 2, 3)

    def bits(self, y: torch.Tensor) -> torch.Tensor:
        """The code length of ``y`` in bits, summed over every element."""
        return -torch.log2(self.likelihood(y)).sum()

    @torch.no_grad()
    def tables(self, half_width: int) -> EntropyTables:
        """The prior on the integers -half_width..half_width, one row per channel, for the range coder."""
        values = torch.arange(-half_width, half_width + 1, dtype=torch.float32)
        v = values.reshape(1, 1, -1).expand(self.channels, 1, -1)
        lower, upper = self._logits_cdf(v - 0.5), self._logits_cdf(v + 0.5)
        sign = -torch.sign(lower + upper)
        pmf = (torch.sigmoid(sign * upper) - torch.sigmoid(sign * lower)).abs().reshape(self.channels, -1)
        pmf = pmf.double().numpy()
        pmf = np.maximum(pmf, 1e-9)  # the tails the table cuts off keep a small mass: clamped values stay codable
        return EntropyTables(pmf=pmf, offset=-half_width)
