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
