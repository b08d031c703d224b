"""Engines run in-process (no daemon): quantization, the sweep with its Pareto report, user engines
from the ``cleave.engines`` entry-point group, and engine failures naming the field."""

from __future__ import annotations

import json
from importlib.metadata import EntryPoint
from pathlib import Path

import numpy as np
import pytest
import torch

from cloud_node.jobs import engines
from cloud_node.jobs.engines import JobContext, Quantize, Sweep, get_engine
from cloud_node.jobs.models import ModelSource
from protos.cleave.v1 import compression_pb2 as pb


def context(tmp_path: Path, spec: pb.JobSpec, source: ModelSource, **kw) -> JobContext:
    seen: list[tuple[float, str]] = []
    ctx = JobContext(spec=spec, source=source, workdir=tmp_path, on_progress=lambda f, s: seen.append((f, s)), **kw)
    ctx.seen = seen  # type: ignore[attr-defined]
    return ctx


class EchoEngine:
    """A user engine, as a package would register it."""

    name = "echo"

    def run(self, ctx: JobContext) -> None:
        ctx.progress(0.5, "echoing")
        ctx.write_artifact("echo.json", json.dumps(dict(ctx.spec.params)), "application/json")
        ctx.report["echo"] = dict(ctx.spec.params)


def test_user_engines_come_from_entry_points(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    ep = EntryPoint(name="echo", value=f"{__name__}:EchoEngine", group=engines.ENTRY_POINT_GROUP)
    shadow = EntryPoint(name="quantize", value=f"{__name__}:EchoEngine", group=engines.ENTRY_POINT_GROUP)
    monkeypatch.setattr(engines, "entry_points", lambda group: [ep, shadow] if group == ep.group else [])
    assert engines.dispatch("echo", "model") == "echo"
    assert isinstance(get_engine("quantize"), Quantize)  # built-ins cannot be replaced
    ctx = context(tmp_path, pb.JobSpec(params={"a": "b"}), ModelSource())
    get_engine("echo").run(ctx)
    assert json.loads((tmp_path / "echo.json").read_text()) == {"a": "b"} and ctx.seen == [(0.5, "echoing")]
    with pytest.raises(ValueError, match="engine"):
        get_engine("missing")


def test_quantize_engine_reports_sizes(tmp_path: Path) -> None:
    spec = pb.JobSpec(engine="quantize", quantize=pb.QuantizeOptions(bits=4, clip="percentile"))
    ctx = context(tmp_path, spec, ModelSource(torchvision="resnet18", input_shape=(1, 3, 32, 32)))
    Quantize().run(ctx)
    r = ctx.report
    assert r["after"]["size_bytes"] == (tmp_path / "model.qweights.safetensors").stat().st_size
    assert r["after"]["size_bytes"] < r["before"]["size_bytes"] / 6  # 4-bit codes vs fp32
    assert "only for 8-bit" in r["int8_execution"]
    bad = context(tmp_path, pb.JobSpec(quantize=pb.QuantizeOptions(clip="nonesuch")), ModelSource())
    with pytest.raises(ValueError, match="clip"):
        Quantize().run(bad)


def test_lapq_weights_beat_their_initialisation(tmp_path: Path) -> None:
    spec = pb.JobSpec(engine="quantize", quantize=pb.QuantizeOptions(bits=4, clip="lapq", per_tensor=True))
    ctx = context(tmp_path, spec, ModelSource(torchvision="resnet18", input_shape=(1, 3, 32, 32)))
    Quantize().run(ctx)
    lapq = ctx.report["lapq"]
    assert ctx.report["clip"] == "lapq" and lapq["evals"] >= 1
    assert lapq["loss"] <= lapq["init_loss"]  # LAPQ never ends worse than its Lp initialisation
    assert ctx.report["after"]["size_bytes"] < ctx.report["before"]["size_bytes"] / 6


def test_8_bit_quantize_job_ships_a_model_on_int8_kernels(tmp_path: Path) -> None:
    from partitioner.quantized_head import QuantizedHead

    spec = pb.JobSpec(engine="quantize", quantize=pb.QuantizeOptions(bits=8))
    ctx = context(tmp_path, spec, ModelSource(torchvision="resnet18", input_shape=(1, 3, 32, 32)))
    Quantize().run(ctx)
    int8 = ctx.report["int8_execution"]
    assert int8["artifact"] == "model.int8.pt" and int8["size_bytes"] < ctx.report["before"]["size_bytes"] / 3
    head = QuantizedHead.load(tmp_path / "model.int8.pt")
    assert any(op.startswith("QLinear") for op in head.op_types)  # real int8 kernels, not fake-quant
    model, _ = ctx.load_model()
    x = torch.randn(2, 3, 32, 32)
    with torch.inference_mode():
        ref = model(x)
    (out,) = head(x)
    cosine = torch.nn.functional.cosine_similarity(out.flatten(), ref.flatten(), dim=0)
    assert out.shape == ref.shape and float(cosine) >= 0.98


def test_sweep_writes_pareto_json_and_png(tmp_path: Path) -> None:
    data = tmp_path / "d.npz"
    rng = np.random.default_rng(0)
    np.savez(data, inputs=rng.standard_normal((4, 3, 32, 32)).astype(np.float32), labels=rng.integers(0, 10, 4))
    spec = pb.JobSpec(engine="sweep", sweep=pb.SweepOptions(ratios=[0.0, 0.5], bits=[32, 4], parallelism=2))
    source = ModelSource(torchvision="resnet18", input_shape=(1, 3, 32, 32), num_classes=10)
    ctx = context(tmp_path, spec, source, dataset_path=str(data), dataset_format="npz")
    Sweep().run(ctx)
    result = json.loads((tmp_path / "sweep.json").read_text())
    points = {(p["ratio"], p["bits"]): p for p in result["points"]}
    assert set(points) == {(0.0, 32), (0.0, 4), (0.5, 32), (0.5, 4)}
    assert points[(0.5, 4)]["size_bytes"] < points[(0.5, 32)]["size_bytes"] < points[(0.0, 32)]["size_bytes"]
    assert points[(0.5, 32)]["macs"] < points[(0.0, 32)]["macs"]
    assert all("accuracy" in p for p in points.values()) and any(p["pareto"] for p in points.values())
    assert (tmp_path / "sweep.png").read_bytes()[:4] == b"\x89PNG"
    assert ctx.seen[-1][1] == "4/4 configurations"
    with pytest.raises(ValueError, match="sweep.bits"):
        Sweep().run(context(tmp_path, pb.JobSpec(sweep=pb.SweepOptions(bits=[7])), source))


def test_prune_engine_refuses_torchscript_model(tmp_path: Path) -> None:
    path = tmp_path / "m.ts"
    torch.jit.save(torch.jit.script(torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3))), str(path))
    source = ModelSource(upload_path=str(path), upload_format="TORCHSCRIPT", input_shape=(1, 3, 8, 8))
    with pytest.raises(ValueError, match="model: structured pruning needs"):
        get_engine("prune_cnn").run(context(tmp_path, pb.JobSpec(prune=pb.PruneOptions(ratio=0.5)), source))
    # ... but it can be quantized
    ctx = context(tmp_path, pb.JobSpec(quantize=pb.QuantizeOptions(bits=8)), source)
    Quantize().run(ctx)
    assert ctx.report["artifact_bytes"] > 0


