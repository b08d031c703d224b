"""The placement benchmark's report: goals per cell, the real-ground table, and --append across edge speeds."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def placement():
    spec = importlib.util.spec_from_file_location("placement_bench", ROOT / "benchmarks" / "placement.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def cell(mbit: float, cleave_ms: float, oracle_ms: float, alt_ms: float, split: bool) -> dict:
    oracle = {"label": "_blocks_6#85 int8" if split else "cloud-only int8c", "e2e_ms": oracle_ms}
    return {
        "bandwidth_mbit": mbit,
        "cleave": {"label": "x", "predicted_ms": cleave_ms, "measured": {"e2e_ms": cleave_ms, "edge_ms": cleave_ms}},
        "oracle": oracle,
        "oracle_within_budget": oracle,
        "oracle_is_split": split,
        "ratio": cleave_ms / oracle_ms,
        "ratio_within_budget": cleave_ms / oracle_ms,
        "best_alternative": {"label": "edge-only", "e2e_ms": alt_ms},
        "speedup_over_best_alternative": alt_ms / cleave_ms,
        "strategies": {"cleave": cleave_ms},
        "confirm_round": {},
        "candidates": [],
    }


def run(speed: float, cells: list[dict]) -> dict:
    return {
        "model": "efficientnet_lite0_pretrained",
        "speed": speed,
        "speed_achieved": speed * 0.97,
        "bandwidths": cells,
    }


def test_goals_are_judged_per_cell(placement, capsys: pytest.CaptureFixture) -> None:
    report = {"config": {}, "models": [run(4, [cell(1, 100, 100, 300, True)]), run(30, [cell(5, 120, 100, 150, True)])]}
    summary = placement.summarize(report)
    assert summary["goals"]["max_ratio_within_budget <= 1.15"] is False  # 1.2 in the 30x cell
    assert summary["goals"]["split cells: speed-up >= 1.5"] is False  # 150 / 120 = 1.25
    assert summary["cells_where_oracle_is_split"] == 2
    report["models"][1]["bandwidths"] = [cell(5, 100, 100, 100, False)]  # a cloud-only oracle: no speed-up asked
    summary = placement.summarize(report)
    assert all(summary["goals"].values())
    placement.print_real_table(report)
    out = capsys.readouterr().out
    assert "4x/3.9x" in out and "30x/29.1x" in out and "3.00" in out


def test_append_keeps_the_other_speeds(placement, tmp_path: Path) -> None:
    path = tmp_path / "placement_real.json"
    config = {"speeds": [4, 30], "speed_calibration": {"m": {"old": 1}}}
    path.write_text(json.dumps({"config": config, "models": [run(4, []), run(30, [])], "seconds": 5.0}))
    new = {"config": {"speed_calibration": {}}, "models": []}
    merged = placement.appended_to(path, new, ["efficientnet_lite0_pretrained"], [30.0])
    assert [m["speed"] for m in merged["models"]] == [4]  # 30x is measured again
    assert merged["config"]["speeds"] == [4, 30.0] and merged["config"]["speed_calibration"] == {"m": {"old": 1}}


def test_candidates_are_measured_round_robin_with_a_warm_up_after_each_pin(placement) -> None:
    """Two passes over three candidates: A B C A B C, each pin followed by its warm-up, then its share of requests."""
    from types import SimpleNamespace

    from protos.cleave.v1 import edge_pb2

    events: list[str] = []

    class Client:
        def pin(self, where, encoding) -> None:
            events.append(f"pin {where}")

        def infer(self, x, timeout):
            events.append("request")
            timing = edge_pb2.StageTiming(edge_compute_ms=1.0, total_ms=1.0)
            return SimpleNamespace(timing=timing, placement=edge_pb2.EDGE_ONLY, plan=edge_pb2.Plan(), bytes_up=0)

    observed = []
    session = placement.Session.__new__(placement.Session)
    session.args = SimpleNamespace(passes=2, warmup=1, candidate_budget_s=60.0, request_timeout_s=5.0)
    session.client, session._n = Client(), 0
    session.inputs = [SimpleNamespace(unsqueeze=lambda _: None)]  # stands for an image
    session.planner = SimpleNamespace(observe_edge=lambda cut, ms: observed.append((cut, ms)))
    candidates = {k: SimpleNamespace(kind="split", cut_index=i, encoding="int8") for i, k in enumerate("ABC", 1)}
    measured = session.measure_pinned(candidates, repeats=5)
    pins = [e for e in events if e.startswith("pin")]
    assert pins == ["pin 1", "pin 2", "pin 3"] * 2  # interleaved, not all of A's requests first
    # Pass 1 takes 3 of the 5 repeats, pass 2 the other 2; each pin is followed by one warm-up request.
    first = events.index("pin 2")
    assert events[:first] == ["pin 1", "request", "request", "request", "request"]
    assert all(m.summary()["samples"] == 5 for m in measured.values())
    assert len(observed) == 3 * (5 + 2)  # every answer, warm-ups included, teaches the planner


def test_the_edges_cpu_quota_is_checked_per_cell(placement, tmp_path: Path) -> None:
    before = {"quota_us": 2000, "period_us": 10000, "nr_periods": 100, "nr_throttled": 10, "throttled_time": 0}
    after = {**before, "nr_periods": 600, "nr_throttled": 260, "throttled_time": 2 * 10**9, "usage_ns": 10**9}
    check = placement.cpu_check({**before, "usage_ns": 0}, after, seconds=5.0)
    assert check["quota_cores"] == pytest.approx(0.2) and check["period_ms"] == 10.0
    assert check["throttled_share"] == pytest.approx(0.5) and check["throttled_s"] == pytest.approx(2.0)
    assert check["cpu_cores_used"] == pytest.approx(0.2)
    cg = tmp_path / "cg"
    cg.mkdir()
    (cg / "cpu.cfs_quota_us").write_text("2000\n")
    (cg / "cpu.cfs_period_us").write_text("10000\n")
    (cg / "cpu.stat").write_text("nr_periods 7\nnr_throttled 3\nthrottled_time 99\n")
    assert placement.cgroup_cpu(cg) == {
        "quota_us": 2000,
        "period_us": 10000,
        "nr_periods": 7,
        "nr_throttled": 3,
        "throttled_time": 99,
    }


def _offer(placement, distortion, mbit: float) -> tuple[dict, dict]:
    from types import SimpleNamespace

    from partitioner.costmodel import SPLIT, Candidate, Link
    from partitioner.planner import Budgets, Planner

    from .test_planner import synthetic_cost

    session = placement.Session.__new__(placement.Session)
    session.planner = Planner(synthetic_cost(), Budgets(min_top1=0.99, max_rel_error=0.05))
    # A latent of 300 bytes after a head as long as the synthetic model's cut 2, the tail as long as its rest.
    cut2 = next(c for c in session.planner.candidates if c.kind == SPLIT and c.cut_index == 2)
    latent = Candidate(SPLIT, 40, "bottleneck_latent", "entropy", 300, 400, cut2.edge_ms, 0.5, 0.2, cut2.cloud_ms, 0)
    session.bottleneck = (latent, distortion)
    link = Link(mbit, mbit, 5.0)
    best = session.planner.best(link)
    picks: dict = {}
    offered = session.offer_bottleneck(link, picks, best)
    assert offered is not None and picks[latent.label].reasons == ["bottleneck"]  # measured like the others
    session.args = SimpleNamespace()
    return offered, picks[latent.label].__dict__


def test_a_bottleneck_within_the_budget_is_offered_to_the_planner_and_wins_on_a_slow_link(placement) -> None:
    from partitioner.planner import Distortion

    offered, pick = _offer(placement, Distortion(0.01, 1.0), mbit=0.5)
    assert offered["plan"] == "bottleneck_latent#40 entropy" and pick["within_budget"]
    offered, _ = _offer(placement, Distortion(0.01, 1.0), mbit=1000.0)
    assert offered["plan"] != "bottleneck_latent#40 entropy"  # on a fast link its head costs more than it saves
    # Out of the accuracy budget (top-1 agreement with the plain model), it is measured but never the plan.
    offered, pick = _offer(placement, Distortion(0.3, 0.5), mbit=0.5)
    assert offered["plan"] != "bottleneck_latent#40 entropy" and not pick["within_budget"]
    assert pick["scored"].rejected == "top-1 0.50 < 0.99"


@pytest.mark.slow
def test_a_trained_bottleneck_becomes_a_candidate_of_the_plain_models_planner(placement, tmp_path: Path) -> None:
    """A small bottleneck trained with the engine's API: its latent's bytes, E and C, and its top-1 agreement."""
    import torch

    from compressor import EncodingSpec, encode
    from partitioner.loaded import LoadedModel
    from partitioner.models import ModelSpec
    from partitioner.profile import profile_model
    from tests.support import tiny_bottleneck as small

    torch.set_num_threads(1)
    artifacts = small.train_artifacts(tmp_path, "layer1_1_relu_1", augment_copies=2, max_steps=20, budget_s=30)
    x, _, _ = small.images()
    _, held_idx = small.split()
    spec = {"name": "rn", "source": "resnet18", "weights": str(tmp_path / "model.safetensors")}
    spec |= {"input_shape": list(small.SHAPE), "num_classes": 4}
    plain = LoadedModel.load(ModelSpec.from_dict(spec))
    bspec = placement.bottleneck_entry(spec, artifacts)
    assert bspec["name"] == "rn_bneck" and bspec["bottleneck"] == str(artifacts.resolve())
    bmodel = LoadedModel.load(ModelSpec.from_dict(bspec))
    cloud = profile_model(bmodel, repeats=3, warmup=1, head_samples=3)
    calib = x[held_idx][:6]
    candidate, distortion = placement.bottleneck_candidate(plain, bmodel, cloud, 4.0, calib)

    assert candidate.label.startswith("bottleneck_latent#") and candidate.encoding == "entropy"
    index = candidate.cut_index
    assert candidate.edge_ms == pytest.approx(4.0 * cloud.curve().head_ms(index))  # the cloud's head, 4x slower
    assert candidate.cloud_ms == pytest.approx(cloud.curve().tail_ms(index))
    # Bytes: the range-coded latent of the calibration images the edge measures bytes on (median), as it will send it.
    import statistics

    from edge_node.config import AutoPlanSettings

    _, latent_head, _ = bmodel.parts(index)
    spec_e, n = EncodingSpec.parse("entropy"), AutoPlanSettings().byte_samples
    with torch.inference_mode():
        sizes = [
            sum(encode(v, spec_e, bmodel.entropy_tables).ByteSize() for v in latent_head(calib[i : i + 1]))
            for i in range(n)
        ]
        agree = (bmodel.module(calib).argmax(-1) == plain.module(calib).argmax(-1)).float().mean().item()
    assert candidate.bytes_up == int(statistics.median(sizes))
    assert candidate.bytes_up < 0.5 * 64 * 8 * 8  # far under int8 features at that cut
    assert distortion.top1 == pytest.approx(agree) and distortion.rel_error >= 0


def test_stage_errors_say_which_stage_a_prediction_missed(placement) -> None:
    """A cloud that takes 12 ms more than predicted, everything else on time: the cloud stage says so."""

    def candidate(kind: str, edge: float, cloud: float) -> dict:
        predicted = {"edge_ms": edge, "encode_ms": 1.0, "upload_ms": 10.0, "rtt_ms": 10.0, "download_ms": 1.0}
        predicted |= {"decode_ms": 0.5, "cloud_ms": cloud}
        stages = {"edge_ms": edge, "encode_ms": 1.0, "link_ms": 21.0, "decode_ms": 0.5, "cloud_ms": cloud + 12.0}
        stages["result_decode_ms"] = 0.0
        total = sum(stages.values())
        measured = {"samples": 4, "stages_ms": stages, "edge_ms": total, "e2e_ms": total + 3.0}
        return {"kind": kind, "predicted": predicted, "predicted_ms": total - 12.0, "measured": measured}

    cells = [{"candidates": [candidate("split", 50.0, 10.0), candidate("cloud", 0.0, 30.0)]}]
    errors = placement.stage_errors({"models": [run(4.0, cells)]})
    stages = errors["efficientnet_lite0_pretrained 4x (3.9x)"]
    assert stages["cloud"]["meas_minus_pred_ms"] == pytest.approx(12.0)
    assert stages["link"]["meas_minus_pred_ms"] == pytest.approx(0.0)
    assert stages["edge"]["n"] == 1  # cloud-only has no head to judge
    assert stages["client"]["meas_minus_pred_ms"] == pytest.approx(3.0)
    assert stages["other"]["meas_minus_pred_ms"] == pytest.approx(0.0)


def test_the_final_round_pairs_the_plan_with_the_oracle(placement) -> None:
    """The in-budget ratio comes from the plan and the oracle measured alone, back to back: the confirmation round
    picked the oracle as its fastest (biased low), and a median of 4 moved by up to 1.5x between rounds. Here the
    host slows by 1.5x between passes; each pass pairs the two, so the ratio stays the plan's 1.1x."""
    from types import SimpleNamespace

    session = placement.Session.__new__(placement.Session)
    session.args = SimpleNamespace(final_passes=3, final_repeats=2, warmup=1)
    session.bclient = None
    plan, oracle = SimpleNamespace(encoding="int6"), SimpleNamespace(encoding="int8")
    picks = {
        "plan": placement.Pick(SimpleNamespace(candidate=plan), []),
        "oracle": placement.Pick(SimpleNamespace(candidate=oracle), []),
    }
    order: list[str] = []
    drift = iter([1.0, 1.0, 1.5, 1.5, 1.0, 1.0])  # the host's speed during each pinned block

    def pin(candidate) -> None:
        order.append("plan" if candidate is plan else "oracle")

    def measure(repeats: int, into=None, client=None):
        base = 110.0 if order[-1] == "plan" else 100.0
        slow = next(drift)
        return SimpleNamespace(e2e=[base * slow] * repeats)

    session.pin, session.measure = pin, measure
    final = session.final_round(picks, "plan", "oracle")
    assert order == ["plan", "oracle", "oracle", "plan", "plan", "oracle"]  # back to back, the order alternating
    assert final["ratio"] == pytest.approx(1.1) and len(final["paired_ratios"]) == 3
    assert session.final_round(picks, "plan", "plan") is None  # the plan is the oracle: nothing to pair

    c = cell(5, 150, 100, 200, True)  # 1.5 from the confirmation round
    placement.with_final_round(c, final)
    assert c["ratio_within_budget"] == pytest.approx(1.1) and c["ratio_within_budget_confirm"] == pytest.approx(1.5)
    placement.with_final_round(c, {**final, "ratio": 0.9})  # the plan was faster: it was the oracle after all
    assert c["ratio_within_budget"] == 1.0
    confirm = {
        "plan": placement.Measurement(e2e=[120.0]),
        "oracle": placement.Measurement(e2e=[100.0]),
        "jpeg": placement.Measurement(e2e=[50.0]),
    }
    picks["jpeg"] = placement.Pick(SimpleNamespace(candidate=None), [], within_budget=False)
    assert placement.budget_oracle(picks, confirm) == "oracle"


