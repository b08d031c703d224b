"""The speed-up map between the placement grid's bandwidths: candidates priced as fixed cost + bytes at the rate,
and the bandwidths where a split takes over and where it reaches 1.5x, against a run whose answer is known."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from benchmarks import speedup_map


def candidate(label: str, kind: str, fixed_ms: float, bytes_up: int, mbit: float, head_ms: float = 50.0, **kw) -> dict:
    return {
        "label": label,
        "kind": kind,
        "head_ms_predicted": head_ms,
        "within_budget": kw.get("within_budget", True),
        "predicted": {"download_ms": 0.0},
        "measured": {"samples": 4, "bytes_up": bytes_up, "e2e_ms": fixed_ms + bytes_up * 8 / (mbit * 1000.0)},
    }


def run(mbits=(1.0, 10.0, 100.0), extra=()) -> dict:
    """Edge-only 200 ms; cloud-only 60 ms + 150 kB; a split 100 ms + 10 kB; a lossy cloud-only out of budget; a
    "split" right after the input (a head of 1 ms) that is really the image re-encoded."""
    cells = []
    for mbit in mbits:
        cands = [
            candidate("edge-only", "edge", 200.0, 0, mbit, head_ms=200.0),
            candidate("cloud-only int8c", "cloud", 60.0, 150_000, mbit),
            candidate("cloud-only jpeg75", "cloud", 55.0, 9_000, mbit, within_budget=False),
            candidate("cut#40 int4c", "split", 100.0, 10_000, mbit),
            candidate("size#1 int8", "split", 58.0, 140_000, mbit, head_ms=1.0),
            *extra,
        ]
        cells.append(
            {
                "bandwidth_mbit": mbit,
                "link_probed": {"down_mbps": mbit},
                "candidates": cands,
                "best_alternative": {"e2e_ms": 1.0},
                "speedup_over_best_alternative": 1.2,
                "oracle_is_split": True,
                "cleave": {"label": "cut#40 int4c"},
                "oracle_within_budget": {"label": "cut#40 int4c"},
            }
        )
    return {"speed": 4.0, "speed_achieved": 4.0, "bandwidths": cells}


def test_split_region_and_target_are_the_analytic_crossings() -> None:
    # split(B) = 100 + 80/B; cloud(B) = 60 + 1200/B; edge-only 200 (ms, B in Mbit/s).
    # The split beats edge-only above B = 0.8 and cloud-only below B = 28; 1.5x over edge-only from B = 2.4,
    # over cloud-only up to B = 12; the peak where cloud-only meets edge-only, B = 1200/140, at 200/109.33.
    m = speedup_map.speed_map(run())
    assert m["split_wins"] == [[1.0, pytest.approx(28.0, rel=1e-6)]]
    assert m["reaches_target"] == [[pytest.approx(2.4, rel=1e-6), pytest.approx(12.0, rel=1e-6)]]
    assert m["peak"]["speedup"] == pytest.approx(200 / (100 + 80 / (1200 / 140)), rel=2e-3)
    assert m["peak"]["split"] == "cut#40 int4c"
    # Neither the out-of-budget JPEG nor the re-encoded input counts; the map reproduces each measured point.
    for f in m["fit"]:
        assert f["map_split_ms"] == pytest.approx(f["measured_best_split_ms"])
    share = speedup_map.build({"models": [run()]})["speeds"][0]["target_share_of_split_region"]
    assert share == pytest.approx(math.log(12 / 2.4) / math.log(28 / 1.0), rel=1e-6)


def test_fixed_cost_is_the_median_over_cells_and_replies_cost_bandwidth() -> None:
    r = run()
    # The split measured 30 ms slower at 1 Mbit/s only: the median of three cells ignores it.
    slow = r["bandwidths"][0]["candidates"][3]["measured"]
    slow["e2e_ms"] += 30.0
    # A reply of 1,000 B down (priced from the predicted download at the probed rate) counts as wire bytes.
    for cell in r["bandwidths"]:
        cell["candidates"][1]["predicted"]["download_ms"] = 1000 * 8 / (cell["bandwidth_mbit"] * 1000.0)
        cell["candidates"][1]["measured"]["e2e_ms"] += 1000 * 8 / (cell["bandwidth_mbit"] * 1000.0)
    by_label = {c.label: c for c in speedup_map.candidates(r)}
    assert by_label["cut#40 int4c"].fixed_ms == pytest.approx(100.0)
    assert by_label["cloud-only int8c"].wire_bytes == pytest.approx(151_000)
    assert by_label["cloud-only int8c"].fixed_ms == pytest.approx(60.0)
    assert by_label["size#1 int8"].role == "other"
    assert not by_label["cloud-only jpeg75"].within_budget


def test_held_out_cells_are_priced_by_the_grid_and_never_extrapolated() -> None:
    other = run(mbits=(2.4, 300.0))
    rows = speedup_map.held_out({"models": [run()]}, {"models": [other, {**run(), "speed": 30.0}]})
    # 300 Mbit/s is past the grid's 100, and no grid run has a 30x edge.
    assert [r["mbit"] for r in rows] == [2.4]
    # split(2.4) = 100 + 80/2.4; edge-only 200 is the better alternative there.
    assert rows[0]["map_speedup"] == pytest.approx(200 / (100 + 80 / 2.4))
    assert rows[0]["map_split"] == "cut#40 int4c"
    assert rows[0]["measured_speedup"] == 1.2 and rows[0]["oracle_is_split"]


def test_a_run_without_an_in_budget_split_is_refused() -> None:
    r = run()
    for cell in r["bandwidths"]:
        cell["candidates"][3]["within_budget"] = False
    with pytest.raises(ValueError, match="in-budget split"):
        speedup_map.speed_map(r)


def test_cli_writes_the_map_and_plot(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    source = tmp_path / "placement_real.json"
    source.write_text(json.dumps({"models": [run()]}))
    assert speedup_map.main(["--results", str(source), "--points", "31"]) == 0
    written = json.loads((tmp_path / "placement_real_map.json").read_text())
    assert written["speeds"][0]["reaches_target"][0][0] == pytest.approx(2.4, rel=1e-6)
    assert (tmp_path / "placement_real_map.png").stat().st_size > 0
    assert ">= 1.5x at 2.4-12" in capsys.readouterr().out
