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
