"""Turn image files into model inputs (decode, resize, ImageNet normalisation), and make synthetic ones."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, UnidentifiedImageError

MEAN = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
STD = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)


def load_image(path: str | Path, input_shape: tuple[int, ...]) -> torch.Tensor:
    """A (1, C, H, W) float32 input from an image file, resized to ``input_shape``'s H and W."""
    channels, height, width = input_shape[1:]
    try:
        with Image.open(path) as image:
            pixels = np.asarray(image.convert("RGB" if channels == 3 else "L"))
    except (UnidentifiedImageError, OSError) as exc:
        raise ValueError(f"{path}: cannot decode image ({exc})") from exc
    x = torch.from_numpy(pixels.copy()).reshape(pixels.shape[0], pixels.shape[1], -1).permute(2, 0, 1)
    x = x.unsqueeze(0).float() / 255.0
    x = F.interpolate(x, size=(height, width), mode="bilinear", antialias=True, align_corners=False)
    return (x - MEAN) / STD if channels == 3 else x


def synthetic_images(n: int, input_shape: tuple[int, ...], seed: int = 0) -> torch.Tensor:
    """``n`` deterministic image-like inputs: smooth colour gradients with a few blobs, normalised."""
    _, channels, height, width = input_shape
    gen = torch.Generator().manual_seed(seed)
    ys = torch.linspace(0, 1, height).view(height, 1)
    xs = torch.linspace(0, 1, width).view(1, width)
    images = []
    for _ in range(n):
        img = torch.empty(channels, height, width)
        for c in range(channels):
            a, b, phase = (torch.rand(3, generator=gen) * torch.tensor([4.0, 4.0, 2 * math.pi])).tolist()
            img[c] = 0.5 + 0.25 * torch.sin(a * 2 * math.pi * xs + b * 2 * math.pi * ys + phase)
        for _ in range(3):
            cy, cx, r = torch.rand(3, generator=gen).tolist()
            mask = ((ys - cy) ** 2 + (xs - cx) ** 2) < (0.05 + 0.2 * r) ** 2
            img[:, mask] = torch.rand(channels, 1, generator=gen)
        images.append(img)
    x = torch.stack(images).clamp(0, 1)
    return (x - MEAN) / STD if channels == 3 else x
