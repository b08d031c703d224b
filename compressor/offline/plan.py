"""Replayable CNN pruning plans: what was cut, in a few KB of JSON, and the applier the edge runs.

A plan lists Torch-Pruning's root pruning steps in order: ``[module name, "out" | "in", indices]``
with the indices as a bitmask (:mod:`.indexsets`). Replaying the steps on an unmodified copy of the
original model through Torch-Pruning's dependency graph cuts every coupled layer (residual adds,
concatenations, depthwise and grouped convs, BatchNorm) exactly as the pruner did, so the edge
rebuilds the pruned weights from its own copy of the model instead of downloading them. The plan
carries the SHA-256 of the pruned state dict, and :func:`apply_plan` refuses a result that differs.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from .indexsets import decode_indices, encode_indices

PLAN_FORMAT = "cleave.cnn-pruning-plan"
PLAN_VERSION = 1
MAX_PLAN_BYTES = 4 << 20


class PlanError(ValueError):
    """A plan that is malformed or does not fit the model; the message names the field."""


def state_digest(model: nn.Module) -> str:
    """SHA-256 of a module's state dict: every entry's name, dtype, shape and bytes, in name order."""
    digest = hashlib.sha256()
    state = model.state_dict()
    for name in sorted(state):
        value = state[name]
        digest.update(name.encode() + b"\0")
        if isinstance(value, torch.Tensor):
            t = value.detach().cpu().contiguous()
            digest.update(f"{t.dtype}{tuple(t.shape)}".encode())
            digest.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


@dataclass
class PruningPlan:
    """The steps that turn the original model into the pruned one.

    Attributes:
        input_shape: the example input the dependency graph is traced with.
        steps: ``(module name, out_channels?, indices)`` in the order they were applied; indices
            are relative to the module's size at that step.
        result_sha256: :func:`state_digest` of the pruned model.
        base: what the plan applies to (architecture, fingerprint of the original), informative.
    """

    input_shape: tuple[int, ...]
    steps: list[tuple[str, bool, list[int]]]
    result_sha256: str = ""
    base: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": PLAN_FORMAT,
            "version": PLAN_VERSION,
            "input_shape": list(self.input_shape),
            "base": self.base,
            "result_sha256": self.result_sha256,
            "steps": [[name, "out" if out else "in", encode_indices(idx)] for name, out, idx in self.steps],
        }

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), separators=(",", ":"), sort_keys=True)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> PruningPlan:
        if not isinstance(data, Mapping):
            raise PlanError(f"plan: expected a JSON object, got {type(data).__name__}")
        if data.get("format") != PLAN_FORMAT:
            raise PlanError(f"plan.format: expected {PLAN_FORMAT!r}, got {data.get('format')!r}")
        if data.get("version") != PLAN_VERSION:
            raise PlanError(f"plan.version: {data.get('version')!r} is not supported (expected {PLAN_VERSION})")
        shape = data.get("input_shape")
        if not (isinstance(shape, list) and shape and all(isinstance(d, int) and d > 0 for d in shape)):
            raise PlanError(f"plan.input_shape: expected a list of positive integers, got {shape!r}")
        raw_steps = data.get("steps")
        if not isinstance(raw_steps, list):
            raise PlanError("plan.steps: expected a list")
        steps = []
        for i, step in enumerate(raw_steps):
            where = f"plan.steps[{i}]"
            if not (isinstance(step, list) and len(step) == 3 and isinstance(step[0], str)):
                raise PlanError(f"{where}: expected [module name, 'out'|'in', indices]")
            if step[1] not in ("out", "in"):
                raise PlanError(f"{where}[1]: expected 'out' or 'in', got {step[1]!r}")
            try:
                idx = decode_indices(step[2], f"{where}[2]")
            except ValueError as exc:
                raise PlanError(str(exc)) from None
            steps.append((step[0], step[1] == "out", idx))
        digest = data.get("result_sha256", "")
        if not isinstance(digest, str):
            raise PlanError("plan.result_sha256: expected a hex string")
        base = data.get("base", {})
        return cls(tuple(shape), steps, digest, dict(base) if isinstance(base, Mapping) else {})

    @classmethod
    def from_json(cls, text: str | bytes) -> PruningPlan:
        if len(text) > MAX_PLAN_BYTES:
            raise PlanError(f"plan: {len(text)} bytes is over the {MAX_PLAN_BYTES} byte limit")
        try:
            return cls.from_dict(json.loads(text))
        except json.JSONDecodeError as exc:
            raise PlanError(f"plan: not JSON ({exc})") from None


def apply_plan(model: nn.Module, plan: PruningPlan | Mapping[str, Any] | str, verify: bool = True) -> nn.Module:
    """Prune ``model`` (the original, unmodified) in place as ``plan`` says; returns it.

    Raises:
        PlanError: the plan is malformed, names a module the model lacks, or (with ``verify``) the
            result's state dict differs from the one the plan was made from.
    """
    import torch_pruning as tp

    if isinstance(plan, str):
        plan = PruningPlan.from_json(plan)
    elif isinstance(plan, Mapping):
        plan = PruningPlan.from_dict(plan)
    modules = dict(model.named_modules())
    for i, (name, _, _) in enumerate(plan.steps):
        if name not in modules:
            raise PlanError(f"plan.steps[{i}][0]: the model has no module {name!r}")
    model.eval()
    graph = tp.DependencyGraph().build_dependency(model, example_inputs=torch.zeros(plan.input_shape))
    try:
        graph.load_pruning_history([[name, out, list(idx)] for name, out, idx in plan.steps])
    except (IndexError, RuntimeError, KeyError) as exc:
        raise PlanError(f"plan.steps: does not fit this model ({type(exc).__name__}: {exc})") from exc
    if verify and plan.result_sha256:
        got = state_digest(model)
        if got != plan.result_sha256:
            raise PlanError(
                f"plan.result_sha256: the replayed model hashes to {got[:16]}..., "
                f"not {plan.result_sha256[:16]}...; is this the model the plan was made for?"
            )
    return model


def steps_from_history(history: Sequence[Sequence[Any]]) -> list[tuple[str, bool, list[int]]]:
    """Torch-Pruning's ``pruning_history()`` as plan steps."""
    return [(str(name), bool(out), sorted(int(i) for i in idx)) for name, out, idx in history]
