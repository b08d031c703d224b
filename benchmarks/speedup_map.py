"""Where a split wins, and by how much, between the bandwidths the placement benchmark measured.

The placement grid (``benchmarks/placement.py``) measures each candidate at a few bandwidths per edge speed. A
split's speed-up over the better of edge-only and in-budget cloud-only is then known at those points only, and a
grid point that falls near the bandwidth where one placement takes over from another shows a split winning by a
few percent. This module fills in the bandwidths between the points from the same measurements:

- Every measured candidate of an edge speed costs ``fixed + wire_bytes * 8 / bandwidth``: its bytes up (measured)
  and its reply down (the planner's, from its predicted download at the probed rate) cross at the link's rate,
  and the rest (edge, codecs, cloud, RTT, the link's per-request overhead, the client's call) does not depend on
  the bandwidth. ``fixed`` is the median, over the cells that measured the candidate, of its client-side median
  less its bytes at the cell's nominal bandwidth.
- At each bandwidth of a log-spaced sweep over the measured range, the best real split within the accuracy
  budget (a real split as the benchmark decides it: ``benchmarks.placement.splits_the_network``) is set
  against the best alternative: edge-only, or an in-budget cloud-only encoding. Their ratio is the speed-up.
- The bandwidths where that ratio crosses 1 (a split takes over, or hands over) and 1.5 are found by bisection.

The ratio is continuous in the bandwidth (each candidate's cost is), so it passes through 1 wherever a split
region begins or ends: next to those bandwidths, a split is the fastest placement and wins by little. ``fit``
compares the map with what each cell measured.

    .venv/bin/python -m benchmarks.speedup_map            # placement_real.json -> placement_real_map.{json,png}
    .venv/bin/python -m benchmarks.speedup_map --held-out benchmarks/results/placement_between.json
                                                          # ... and the map against a run at other bandwidths

Only the standard library computes the map; the plot needs matplotlib.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

# The benchmark's rule for a real split, and the speed-up the issue asks of one (its crossings are reported beside 1's).
from benchmarks.placement import SPLIT_GOAL as TARGET
from benchmarks.placement import splits_the_network

RESULTS = Path(__file__).resolve().parent / "results"
POINTS = 121  # sweep points over the measured range, log-spaced


@dataclass(frozen=True)
class Candidate:
    """One measured placement of an edge speed, as the map prices it."""

    label: str
    role: str  # "split" (a real split), "alternative" (edge-only, cloud-only), "other" (re-encodes the input)
    within_budget: bool
    fixed_ms: float
    wire_bytes: float  # up + down
    cells: int

    def ms(self, mbit: float) -> float:
        return self.fixed_ms + self.wire_bytes * 8 / (mbit * 1000.0)


def candidates(run: dict[str, Any]) -> list[Candidate]:
    """Every candidate measured at any bandwidth of one edge speed's run (``report["models"][i]``)."""
    fixed: dict[str, list[float]] = {}
    seen: dict[str, tuple[str, float, bool]] = {}
    for cell in run.get("bandwidths", []):
        mbit = cell["bandwidth_mbit"]
        down = cell["link_probed"]["down_mbps"]
        edge = next((c for c in cell["candidates"] if c["kind"] == "edge"), None)
        if edge is None:
            raise ValueError(f"cell at {mbit} Mbit/s: no edge-only candidate")
        for c in cell["candidates"]:
            measured = c.get("measured") or {}
            if not measured.get("samples"):
                continue
            reply = c["predicted"].get("download_ms", 0.0) * down * 1000.0 / 8  # bytes, as the planner priced them
            wire = measured["bytes_up"] + reply
            fixed.setdefault(c["label"], []).append(measured["e2e_ms"] - wire * 8 / (mbit * 1000.0))
            if c["kind"] == "split":
                real = splits_the_network(c["kind"], c["head_ms_predicted"], edge["head_ms_predicted"])
                role = "split" if real else "other"
            else:
                role = "alternative"
            # In budget only if every cell that judged it said so (the calibration photos are the same in each).
            prior = seen.get(c["label"])
            within = bool(c["within_budget"]) and (prior is None or prior[2])
            seen[c["label"]] = (role, wire, within)
    return [
        Candidate(label, role, within, statistics.median(fixed[label]), wire, len(fixed[label]))
        for label, (role, wire, within) in seen.items()
    ]


