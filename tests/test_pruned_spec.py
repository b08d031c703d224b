"""A model spec with a pruning plan: the edge (or cloud) replays the plan on its own copy of the
original model, and the result serves split inference exactly like the pruned model."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from compressor.offline import CnnPruneConfig, prune_cnn
from partitioner.loaded import LoadedModel
from partitioner.models import ModelLoadError, ModelSpec, load_model

SPEC = {"name": "r18", "source": "resnet18", "input_shape": [1, 3, 64, 64]}


@pytest.fixture(scope="module")
def pruned(tmp_path_factory: pytest.TempPathFactory) -> tuple[torch.nn.Module, Path]:
    model = load_model(ModelSpec.from_dict(SPEC))
    plan = prune_cnn(model, torch.randn(1, 3, 64, 64), CnnPruneConfig(ratio=0.5))
    path = tmp_path_factory.mktemp("plan") / "plan.json"
    path.write_text(plan.to_json())
    return model, path


def test_plan_in_spec_reproduces_the_pruned_model(pruned) -> None:
    reference, path = pruned
    assert path.stat().st_size < 20_000
    model = LoadedModel.load(ModelSpec.from_dict({**SPEC, "pruning_plan": str(path)}))
    original = LoadedModel.load(ModelSpec.from_dict(SPEC))
    assert model.fingerprint != original.fingerprint  # a session cannot mix pruned and unpruned halves
    x = torch.randn(2, 3, 64, 64)
    with torch.inference_mode():
        assert torch.equal(model.module(x), reference(x))
        for cut in model.graph.cuts[:: max(len(model.graph.cuts) // 8, 1)]:
            _, head, tail = model.parts(cut.index)
            assert torch.equal(tail(*head(x)), reference(x))
    params = sum(p.numel() for p in model.module.parameters())
    assert params < 0.5 * sum(p.numel() for p in original.module.parameters())


def test_bad_plans_name_the_problem(tmp_path: Path) -> None:
    with pytest.raises(ModelLoadError, match="pruning plan 'nope.json' not found"):
        load_model(ModelSpec.from_dict({**SPEC, "pruning_plan": "nope.json"}))
    bad = tmp_path / "bad.json"
    bad.write_text("[1, 2]")
    with pytest.raises(ModelLoadError, match="pruning plan"):
        load_model(ModelSpec.from_dict({**SPEC, "pruning_plan": str(bad)}))