def test_the_speedup_round_pairs_the_plan_with_edge_only_and_the_best_in_budget_cloud_only(placement) -> None:
    """What a user would do without Cleave is measured beside the plan: edge-only and the fastest cloud-only within
    the budget of the earlier rounds (not the lossy JPEG, faster but out of budget). The host slows by 2x for the
    second pass; every pass holds all three, so the speed-up stays min(130, 150) / 100 = 1.3."""
    from types import SimpleNamespace

    session = placement.Session.__new__(placement.Session)
    session.args = SimpleNamespace(speedup_passes=3, speedup_repeats=2, warmup=1)
    kinds = {"plan": "split", "edge-only": "edge", "int8c": "cloud", "raw": "cloud", "jpeg": "cloud"}
    cands = {k: SimpleNamespace(kind=v, label=k) for k, v in kinds.items()}
    picks = {k: placement.Pick(SimpleNamespace(candidate=c), [], within_budget=k != "jpeg") for k, c in cands.items()}
    ms = {"plan": 100.0, "edge-only": 150.0, "int8c": 130.0, "raw": 400.0, "jpeg": 60.0}
    measured = {k: placement.Measurement(e2e=[v]) for k, v in ms.items()}
    confirm = {"int8c": placement.Measurement(e2e=[140.0])}  # re-measured: its median there counts
    alternatives = placement.alternatives_of(picks, measured, confirm)
    assert alternatives == {"edge-only": 150.0, "int8c": 140.0, "raw": 400.0}
    order: list[str] = []
    drift = iter([1.0] * 3 + [2.0] * 3 + [1.0] * 3)

    def pin(candidate) -> None:
        order.append(candidate.label)

    def measure(repeats: int, into=None, client=None):
        return SimpleNamespace(e2e=[ms[order[-1]] * next(drift)] * repeats)

    session.pin, session.measure = pin, measure
    result = session.speedup_round(picks, "plan", alternatives)
    assert order == ["plan", "edge-only", "int8c", "edge-only", "int8c", "plan", "int8c", "plan", "edge-only"]
    assert result["alternatives"] == ["edge-only", "int8c"] and result["speedup"] == pytest.approx(1.3)
    assert result["paired_speedups"] == pytest.approx([1.3, 1.3, 1.3])
    assert session.speedup_round(picks, "edge-only", alternatives) is None  # the plan is an alternative

    c = cell(5, 120, 100, 150, True)  # Cleave planning by itself: 150 / 120
    placement.with_speedup_round(c, result)
    assert c["speedup_over_best_alternative"] == pytest.approx(1.3) and c["speedup_unpaired"] == pytest.approx(1.25)
    assert placement.summarize({"models": [run(4, [c])]})["speedup_over_best_alternative_in_split_cells"] == [
        pytest.approx(1.3)
    ]


