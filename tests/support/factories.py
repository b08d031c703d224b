"""Model factories for tests, named in ModelSpec sources as ``"tests.support.factories:<function>"``."""

import os
import time
from pathlib import Path

import torch
from torch import nn

TAIL_SLEEP_ENV = "CLEAVE_TEST_TAIL_SLEEP_S"


def tiny_cnn() -> nn.Module:
    """A small CNN with BatchNorm, randomly initialised from the global RNG."""
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        nn.BatchNorm2d(8),
        nn.ReLU(inplace=True),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(8, 4),
    )


def not_a_module() -> int:
    return 42


def broken() -> nn.Module:
    raise RuntimeError("factory exploded")


class _TwoHeads(nn.Module):
    """A CNN that returns two tensors (logits and pooled features), for multi-output serving."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.classifier = nn.Linear(4, 3)

    def forward(self, x):
        pooled = self.features(x)
        return self.classifier(pooled), pooled


def two_heads() -> nn.Module:
    return _TwoHeads()


@torch.fx.wrap  # one opaque node in the traced graph, so the sleep runs at serving time, not at trace time
def cloud_delay(x: torch.Tensor) -> torch.Tensor:
    """``x``, after sleeping ``$CLEAVE_TEST_TAIL_SLEEP_S`` seconds (unset: at once).

    Both hosts trace the same graph (same fingerprint); only the process whose environment sets the
    variable is slow, e.g. a cloud started with it serves a slow tail while the edge's fallback is fast.
    """
    seconds = float(os.environ.get(TAIL_SLEEP_ENV) or 0)
    if seconds > 0:
        time.sleep(seconds)
    return x


class _SlowTail(nn.Module):
    """conv -> relu -> cloud_delay -> pool -> fc: cut at ``relu`` and the delay is in the tail."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.relu = nn.ReLU()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = cloud_delay(self.relu(self.conv(x)))
        return self.fc(torch.flatten(self.pool(x), 1))


def slow_tail_cnn() -> nn.Module:
    """A tiny CNN whose tail sleeps where ``$CLEAVE_TEST_TAIL_SLEEP_S`` is set (see :func:`cloud_delay`)."""
    return _SlowTail()


def gated_tiny_cnn() -> nn.Module:
    """:func:`tiny_cnn`, once the file named by ``CLEAVE_TEST_LOAD_GATE`` exists: a daemon that serves
    it stays in its loading phase (NOT_SERVING) until the test creates the file."""
    gate = Path(os.environ["CLEAVE_TEST_LOAD_GATE"])
    deadline = time.monotonic() + 300
    while not gate.exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    return tiny_cnn()
