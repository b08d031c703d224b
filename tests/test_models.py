"""partitioner.models: specs, loading from every kind of source, fingerprints, calibration."""

from __future__ import annotations

import copy
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from partitioner import (
    ModelLoadError,
    ModelSpec,
    calibrate_batchnorm,
    example_input,
    fingerprint,
    load_model,
    trace,
)

SHAPE = (1, 3, 64, 64)
# Loading a factory by name needs tests/ on the import path whichever way pytest was started.
FACTORY_DIR = str(Path(__file__).parent / "support")  # where a bare "factories:<function>" source resolves
# jit.script / jit.trace warn that TorchScript is deprecated; loading it is still supported.
pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit:FutureWarning")


def _spec(source: str = "resnet18", **kwargs) -> ModelSpec:
    return ModelSpec(name="m", source=source, input_shape=SHAPE, **kwargs)


def _run(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(x)


@pytest.fixture(scope="module")
def resnet18() -> nn.Module:
    return load_model(_spec())


def test_same_spec_gives_same_model_and_fingerprint(resnet18) -> None:
    rng = torch.get_rng_state()
    again = load_model(_spec("torchvision:resnet18"))
    assert torch.equal(torch.get_rng_state(), rng), "seeding must not disturb the global RNG"
    assert not again.training and not resnet18.training
    assert fingerprint(again) == fingerprint(resnet18)
    x = example_input(_spec())
    assert torch.equal(_run(again, x), _run(resnet18, x))
    # The traced graph, which is what daemons fingerprint, agrees as well.
    assert fingerprint(trace(again, x).module) == fingerprint(trace(copy.deepcopy(resnet18), x).module)


def test_fingerprint_changes_with_seed_and_with_one_weight(resnet18) -> None:
    reference = fingerprint(resnet18)
    assert len(reference) == 64 and int(reference, 16) >= 0
    assert fingerprint(load_model(_spec(seed=1))) != reference
    edited = copy.deepcopy(resnet18)
    with torch.no_grad():
        edited.layer3[1].conv2.weight[0, 0, 0, 0] += 1e-3
    assert fingerprint(edited) != reference
    assert fingerprint(resnet18, graph_code="other graph") != reference


def test_torchvision_options(resnet18) -> None:
    small = load_model(_spec(num_classes=10))
    assert _run(small, example_input(_spec())).shape == (1, 10)
    # GoogLeNet is built without its training-only auxiliary classifiers.
    googlenet = load_model(_spec("googlenet"))
    assert not any(k.startswith(("aux1.", "aux2.")) for k in googlenet.state_dict())
    assert _run(googlenet, example_input(_spec())).shape == (1, 1000)


def test_weights_file_round_trip(tmp_path: Path, resnet18) -> None:
    donor = load_model(_spec(seed=7))
    path = tmp_path / "resnet18.pth"
    torch.save(donor.state_dict(), path)
    loaded = load_model(_spec(weights=str(path)))
    x = example_input(_spec())
    assert torch.equal(_run(loaded, x), _run(donor, x))
    assert fingerprint(loaded) == fingerprint(donor) != fingerprint(resnet18)


def test_weights_file_with_pickled_objects_is_refused(tmp_path: Path) -> None:
    ran: list[str] = []
    path = tmp_path / "evil.pth"
    torch.save({"fc.weight": torch.zeros(1), "payload": _Payload(ran)}, path)
    with pytest.raises(ModelLoadError, match="weights file .*evil.pth.* refused.*weights_only"):
        load_model(_spec(weights=str(path)))
    assert ran == [], "unpickling must not have run any code"


class _Payload:
    """Pickles as a call to list.append: loading it unrestricted would run code."""

    def __init__(self, sink: list[str]) -> None:
        self.sink = sink

    def __reduce__(self):
        return (self.sink.append, ("unpickled",))


def test_weights_that_do_not_fit_name_the_file(tmp_path: Path) -> None:
    path = tmp_path / "vgg.pth"
    torch.save({"features.0.weight": torch.zeros(1)}, path)
    with pytest.raises(ModelLoadError, match="weights file .*vgg.pth.* does not fit"):
        load_model(_spec(weights=str(path)))
    path.write_bytes(b"not a checkpoint")
    with pytest.raises(ModelLoadError, match="vgg.pth.* cannot be read"):
        load_model(_spec(weights=str(path)))


def test_safetensors_weights_need_the_package(tmp_path: Path, monkeypatch) -> None:
    path = tmp_path / "w.safetensors"
    path.write_bytes(b"{}")
    # A None entry in sys.modules makes the import fail as if the package were not installed.
    monkeypatch.setitem(sys.modules, "safetensors", None)
    monkeypatch.setitem(sys.modules, "safetensors.torch", None)
    with pytest.raises(ModelLoadError, match="w.safetensors' is safetensors, but the 'safetensors' package"):
        load_model(_spec(weights=str(path)))


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        (_spec(weights="/nonexistent/w.pth"), "model 'm': weights file '/nonexistent/w.pth' not found"),
        (_spec("resnet19"), "unknown torchvision model 'resnet19' \\(did you mean resnet18"),
        (_spec("torchvision:no_such_net"), "unknown torchvision model 'no_such_net'"),
        # The README's pretrained model, misspelt or half-remembered: it is suggested, not only torchvision's.
        (_spec("efficientnet_lite0_pretrainde"), "\\(did you mean efficientnet_lite0_pretrained, efficientnet_"),
        (_spec("efficientnet_lite0"), "\\(did you mean efficientnet_lite0_pretrained, "),
        # `cleave profile --model lite0`: a name meant for another source says how to give one.
        (
            ModelSpec(name="lite0", source="lite0", input_shape=SHAPE),
            "unknown torchvision model 'lite0'; a model under a name of your own is NAME=SOURCE, e.g. lite0=",
        ),
        (_spec("/nonexistent/model.ts"), "source file '/nonexistent/model.ts' not found"),
        (_spec("/nonexistent/model.pt2"), "source file '/nonexistent/model.pt2' not found"),
        (_spec("no_such_package.models:build"), "cannot import 'no_such_package.models'"),
        (_spec("factories:missing"), "'factories' has no attribute 'missing'"),
        (_spec("factories:not_a_module"), "returned int, not a torch.nn.Module"),
        (_spec("factories:broken"), "factory 'factories:broken' failed: RuntimeError: factory exploded"),
        (_spec("factories:tiny_cnn", num_classes=3), "num_classes applies only to torchvision"),
        (_spec("not a source!"), "source 'not a source!' is neither"),
    ],
)
def test_load_errors_name_the_problem(spec: ModelSpec, message: str, monkeypatch) -> None:
    monkeypatch.syspath_prepend(FACTORY_DIR)
    with pytest.raises(ModelLoadError, match=message):
        load_model(spec)


