"""torchvision loads without TorchDynamo (start-up), and what it lent roi_align still answers."""

from __future__ import annotations

import subprocess
import sys

PROBE = """
import sys
import partitioner.graph, partitioner.models  # what every model load imports
assert "torchvision" in sys.modules
print("dynamo", "torch._dynamo" in sys.modules)
import torchvision
print("model", type(torchvision.models.get_model("resnet18", weights=None)).__name__)
roi = sys.modules["torchvision.ops.roi_align"]
answer = roi.is_compile_supported("cpu")  # the stand-in: imports TorchDynamo now, then asks it
from torch._dynamo.utils import is_compile_supported
print("same", answer == is_compile_supported("cpu"), "dynamo", "torch._dynamo" in sys.modules)
"""


def test_torchvision_loads_without_dynamo_and_roi_align_still_asks_it() -> None:
    done = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split("\n")[:3] == ["dynamo False", "model ResNet", "same True dynamo True"], done.stdout


def test_a_loaded_dynamo_is_used_as_it_is() -> None:
    probe = "import torch._dynamo.utils as u, sys\nimport partitioner.vision\n"
    probe += "print(sys.modules['torchvision.ops.roi_align'].is_compile_supported is u.is_compile_supported)"
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "True"