def in_budget(pool: list[Candidate]) -> tuple[list[Candidate], list[Candidate]]:
    """``pool``'s real splits and its alternatives (edge-only, cloud-only), each within the accuracy budget."""
    return (
        [c for c in pool if c.role == "split" and c.within_budget],
        [c for c in pool if c.role == "alternative" and c.within_budget],
    )


def best(pool: Iterable[Candidate], mbit: float) -> Candidate | None:
    return min(pool, key=lambda c: c.ms(mbit), default=None)


def speedup(splits: list[Candidate], alternatives: list[Candidate], mbit: float) -> float:
    """The best alternative's ms over the best split's at ``mbit``."""
    return best(alternatives, mbit).ms(mbit) / best(splits, mbit).ms(mbit)


def crossings(f: Callable[[float], float], level: float, grid: list[float]) -> list[float]:
    """Bandwidths in ``grid``'s range where ``f`` crosses ``level``, each found by bisection in log bandwidth."""
    found = []
    for lo, hi in zip(grid, grid[1:], strict=False):
        if (f(lo) >= level) == (f(hi) >= level):
            continue
        a, b = math.log(lo), math.log(hi)
        for _ in range(60):
            mid = (a + b) / 2
            if (f(math.exp(mid)) >= level) == (f(lo) >= level):
                a = mid
            else:
                b = mid
        found.append(math.exp((a + b) / 2))
    return found


def intervals(f: Callable[[float], float], level: float, grid: list[float]) -> list[list[float]]:
    """The bandwidth intervals within ``grid``'s range where ``f >= level``."""
    edges = [grid[0], *crossings(f, level, grid), grid[-1]]
    spans = []
    for lo, hi in zip(edges, edges[1:], strict=False):
        if f(math.sqrt(lo * hi)) >= level:
            spans.append([lo, hi])
    return spans


def sweep_grid(lo: float, hi: float, points: int = POINTS) -> list[float]:
    return [lo * (hi / lo) ** (i / (points - 1)) for i in range(points)]


def speed_map(run: dict[str, Any], points: int = POINTS) -> dict[str, Any]:
    """The map of one edge speed: the sweep, where a split wins (speed-up > 1) and where it reaches
    :data:`TARGET`, its peak, and how well the map reproduces each measured cell."""
    pool = candidates(run)
    splits, alternatives = in_budget(pool)
    if not splits or not alternatives:
        raise ValueError(f"{run.get('speed')}x: needs an in-budget split and an alternative, measured")
    measured = sorted(c["bandwidth_mbit"] for c in run["bandwidths"])
    grid = sweep_grid(measured[0], measured[-1], points)

    def ratio(mbit: float) -> float:
        return speedup(splits, alternatives, mbit)

    sweep = []
    for mbit in grid:
        s, a = best(splits, mbit), best(alternatives, mbit)
        sweep.append(
            {
                "mbit": mbit,
                "split": s.label,
                "split_ms": s.ms(mbit),
                "alternative": a.label,
                "alternative_ms": a.ms(mbit),
                "speedup": a.ms(mbit) / s.ms(mbit),
            }
        )
    peak = max(sweep, key=lambda p: p["speedup"])
    split_labels = {c.label for c in splits}
    fit = []
    for cell in run["bandwidths"]:
        mbit = cell["bandwidth_mbit"]
        split_ms = [
            c["measured"]["e2e_ms"]
            for c in cell["candidates"]
            if (c.get("measured") or {}).get("samples") and c["label"] in split_labels
        ]
        fit.append(
            {
                "mbit": mbit,
                "map_speedup": ratio(mbit),
                "map_split_ms": best(splits, mbit).ms(mbit),
                "measured_best_split_ms": min(split_ms) if split_ms else None,
                "map_alternative_ms": best(alternatives, mbit).ms(mbit),
                "measured_alternative_ms": (cell.get("best_alternative") or {}).get("e2e_ms"),
                "measured_speedup": cell.get("speedup_over_best_alternative"),
                "oracle_is_split": bool(cell.get("oracle_is_split")),
            }
        )
    return {
        "speed": run.get("speed"),
        "speed_achieved": run.get("speed_achieved"),
        "range_mbit": [grid[0], grid[-1]],
        "split_wins": intervals(ratio, 1.0, grid),
        "reaches_target": intervals(ratio, TARGET, grid),
        "peak": peak,
        "sweep": sweep,
        "fit": fit,
        "candidates": [asdict(c) for c in pool],
    }


