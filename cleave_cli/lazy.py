"""Modules imported on first use, so that building the parsers (``--help``) imports no gRPC or torch."""

from __future__ import annotations

import importlib
from types import ModuleType
from typing import Any


class LazyModule:
    """Stands for the module ``name`` and imports it at the first attribute access.

    ``pb = LazyModule("protos.cleave.v1.compression_pb2")`` reads like ``import ... as pb`` in the
    code that uses it; only running a command pays for the import.
    """

    def __init__(self, name: str) -> None:
        self._name = name

    def _module(self) -> ModuleType:
        return importlib.import_module(self._name)  # cached by sys.modules after the first call

    def __getattr__(self, attr: str) -> Any:
        return getattr(self._module(), attr)

    def __repr__(self) -> str:
        return f"<lazy module {self._name!r}>"