def measured_candidate(label: str, head_ms: float, stages: tuple[float, float, float, float], bytes_up: int, **kw):
    """A measured candidate: ``stages`` = edge, encode, decode, cloud (ms); its link and result decoding are slow, so
    a bound that counted them would show."""
    edge, encode, decode, cloud = stages
    st = {"edge_ms": edge, "encode_ms": encode, "link_ms": 500.0, "decode_ms": decode, "cloud_ms": cloud}
    st["result_decode_ms"] = 40.0
    measured = {"samples": 4, "stages_ms": st, "bytes_up": bytes_up, "e2e_ms": sum(st.values()) + 20.0}
    return {"label": label, "kind": "split", "head_ms_predicted": head_ms, "within_budget": True, "measured": measured}


def bound_cell(candidates: list[dict], alt_ms: float = 200.0, split: bool = True) -> dict:
    c = cell(8, 150, 150, alt_ms, split)
    edge = measured_candidate("edge-only", 100.0, (100.0, 0.0, 0.0, 0.0), 0)
    c["candidates"] = [{**edge, "kind": "edge"}, *candidates]
    c["nominal_rtt_ms"] = 10.0
    return c


def test_the_split_bound_is_the_fastest_any_in_budget_split_could_be(placement, tmp_path, capsys) -> None:
    """Per cell: a split's measured edge, codec and cloud stages, the nominal RTT and its bytes at the nominal rate."""
    late = measured_candidate("late#9 int8", 40.0, (50.0, 2.0, 1.0, 7.0), 10_000)  # 10 kB at 8 Mbit/s: 10 ms
    early = measured_candidate("early#4 int8", 20.0, (30.0, 1.0, 1.0, 8.0), 50_000)  # 50 ms on the wire
    # Faster, but not counted: a cut that only re-encodes the input (head < 5% of edge-only), a split out of the
    # accuracy budget, a split never measured, and cloud-only.
    image = measured_candidate("size#1 int8", 1.0, (0.1, 1.0, 1.0, 20.0), 1000)
    lossy = {**measured_candidate("late#9 int2", 40.0, (5.0, 1.0, 1.0, 1.0), 10), "within_budget": False}
    unmeasured = {**measured_candidate("late#9 int4", 40.0, (5.0, 1.0, 1.0, 1.0), 10), "measured": {"samples": 0}}
    cloud = {**measured_candidate("cloud-only int8c", 0.0, (0.0, 1.0, 1.0, 20.0), 1000), "kind": "cloud"}
    c = bound_cell([early, image, late, lossy, unmeasured, cloud])
    b = placement.split_bound(c)
    assert b["label"] == "late#9 int8" and b["splits"] == 2
    assert b["bound_ms"] == pytest.approx(50 + 2 + 1 + 7 + 10 + 10)  # 80 against early's 30+1+1+8+10+50 = 100
    assert b["max_speedup"] == pytest.approx(200 / 80)
    assert b["zero_byte_bound_ms"] == pytest.approx(70) and b["zero_byte_max_speedup"] == pytest.approx(200 / 70)
    # With free bytes, the early cut's 50 ms would bound lower.
    assert b["any_zero_byte"] == {"label": "early#4 int8", "bound_ms": pytest.approx(50), "max_speedup": 4.0}
    # 1.5x against 200 ms is 133.3 ms: 63.3 ms of wire over the 70 ms of stages, at 8 Mbit/s 63.3 kB.
    assert b["bytes_up"] == 10_000 and b["goal_bytes"] == pytest.approx((200 / 1.5 - 70) * 1000)
    slower = placement.split_bound(bound_cell([late], alt_ms=90.0))  # 90 / 1.5 = 60 ms: under the stages alone
    assert slower["goal_bytes"] == 0.0 and slower["zero_byte_max_speedup"] < 1.5

    no_split = bound_cell([image, lossy, cloud], alt_ms=60.0, split=False)
    assert placement.split_bound(no_split) is None
    assert placement.split_bound(cell(5, 100, 100, 100, False)) is None  # nothing measured at all

    report = {"config": {}, "models": [run(4, [c, no_split])]}
    summary = placement.summarize(report)["split_speedup_bound"]
    assert summary["in_split_cells"] == [pytest.approx(2.5)] and summary["cells_reaching_1.5"] == 1
    assert summary["max"] == pytest.approx(2.5) and summary["zero_byte_max"] == pytest.approx(4.0)
    # The report records it per cell (write_results also serves `report`, from the JSON alone).
    placement.write_results(report, tmp_path / "r")
    written = json.loads((tmp_path / "r.json").read_text())["models"][0]["bandwidths"]
    assert written[0]["split_bound"]["label"] == "late#9 int8" and written[1]["split_bound"] is None
    placement.print_split_bounds(report)
    out = capsys.readouterr().out
    assert "late#9 int8" in out and "2.50" in out and "4.00" in out and "63333" in out


def test_the_split_bound_judges_a_split_as_the_report_does(placement) -> None:
    """The same rule as ``oracle_is_split``: the planner's candidates there, the recorded head times here."""
    from types import SimpleNamespace

    planner = SimpleNamespace(candidates=[SimpleNamespace(kind="edge", edge_ms=100.0)])
    for kind, head in (("split", 4.9), ("split", 5.0), ("cloud", 50.0), ("split", 60.0)):
        candidate = SimpleNamespace(kind=kind, edge_ms=head)
        assert placement.is_real_split(candidate, planner) == placement.splits_the_network(kind, head, 100.0)
    assert placement.splits_the_network("split", 5.0, 100.0) and not placement.splits_the_network("split", 4.9, 100.0)
    c = bound_cell([measured_candidate("late#9 int8", 40.0, (50.0, 2.0, 1.0, 7.0), 10_000)])
    old = json.loads(json.dumps(c))
    del c["nominal_rtt_ms"]
    with pytest.raises(ValueError, match="nominal_rtt_ms"):
        placement.split_bound(c)
    for candidate in old["candidates"]:  # results from before head times were recorded (placement.json)
        del candidate["head_ms_predicted"]
    assert placement.split_bound(old) is None
