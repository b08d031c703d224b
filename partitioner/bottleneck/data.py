"""Unlabeled training images for a bottleneck: every picture installed packages ship, augmented.

Distillation needs no labels, so any image teaches the bottleneck what the model's features look
like. Seven photographs are too few (a bottleneck trained on 7 overfits them: see
docs/bottleneck.md), so the pool is the built-in photographs that are *not* held out
(:data:`partitioner.photos` order) plus the other pictures scikit-image and matplotlib bundle:
greyscale scenes and textures (camera, coins, moon, brick, grass, gravel, ...) turned into RGB,
the right view of the stereo motorcycle, Grace Hopper. Held-out photographs are never in the pool.

:func:`random_crops` cuts any number of distinct training inputs from the pool at full
resolution: random resized crops (8-100% of the area, aspect 3:4-4:3), flips, small rotations and
colour jitter (brightness, contrast, saturation), seeded, so a job is reproducible.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from PIL import Image, ImageEnhance

from partitioner import photos

__all__ = ["EXTRA_PICTURES", "photo_names", "pool", "random_crops"]

#: scikit-image pictures beyond the colour photographs of :mod:`partitioner.photos` (no download).
EXTRA_PICTURES = (
    "brick",
    "camera",
    "cell",
    "clock",
    "coins",
    "colorwheel",
    "grass",
    "gravel",
    "moon",
    "page",
    "text",
    "horse",
    "logo",
)


def photo_names() -> list[str]:
    """The built-in photographs' names, in the order of :func:`partitioner.photos.builtin_photos`'
    sources (the group index of a crop is its position here)."""
    return [*photos._SKIMAGE_PHOTOS, "china", "flower"]


def _rgb(pixels: np.ndarray) -> np.ndarray:
    a = np.asarray(pixels)
    if a.dtype == bool:
        a = a.astype(np.uint8) * 255
    elif a.dtype != np.uint8:
        a = np.clip(a * (255.0 if a.max() <= 1.0 else 1.0), 0, 255).astype(np.uint8)
    if a.ndim == 2:
        a = np.stack([a] * 3, -1)
    return np.ascontiguousarray(a[..., :3])


def pool(held_out: Sequence[str] = ()) -> list[tuple[str, np.ndarray]]:
    """(name, RGB uint8 pixels) of every bundled picture except the photographs named in
    ``held_out``. Needs scikit-image and scikit-learn (the ``pretrained`` extra); matplotlib's
    sample photograph is used when matplotlib is installed."""
    import skimage.data

    excluded = set(held_out)
    unknown = excluded - set(photo_names())
    if unknown:
        raise ValueError(f"held_out: {sorted(unknown)} are not built-in photographs")
    out = [(n, _rgb(p)) for n, p in zip(photo_names(), photos._photos(), strict=True) if n not in excluded]
    if "stereo_motorcycle" not in excluded:
        out.append(("stereo_motorcycle_right", _rgb(skimage.data.stereo_motorcycle()[1])))
    for name in EXTRA_PICTURES:
        out.append((name, _rgb(getattr(skimage.data, name)())))
    try:
        from matplotlib import cbook

        with cbook.get_sample_data("grace_hopper.jpg") as f:
            out.append(("grace_hopper", _rgb(np.asarray(Image.open(f).convert("RGB")))))
    except (ImportError, OSError):
        pass
    return out


def _crop(pixels: np.ndarray, rng: np.random.Generator) -> Image.Image:
    """One random resized crop of ``pixels`` with a flip, a small rotation and colour jitter."""
    h, w = pixels.shape[:2]
    for _ in range(10):
        area = h * w * rng.uniform(0.08, 1.0)
        aspect = float(np.exp(rng.uniform(np.log(3 / 4), np.log(4 / 3))))
        cw, ch = round((area * aspect) ** 0.5), round((area / aspect) ** 0.5)
        if 16 <= cw <= w and 16 <= ch <= h:
            break
    else:
        ch = cw = min(h, w)
    top, left = int(rng.integers(0, h - ch + 1)), int(rng.integers(0, w - cw + 1))
    image = Image.fromarray(pixels[top : top + ch, left : left + cw])
    if rng.random() < 0.5:
        image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    if rng.random() < 0.5:
        image = image.rotate(float(rng.uniform(-15, 15)), resample=Image.Resampling.BILINEAR)
    for enhance in (ImageEnhance.Brightness, ImageEnhance.Contrast, ImageEnhance.Color):
        image = enhance(image).enhance(float(rng.uniform(0.7, 1.3)))
    return image


def random_crops(
    pictures: Sequence[tuple[str, np.ndarray]], input_shape: Sequence[int], n: int, seed: int = 0
) -> torch.Tensor:
    """``n`` model inputs cut at random from ``pictures`` (round-robin over them), seeded."""
    if not pictures:
        raise ValueError("pictures: the training pool is empty")
    rng = np.random.default_rng(seed)
    out = [photos.to_input(np.asarray(_crop(pictures[i % len(pictures)][1], rng)), input_shape) for i in range(n)]
    return torch.cat(out) if out else torch.zeros((0, *tuple(input_shape)[1:]))
