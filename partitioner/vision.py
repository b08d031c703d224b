"""torchvision, imported without ``torch._dynamo``.

``import torchvision`` imports ``torchvision.ops.roi_align``, whose only use of TorchDynamo is one
function, ``torch._dynamo.utils.is_compile_supported``, called only while ``torch.compile`` traces
``roi_align``. Importing that module imports all of TorchDynamo (sympy, the FSDP and DTensor
modules, ...): measured on this project's 2-core machine with torch 2.14 and torchvision 0.29,
``import torchvision`` takes 0.6 s this way against 3-5 s (under load) otherwise, paid by every
command and daemon that loads a model. :func:`load_torchvision` lends ``roi_align`` a stand-in for
that one function while torchvision is imported; the stand-in imports TorchDynamo and calls the
real function the first time it is called, so ``torch.compile`` of ``roi_align`` behaves as before.
Where the stand-in would not do (TorchDynamo already loaded, or a torchvision that imports another
name from it), torchvision is imported as usual.
"""

from __future__ import annotations

import importlib
import sys
import types
from typing import Any

_UTILS = "torch._dynamo.utils"


def is_compile_supported(device_type: Any) -> Any:
    """``torch._dynamo.utils.is_compile_supported``, imported at its first call."""
    from torch._dynamo.utils import is_compile_supported as real

    return real(device_type)


def load_torchvision() -> types.ModuleType:
    """``import torchvision``, without importing TorchDynamo when torchvision is not yet loaded."""
    if "torchvision" in sys.modules or _UTILS in sys.modules or "torch._dynamo" in sys.modules:
        return importlib.import_module("torchvision")
    stand_in = types.ModuleType(_UTILS)
    stand_in.is_compile_supported = is_compile_supported  # type: ignore[attr-defined]
    sys.modules[_UTILS] = stand_in
    try:
        return importlib.import_module("torchvision")
    except ImportError:
        # Another torchvision, which wants more of TorchDynamo: start again the usual way.
        for name in [m for m in sys.modules if m == "torchvision" or m.startswith("torchvision.")]:
            del sys.modules[name]
        if sys.modules.get(_UTILS) is stand_in:
            del sys.modules[_UTILS]
        return importlib.import_module("torchvision")
    finally:
        if sys.modules.get(_UTILS) is stand_in:
            del sys.modules[_UTILS]


torchvision = load_torchvision()
