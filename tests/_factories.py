"""Model factories for tests, named in ModelSpec sources as ``"_factories:<function>"``."""

from torch import nn


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