def log_share(spans: list[list[float]], inside: list[list[float]]) -> float | None:
    """The share of ``spans`` (log bandwidth) that ``inside`` covers; None when ``spans`` is empty."""
    total = sum(math.log(hi / lo) for lo, hi in spans)
    if total <= 0:
        return None
    covered = 0.0
    for lo, hi in spans:
        for a, b in inside:
            lo2, hi2 = max(lo, a), min(hi, b)
            if hi2 > lo2:
                covered += math.log(hi2 / lo2)
    return covered / total


def build(report: dict[str, Any], points: int = POINTS) -> dict[str, Any]:
    speeds = [speed_map(run, points) for run in report["models"] if run.get("bandwidths")]
    for s in speeds:
        s["target_share_of_split_region"] = log_share(s["split_wins"], s["reaches_target"])
    return {"target": TARGET, "speeds": speeds}


def held_out(report: dict[str, Any], other: dict[str, Any]) -> list[dict[str, Any]]:
    """The map of ``report`` (the grid) at the bandwidths of ``other``, a run at other bandwidths and the same edge
    speeds (matched by target slowdown), beside what ``other`` measured there: the map's speed-up, Cleave's paired
    speed-up, and whether the cell's in-budget oracle was a split. A cell outside the grid's measured range is
    left out (the map does not extrapolate)."""
    grid = {run["speed"]: run for run in report["models"] if run.get("bandwidths") and run.get("speed")}
    rows = []
    for run in other["models"]:
        source = grid.get(run.get("speed"))
        if source is None:
            continue
        splits, alternatives = in_budget(candidates(source))
        measured = sorted(c["bandwidth_mbit"] for c in source["bandwidths"])
        for cell in run.get("bandwidths", []):
            mbit = cell["bandwidth_mbit"]
            if not measured[0] <= mbit <= measured[-1]:
                continue
            rows.append(
                {
                    "speed": run["speed"],
                    "speed_achieved": run.get("speed_achieved"),
                    "mbit": mbit,
                    "map_speedup": speedup(splits, alternatives, mbit),
                    "map_split": best(splits, mbit).label,
                    "measured_speedup": cell.get("speedup_over_best_alternative"),
                    "plan": cell["cleave"]["label"],
                    "oracle_is_split": bool(cell.get("oracle_is_split")),
                    "oracle": (cell.get("oracle_within_budget") or {}).get("label"),
                }
            )
    return rows


