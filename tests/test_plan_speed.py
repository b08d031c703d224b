"""What makes ``cleave plan`` fast keeps its answers: recorded live sets, disk caches, several links."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from cleave_cli.main import main
from compressor import EncodingSpec, decode, encode
from partitioner import costmodel
from partitioner.costmodel import REPLY_ENCODING, SPLIT, Candidate, CostModel, CutCost, Link
from partitioner.graph import trace
from partitioner.loaded import LoadedModel, as_tensor_list
from partitioner.models import ModelSpec, calibration_batch, fingerprint
from partitioner.planner import (
    Budgets,
    Distortion,
    DistortionMeter,
    LiveSets,
    Planner,
    _decoded_rows,
    cached_distortion,
    distortion_meter,
    head_tail_distortion,
    run_from_cuts,
)
from partitioner.profile import profile_model, scaled

MODEL_ARGS = ["--model", "resnet18", "--input-shape", "1,3,64,64", "--rtt", "20", "--quiet"]


@pytest.fixture(autouse=True)
def private_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CLEAVE_CACHE", str(tmp_path / "cache"))


def candidate(model: LoadedModel, index: int, encoding: str) -> Candidate:
    cut = model.graph.cut(index)
    return Candidate(SPLIT, cut.index, cut.name, encoding, 0, 0, 0.0, 0.0, 0.0, 0.0, 0)


def test_recorded_live_sets_give_the_head_and_tail_distortion_exactly(local_model: LoadedModel) -> None:
    calib = calibration_batch(local_model.spec.input_shape, 4, seed=3)
    recorded, direct = distortion_meter(local_model, calib, record=True), head_tail_distortion(local_model, calib)
    cuts = local_model.graph.cuts
    picked = [cuts[0], cuts[2], cuts[len(cuts) // 3], cuts[len(cuts) // 2], cuts[-3], cuts[-1]]
    for cut in picked:
        for enc in ("jpeg", "int8c") if cut.index == 0 else ("int8", "int2", "fp16"):
            c = candidate(local_model, cut.index, enc)
            assert recorded(c) == direct(c), (cut.name, enc)
    assert direct(candidate(local_model, cuts[-3].index, "int2")).rel_error > 0  # the check can fail


class InPlace(nn.Module):
    """A value live across a cut is changed in place before the cut: the head returns it changed."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.fc = nn.Linear(4, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = self.conv(x)
        b = a * 2
        a.add_(1)
        a.mul_(0.5)
        return self.fc((b + a).mean((2, 3)))


def test_recorded_live_sets_follow_in_place_updates() -> None:
    x = torch.randn(1, 3, 8, 8)
    graph = trace(InPlace(), x)
    spec = ModelSpec.from_dict({"name": "inplace", "source": "x", "input_shape": [1, 3, 8, 8]})
    model = LoadedModel(spec, graph, "f")
    calib = torch.randn(3, 3, 8, 8)
    live = LiveSets(model, calib)
    mutated = 0
    for cut in graph.cuts:
        head, _ = graph.split(cut)
        with torch.inference_mode():
            expected = head(calib)
        assert all(torch.equal(a, b) for a, b in zip(live.at(cut.index), expected, strict=True)), cut.name
        mutated += cut.name in ("add_", "mul_")
    assert mutated  # the cuts after an in-place update were checked
    with torch.inference_mode():
        assert torch.equal(live.output, model.module(calib))


def hidden_write(x: torch.Tensor) -> torch.Tensor:
    """Halves ``x`` in place where fx cannot see it: the graph records a call named ``hidden_write``."""
    x.mul_(0.5)
    return x


torch.fx.wrap("hidden_write")


class HiddenWrite(InPlace):
    """As :class:`InPlace`, with the in-place update inside a function the graph does not look into."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = self.conv(x)
        b = a * 2
        a = hidden_write(a)
        return self.fc((b + a).mean((2, 3)))


def test_a_write_no_rule_foresees_records_again_copying_every_value() -> None:
    """Held values are copied only before a node that may write them: a write the rules miss moves a
    held value's version counter, and the live sets are recorded again, copying each value."""
    x = torch.randn(1, 3, 8, 8)
    spec = ModelSpec.from_dict({"name": "inplace", "source": "x", "input_shape": [1, 3, 8, 8]})
    calib = torch.randn(3, 3, 8, 8)
    for module, hidden in ((InPlace(), False), (HiddenWrite(), True)):
        graph = trace(module, x)
        live = LiveSets(LoadedModel(spec, graph, "f"), calib)
        assert live.copied_all == hidden, type(module).__name__
        for cut in graph.cuts:
            head, _ = graph.split(cut)
            with torch.inference_mode():
                expected = head(calib)
            assert all(torch.equal(a, b) for a, b in zip(live.at(cut.index), expected, strict=True)), cut.name


