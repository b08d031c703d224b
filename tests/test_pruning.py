"""compressor.offline: CNN pruning and its replayable plan, Transformer head/FFN plans, weight PTQ."""

from __future__ import annotations

import copy
import json

import pytest
import torch
import torchvision
from torch import nn

from compressor.offline import (
    CnnPruneConfig,
    PlanError,
    PruningPlan,
    PtqConfig,
    TransformerPlan,
    apply_plan,
    apply_transformer_plan,
    build_transformer,
    decode_indices,
    encode_indices,
    gradient_importance,
    magnitude_importance,
    masked_reference,
    plan_from_scores,
    prune_cnn,
    quantize_weights,
    state_digest,
)
from compressor.offline.transformer import layers_of

X = torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(0))


def tv(arch: str, **kw) -> nn.Module:
    torch.manual_seed(0)
    if arch == "googlenet":
        kw.update(aux_logits=False, init_weights=True)
    return torchvision.models.get_model(arch, weights=None, num_classes=10, **kw).eval()


def params(m: nn.Module) -> int:
    return sum(p.numel() for p in m.parameters())


@pytest.mark.parametrize(
    ("arch", "config"),
    [
        ("resnet18", CnnPruneConfig(ratio=0.5)),  # residual adds
        ("mobilenet_v2", CnnPruneConfig(ratio=0.3, importance="l2", round_to=8)),  # depthwise
        ("googlenet", CnnPruneConfig(ratio=0.5, global_pruning=True)),  # concatenation
        ("regnet_x_400mf", CnnPruneConfig(ratio=0.4, importance="bn_scale")),  # grouped convs
        ("resnet18", CnnPruneConfig(ratio=0.2, layer_ratios={"layer4.1.conv1": 0.75}, ignored_layers=["conv1"])),
    ],
    ids=["resnet18", "mobilenet_v2-l2-round8", "googlenet-global", "regnet-bn", "resnet18-per-layer"],
)
def test_cnn_pruning_plan_replays_exactly(arch: str, config: CnnPruneConfig) -> None:
    original = tv(arch)
    model = copy.deepcopy(original)
    plan = prune_cnn(model, X, config)
    with torch.no_grad():
        out = model(X)
    assert out.shape == (1, 10)  # the classifier is left alone by default
    assert params(model) < params(original)
    text = plan.to_json()
    assert len(text) < 8 << 10, "a plan is a few KB"
    replayed = apply_plan(copy.deepcopy(original), text)
    a, b = replayed.state_dict(), model.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    with torch.no_grad():
        assert torch.equal(replayed(X), out)
    if config.ignored_layers:
        assert model.conv1.out_channels == original.conv1.out_channels
    if config.round_to:
        convs = [m for m in model.modules() if isinstance(m, nn.Conv2d) and m.groups == 1]
        assert sum(m.out_channels % config.round_to == 0 for m in convs) >= len(convs) - 2
    if config.layer_ratios:
        assert model.layer4[1].conv1.out_channels == 128  # 512 * (1 - 0.75)


def test_torchscript_of_pruned_model() -> None:
    # (.pt2 export of a pruned model is exercised by the service test, which loads the artifact)
    model = tv("resnet18")
    prune_cnn(model, X, CnnPruneConfig(ratio=0.5))
    traced = torch.jit.trace(model, X)
    with torch.no_grad():
        assert torch.equal(traced(X), model(X))
    # the served TorchScript's weights are the plan's weights
    assert state_digest(traced) == state_digest(model)


