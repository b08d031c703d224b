"""Evaluation datasets: ``inputs`` and ``labels`` arrays in an npz or safetensors file, validated.

Nothing is unpickled: npz files are read with ``allow_pickle=False`` (an object array is refused).
The headers are checked first (:mod:`.headers`: declared shapes, dtypes and sizes against the
limits), so nothing larger than the limits is ever allocated; :func:`check_upload` does only that
(the daemon, at upload), :func:`load_dataset` then reads the arrays (the job process).
"""

from __future__ import annotations

import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .headers import HeaderError, check_dataset, npz_header, safetensors_header

INPUT_DTYPES = (np.float32, np.float16, np.float64, np.uint8, np.int64, np.int32)
LABEL_DTYPES = (np.int64, np.int32, np.int16, np.uint8)
MAX_SAMPLES = 1 << 20


class DatasetError(ValueError):
    """A dataset that cannot be used; the message names the field."""


@dataclass
class Dataset:
    inputs: np.ndarray
    labels: np.ndarray

    def __len__(self) -> int:
        return len(self.labels)


@dataclass(frozen=True)
class DatasetLimits:
    """``jobs.max_header_bytes``, ``jobs.max_dataset_bytes`` and ``jobs.max_dataset_samples``."""

    max_header: int = 16 << 20
    max_bytes: int = 2 << 30
    max_samples: int = MAX_SAMPLES


def check_upload(path: Path, fmt: str, limits: DatasetLimits) -> int:
    """Validate a dataset from its headers only; returns its sample count. Raises DatasetError."""
    try:
        if fmt == "npz":
            arrays = npz_header(path, limits.max_header, limits.max_bytes)
        else:
            arrays = safetensors_header(path, limits.max_header)
        return check_dataset(arrays, limits.max_samples, limits.max_bytes)
    except HeaderError as exc:
        raise DatasetError(str(exc)) from None


def load_dataset(path: Path, fmt: str, limits: DatasetLimits | None = None) -> Dataset:
    """Check the headers, then read and validate; ``fmt`` is ``"npz"`` or ``"safetensors"``."""
    check_upload(path, fmt, limits or DatasetLimits())
    if fmt == "npz":
        try:
            with np.load(path, allow_pickle=False) as data:
                arrays = {k: data[k] for k in data.files}
        except ValueError as exc:  # object arrays need pickle
            raise DatasetError(f"dataset: refused ({exc})") from None
        except (OSError, zipfile.BadZipFile, EOFError) as exc:
            raise DatasetError(f"dataset: not an npz file ({exc})") from None
    else:
        try:
            from safetensors.numpy import load_file

            arrays = load_file(str(path))
        except Exception as exc:  # safetensors raises its own SafetensorError
            raise DatasetError(f"dataset: not a safetensors file ({type(exc).__name__}: {exc})") from None
    return validate(arrays)


def validate(arrays: dict[str, np.ndarray]) -> Dataset:
    for key in ("inputs", "labels"):
        if key not in arrays:
            raise DatasetError(f"dataset.{key}: missing (the file has {sorted(arrays)})")
    inputs, labels = arrays["inputs"], arrays["labels"]
    if inputs.dtype.type not in INPUT_DTYPES:
        raise DatasetError(f"dataset.inputs: dtype {inputs.dtype} is not supported")
    if labels.dtype.type not in LABEL_DTYPES:
        raise DatasetError(f"dataset.labels: dtype {labels.dtype} is not an integer type")
    if labels.ndim != 1:
        raise DatasetError(f"dataset.labels: expected shape (N,), got {labels.shape}")
    if inputs.ndim < 2 or inputs.shape[0] != labels.shape[0]:
        raise DatasetError(f"dataset.inputs: shape {inputs.shape} does not have N={labels.shape[0]} rows")
    if not 0 < len(labels) <= MAX_SAMPLES:
        raise DatasetError(f"dataset.labels: {len(labels)} samples is not in 1..{MAX_SAMPLES}")
    if inputs.dtype.kind == "f" and not np.isfinite(inputs).all():
        raise DatasetError("dataset.inputs: contains NaN or infinity")
    if (labels < 0).any():
        raise DatasetError("dataset.labels: negative label")
    return Dataset(inputs, labels.astype(np.int64))
