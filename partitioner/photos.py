"""Real calibration images: a directory of image files, or photos that installed packages ship.

The planner predicts bytes on the wire and accuracy from calibration inputs. Synthetic images are
smoother than photos, so they under-predict what real frames send (about 3x for 8-bit input codes
on EfficientNet-Lite0) and say nothing about top-1 agreement. :func:`calibration_inputs` gives the
planner real images:

* a directory of image files (``.jpg``, ``.png``, ...), read in name order;
* ``"photos"``: the built-in set, colour photographs bundled with scikit-image (astronaut, coffee,
  chelsea, rocket, ...) and scikit-learn (china, flower), each cut into deterministic crops
  (the whole image, then four corner crops), ordered so the first few inputs are all different
  photos. Nothing is downloaded. Needs the ``pretrained`` extra (scikit-image, scikit-learn);
* ``"synthetic"``: seeded synthetic images (:func:`partitioner.models.calibration_batch`).

The default (``None``) is the photos for a pretrained model (:attr:`ModelSpec.pretrained`) and
synthetic images otherwise. Images are turned into inputs like ``cleave infer`` turns files into
inputs: RGB, resized to the model's height and width, ImageNet-normalised.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch

from partitioner import imagefiles
from partitioner.models import ModelSpec, calibration_batch
from partitioner.spec import IMAGE_SUFFIXES, PHOTOS, SYNTHETIC, image_files

__all__ = [
    "IMAGE_SUFFIXES",
    "PHOTOS",
    "SYNTHETIC",
    "builtin_photos",
    "calibration_inputs",
    "directory_images",
    "load_image",
    "to_input",
]


# scikit-image's bundled colour photographs (the ones that need no download).
_SKIMAGE_PHOTOS = (
    "astronaut",
    "coffee",
    "chelsea",
    "rocket",
    "stereo_motorcycle",
    "hubble_deep_field",
    "immunohistochemistry",
    "retina",
)
# (top, left) of the corner crops, as fractions of the room left around a crop of _CROP of the image.
_CORNERS = ((0.0, 0.0), (0.0, 1.0), (1.0, 0.0), (1.0, 1.0))
_CROP = 0.6


def to_input(pixels: np.ndarray, input_shape: Sequence[int]) -> torch.Tensor:
    """A (1, C, H, W) float32 input from (H, W[, C]) uint8 pixels (see :func:`imagefiles.to_array`)."""
    return torch.from_numpy(imagefiles.to_array(pixels, input_shape))


def load_image(path: str | Path, input_shape: Sequence[int]) -> torch.Tensor:
    """A (1, C, H, W) input from an image file (see :func:`imagefiles.load_array`).

    Raises:
        ValueError: naming the file that cannot be decoded.
    """
    return torch.from_numpy(imagefiles.load_array(path, input_shape))


def directory_images(directory: str | Path, input_shape: Sequence[int], n: int | None = None) -> torch.Tensor:
    """The image files of ``directory`` (by suffix, in name order; at most ``n``) as one input batch.

    Raises:
        ValueError: the directory does not exist, holds no image file, or a file cannot be decoded.
    """
    folder = Path(directory).expanduser()
    if not folder.is_dir():
        raise ValueError(f"calibration: {str(directory)!r} is not a directory of images")
    files = image_files(folder)
    if not files:
        raise ValueError(f"calibration: {str(directory)!r} holds no image file ({', '.join(IMAGE_SUFFIXES)})")
    return torch.cat([load_image(p, input_shape) for p in files[:n]])


def builtin_photos(input_shape: Sequence[int], n: int | None = None) -> torch.Tensor:
    """Up to ``n`` deterministic crops of the bundled photographs, as one input batch (50 at most).

    Raises:
        ValueError: scikit-image or scikit-learn is not installed (the ``pretrained`` extra).
    """
    photos = _photos()
    crops: list[Callable[[np.ndarray], np.ndarray]] = [_whole] + [_corner(t, left) for t, left in _CORNERS]
    inputs = []
    for crop in crops:  # crop-major: the first len(photos) inputs are all different photos
        for pixels in photos:
            if n is not None and len(inputs) >= n:
                return torch.cat(inputs)
            inputs.append(to_input(crop(pixels), input_shape))
    return torch.cat(inputs)


def calibration_inputs(spec: ModelSpec, source: str | None = None, n: int = 8, seed: int = 1) -> torch.Tensor:
    """``n`` calibration inputs for the model ``spec`` describes, from ``source`` (see the module doc).

    A directory may give fewer than ``n`` (all it holds). ``seed`` seeds synthetic images.

    Raises:
        ValueError: naming the source that cannot give images.
    """
    if n < 1:
        raise ValueError(f"calibration: need at least 1 input, got {n}")
    if source is None:
        source = PHOTOS if spec.pretrained else SYNTHETIC
    if source == SYNTHETIC:
        return calibration_batch(spec.input_shape, n, seed=seed)
    if len(spec.input_shape) != 4:
        raise ValueError(f"calibration: images need a (N, C, H, W) input, the model takes {tuple(spec.input_shape)}")
    if source == PHOTOS:
        return builtin_photos(spec.input_shape, n)
    return directory_images(source, spec.input_shape, n)


def _photos() -> list[np.ndarray]:
    try:
        import skimage.data
        from sklearn.datasets import load_sample_images
    except ImportError as exc:
        raise ValueError(
            f"calibration: the built-in photos come from scikit-image and scikit-learn: "
            f"pip install 'cleave[pretrained]' ({exc})"
        ) from exc
    photos = []
    for name in _SKIMAGE_PHOTOS:
        image = getattr(skimage.data, name)()
        photos.append(image[0] if isinstance(image, tuple) else image)  # stereo pairs: the left view
    photos.extend(load_sample_images().images)  # china, flower
    return [np.ascontiguousarray(p[..., :3]) for p in photos]


def _whole(pixels: np.ndarray) -> np.ndarray:
    """The largest centred square."""
    h, w = pixels.shape[:2]
    side = min(h, w)
    top, left = (h - side) // 2, (w - side) // 2
    return pixels[top : top + side, left : left + side]


def _corner(top: float, left: float) -> Callable[[np.ndarray], np.ndarray]:
    def crop(pixels: np.ndarray) -> np.ndarray:
        h, w = pixels.shape[:2]
        side = int(min(h, w) * _CROP)
        y, x = round((h - side) * top), round((w - side) * left)
        return pixels[y : y + side, x : x + side]

    return crop