def test_factory_source_is_seeded(monkeypatch) -> None:
    monkeypatch.syspath_prepend(FACTORY_DIR)
    spec = _spec("factories:tiny_cnn")
    first, second = load_model(spec), load_model(spec)
    assert isinstance(first, nn.Sequential) and not first.training
    assert fingerprint(first) == fingerprint(second)
    assert fingerprint(load_model(_spec("factories:tiny_cnn", seed=1))) != fingerprint(first)


class _Tiny(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.bn = nn.BatchNorm2d(4)
        self.fc = nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.relu(self.bn(self.conv(x)))
        return self.fc(y.mean((2, 3)))


@pytest.fixture(scope="module")
def tiny() -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    torch.manual_seed(0)
    model = _Tiny().eval()
    x = torch.randn(1, 3, 16, 16)
    return model, x, _run(model, x)


@pytest.mark.parametrize("suffix", [".ts", ".pt"])
def test_torchscript_source_loads_and_runs(tmp_path: Path, tiny, suffix: str) -> None:
    model, x, expected = tiny
    path = tmp_path / f"tiny{suffix}"
    torch.jit.save(torch.jit.script(model), str(path))
    loaded = load_model(_spec(str(path)))
    assert isinstance(loaded, torch.jit.ScriptModule)
    assert torch.equal(_run(loaded, x), expected)
    assert fingerprint(loaded) == fingerprint(load_model(_spec(str(path))))


def test_torchscript_source_that_is_not_an_archive(tmp_path: Path) -> None:
    path = tmp_path / "weights.pt"
    torch.save({"w": torch.zeros(1)}, path)
    with pytest.raises(ModelLoadError, match="weights.pt' is not a TorchScript archive"):
        load_model(_spec(str(path)))


def test_exported_program_source_loads_runs_and_splits(tmp_path: Path, tiny) -> None:
    model, x, expected = tiny
    path = tmp_path / "tiny.pt2"
    torch.export.save(torch.export.export(model, (x,)), str(path))
    loaded = load_model(_spec(str(path)))
    assert torch.equal(_run(loaded, x), expected)
    graph = trace(loaded, x)
    assert not graph.opaque and len(graph.cuts) >= 4
    for cut in graph.cuts:
        head, tail = graph.split(cut)
        with torch.no_grad():
            assert torch.equal(tail(*head(x)), expected), cut


def _bn_stats(model: nn.Module) -> list[torch.Tensor]:
    return [t.clone() for name, t in model.state_dict().items() if "running_" in name]


def test_calibrate_batchnorm_changes_stats_deterministically() -> None:
    spec = _spec("mobilenet_v3_small")
    model, twin = load_model(spec), load_model(spec)
    before = _bn_stats(model)
    momenta = [m.momentum for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    assert calibrate_batchnorm(model, SHAPE, batches=3) is model
    after = _bn_stats(model)
    assert not model.training and not any(m.training for m in model.modules())
    assert [m.momentum for m in model.modules() if isinstance(m, nn.BatchNorm2d)] == momenta
    assert all(not torch.equal(a, b) for a, b in zip(before, after, strict=True))
    assert all(torch.isfinite(t).all() for t in after)
    calibrate_batchnorm(twin, SHAPE, batches=3)
    assert all(torch.equal(a, b) for a, b in zip(after, _bn_stats(twin), strict=True))
    calibrate_batchnorm(twin, SHAPE, batches=3, seed=1)
    assert not all(torch.equal(a, b) for a, b in zip(after, _bn_stats(twin), strict=True))


def test_calibrated_statistics_are_a_cumulative_average(tiny) -> None:
    model = copy.deepcopy(tiny[0])
    batch_means: list[torch.Tensor] = []
    model.bn.register_forward_hook(lambda m, args, out: batch_means.append(args[0].mean((0, 2, 3))))
    calibrate_batchnorm(model, (4, 3, 16, 16), batches=3)
    assert len(batch_means) == 3 and int(model.bn.num_batches_tracked) == 3
    # momentum=None: every batch weighs the same, unlike an exponential moving average.
    torch.testing.assert_close(model.bn.running_mean, torch.stack(batch_means).mean(0))


def test_example_input_is_deterministic_and_image_like() -> None:
    x = example_input(_spec())
    assert x.shape == SHAPE and x.dtype == torch.float32
    assert torch.equal(x, example_input(_spec()))
    assert not torch.equal(x, example_input(_spec(seed=1)))
    # Normalised-image range, and smooth: neighbouring pixels are far closer than noise.
    assert -3 < x.min() < x.max() < 3
    assert (x[..., 1:] - x[..., :-1]).abs().mean() < 0.25 * x.std()
    assert example_input(ModelSpec("t", "m:f", input_shape=(2, 16))).shape == (2, 16)


def test_spec_from_dict() -> None:
    spec = ModelSpec.from_dict(
        {"name": "r", "source": "resnet18", "input_shape": [1, 3, 32, 32], "num_classes": 10, "seed": 3}
    )
    assert spec == ModelSpec("r", "resnet18", None, (1, 3, 32, 32), 10, 3)
    assert ModelSpec.from_dict({"name": "r", "source": "x.ts"}).input_shape == (1, 3, 224, 224)


@pytest.mark.parametrize(
    ("data", "key"),
    [
        ({"name": "r", "source": "resnet18", "colour": "red"}, "'colour'"),
        ({"name": "r"}, "missing required key 'source'"),
        ({"name": "r", "source": "resnet18", "input_shape": "1x3x224x224"}, "'input_shape'"),
        ({"name": "r", "source": "resnet18", "input_shape": [1, 3, 0, 224]}, "'input_shape'"),
        ({"name": "r", "source": "resnet18", "num_classes": "10"}, "'num_classes'"),
        ({"name": "r", "source": "resnet18", "seed": True}, "'seed'"),
        ({"name": "r", "source": "resnet18", "weights": 5}, "'weights'"),
        ({"name": "", "source": "resnet18"}, "'name'"),
        ({"name": "r", "source": None}, "'source'"),
    ],
)
def test_spec_from_dict_rejects_bad_keys_and_types(data: dict, key: str) -> None:
    with pytest.raises(ValueError, match=key):
        ModelSpec.from_dict(data)
