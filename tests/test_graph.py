"""partitioner.graph: tracing, cuts and live sets, and the exact head/tail split."""

from __future__ import annotations

import math
import random
from typing import NamedTuple

import pytest
import torch
import torchvision
from torch import nn

from partitioner import Cut, ModelGraph, TraceError, trace

TORCHVISION_MODELS = [
    "resnet18",
    "resnet50",
    "mobilenet_v2",
    "mobilenet_v3_small",
    "googlenet",
    "vgg11",
    "densenet121",
    "efficientnet_b0",
]


def _run_split(graph: ModelGraph, key: int | str | Cut, x: torch.Tensor) -> tuple[tuple, object]:
    """Head outputs and tail result for one cut.

    The live values are cloned before the tail sees them, as the wire would copy them: a
    tail that only works because it shares storage with the head would fail here.
    """
    head, tail = graph.split(key)
    with torch.no_grad():
        live = head(x)
        return live, tail(*(t.clone() for t in live))


def _kind(graph: ModelGraph, cut: Cut) -> tuple[str, str]:
    """What a node does: its module type for call_module nodes, else its op and target."""
    if cut.op == "call_module":
        return cut.op, type(graph.module.get_submodule(cut.target)).__name__
    return cut.op, cut.target


def _sample_cuts(graph: ModelGraph, n_random: int = 10) -> list[Cut]:
    """One cut per kind of node, the first and last cuts, and n_random seeded random cuts."""
    by_kind: dict[tuple[str, str], Cut] = {}
    for cut in graph.cuts:
        by_kind.setdefault(_kind(graph, cut), cut)
    picked = {c.index: c for c in by_kind.values()}
    picked.update({c.index: c for c in (graph.cuts[0], graph.cuts[-1])})
    picked.update({c.index: c for c in random.Random(0).sample(graph.cuts, n_random)})
    return [picked[i] for i in sorted(picked)]


@pytest.fixture(scope="module", params=TORCHVISION_MODELS)
def traced(request: pytest.FixtureRequest) -> tuple[str, nn.Module, torch.Tensor, torch.Tensor, ModelGraph]:
    name = request.param
    torch.manual_seed(0)
    # GoogLeNet's auxiliary heads only run in training; see partitioner.models.
    kwargs = {"aux_logits": False, "init_weights": True} if name == "googlenet" else {}
    model = torchvision.models.get_model(name, weights=None, **kwargs).eval()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        expected = model(x)
    return name, model, x, expected, trace(model, x)


def test_torchvision_split_is_exact_at_every_kind_of_node(traced) -> None:
    name, _, x, expected, graph = traced
    assert expected.std() > 0, "a constant output would make equality meaningless"
    sample = _sample_cuts(graph)
    assert {_kind(graph, c) for c in sample} == {_kind(graph, c) for c in graph.cuts}
    for cut in sample:
        live, out = _run_split(graph, cut, x)
        assert isinstance(live, tuple) and len(live) == len(cut.live), (name, cut)
        assert tuple(tuple(t.shape) for t in live) == cut.shapes, (name, cut)
        assert all(str(t.dtype) == f"torch.{d}" for t, d in zip(live, cut.dtypes, strict=True)), (name, cut)
        # Head and tail run the traced model's own nodes in its order: bit-exact, not close.
        assert torch.equal(out, expected), (name, cut.index, cut.name)


def test_torchvision_cut_metadata_is_consistent(traced) -> None:
    _, _, x, _, graph = traced
    nodes = list(graph.module.graph.nodes)
    indices = [c.index for c in graph.cuts]
    assert indices == sorted(set(indices))
    assert graph.cuts[0].index == 0 and graph.cuts[0].op == "placeholder"
    assert graph.cuts[0].live == (graph.cuts[0].name,) and graph.cuts[0].shapes == (tuple(x.shape),)
    assert nodes[graph.cuts[-1].index + 1].op == "output"
    for cut in graph.cuts:
        assert nodes[cut.index].name == cut.name and nodes[cut.index].op == cut.op
        assert cut.op != "get_attr"
        assert len(cut.live) == len(cut.shapes) == len(cut.dtypes) >= 1
        assert cut.nbytes == sum(math.prod(s) * 4 for s in cut.shapes)
        assert graph.cut(cut.index) is graph.cut(cut.name) is graph.cut(cut) is cut