def plot(result: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.2, 4.4))
    for s in result["speeds"]:
        xs = [p["mbit"] for p in s["sweep"]]
        (line,) = ax.plot(xs, [p["speedup"] for p in s["sweep"]], lw=1.8, label=f"edge {s['speed']:g}x")
        for f in s["fit"]:
            if f["measured_speedup"]:
                ax.plot(
                    f["mbit"], f["measured_speedup"], "o" if f["oracle_is_split"] else "x", color=line.get_color(), ms=6
                )
    ax.axhline(1.0, color="k", lw=0.8)
    ax.axhline(result["target"], color="k", lw=0.8, ls="--")
    ax.set_xscale("log")
    ax.set_xlabel("link bandwidth, Mbit/s (both directions)")
    ax.set_ylabel("speed-up: better of edge-only and\nin-budget cloud-only over the best split")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title(
        "Speed-up of the best in-budget split, from each candidate's measured fixed cost + bytes\n"
        "(markers: Cleave's paired speed-up per cell; o = the cell's in-budget oracle is a split)",
        fontsize=9,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def print_map(result: dict[str, Any]) -> None:
    for s in result["speeds"]:
        wins = ", ".join(f"{lo:.2g}-{hi:.3g}" for lo, hi in s["split_wins"]) or "nowhere"
        target = ", ".join(f"{lo:.2g}-{hi:.3g}" for lo, hi in s["reaches_target"]) or "nowhere"
        p = s["peak"]
        print(
            f"edge {s['speed']:g}x: a split wins at {wins} Mbit/s, >= {result['target']}x at {target}; "
            f"peak {p['speedup']:.2f}x at {p['mbit']:.3g} Mbit/s ({p['split']} against {p['alternative']})"
        )
        for f in s["fit"]:
            print(
                f"  {f['mbit']:>5g} Mbit/s: map {f['map_speedup']:.2f}x (split {f['map_split_ms']:.1f} ms, measured "
                f"best {_ms(f['measured_best_split_ms'])}; alternative {f['map_alternative_ms']:.1f}, measured "
                f"{_ms(f['measured_alternative_ms'])}); Cleave's paired speed-up {_x(f['measured_speedup'])}"
            )


def print_held_out(result: dict[str, Any]) -> None:
    for r in result.get("held_out", []):
        print(
            f"held out: edge {r['speed']:g}x at {r['mbit']:g} Mbit/s: map {r['map_speedup']:.2f}x ({r['map_split']}); "
            f"measured: Cleave {r['plan']} {_x(r['measured_speedup'])}, oracle {r['oracle']}"
            f"{' (a split)' if r['oracle_is_split'] else ''}"
        )


def _ms(v: float | None) -> str:
    return "-" if v is None else f"{v:.1f}"


def _x(v: float | None) -> str:
    return "-" if v is None else f"{v:.2f}x"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--results", type=Path, default=RESULTS / "placement_real.json", help="placement JSON read")
    parser.add_argument("--out", type=Path, default=None, help="map JSON written (default: <results>_map.json)")
    parser.add_argument("--points", type=int, default=POINTS)
    parser.add_argument(
        "--held-out",
        type=Path,
        default=None,
        help="a placement JSON at other bandwidths: the map is checked against what it measured",
    )
    parser.add_argument("--no-plot", action="store_true")
    args = parser.parse_args(argv)
    report = json.loads(args.results.read_text())
    held = json.loads(args.held_out.read_text()) if args.held_out is not None else None
    out = args.out or args.results.with_name(args.results.stem + "_map.json")
    write(report, out, args.results.name, args.points, held, args.held_out.name if held else "", not args.no_plot)
    return 0


def write(
    report: dict[str, Any],
    out: Path,
    source: str,
    points: int = POINTS,
    other: dict[str, Any] | None = None,
    other_source: str = "",
    with_plot: bool = True,
) -> dict[str, Any]:
    """The map of ``report`` (read from ``source``) to ``out`` (JSON, and a plot beside it), checked against
    ``other`` when given (:func:`held_out`); printed, and returned."""
    result = {"source": source, **build(report, points)}
    if other is not None:
        result["held_out_source"] = other_source
        result["held_out"] = held_out(report, other)
    out.write_text(json.dumps(result, indent=1))
    if with_plot:
        plot(result, out.with_suffix(".png"))
    print_map(result)
    print_held_out(result)
    print(f"wrote {out}")
    return result


if __name__ == "__main__":
    raise SystemExit(main())
