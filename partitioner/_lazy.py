"""Torch, imported on first use.

Profiles, the cost model and the planner are plain data and arithmetic that the light edge needs
without torch (it plans from an edge bundle's tables); the same modules also measure models with
torch. They name ``torch`` and ``fx`` through these proxies, so importing them imports no torch:
the first attribute read (``torch.inference_mode``) does.
"""

from __future__ import annotations

import importlib
import types
from typing import Any


class LazyModule(types.ModuleType):
    """A module imported on the first attribute read."""

    def __init__(self, name: str) -> None:
        super().__init__(name)
        self._module: types.ModuleType | None = None

    def __getattr__(self, attr: str) -> Any:
        if attr in ("__path__", "__wrapped__", "__file__"):  # what tools probe for: no import for them
            raise AttributeError(attr)
        module = self.__dict__.get("_module")
        if module is None:
            module = importlib.import_module(self.__name__)
            self.__dict__["_module"] = module
        return getattr(module, attr)


torch: Any = LazyModule("torch")
fx: Any = LazyModule("torch.fx")
