"""Before/after measurements for a job's report: parameters, MACs, size, CPU latency, accuracy."""

from __future__ import annotations

import math
import statistics
import time
from typing import Any

import torch
from torch import nn

from .datasets import Dataset


def count_macs(model: nn.Module, example: Any) -> int:
    """Multiply-accumulates of one forward pass over Conv, Linear and GPT-2 Conv1D layers."""
    total = 0

    def hook(m: nn.Module, inputs: tuple, output: torch.Tensor) -> None:
        nonlocal total
        if not isinstance(output, torch.Tensor):
            return
        if isinstance(m, nn.modules.conv._ConvNd):
            total += output.numel() * math.prod(m.weight.shape[1:])  # (in / groups) x kernel per output
        elif isinstance(m, nn.Linear):
            total += output.numel() * m.in_features
        elif type(m).__name__ == "Conv1D":
            total += output.numel() * m.weight.shape[0]

    hooks = [m.register_forward_hook(hook) for m in model.modules() if not isinstance(m, torch.jit.ScriptModule)]
    try:
        with torch.inference_mode():
            run(model, example)
    finally:
        for h in hooks:
            h.remove()
    return total


def state_bytes(model: nn.Module) -> int:
    """Size of the weights serialized as safetensors (what a state-dict artifact costs on disk)."""
    from safetensors.torch import save

    state = {k: v.detach().contiguous().clone() for k, v in model.state_dict().items() if isinstance(v, torch.Tensor)}
    return len(save(state))


def latency_ms(model: nn.Module, example: Any, runs: int = 5) -> float:
    """Median CPU latency of one forward pass, after one warm-up."""
    times = []
    with torch.inference_mode():
        run(model, example)
        for _ in range(runs):
            t = time.perf_counter()
            run(model, example)
            times.append((time.perf_counter() - t) * 1e3)
    return statistics.median(times)


def accuracy(model: nn.Module, data: Dataset, batch: int = 64) -> float | None:
    """Top-1 accuracy on ``data``; None when the model's output is not (N, classes) logits."""
    correct = 0
    with torch.inference_mode():
        for i in range(0, len(data), batch):
            x = torch.from_numpy(data.inputs[i : i + batch])
            x = x.float() if x.is_floating_point() or x.dtype == torch.uint8 else x
            out = _logits(run(model, x))
            if out is None or out.ndim != 2 or out.shape[0] != x.shape[0]:
                return None
            correct += int((out.argmax(1) == torch.from_numpy(data.labels[i : i + batch])).sum())
    return correct / len(data)


def measure(model: nn.Module, example: Any, data: Dataset | None, runs: int = 5) -> dict[str, Any]:
    """One column of the report."""
    report: dict[str, Any] = {
        "parameters": sum(p.numel() for p in model.parameters()),
        "macs": count_macs(model, example),
        "size_bytes": state_bytes(model),
        "latency_ms": round(latency_ms(model, example, runs), 3),
    }
    if data is not None:
        report["accuracy"] = accuracy(model, data)
    return report


def run(model: nn.Module, x: Any) -> Any:
    """One forward pass of ``model`` on ``x`` (keyword inputs when ``x`` is a dict)."""
    if isinstance(x, dict):
        return model(**x)
    return model(x)


def _logits(out: Any) -> torch.Tensor | None:
    if isinstance(out, torch.Tensor):
        return out
    logits = getattr(out, "logits", None)
    return logits if isinstance(logits, torch.Tensor) else None