def test_live_sets_copy_only_the_values_a_later_node_may_write(
    local_model: LoadedModel, monkeypatch: pytest.MonkeyPatch
) -> None:
    """resnet18: in-place ReLUs and ``out += identity`` write some values after a cut; only those are
    copied (17 copies here, against 70 when every value was copied), and every cut's live set is
    what copying every value gave."""
    from partitioner.planner import _live_recorder

    calib = calibration_batch(local_model.spec.input_shape, 2, seed=4)
    cuts = {c.index: c for c in local_model.graph.cuts}
    copies = [0]
    clone = torch.Tensor.clone

    def counted(self, *args, **kwargs):
        copies[0] += 1
        return clone(self, *args, **kwargs)

    monkeypatch.setattr(torch.Tensor, "clone", counted)
    live = LiveSets(local_model, calib)
    held_copies, copies[0] = copies[0], 0
    every = _live_recorder()(local_model.graph.module, cuts, copy_all=True)
    with torch.no_grad():
        every.run(calib)
    assert not live.copied_all and 0 < held_copies < copies[0] / 2
    for index in cuts:
        assert all(torch.equal(a, b) for a, b in zip(live.at(index), every.sets[index], strict=True)), index


def test_a_second_cost_model_build_hits_the_cache(local_model: LoadedModel, monkeypatch: pytest.MonkeyPatch) -> None:
    profile = profile_model(local_model, repeats=2, warmup=1, head_samples=3)
    calib = calibration_batch(local_model.spec.input_shape, 2, seed=5)
    first = CostModel.measure(local_model, profile, profile, calib, cache=True, workers=2)
    assert first == CostModel.measure(local_model, profile, profile, calib)  # same sizes on one thread

    measured = []
    real = costmodel._measure_sizes
    monkeypatch.setattr(costmodel, "_measure_sizes", lambda *a: measured.append(a[1]) or real(*a))
    assert CostModel.measure(local_model, profile, profile, calib, cache=True) == first
    assert measured == []  # read back, nothing encoded

    other = calibration_batch(local_model.spec.input_shape, 2, seed=6)
    CostModel.measure(local_model, profile, profile, other, cache=True)
    assert len(measured) == 1  # other calibration inputs: measured again

    module = local_model.module
    renamed = LoadedModel(local_model.spec, local_model.graph, fingerprint(module, "another model"))
    assert renamed.fingerprint != local_model.fingerprint
    CostModel.measure(renamed, profile, profile, calib, cache=True)
    assert len(measured) == 2  # another model: measured again
    CostModel.measure(local_model, profile, profile, calib, cache=True, feature_encodings=("int8",))
    assert len(measured) == 3  # other encodings: measured again