@pytest.fixture(scope="module")
def resnet18() -> tuple[torch.Tensor, ModelGraph]:
    torch.manual_seed(0)
    x = torch.randn(1, 3, 64, 64)
    return x, trace(torchvision.models.resnet18(weights=None), x)


def test_resnet18_live_sets_inside_and_between_blocks(resnet18) -> None:
    x, graph = resnet18
    # Inside a block the block input is still needed by the skip connection.
    assert graph.cut("layer1_0_conv1").live == ("maxpool", "layer1_0_conv1")
    assert graph.cut("layer2_0_bn2").live == ("layer1_1_relu_1", "layer2_0_bn2")
    # Between blocks only the block output crosses.
    assert graph.cut("layer1_0_relu_1").live == ("layer1_0_relu_1",)
    assert graph.cut("layer3_1_relu_1").live == ("layer3_1_relu_1",)
    assert graph.cut("fc").live == ("fc",)

    cut = graph.cut("layer2_0_bn2")
    live, _ = _run_split(graph, cut, x)
    assert cut.shapes == ((1, 64, 16, 16), (1, 128, 8, 8)) == tuple(tuple(t.shape) for t in live)
    assert cut.nbytes == (64 * 16 * 16 + 128 * 8 * 8) * 4


def test_cut_lookup_by_index_name_and_errors(resnet18) -> None:
    _, graph = resnet18
    cut = graph.cuts[5]
    assert graph.cut(cut.index) == graph.cut(cut.name) == cut
    assert graph.split(cut.index) is graph.split(cut.name)  # built once, cached
    with pytest.raises(KeyError, match="no_such_node"):
        graph.cut("no_such_node")
    with pytest.raises(KeyError, match="10000.*valid cuts include 0 \\('x'\\)"):
        graph.cut(10_000)
    foreign = Cut(5, "bogus", "call_module", "bogus", ("x",), ((1,),), ("float32",), 4)
    with pytest.raises(KeyError, match="bogus"):
        graph.cut(foreign)


class Gate(nn.Module):
    """Data-dependent control flow: fx cannot trace through this."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.mean() > 0:
            return x * 2
        return x - 1


class GatedBlock(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 3, padding=1)
        self.gate = Gate()
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.gate(self.conv(x))
        out += x
        return self.relu(out)


class GatedNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.block = GatedBlock()
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(3, 4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.block(x))


def _assert_every_cut_exact(model: nn.Module, x: torch.Tensor) -> ModelGraph:
    graph = trace(model, x)
    with torch.no_grad():
        expected = model(x)
    for cut in graph.cuts:
        _, out = _run_split(graph, cut, x)
        assert type(out) is type(expected), cut
        if isinstance(expected, torch.Tensor):
            assert torch.equal(out, expected), cut
        else:
            values = expected.values() if isinstance(expected, dict) else expected
            got = out.values() if isinstance(out, dict) else out
            assert all(torch.equal(a, b) for a, b in zip(got, values, strict=True)), cut
    return graph


def test_submodule_with_control_flow_becomes_a_leaf() -> None:
    torch.manual_seed(0)
    x = torch.randn(1, 3, 8, 8)
    graph = _assert_every_cut_exact(GatedNet(), x)
    gate = [c for c in graph.cuts if c.target == "block.gate"]
    assert len(gate) == 1 and gate[0].op == "call_module"
    # Only the failing submodule is opaque: its siblings are still separate cut points.
    assert {"block.conv", "block.relu", "head.2"} <= {c.target for c in graph.cuts}


class RootBranch(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv(x)
        if y.sum() > 0:
            return y
        return -y


def test_control_flow_in_root_forward_raises_trace_error() -> None:
    with pytest.raises(TraceError, match=r"root module \(RootBranch\.forward\).*control flow.*if y\.sum\(\) > 0"):
        trace(RootBranch(), torch.randn(1, 3, 8, 8))


class SizeReshape(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.fc = nn.Linear(4 * 6 * 6, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.relu(self.conv(x))
        n, c = y.size(0), y.size(1)
        return self.fc(y.view(n, c, -1).flatten(1))


def test_shape_arithmetic_is_recomputed_by_the_tail() -> None:
    graph = _assert_every_cut_exact(SizeReshape(), torch.randn(1, 3, 8, 8))
    nodes = list(graph.module.graph.nodes)
    sizes = [n.name for n in nodes if n.op == "call_method" and n.target == "size"]
    assert len(sizes) == 2
    # Between the first size() and the view() that consumes the ints, the ints are alive: they are
    # recomputed on the tail side, not sent, and the cuts there are as good as any other.
    assert [c.name for c in graph.cuts] == [n.name for n in nodes[:-1]]
    cut = graph.cut(sizes[1])
    assert cut.live == ("relu",) and cut.recomputed == tuple(sizes)
    assert graph.not_cuts() == []


class BatchFromInput(nn.Module):
    """The EfficientNet pattern: ``bs = inputs.size(0)`` stays alive until ``x.view(bs, -1)``."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.fc = nn.Linear(4, 5)

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        bs = inputs.size(0)
        x = torch.relu(self.conv(inputs))
        x = nn.functional.adaptive_avg_pool2d(x, 1)
        return self.fc(x.view(bs, -1))


