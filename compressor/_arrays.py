"""The codec's one bridge to torch: optional, and never needed to encode or decode numpy arrays.

The codec's math runs on numpy arrays. A torch tensor on the CPU converts to one without a copy
(``Tensor.numpy()`` shares memory), so a tensor and the equal array go through the same code and
give the same bytes by construction. :func:`torch_or_none` imports torch lazily, so
``import compressor.codec`` works where torch is not installed.
"""

from __future__ import annotations

import functools
from types import ModuleType
from typing import Any

import numpy as np


@functools.cache
def torch_or_none() -> ModuleType | None:
    """The torch module, or None where it is not installed (or blocked)."""
    try:
        import torch
    except ImportError:
        return None
    return torch


def is_tensor(x: Any) -> bool:
    """Whether ``x`` is a torch tensor (False without importing torch when torch was never loaded)."""
    torch = torch_or_none() if type(x).__module__.startswith("torch") else None
    return torch is not None and isinstance(x, torch.Tensor)


def as_float32(x: Any) -> np.ndarray:
    """``x`` (a numpy array, a torch tensor on any device, or anything array-like) as float32 numpy.

    Zero-copy for a contiguous CPU float32 tensor or array; otherwise one conversion.
    """
    if is_tensor(x):
        torch = torch_or_none()
        x = x.detach()
        if x.device.type != "cpu" or x.dtype != torch.float32:
            x = x.to(device="cpu", dtype=torch.float32)
        return x.numpy()
    return np.asarray(x, dtype=np.float32)


def like(value: np.ndarray, template: Any) -> Any:
    """``value`` as a torch tensor when ``template`` is one (zero-copy), else unchanged."""
    if is_tensor(template):
        value = np.asarray(value)
        if not (value.flags.c_contiguous and value.flags.writeable):
            value = value.copy()
        return torch_or_none().from_numpy(value)
    return value