def test_a_build_for_some_cuts_takes_from_the_cache_only_what_it_asks(
    local_model: LoadedModel, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The size cache keeps what every build measured; a build for some cuts (a walk's round,
    ``measure_on_demand``) has the candidates it asks for and no more, whatever an earlier build left
    in the cache: a warm ``cleave plan`` then walks, and screens from the cache, as the cold one did."""
    profile = profile_model(local_model, repeats=1, warmup=0, head_samples=2)
    calib = calibration_batch(local_model.spec.input_shape, 2, seed=5)
    cuts = [c.index for c in local_model.graph.cuts]
    few = {cuts[1]: frozenset({"int8"})}
    more = {cuts[1]: frozenset({"int8", "int4"}), cuts[-2]: frozenset({"int2"})}
    far = CostModel.measure(local_model, profile, profile, calib, cuts=more, cache=True)  # a walk that went further
    measured = []
    real = costmodel._measure_sizes
    monkeypatch.setattr(costmodel, "_measure_sizes", lambda *a: measured.append(a[1]) or real(*a))
    warm = CostModel.measure(local_model, profile, profile, calib, cuts=few, cache=True)
    assert measured == []  # every size asked for is in the cache
    assert warm == CostModel.measure(local_model, profile, profile, calib, cuts=few)  # as if nothing was cached
    labels = {c.label for c in warm.candidates()}
    assert {c.label for c in far.candidates()} - labels  # the further walk's candidates are not there


def test_sizes_are_what_each_cuts_head_output_encodes_to(local_model: LoadedModel) -> None:
    """Sizes are measured per live value and added up per cut: the same bytes as encoding each
    cut's head output input by input (the median over inputs), as the planner's model says."""
    profile = profile_model(local_model, repeats=1, warmup=0, head_samples=2)
    calib = calibration_batch(local_model.spec.input_shape, 3, seed=4)
    cost = CostModel.measure(local_model, profile, profile, calib, workers=2)
    cuts = local_model.graph.cuts
    shared = [c for c in cuts if len(c.live) > 1]
    assert shared  # residual cuts, whose values are live at other cuts too, are among those checked
    for cut in [cuts[1], shared[0], shared[-1], cuts[-1]]:
        _, head, _ = local_model.parts(cut.index)
        with torch.inference_mode():
            live = head(calib)
        sizes = cost.cuts[cuts.index(cut)].feature_bytes
        assert set(sizes) == {*costmodel.FEATURE_ENCODINGS, costmodel.UNCOMPRESSED}
        for enc, size in sizes.items():
            per_input = sorted(
                sum(encode(v[i : i + 1], EncodingSpec.parse(enc)).ByteSize() for v in live) for i in range(3)
            )
            assert size == per_input[1], (cut.name, enc)


def test_screening_keeps_every_ranking(local_model: LoadedModel) -> None:
    """Screening candidates on one input rejects what measuring them on all would, and saves work."""
    profile = profile_model(local_model, repeats=2, warmup=1, head_samples=3)
    calib = calibration_batch(local_model.spec.input_shape, 8, seed=7)
    cost = CostModel.measure(local_model, profile, scaled(profile, 0.25), calib[:2])
    budgets = Budgets(max_rel_error=0.05, min_top1=0.99)
    meter = distortion_meter(local_model, calib, record=True)
    assert isinstance(meter, DistortionMeter)
    calls = {"plain": 0, "screened": 0}

    def counting(name: str):
        def measure(c: Candidate):
            calls[name] += 1
            return meter(c)

        return measure

    plain = Planner(cost, budgets, counting("plain"))
    screened = Planner(cost, budgets, counting("screened"), screen=meter.screen)
    batches: list[int] = []

    def screen_many(cs: list[Candidate]):
        batches.append(len(cs))
        return meter.screen_many(cs)

    batched = Planner(cost, budgets, meter, screen=meter.screen, screen_many=screen_many)
    links = [Link(mbps, mbps, 10) for mbps in (1, 10, 100, 1000)]
    rankings = [(plain.rank(link, limit=10), screened.rank(link, limit=10)) for link in links]
    assert calls["screened"] < calls["plain"]  # the screen rejected some on one input
    rejected = 0
    for link, (want, got) in zip(links, rankings, strict=True):
        for planner, ranked in ((screened, got), (batched, batched.rank(link, limit=10))):
            assert [s.candidate for s in ranked] == [s.candidate for s in want]
            assert [bool(s.rejected) for s in ranked] == [bool(s.rejected) for s in want]
            for w, g in zip(want, ranked, strict=True):
                if g.rejected:
                    rejected += planner is screened
                    assert planner.measured(g) == w  # shown in full: the same reason and distortion
                else:
                    assert g == w
            assert planner.best(link) == plain.best(link)
    assert rejected >= 3
    assert max(batches) > 1  # candidates were screened together


def test_no_candidate_costs_less_than_its_cuts_floor(local_model: LoadedModel) -> None:
    """The floor that decides which cuts ``cleave plan`` measures is below every candidate's cost,
    whatever the link and objective (a prediction grows with bytes and codec time)."""
    profile = profile_model(local_model, repeats=1, warmup=0, head_samples=3)
    cost = CostModel.measure(local_model, profile, scaled(profile, 0.25), calibration_batch((1, 3, 64, 64), 2))
    cuts = {cut.index: cut for cut in cost.cuts}
    for objective in ("latency", "throughput"):
        planner = Planner(cost, objective=objective)
        for link in (Link(0.5, 0.5, 0), Link(10, 5, 20), Link(1000, 1000, 1, overhead_ms=3)):
            tight = 0
            for c in planner.candidates:
                if c.cut_index >= 0:
                    floor = planner.floor(cuts[c.cut_index], link, c.encoding)
                    assert planner.floor(cuts[c.cut_index], link) <= floor <= planner.score(c, link).cost_ms, c.label
                    tight += floor > 0.5 * planner.score(c, link).cost_ms
            assert tight  # not a bound of zero: it can leave cuts out


@pytest.mark.parametrize("top", [1, 5])
def test_sizes_measured_on_demand_plan_as_sizes_measured_first(local_model: LoadedModel, top: int) -> None:
    """``cleave plan`` measures the sizes of candidates only as its walks reach them
    (measure_on_demand): the plans, rankings up to where the walks stop (with the measured accuracy
    of each) and the baselines are those of every size measured first, and fewer sizes are measured
    (screens ahead take the candidates known, so their batches may differ)."""
    profile = profile_model(local_model, repeats=2, warmup=1, head_samples=3)
    calib = calibration_batch(local_model.spec.input_shape, 8, seed=7)
    edge, cloud = scaled(profile, 8.0), scaled(profile, 0.25)  # a slow edge: splits and cloud-only compete
    budgets = Budgets(max_rel_error=0.05, min_top1=0.99)
    memo: dict = {}
    asked: list[dict[int, frozenset[str]]] = []

    def measure(cuts: dict[int, frozenset[str]] | None) -> CostModel:
        asked.append(cuts)
        return CostModel.measure(local_model, edge, cloud, calib[:2], cuts=cuts, memo=memo)

    split, rejected, left_out, batched = set(), 0, 0, 0
    for links in ([Link(1, 1, 20)], [Link(5, 5, 10), Link(100, 100, 5)], [Link(1000, 1000, 1)]):
        batches: dict[str, list[list[str]]] = {"full": [], "lazy": []}
        planners = {}
        for name, cuts in (("full", None), ("lazy", {})):
            meter = DistortionMeter(local_model, calib)  # one each: screens follow each planner's misses

            def screen_many(cs: list[Candidate], meter=meter, seen=batches[name]) -> list:
                seen.append([c.label for c in cs])
                return meter.screen_many(cs)

            planners[name] = Planner(measure(cuts), budgets, meter, screen=meter.screen, screen_many=screen_many)
        full, lazy = planners["full"], planners["lazy"]
        wanted = lazy.measure_on_demand(measure, first=4)
        for link in links:
            want, got = full.rank(link, limit=top), lazy.rank(link, limit=top)
            stop = [i for i, s in enumerate(want) if not s.rejected][top - 1]
            assert [s.candidate for s in got[: stop + 1]] == [s.candidate for s in want[: stop + 1]]
            for w, g in zip(want[: stop + 1], got, strict=False):
                assert bool(g.rejected) == bool(w.rejected) and lazy.measured(g) == full.measured(w)
                rejected += bool(w.rejected)
            assert lazy.best(link) == full.best(link)
            for name in ("neurosurgeon", "edge-only", "cloud-raw", "cloud-jpeg", "cloud-webp"):
                assert lazy.baseline(name, link) == full.baseline(name, link), name
        split |= {c.cut_index for c in lazy.candidates if c.cut_index > 0 and c.encoding != "raw+none"}
        left_out += len(lazy.candidates) < len(full.candidates)
        batched += any(len(b) > 1 for b in batches["lazy"])
        assert asked[-1] == {k: frozenset(v) for k, v in wanted.items()}
    assert memo["values"]  # one run of the model for every build
    assert split and rejected  # the walks reached split cuts and rejected candidates on the way
    assert left_out  # and sizes were left out (how many depends on the profile measured here)
    assert batched  # screens ahead still run together


def test_later_builds_reuse_the_model_run_on_an_equal_slice_of_inputs(
    local_model: LoadedModel, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``cleave plan`` measures sizes in rounds on ``calib[:3]``, a new tensor each time it is sliced:
    the memo takes an equal tensor as the same inputs, so the model runs once for every round, and
    the sizes are those measured without it. Other inputs run the model again."""
    profile = profile_model(local_model, repeats=1, warmup=0, head_samples=2)
    calib = calibration_batch(local_model.spec.input_shape, 4, seed=5)
    runs = []
    all_values = costmodel._all_values
    monkeypatch.setattr(costmodel, "_all_values", lambda m, x: runs.append(x) or all_values(m, x))
    cuts = [c.index for c in local_model.graph.cuts]
    first, later = {cuts[1]: frozenset({"int8"})}, {cuts[1]: frozenset({"int8"}), cuts[-2]: frozenset({"int4"})}
    memo: dict = {}
    CostModel.measure(local_model, profile, profile, calib[:3], cuts=first, memo=memo)
    again = CostModel.measure(local_model, profile, profile, calib[:3], cuts=later, memo=memo)
    assert len(runs) == 1  # the second build's slice is another tensor with the same values
    fresh = CostModel.measure(local_model, profile, profile, calib[:3], cuts=later)
    assert [c.feature_bytes for c in again.cuts] == [c.feature_bytes for c in fresh.cuts]
    CostModel.measure(local_model, profile, profile, calib[1:4], cuts=later, memo=memo)
    assert len(runs) == 3  # other inputs: the model runs on them


def test_sizes_and_accuracy_share_one_run_of_the_model(
    local_model: LoadedModel, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``cleave plan`` measures sizes on the first rows of the batch whose live sets the accuracy checks
    record (``memo["recorded"]``): the model runs once for both, and the sizes are those of the same rows
    in a run of its own on that batch. (Not of a run on those rows alone: a batch of 3 and one of 4 take
    different GEMM kernels, whose floats differ in the last bits, and zstd of raw fp32 bytes then differs
    by a byte: resnet18's logits, 3,774 against 3,775 B on one machine.)"""
    profile = profile_model(local_model, repeats=1, warmup=0, head_samples=2)
    calib = calibration_batch(local_model.spec.input_shape, 4, seed=5)
    runs = []
    all_values = costmodel._all_values
    monkeypatch.setattr(costmodel, "_all_values", lambda m, x: runs.append(x) or all_values(m, x))
    meter = DistortionMeter(local_model, calib)
    shared = CostModel.measure(local_model, profile, profile, calib[:3], memo={"recorded": meter.values})
    assert not runs  # the sizes came from the live sets, recorded for the accuracy checks
    whole = costmodel._all_values(local_model, calib)  # a run of its own, on the same batch
    assert len(runs) == 1
    rows = {name: v[:3] if isinstance(v, torch.Tensor) and v.ndim and len(v) == 4 else v for name, v in whole.items()}
    fresh = CostModel.measure(local_model, profile, profile, calib[:3], memo={"recorded": lambda x: rows})
    assert len(runs) == 1
    assert [c.feature_bytes for c in shared.cuts] == [c.feature_bytes for c in fresh.cuts]
    assert shared.output_bytes == fresh.output_bytes
    assert meter.values(calib[1:4]) is None  # not the batch's first rows: the model runs on them
    # A value changed in place while live has another value at each cut: sizes, one per name, run the model.
    spec = ModelSpec.from_dict({"name": "inplace", "source": "x", "input_shape": [1, 3, 8, 8]})
    inplace = DistortionMeter(
        LoadedModel(spec, trace(InPlace(), torch.randn(1, 3, 8, 8)), "f"), torch.randn(3, 3, 8, 8)
    )
    assert inplace.values(inplace.calib[:2]) is None


def test_plan_and_profile_keep_freed_pages_before_they_load_the_model(monkeypatch: pytest.MonkeyPatch) -> None:
    """``cleave plan`` and ``cleave profile`` set glibc's thresholds first, so every run of the model
    after the first reuses the pages of the one before (:func:`cleave_cli.plan_cmd.keep_pages`)."""
    import runtime.memory
    from cleave_cli import plan_cmd

    order: list = []
    monkeypatch.setattr(runtime.memory, "keep_freed_memory", lambda **kw: order.append(kw) or True)

    def load(args):
        order.append("load")
        raise ValueError("not loaded in this test")

    monkeypatch.setattr(plan_cmd, "load", load)
    want = {"mmap_threshold": plan_cmd.PLAN_MMAP_THRESHOLD, "trim_threshold": plan_cmd.PLAN_TRIM_THRESHOLD}
    for argv in (["plan", "--model", "resnet18", "--bandwidth", "5"], ["profile", "--model", "resnet18"]):
        order.clear()
        assert main(argv) == 1  # the error from load, on one line
        assert order == [want, "load"], argv


@pytest.mark.skipif(
    platform.system() != "Linux" or platform.libc_ver()[0] != "glibc", reason="the thresholds are glibc's"
)
def test_glibc_takes_the_plan_thresholds_and_a_model_run_s_blocks_fault_no_pages_again() -> None:
    """glibc accepts the thresholds (32 MB is its largest mmap threshold); blocks of a model run's sizes
    (up to 25 MB: resnet50's first activations on 8 inputs), held together and freed, then fault in no
    page when the next run allocates them again. With glibc's defaults each such run faults ~19,000."""
    churn = """
import resource, sys
if sys.argv[1] == "keep":
    from cleave_cli.plan_cmd import keep_pages
    print(keep_pages())
SIZES = [25, 12, 6, 25, 3, 12, 1, 6, 25, 2]  # MB: a run's activations, held together, then freed
def run():
    held = [bytearray(s << 20) for s in SIZES]
    del held
for _ in range(3):
    run()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(10):
    run()
print((resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / 10)
"""
    env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}
    env["PYTHONPATH"] = str(Path(__file__).resolve().parent.parent)

    def faults(mode: str) -> list[str]:
        run = [sys.executable, "-c", churn, mode]
        return subprocess.run(run, capture_output=True, text=True, env=env, check=True, timeout=120).stdout.split()

    kept, keep_faults = faults("keep")
    assert kept == "True" and float(keep_faults) < 100  # 0 here: every block from pages kept
    assert float(faults("defaults")[0]) > 1000  # the check can fail: glibc's defaults do fault here


def test_a_screen_passed_before_a_miss_is_screened_again_on_the_input_that_missed() -> None:
    """Candidates screened together on one input, which a full measurement then shows to be the wrong
    input, are screened again on the input that broke the budget before any is measured in full: the
    same rankings, with one full measurement of a rejected candidate instead of one per candidate."""
    from tests.test_planner import synthetic_cost

    cost = synthetic_cost()
    link = Link(2, 2, 10)
    good = {c for c in cost.candidates() if c.encoding in ("webp", "fp16", "raw", "int8c", "raw+none", "")}
    state = {"probe": 0}
    fulls: list[Candidate] = []

    class Meter:  # input 1 flips under every bad candidate; input 0 never does
        probe = property(lambda self: state["probe"])

        def __call__(self, c: Candidate) -> Distortion:
            fulls.append(c)
            if c in good:
                return Distortion(0.001, 1.0)
            state["probe"] = 1
            return Distortion(0.01, 0.5)

        def screen(self, c: Candidate) -> Distortion:
            return Distortion(0.0, 1.0 if c in good or state["probe"] == 0 else 0.5)

    meter = Meter()
    budgets = Budgets(max_rel_error=0.05, min_top1=0.99)
    plain = Planner(cost, budgets, lambda c: Distortion(0.001, 1.0) if c in good else Distortion(0.01, 0.5))
    screened = Planner(cost, budgets, meter, screen=meter.screen, screen_many=lambda cs: [meter.screen(c) for c in cs])
    want, got = plain.rank(link, limit=3), screened.rank(link, limit=3)
    assert [s.candidate for s in got] == [s.candidate for s in want]
    assert [bool(s.rejected) for s in got] == [bool(s.rejected) for s in want]
    walked = [s for s in want[: [i for i, s in enumerate(want) if not s.rejected][2] + 1]]
    assert sum(bool(s.rejected) for s in walked) >= 3  # several bad ones passed the first screen together
    assert len([c for c in fulls if c not in good]) == 1


def test_a_screen_never_promises_less_than_the_whole_batch_gives(local_model: LoadedModel) -> None:
    calib = calibration_batch(local_model.spec.input_shape, 4, seed=8)
    meter = DistortionMeter(local_model, calib)
    cuts = local_model.graph.cuts
    refused = 0
    for cut in [cuts[0], cuts[3], cuts[len(cuts) // 2], cuts[-2]]:
        for enc in ("jpeg75", "int8c") if cut.index == 0 else ("int2", "int3", "int8"):
            c = candidate(local_model, cut.index, enc)
            bound, full = meter.screen(c), meter(c)
            assert bound is not None
            assert bound.rel_error <= full.rel_error and bound.top1 >= full.top1, (cut.name, enc, bound, full)
            refused += bound.rel_error > 0.05
    assert refused  # the bound can reject


def test_batched_screens_decide_as_one_by_one_screens(local_model: LoadedModel) -> None:
    """Screening candidates of several cuts in one batch gives each the bound it gets alone (up to
    float rounding), so the budgets accept and reject the same ones."""
    calib = calibration_batch(local_model.spec.input_shape, 8, seed=9)
    meter = DistortionMeter(local_model, calib)
    cuts = local_model.graph.cuts
    picked = [cuts[0], cuts[1], cuts[4], cuts[len(cuts) // 3], cuts[len(cuts) // 2], cuts[-3], cuts[-1]]
    candidates = [
        candidate(local_model, cut.index, enc)
        for cut in picked
        for enc in (("jpeg75", "webp75", "int8c") if cut.index == 0 else ("int2", "int3", "int4", "int8"))
    ]
    alone = [meter.screen(c) for c in candidates]
    together = meter.screen_many(candidates[::-1])[::-1]  # rows enter in cut order whatever the order given
    decisions = set()
    for c, one, many in zip(candidates, alone, together, strict=True):
        assert one is not None and many is not None, c.label
        assert many.top1 == one.top1, c.label
        assert many.rel_error == pytest.approx(one.rel_error, rel=1e-4, abs=1e-6), c.label
        decision = many.top1 < 0.99 or many.rel_error > 0.05  # what the budgets of cleave plan reject
        assert decision == (one.top1 < 0.99 or one.rel_error > 0.05), (c.label, one, many)
        decisions.add(decision)
    assert decisions == {True, False}  # some rejected, some not: the comparison can fail


def test_tails_run_together_give_each_tails_output(local_model: LoadedModel) -> None:
    calib = calibration_batch(local_model.spec.input_shape, 3, seed=10)
    live = LiveSets(local_model, calib)
    cuts = local_model.graph.cuts
    picked = [cuts[0], cuts[2], cuts[len(cuts) // 2], cuts[len(cuts) // 2], cuts[-2]]
    alone = []
    for cut in picked:
        _, _, tail = local_model.parts(cut.index)
        with torch.inference_mode():
            alone.append(tail(*live.at(cut.index)))
            # One cut alone runs the tail's very nodes: exactly the tail's output.
            assert torch.equal(run_from_cuts(local_model.graph, [(cut.index, list(live.at(cut.index)))]), alone[-1])
    with torch.inference_mode():
        together = run_from_cuts(local_model.graph, [(c.index, [v.clone() for v in live.at(c.index)]) for c in picked])
    assert together.shape[0] == 3 * len(picked)
    for i, want in enumerate(alone):
        torch.testing.assert_close(together[3 * i : 3 * i + 3], want, rtol=1e-4, atol=1e-5)


def test_a_screen_decodes_one_input_as_the_codec_decodes_it_alone() -> None:
    gen = torch.Generator().manual_seed(0)
    tensors = [torch.randn(4, 8, 6, 6, generator=gen), torch.randn(4, 16, generator=gen).clamp_min(0) * 7]
    tensors.append(torch.full((4, 3), 2.5))  # a constant: its own scale
    tensors.append(torch.randn(4, 8, generator=gen) * torch.tensor([[100.0], [1], [1], [1]]))  # one wide input
    for x in tensors:
        for enc in ("int8", "int6", "int4", "int3", "int2", "int4+none"):
            spec = EncodingSpec.parse(enc)
            for j in range(4):
                alone = decode(encode(x[j : j + 1], spec))  # as a request sends it: its own range
                assert torch.equal(_decoded_rows(x, spec, slice(j, j + 1)), alone), (enc, j)
        for enc in ("fp16", "raw", "int8c", "int4:percentile(percentile=99.9)"):
            assert _decoded_rows(x, EncodingSpec.parse(enc), slice(0, 1)) is None  # through the codec instead


class BatchMixer(nn.Module):
    """Each output depends on the other inputs of its batch: one input alone says nothing."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.fc = nn.Linear(4, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = self.conv(x)
        return self.fc((a - a.mean(0, keepdim=True)).mean((2, 3)))


def test_a_model_mixing_its_batch_is_not_screened() -> None:
    graph = trace(BatchMixer(), torch.randn(1, 3, 8, 8))
    spec = ModelSpec.from_dict({"name": "mixer", "source": "x", "input_shape": [1, 3, 8, 8]})
    model = LoadedModel(spec, graph, "m")
    meter = DistortionMeter(model, torch.randn(4, 3, 8, 8))
    c = candidate(model, graph.cuts[1].index, "int2")
    assert meter.screen(c) is None
    assert meter(c).rel_error > 0  # measured in full instead


def test_a_quantized_heads_meter_asks_for_each_cuts_head_once(
    local_model: LoadedModel, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With ``head_at`` (the int8 heads an edge serves: seconds to build each), a cut's head is asked for once
    however its encodings interleave, its outputs kept within KEPT_LIVE_BYTES; its distortion is that head's."""
    from partitioner import planner as planner_module

    calib = calibration_batch(local_model.spec.input_shape, 2, seed=5)
    asked = []

    def head_at(index: int):
        asked.append(index)
        _, head, _ = local_model.parts(index)
        return lambda x: [t * 1.01 for t in as_tensor_list(head(x))]  # a head that moves its outputs by 1%

    measure = head_tail_distortion(local_model, calib, head_at=head_at)
    cuts = [c.index for c in local_model.graph.cuts[3:6]]
    for enc in ("raw", "int8", "int4c"):
        for index in cuts:
            d = measure(candidate(local_model, index, enc))
            assert d.rel_error > 0.005, (index, enc, d)  # the moved head's outputs, even through float32 features
    measure(candidate(local_model, 0, "int8c"))  # cloud-only runs no head
    assert asked == cuts
    exact = head_tail_distortion(local_model, calib)(candidate(local_model, cuts[0], "raw"))
    assert exact.rel_error < 0.005  # the float head: only the reply's coding, as a lossy plan's reply comes
    monkeypatch.setattr(planner_module, "KEPT_LIVE_BYTES", 1)  # only the last cut's outputs are kept
    asked.clear()
    measure = head_tail_distortion(local_model, calib, head_at=head_at)
    for enc in ("raw", "int8"):
        for index in cuts:
            measure(candidate(local_model, index, enc))
    assert asked == cuts * 2


def test_distortions_are_cached_per_model_and_calibration(local_model: LoadedModel) -> None:
    calib = calibration_batch(local_model.spec.input_shape, 2, seed=5)
    calls = []

    def meter(c: Candidate):
        calls.append(c)
        return distortion_meter(local_model, calib)(c)

    c = candidate(local_model, local_model.graph.cuts[5].index, "int4")
    first = cached_distortion(meter, local_model, calib)(c)
    assert cached_distortion(meter, local_model, calib)(c) == first and len(calls) == 1
    cached_distortion(meter, local_model, calib[:1])(c)
    assert len(calls) == 2  # another calibration batch: measured again


def test_a_cached_full_measurement_moves_the_screens_as_measuring_did(local_model: LoadedModel) -> None:
    """A warm run replays the cold one: a full measurement read from the cache moves the meter's
    screens to the input it moved them to when measured, so the screens that follow hit the cache."""
    calib = calibration_batch(local_model.spec.input_shape, 8, seed=7)
    cold = DistortionMeter(local_model, calib)
    cached = cached_distortion(cold, local_model, calib)
    moved = []
    for cut in local_model.graph.cuts[1:12]:
        c = candidate(local_model, cut.index, "int2")
        d = cached(c)
        bound = cached.screen(c)
        if cold.probe:
            moved.append((c, d, cold.probe, bound))
    assert moved  # some measurement moved the screens off the first input
    for c, d, probe, bound in moved:
        warm = DistortionMeter(local_model, calib)
        replay = cached_distortion(warm, local_model, calib)
        assert replay(c) == d and warm.probe == probe
        assert replay.screen(c) == bound
        assert warm._live is None  # nothing was run: all from the cache


def test_several_bandwidths_give_one_plan_each(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert main(["plan", *MODEL_ARGS, "--bandwidth", "1,100", "--top", "3", "--json", str(tmp_path / "all.json")]) == 0
    out = capsys.readouterr().out
    assert "link up 1.00 Mbit/s" in out and "link up 100.00 Mbit/s" in out
    plans = json.loads((tmp_path / "all.json").read_text())["plans"]
    assert [p["link"]["up_mbps"] for p in plans] == [1.0, 100.0]
    for plan in plans:
        bw = f"{plan['link']['up_mbps']:g}"
        assert main(["plan", *MODEL_ARGS, "--bandwidth", bw, "--top", "3", "--json", str(tmp_path / "one.json")]) == 0
        alone = json.loads((tmp_path / "one.json").read_text())
        assert alone["best"] == plan["best"] and alone["ranked"] == plan["ranked"]
    # A faster link never makes the best plan slower (equal when edge-only wins on both links, as it
    # does here when the test process runs one torch thread).
    assert plans[0]["best"]["cost_ms"] >= plans[1]["best"]["cost_ms"]
    capsys.readouterr()
    for bad in ("5,x", "0", "-1"):
        with pytest.raises(SystemExit):
            main(["plan", *MODEL_ARGS, "--bandwidth", bad])
        assert "--bandwidth" in capsys.readouterr().err


def test_plan_shows_its_phases_on_stderr(capsys: pytest.CaptureFixture) -> None:
    assert main(["plan", *MODEL_ARGS[:-1], "--bandwidth", "5", "--top", "2"]) == 0
    err = capsys.readouterr().err
    assert all(phase in err for phase in ("profile", "encodings", "accuracy")), err


class Classifier(nn.Module):
    """Two linear layers; a cut between them carries 16 features per input."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(3)
        self.a, self.b = nn.Linear(8, 16), nn.Linear(16, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b(self.a(x))


def test_accuracy_is_judged_on_each_input_coded_alone_as_its_request_sends_it() -> None:
    # One calibration input 1000x wider than the others: coded with the batch's range, 2 bits would flatten
    # the others; each request codes its own features with its own range, so the budget must judge that.
    graph = trace(Classifier(), torch.randn(1, 8))
    model = LoadedModel(ModelSpec.from_dict({"name": "clf", "source": "x", "input_shape": [1, 8]}), graph, "m")
    calib = torch.randn(6, 8, generator=torch.Generator().manual_seed(4)) * torch.tensor([[1000.0]] + [[1.0]] * 5)
    c = candidate(model, graph.cuts[1].index, "int4")
    with torch.inference_mode():
        _, head, tail = model.parts(c.cut_index)
        (features,) = as_tensor_list(head(calib))
        spec = EncodingSpec.parse("int4")
        alone = torch.cat([decode(encode(features[i : i + 1], spec)) for i in range(6)])
        batch = decode(encode(features, spec))
        reference = model.module(calib)
        expected_top1 = float((tail(alone).argmax(-1) == reference.argmax(-1)).float().mean())
        old_top1 = float((tail(batch).argmax(-1) == reference.argmax(-1)).float().mean())
    assert old_top1 < expected_top1  # the batch's range: the old judgement
    for meter in (head_tail_distortion(model, calib), DistortionMeter(model, calib)):
        assert meter(c).top1 == pytest.approx(expected_top1)


class NearTie(nn.Module):
    """Logits 9.99 and 10.0 at classes 0 and 1, the rest -10: half an 8-bit step of their range (0.039) apart
    is more than their gap, so coding the reply in 8 bits ties them and argmax takes class 0."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(8, 16)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        zero = self.a(x)[:, :1] * 0.0  # the cut after ``a`` carries the features; the logits do not depend on them
        return torch.cat([zero + 9.99, zero + 10.0, zero.expand(-1, 8) - 10.0], dim=1)


def test_a_lossy_plans_accuracy_counts_the_coding_of_its_reply() -> None:
    graph = trace(NearTie(), torch.randn(1, 8))
    model = LoadedModel(ModelSpec.from_dict({"name": "tie", "source": "x", "input_shape": [1, 8]}), graph, "m")
    calib = torch.randn(4, 8, generator=torch.Generator().manual_seed(2))
    c = candidate(model, graph.cuts[1].index, "fp16")  # exact here: the features are multiplied by 0
    with torch.inference_mode():
        reference = model.module(calib)
        replied = torch.cat(
            [decode(encode(reference[i : i + 1], EncodingSpec.parse(REPLY_ENCODING))) for i in range(4)]
        )
    assert (reference.argmax(-1) == 1).all() and (replied.argmax(-1) == 0).all()
    meter = DistortionMeter(model, calib)
    for measure in (head_tail_distortion(model, calib), meter):
        d = measure(c)
        assert d.top1 == 0.0 and 0 < d.rel_error < 0.01, d  # every reply flips; its values move by < 1%
    bound = meter.screen(c)  # a bound, not an estimate: it must not reject what the measurement keeps
    assert bound is not None and bound.top1 >= 0.0 and bound.rel_error <= meter(c).rel_error


def test_a_lossy_candidate_is_priced_with_its_coded_reply() -> None:
    cuts = [
        CutCost(0, "x", 0.0, 10.0, 4_000, 0, feature_bytes={"int8c": 1_000, "jpeg": 300, "raw+none": 4_000}),
        CutCost(1, "a", 5.0, 5.0, 2_000, 100, feature_bytes={"int4": 250, "raw": 2_000, "raw+none": 2_000}),
    ]
    for c in cuts:
        c.encode_ms = dict.fromkeys(c.feature_bytes, 0.0)
        c.decode_ms = dict.fromkeys(c.feature_bytes, 0.0)
    cost = CostModel("m", cuts, 20.0, 1_000, output_bytes=4_000, reply_bytes=1_050)
    for eight_bit in (True, False):
        down = {c.label: c.bytes_down for c in Planner(cost, input_is_8bit=eight_bit).candidates}
        assert down == {
            "edge-only": 0,
            "cloud-only int8c": 4_000 if eight_bit else 1_050,  # 8-bit codes of an 8-bit image are exact
            "cloud-only jpeg": 1_050,
            "cloud-only raw+none": 4_000,
            "a#1 int4": 1_050,
            "a#1 raw": 4_000,
            "a#1 raw+none": 4_000,
        }
    # Not measured (a bundle of an older Cleave): the float32 reply, as before.
    unmeasured = CostModel("m", cuts, 20.0, 1_000, output_bytes=4_000)
    assert {c.bytes_down for c in Planner(unmeasured).candidates} == {0, 4_000}