def test_batch_size_of_a_gone_input_is_read_from_a_crossing_tensor() -> None:
    graph = _assert_every_cut_exact(BatchFromInput(), torch.randn(2, 3, 8, 8))
    nodes = list(graph.module.graph.nodes)
    assert [c.name for c in graph.cuts] == [n.name for n in nodes[:-1]]
    conv = graph.cut("conv")
    assert conv.live == ("conv",) and conv.recomputed == ("size",)
    # The tail's batch size follows the batch it is given, not the one at tracing.
    head, tail = graph.split(conv)
    x = torch.randn(5, 3, 8, 8)
    with torch.no_grad():
        assert torch.equal(tail(*head(x)), graph.module(x))


class ChannelsFromInput(nn.Module):
    """``c = inputs.size(1)`` (3) matches no tensor that crosses later: those cuts stay refused."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        c = inputs.size(1)
        y = torch.relu(self.conv(inputs))
        return y.flatten(1)[:, :c]


def test_shape_values_without_a_stand_in_are_listed_as_not_cuts() -> None:
    graph = _assert_every_cut_exact(ChannelsFromInput(), torch.randn(1, 3, 8, 8))
    refused = {n.name: n.reason for n in graph.not_cuts()}
    assert set(refused) == {"conv", "relu", "flatten"}
    assert "'inputs', which does not cross" in refused["conv"]
    with pytest.raises(KeyError, match="does not cross"):
        graph.cut("relu")


class Pair(NamedTuple):
    logits: torch.Tensor
    features: torch.Tensor


class MultiOutput(nn.Module):
    def __init__(self, kind: str) -> None:
        super().__init__()
        self.kind = kind
        self.conv = nn.Conv2d(3, 4, 3)
        self.fc = nn.Linear(4, 2)

    def forward(self, x: torch.Tensor):
        features = torch.relu(self.conv(x))
        logits = self.fc(features.mean((2, 3)))
        if self.kind == "tuple":
            return logits, features
        if self.kind == "dict":
            return {"logits": logits, "features": features}
        return Pair(logits, features)


@pytest.mark.parametrize("kind", ["tuple", "dict", "namedtuple"])
def test_structured_output_keeps_its_structure(kind: str) -> None:
    graph = _assert_every_cut_exact(MultiOutput(kind), torch.randn(1, 3, 8, 8))
    assert graph.output_shapes == ((1, 2), (1, 4, 6, 6))
    assert graph.output_nbytes == (2 + 4 * 6 * 6) * 4
    # The last cut sends both outputs; the tail only restructures them.
    assert graph.cuts[-1].live == ("relu", "fc")


class ScaledConv(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.scale = nn.Parameter(torch.full((1, 4, 1, 1), 0.5))

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        scale = self.scale
        y = self.conv(x)
        if mask is not None:
            y = y * mask
        return y * scale


def test_attributes_are_reread_by_the_tail_and_defaults_are_pinned() -> None:
    graph = _assert_every_cut_exact(ScaledConv(), torch.randn(1, 3, 8, 8))
    nodes = list(graph.module.graph.nodes)
    scale = next(i for i, n in enumerate(nodes) if n.op == "get_attr")
    assert scale not in {c.index for c in graph.cuts}
    # The parameter is used after the conv cut but never crosses the link.
    assert graph.cut("conv").live == ("conv",)
    # The None check on the pinned default runs first; its (None) result never crosses.
    assert graph.cut("_assert_is_none").live == ("x",)
    with pytest.raises(KeyError, match="get_attr"):
        graph.cut(scale)


class TinyNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.bn = nn.BatchNorm2d(4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.bn(self.conv(x)))


@pytest.mark.filterwarnings("ignore:`torch.jit:FutureWarning")
def test_torchscript_gives_an_opaque_graph_with_two_exact_cuts() -> None:
    torch.manual_seed(0)
    x = torch.randn(1, 3, 8, 8)
    scripted = torch.jit.script(TinyNet().eval())
    with torch.no_grad():
        expected = scripted(x)
    graph = trace(scripted, x)
    assert graph.opaque
    assert [(c.index, c.name, c.op) for c in graph.cuts] == [
        (0, "x", "placeholder"),
        (1, "output", "call_module"),
    ]
    assert graph.cuts[0].shapes == ((1, 3, 8, 8),) and graph.cuts[1].shapes == ((1, 4, 6, 6),)
    for cut in graph.cuts:
        live, out = _run_split(graph, cut, x)
        assert len(live) == 1 and tuple(live[0].shape) == cut.shapes[0]
        assert torch.equal(out, expected)


@pytest.mark.filterwarnings("ignore:`torch.jit:FutureWarning")
def test_opaque_model_with_tuple_output_only_offers_the_input_cut() -> None:
    x = torch.randn(1, 3, 8, 8)
    scripted = torch.jit.trace(MultiOutput("tuple").eval(), x)
    graph = trace(scripted, x)
    assert graph.opaque and graph.output_shapes == ((1, 2), (1, 4, 6, 6))
    assert [c.index for c in graph.cuts] == [0]
    with pytest.raises(KeyError, match="returns tuple"):
        graph.cut("output")


def test_tracing_records_what_torch_shapeprop_records() -> None:
    """The cut finder reads each node's ``tensor_meta`` and ``type``: recorded as torch's ShapeProp records them."""
    import torch.fx
    from torch.fx.passes.shape_prop import ShapeProp

    class Pair(nn.Module):  # a tuple output, an int, a channels-last tensor
        def forward(self, x: torch.Tensor):
            y = torch.relu(x).contiguous(memory_format=torch.channels_last)
            return y, x.size(1) * 2, y.flatten(1)

    x = torch.randn(2, 3, 16, 16)
    for model in (torchvision.models.resnet18().eval(), Pair()):
        ours = trace(model, x).module
        theirs = torch.fx.symbolic_trace(model)
        with torch.no_grad():
            ShapeProp(theirs).propagate(x.clone())
        got = [(n.name, n.meta.get("tensor_meta"), n.meta.get("type")) for n in ours.graph.nodes]
        want = [(n.name, n.meta.get("tensor_meta"), n.meta.get("type")) for n in theirs.graph.nodes]
        assert got == want
        assert any(m is not None for _, m, _ in got)


def test_loading_a_model_does_not_import_sympy() -> None:
    """ShapeProp imports torch's symbolic shapes (sympy) on its first node: half a second of every model load."""
    import subprocess
    import sys

    probe = (
        "import sys\nfrom partitioner.loaded import LoadedModel\nfrom partitioner.models import ModelSpec\n"
        "spec = {'name': 'resnet18', 'source': 'resnet18', 'input_shape': [1, 3, 64, 64]}\n"
        "LoadedModel.load(ModelSpec.from_dict(spec))\n"
        "print('sympy' in sys.modules, 'torch.fx.experimental.symbolic_shapes' in sys.modules)\n"
    )
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["False", "False"]
