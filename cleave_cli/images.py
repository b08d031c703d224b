"""Synthetic image-like model inputs. Image files become inputs in :mod:`partitioner.imagefiles`."""

from __future__ import annotations

import math
from collections.abc import Iterator

import torch

MEAN = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
STD = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)


def synthetic_images(n: int, input_shape: tuple[int, ...], seed: int = 0) -> torch.Tensor:
    """``n`` deterministic image-like inputs: smooth colour gradients with a few blobs, normalised."""
    return torch.cat(list(iter_synthetic_images(n, input_shape, seed)))


def iter_synthetic_images(n: int, input_shape: tuple[int, ...], seed: int = 0) -> Iterator[torch.Tensor]:
    """:func:`synthetic_images`' inputs one at a time (each ``(1, C, H, W)``, the same values), made as
    they are asked for: ``cleave infer --random 100000`` made 60 GB of Lite0 inputs before its first request."""
    _, channels, height, width = input_shape
    gen = torch.Generator().manual_seed(seed)
    ys = torch.linspace(0, 1, height).view(height, 1)
    xs = torch.linspace(0, 1, width).view(1, width)
    for _ in range(n):
        img = torch.empty(channels, height, width)
        for c in range(channels):
            a, b, phase = (torch.rand(3, generator=gen) * torch.tensor([4.0, 4.0, 2 * math.pi])).tolist()
            img[c] = 0.5 + 0.25 * torch.sin(a * 2 * math.pi * xs + b * 2 * math.pi * ys + phase)
        for _ in range(3):
            cy, cx, r = torch.rand(3, generator=gen).tolist()
            mask = ((ys - cy) ** 2 + (xs - cx) ** 2) < (0.05 + 0.2 * r) ** 2
            img[:, mask] = torch.rand(channels, 1, generator=gen)
        x = img.unsqueeze(0).clamp(0, 1)
        yield (x - MEAN) / STD if channels == 3 else x