def test_plan_refuses_wrong_model_and_bad_fields() -> None:
    model = tv("resnet18")
    plan = prune_cnn(model, X, CnnPruneConfig(ratio=0.5))
    other = tv("resnet18")
    with torch.no_grad():
        other.conv1.weight.add_(1.0)  # not the model the plan was made for
    with pytest.raises(PlanError, match="result_sha256"):
        apply_plan(other, plan)
    with pytest.raises(PlanError, match="no module"):
        apply_plan(tv("mobilenet_v2"), plan)
    data = plan.to_dict()
    for key, value, match in [
        ("format", "x", "plan.format"),
        ("input_shape", [0], "plan.input_shape"),
        ("steps", [["conv1", "sideways", ""]], r"plan.steps\[0\]\[1\]"),
        ("steps", [["conv1", "out", "!!"]], r"plan.steps\[0\]\[2\]"),
    ]:
        with pytest.raises(PlanError, match=match):
            PruningPlan.from_dict({**data, key: value})
    with pytest.raises(PlanError, match="not JSON"):
        PruningPlan.from_json("{")


def test_cnn_config_errors_name_the_field() -> None:
    model = tv("resnet18")
    for config, match in [
        (CnnPruneConfig(ratio=1.0), "ratio"),
        (CnnPruneConfig(importance="l7"), "importance"),
        (CnnPruneConfig(ignored_layers=["nope"]), "ignored_layers"),
        (CnnPruneConfig(layer_ratios={"conv1": 2.0}), "layer_ratios"),
    ]:
        with pytest.raises(ValueError, match=match):
            prune_cnn(model, X, config)


def test_index_sets_roundtrip_and_refuse_garbage() -> None:
    for items in ([], [0], [1, 3, 8, 9, 1000], list(range(0, 3072, 2))):
        assert decode_indices(encode_indices(items)) == items
    assert len(encode_indices(range(0, 3072, 2))) == 512
    with pytest.raises(ValueError, match="neurons"):
        decode_indices("*?", "neurons")
    with pytest.raises(ValueError):
        encode_indices([-1])


TINY = {
    "bert": {
        "num_hidden_layers": 2,
        "hidden_size": 32,
        "num_attention_heads": 4,
        "intermediate_size": 64,
        "vocab_size": 50,
    },
    "roberta": {
        "num_hidden_layers": 2,
        "hidden_size": 32,
        "num_attention_heads": 4,
        "intermediate_size": 64,
        "vocab_size": 50,
    },
    "distilbert": {"n_layers": 2, "dim": 32, "n_heads": 4, "hidden_dim": 64, "vocab_size": 50},
    "gpt2": {
        "n_layer": 2,
        "n_embd": 32,
        "n_head": 4,
        "vocab_size": 50,
        "n_positions": 32,
        "bos_token_id": 0,
        "eos_token_id": 0,
    },
}


