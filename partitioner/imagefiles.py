"""Image files and pixels to model inputs, in numpy (no torch): decode, resize, ImageNet-normalise.

The one preprocessing path for ``cleave infer``, the planner's calibration images and the bundled
photos (:mod:`partitioner.photos` wraps it in torch tensors), so what the planner measures is what
an app sends. Resizing is PIL's antialiased bilinear filter, per channel in float32.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image

MEAN = np.array([0.485, 0.456, 0.406], dtype=np.float32).reshape(1, 3, 1, 1)
STD = np.array([0.229, 0.224, 0.225], dtype=np.float32).reshape(1, 3, 1, 1)


def to_array(pixels: np.ndarray, input_shape: Sequence[int]) -> np.ndarray:
    """A (1, C, H, W) float32 input from (H, W[, C]) uint8 pixels, resized to ``input_shape``'s H and W.

    Three-channel models get RGB, ImageNet-normalised; others get grey levels in [0, 1].
    """
    channels, height, width = (int(d) for d in tuple(input_shape)[1:4])
    image = Image.fromarray(np.ascontiguousarray(pixels))
    pixels = np.asarray(image.convert("RGB" if channels == 3 else "L"))
    planes = pixels.reshape(pixels.shape[0], pixels.shape[1], -1)
    out = np.empty((1, planes.shape[2], height, width), dtype=np.float32)
    for c in range(planes.shape[2]):
        plane = Image.fromarray(planes[:, :, c].astype(np.float32) / np.float32(255.0), mode="F")
        out[0, c] = np.asarray(plane.resize((width, height), Image.Resampling.BILINEAR))
    return (out - MEAN) / STD if channels == 3 else out


def load_array(path: str | Path, input_shape: Sequence[int]) -> np.ndarray:
    """A (1, C, H, W) float32 input from an image file (see :func:`to_array`).

    Raises:
        ValueError: naming the file that cannot be read (missing, a directory, not readable) or
            decoded (not an image, truncated).
    """
    try:
        with Image.open(path) as image:
            pixels = np.asarray(image.convert("RGB"))
    except OSError as exc:
        if exc.errno is not None:  # the file system's answer (missing, a directory, no permission): nothing was read
            raise ValueError(f"{path}: cannot read ({exc.strerror or exc})") from exc
        raise ValueError(f"{path}: cannot decode image ({exc})") from exc  # not an image, or truncated
    return to_array(pixels, input_shape)
