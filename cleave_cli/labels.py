"""Class names for model outputs: ``cleave infer --labels imagenet`` or ``--labels FILE``."""

from __future__ import annotations

from pathlib import Path

IMAGENET = "imagenet"


def load_labels(source: str) -> list[str]:
    """Class names, index ``i`` naming output ``i``.

    ``"imagenet"``: the 1000 ImageNet-1k classes, from the metadata torchvision ships with its weight
    enums (nothing is downloaded); otherwise a text file with one name per line.

    Raises:
        ValueError: the file cannot be read or holds no name.
    """
    if source == IMAGENET:
        from torchvision.models import ResNet18_Weights

        return list(ResNet18_Weights.IMAGENET1K_V1.meta["categories"])
    try:
        names = [line.strip() for line in Path(source).read_text().splitlines()]
    except (OSError, UnicodeDecodeError) as exc:
        raise ValueError(f"--labels: cannot read {source!r} ({exc})") from exc
    names = [n for n in names if n]
    if not names:
        raise ValueError(f"--labels: {source!r} holds no class name")
    return names


def name_of(labels: list[str] | None, index: int) -> str | None:
    """The name of class ``index``, or None without labels or past their end."""
    return labels[index] if labels is not None and 0 <= index < len(labels) else None
