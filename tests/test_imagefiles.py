"""Image files to model inputs: the error names the file and says what went wrong with it."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from partitioner.imagefiles import load_array

SHAPE = (1, 3, 8, 8)


def test_a_photo_becomes_a_normalised_input(tmp_path: Path) -> None:
    path = tmp_path / "grey.png"
    Image.fromarray(np.full((20, 30, 3), 128, dtype=np.uint8)).save(path)
    x = load_array(path, SHAPE)
    assert x.shape == SHAPE and x.dtype == np.float32
    assert np.allclose(x[0, 0], (128 / 255 - 0.485) / 0.229, atol=1e-5)


def test_missing_file_or_directory_is_unreadable_not_undecodable(tmp_path: Path) -> None:
    # These said "cannot decode image ([Errno 2] ...)", which sends a user looking at the image format.
    with pytest.raises(ValueError, match=r"nope\.png: cannot read \(No such file or directory\)$"):
        load_array(tmp_path / "nope.png", SHAPE)
    with pytest.raises(ValueError, match=r": cannot read \(Is a directory\)$"):
        load_array(tmp_path, SHAPE)


def test_corrupt_or_truncated_image_cannot_be_decoded(tmp_path: Path) -> None:
    garbage = tmp_path / "garbage.png"
    garbage.write_bytes(b"not an image")
    with pytest.raises(ValueError, match=r"garbage\.png: cannot decode image"):
        load_array(garbage, SHAPE)
    whole = tmp_path / "whole.jpg"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(whole)
    cut = tmp_path / "cut.jpg"
    cut.write_bytes(whole.read_bytes()[:300])  # the header parses; the body ends early
    with pytest.raises(ValueError, match=r"cut\.jpg: cannot decode image"):
        load_array(cut, SHAPE)