@pytest.mark.parametrize("importance", ["magnitude", "gradient"])
@pytest.mark.parametrize("family", sorted(TINY))
def test_transformer_plan_matches_masked_reference(family: str, importance: str) -> None:
    model = build_transformer(family, TINY[family], seed=1)
    ids = torch.randint(0, 50, (2, 12), generator=torch.Generator().manual_seed(2))
    if importance == "gradient":
        heads, neurons = gradient_importance(model, [{"input_ids": ids}])
    else:
        heads, neurons = magnitude_importance(model)
    plan = TransformerPlan.from_json(plan_from_scores(model, heads, neurons, 0.5, 0.5).to_json())
    widths = [layer.ffn_in.weight.numel() // 32 for layer in layers_of(model)]
    assert all(len(h) == 2 for h in plan.heads.values())
    assert [len(plan.neurons[i]) for i in range(2)] == [w // 2 for w in widths]
    pruned = apply_transformer_plan(copy.deepcopy(model), plan)
    reference = masked_reference(copy.deepcopy(model), plan)
    with torch.no_grad():
        got = pruned(input_ids=ids).last_hidden_state
        want = reference(input_ids=ids).last_hidden_state
        full = model(input_ids=ids).last_hidden_state
    assert got.shape == full.shape
    assert (got - want).abs().max().item() <= 1e-5
    assert not torch.allclose(got, full)  # something was actually removed
    assert params(pruned) < params(model)


def test_bert_base_plan_under_20kb() -> None:
    model = build_transformer("bert", {"vocab_size": 64, "max_position_embeddings": 32}, seed=0)
    heads, neurons = magnitude_importance(model)
    text = plan_from_scores(model, heads, neurons, head_ratio=0.5, ffn_ratio=0.5).to_json()
    assert len(json.loads(text)["heads"]) == 12
    assert len(text) < 20 << 10, len(text)


def test_transformer_plan_errors() -> None:
    model = build_transformer("bert", TINY["bert"])
    good = plan_from_scores(model, *magnitude_importance(model), 0.5, 0.5).to_dict()
    with pytest.raises(PlanError, match="plan.family"):
        apply_transformer_plan(build_transformer("gpt2", TINY["gpt2"]), good)
    with pytest.raises(PlanError, match=r"plan.heads\[0\]"):
        apply_transformer_plan(copy.deepcopy(model), {**good, "heads": {"0": [0, 1, 2, 3]}})
    with pytest.raises(PlanError, match="plan.heads"):
        TransformerPlan.from_dict({**good, "heads": {"7": [0]}})
    with pytest.raises(ValueError, match="head_ratio"):
        plan_from_scores(model, *magnitude_importance(model), 1.5, 0.5)


def test_ptq_weights_on_grid_and_packed_size() -> None:
    model = tv("resnet18")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    packed = quantize_weights(model, PtqConfig(bits=4, clip="percentile"))
    w = model.conv1.weight.detach()
    assert all(len(torch.unique(w[c])) <= 16 for c in range(w.shape[0]))
    assert not torch.equal(w, before["conv1.weight"])
    assert torch.equal(model.bn1.weight, before["bn1.weight"])  # 1-D tensors are left alone
    codes = packed["conv1.weight.qweight"]
    assert codes.dtype == torch.uint8 and codes.numel() == (w.numel() * 4 + 7) // 8
    with pytest.raises(ValueError, match="bits"):
        quantize_weights(model, PtqConfig(bits=7))
    with pytest.raises(ValueError, match="clip"):
        quantize_weights(model, PtqConfig(clip="nonesuch"))


def conv_channels(m: nn.Module) -> dict[str, int]:
    return {n: c.out_channels for n, c in m.named_modules() if isinstance(c, nn.Conv2d)}


def test_readme_safetensors_example_prunes_a_fresh_model() -> None:
    # The README's example: a freshly initialised resnet18, whose BatchNorm gammas are all 1. Global
    # bn_scale ranking used to tie every channel, and Torch-Pruning then pruned nothing.
    model = tv("resnet18")
    assert all(bool((bn.weight == 1).all()) for bn in model.modules() if isinstance(bn, nn.BatchNorm2d))
    reference = copy.deepcopy(model)
    config = CnnPruneConfig(ratio=0.3, global_pruning=True, importance="bn_scale", round_to=8)
    plan = prune_cnn(model, torch.randn(1, 3, 64, 64), config)
    assert plan.steps
    before, after = conv_channels(reference), conv_channels(model)
    removed = 1 - sum(after.values()) / sum(before.values())
    assert 0.15 < removed < 0.45, removed  # about the 30% asked for, not 0
    assert all(c % 8 == 0 for c in after.values() if c != 3)
    replay = apply_plan(copy.deepcopy(reference), plan)
    assert state_digest(replay) == plan.result_sha256


def test_bn_scale_still_ranks_by_gamma_where_gammas_differ() -> None:
    model = tv("resnet18")
    bn = model.bn1
    with torch.no_grad():
        bn.weight.copy_(torch.linspace(1.0, 2.0, bn.num_features))  # channel 0 least important
    prune_cnn(model, X, CnnPruneConfig(ratio=0.25, importance="bn_scale"))
    assert model.bn1.num_features == 48
    # The 16 smallest gammas went, whatever the weights' L1 norms say.
    assert float(model.bn1.weight.min()) == pytest.approx(1.0 + 16 / 63, abs=1e-6)