def test_readme_safetensors_prune_job_prunes_what_it_says(tmp_path: Path) -> None:
    import torchvision
    from safetensors.torch import save_file

    torch.manual_seed(0)
    weights = tmp_path / "r18.safetensors"
    save_file(torchvision.models.resnet18(num_classes=10).state_dict(), str(weights))
    source = ModelSource(
        upload_path=str(weights),
        upload_format="SAFETENSORS",
        upload_meta={"architecture": "resnet18", "num_classes": 10},
        input_shape=(1, 3, 64, 64),
    )
    options = pb.PruneOptions(ratio=0.3, global_pruning=True, importance="bn_scale", round_to=8)
    ctx = context(tmp_path, pb.JobSpec(engine="prune_cnn", prune=options), source)
    get_engine("prune_cnn").run(ctx)
    report = ctx.report
    assert report["steps"] > 0 and "warning" not in report
    assert report["after"]["parameters"] < 0.85 * report["before"]["parameters"]


def test_prune_job_that_removes_nothing_says_so(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    from cleave_cli.compress_cmd import warn_from_report

    spec = pb.JobSpec(engine="prune_cnn", prune=pb.PruneOptions(ratio=0.0), skip_evaluation=True)
    ctx = context(tmp_path, spec, ModelSource(torchvision="resnet18", input_shape=(1, 3, 32, 32)))
    get_engine("prune_cnn").run(ctx)
    assert ctx.report["steps"] == 0
    assert ctx.report["warning"].startswith("nothing was pruned: the ratio is 0")
    # What the CLI does with the finished job's report.
    warn_from_report(pb.Job(id="j1", report_json=json.dumps(ctx.report, default=str)))
    assert "warning: job j1: nothing was pruned" in capsys.readouterr().err


def test_transformer_prune_job_that_removes_nothing_says_so(tmp_path: Path) -> None:
    config = {"num_hidden_layers": 2, "hidden_size": 32, "num_attention_heads": 4, "intermediate_size": 64}
    source = ModelSource(transformer="bert", config={**config, "vocab_size": 50}, input_shape=(1, 8))
    empty = pb.PruneOptions(head_ratio=0.0, ffn_ratio=0.0)
    ctx = context(tmp_path, pb.JobSpec(engine="prune_transformer", prune=empty, skip_evaluation=True), source)
    get_engine("prune_transformer").run(ctx)
    assert ctx.report["warning"].startswith("nothing was pruned: head_ratio 0.0 and ffn_ratio 0.0")
    some = pb.PruneOptions(head_ratio=0.5, ffn_ratio=0.5)
    ctx = context(tmp_path, pb.JobSpec(engine="prune_transformer", prune=some, skip_evaluation=True), source)
    get_engine("prune_transformer").run(ctx)
    assert ctx.report["heads_pruned"] and "warning" not in ctx.report


def test_sweep_with_a_dataset_trades_accuracy_against_size(tmp_path: Path) -> None:
    from cloud_node.jobs.models import load

    source = ModelSource(torchvision="resnet18", input_shape=(1, 3, 32, 32), num_classes=10)
    model, _ = load(source)
    inputs = torch.randn(32, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    with torch.inference_mode():
        labels = model(inputs).argmax(1)  # the original's own answers: it scores 1.0, compression less
    data = tmp_path / "d.npz"
    np.savez(data, inputs=inputs.numpy(), labels=labels.numpy())
    spec = pb.JobSpec(engine="sweep", sweep=pb.SweepOptions(ratios=[0.0, 0.5], bits=[32, 2], parallelism=2))
    ctx = context(tmp_path, spec, source, dataset_path=str(data), dataset_format="npz")
    Sweep().run(ctx)
    points = {(p["ratio"], p["bits"]): p for p in json.loads((tmp_path / "sweep.json").read_text())["points"]}
    assert all(isinstance(p["accuracy"], float) for p in points.values())
    assert points[(0.0, 32)]["accuracy"] == 1.0
    smallest = min(points, key=lambda k: points[k]["size_bytes"])
    assert points[smallest]["accuracy"] < 1.0
    front = {k for k, p in points.items() if p["pareto"]}
    assert {(0.0, 32), smallest} <= front  # the most accurate and the smallest: a trade-off, not one point
    report = ctx.report
    assert report["metric"] == "accuracy"
    assert {(p["ratio"], p["bits"]): p["accuracy"] for p in report["pareto"]} == {
        k: points[k]["accuracy"] for k in front
    }


def test_an_input_shape_the_model_cannot_take_names_the_field(tmp_path: Path) -> None:
    # `cleave compress --model resnet18 --input-shape 1,3,64` failed "RuntimeError: Given groups=1, weight of
    # size [64, 3, 7, 7], expected input[1, 1, 3, 64] to have 3 channels", naming no option.
    source = ModelSource(torchvision="resnet18", input_shape=(1, 3, 64))
    ctx = context(tmp_path, pb.JobSpec(engine="quantize"), source)
    with pytest.raises(
        ValueError, match=r"^spec\.model\.input_shape: the model cannot run on an input of shape 1,3,64 "
    ):
        ctx.load_model()
    model, example = context(
        tmp_path, pb.JobSpec(), ModelSource(torchvision="resnet18", input_shape=(1, 3, 32, 32))
    ).load_model()
    assert tuple(example.shape) == (1, 3, 32, 32) and not model.training
