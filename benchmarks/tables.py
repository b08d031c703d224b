"""Benchmark tables in the docs, generated from the results JSON so that they cannot drift from it.

    python -m benchmarks.tables            # rewrite every marked table in README.md and docs/*.md
    python -m benchmarks.tables --check    # exit 1 (and name the tables) when the committed docs differ

A table lives in a Markdown file between two marker comments, ``<!-- table:NAME -->`` and
``<!-- /table:NAME -->``; everything between them is replaced by what ``TABLES[NAME]`` renders from its
JSON files. Prose around the markers is left alone. A marker with no renderer, a renderer whose JSON is
missing, or an unclosed marker is an error naming it. Only the standard library is used: rendering the
tables needs neither torch nor the project.
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import sys
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"

MARKER = re.compile(r"<!-- table:(?P<name>[a-z0-9_]+) -->\n(?P<body>.*?)<!-- /table:(?P=name) -->", re.S)
OPENING = re.compile(r"<!-- table:([a-z0-9_]+) -->")


def marked_docs(root: Path = ROOT) -> list[Path]:
    """README.md and every docs/*.md that holds at least one table marker."""
    candidates = [root / "README.md", *sorted((root / "docs").glob("*.md"))]
    return [path for path in candidates if path.is_file() and OPENING.search(path.read_text())]


Json = dict[str, Any]


class TableError(Exception):
    """A marker, a renderer or its JSON is wrong; the message names which."""


@dataclass(frozen=True)
class Table:
    """One generated table: the results files it reads and the function that renders them."""

    sources: tuple[str, ...]
    render: Callable[..., list[list[str]]]
    header: tuple[str, ...]
    align: str = ""  # one letter per column, "l" or "r" (right-aligned); missing letters: left


def markdown(header: Iterable[str], rows: Iterable[Iterable[str]], align: str = "") -> str:
    """A Markdown table, one line per row, ending with a newline."""
    header = list(header)
    rule = ["---:" if align[i : i + 1] == "r" else "---" for i in range(len(header))]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(rule) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


# ---- number formats: "-" for a value the JSON does not have -----------------------------------------------------
def f(value: float | None, spec: str = ".1f") -> str:
    """A plain number."""
    return "-" if value is None else format(value, spec)


def x(value: float | None, spec: str = ".2f") -> str:
    """A ratio: ``2.50x``."""
    return "-" if value is None else format(value, spec) + "x"


def pct(value: float | None, spec: str = ".1f") -> str:
    """A fraction as a percentage, without the sign."""
    return "-" if value is None else format(100 * value, spec)


def mega(n: float) -> str:
    return f"{n / 1e6:.1f}M"


def giga(n: float) -> str:
    return f"{n / 1e9:.2f}G"


def kb(n: float) -> str:
    return f"{n / 1000:.1f} KB"


def mb(n: float) -> str:
    return f"{n / 1e6:.2f} MB"


# ---- codec.json -------------------------------------------------------------------------------------------------
def codec(d: Json) -> list[list[str]]:
    """Every path of the codec benchmark: now, against the naive codec, and the run stored as 'before'."""
    before = d.get("before", {}).get("paths", {})
    rows = []
    for name, p in d["paths"].items():
        b = before.get(name, {})
        then = f"{x(b['encode_vs_naive'])} / {x(b['decode_vs_naive'])}" if "encode_vs_naive" in b else "-"
        vs = f"{x(p['encode_vs_naive'])} / {x(p['decode_vs_naive'])}" if "encode_vs_naive" in p else "-"
        rows.append(
            [
                f"`{name}`",
                f"{p['encode_gbps']:.2f} / {p['decode_gbps']:.2f}",
                vs,
                f"{p['payload_bytes']:,}",
                x(p["ratio_vs_fp32"]),
                then,
            ]
        )
    return rows


ZSTD_VARIANTS = {"": "", "codes": " (Cleave's for codes)", "matches": ", Cleave's LZ parameters", "t2": ", 2 threads"}


def zstd_levels(d: Json) -> list[list[str]]:
    return [
        [
            z["input"],
            str(z["level"]) + ZSTD_VARIANTS[z.get("variant", "")],
            x(z["ratio"]),
            f"{z['compress_gbps']:.3f}",
            f"{z['decompress_gbps']:.3f}",
        ]
        for z in d["zstd_levels"]
    ]


def codec_stages(d: Json) -> list[list[str]]:
    parts = d["stages_ms"]
    return [[name, *(f"{parts[k][name]:.3f}" for k in ("int4", "int8"))] for name in parts["int4"]]


# ---- startup.json, startup-before.json --------------------------------------------------------------------------
def startup(now: Json, before: Json) -> list[list[str]]:
    rows = []
    for name, r in now["results"].items():
        b = before["results"].get(name)
        rows.append(
            [
                f"`{name}`",
                f"{r['median_s']:.2f}",
                f"{b['median_s']:.2f}" if b else "-",
                x(b["median_s"] / r["median_s"], ".0f") if b else "-",
            ]
        )
    return rows


# ---- edge_footprint.json ---------------------------------------------------------------------------------------
def edge_footprint(d: Json) -> list[list[str]]:
    goals = d["goals"]
    rows = []
    for name, e in d["edges"].items():
        rows.append(
            [
                name,
                f"{e['install_mb']:.0f}",
                f"{e['rss_mb']:.0f} (peak {e['peak_rss_mb']:.0f})",
                f"{e['serving_s']:.2f}",
            ]
        )
    rows.append(["goal", f"<= {goals['install_mb']}", f"<= {goals['rss_mb']}", f"<= {goals['serving_s']:g}"])
    return rows


# ---- plan_time.json ---------------------------------------------------------------------------------------------
def plan_time(d: Json) -> list[list[str]]:
    def phases(run: Json) -> str:
        parts = []
        for p in PLAN_PHASES:
            phase = run["phases"].get(p)
            parts.append(
                "-"
                if phase is None
                else f"{phase['s']:.1f}" + (f" ({phase['count']})" if p == "accuracy" and "count" in phase else "")
            )
        return " / ".join(parts)

    rows = []
    for m in d["models"]:
        now, before = m["now"], m.get("before")
        rows.append(
            [
                m["model"],
                f"{now['cold']['wall_s']:.1f}",
                f"{before['cold']['wall_s']:.1f}" if before else "-",
                x(before["cold"]["wall_s"] / now["cold"]["wall_s"], ".1f") if before else "-",
                phases(now["cold"]),
                phases(before["cold"]) if before else "-",
                f"{now['warm']['wall_s']:.1f}",
                f"{before['warm']['wall_s']:.1f}" if before else "-",
                f"{m['load_avg_1m_before']:.1f}-{m['load_avg_1m_after']:.1f}",
                f"`{now['cold']['best']}`"
                + (
                    ""
                    if not before or before["cold"]["best"] == now["cold"]["best"]
                    else f" (before: `{before['cold']['best']}`)"
                ),
            ]
        )
    return rows


PLAN_PHASES = ("profile", "encodings", "accuracy")


# ---- placement.json ---------------------------------------------------------------------------------------------
PLACEMENT_STRATEGIES = ("edge-only", "cloud-raw", "cloud-jpeg", "neurosurgeon")


def plan_label(label: str) -> str:
    """The benchmark's candidate labels, shortened for a table (`cloud-only jpeg` -> `cloud JPEG`)."""
    if label == "cloud-only jpeg":
        return "cloud JPEG"
    if label.startswith("cloud-only ") and label != "cloud-only":
        return "cloud " + label.removeprefix("cloud-only ")
    return label


def placement(d: Json) -> list[list[str]]:
    rows = []
    for m in d["models"]:
        for c in m.get("bandwidths", []):
            chosen, s = c["cleave"], c["strategies"]
            rows.append(
                [
                    m["model"],
                    f"{c['bandwidth_mbit']:g}",
                    chosen["label"],
                    f(chosen["predicted_ms"]),
                    f(chosen["measured"]["edge_ms"]),
                    plan_label(c["oracle"]["label"]),
                    f(c.get("ratio"), ".2f"),
                    f(c.get("ratio_within_budget"), ".2f"),
                    *(f(s.get(k)) for k in PLACEMENT_STRATEGIES),
                ]
            )
    return rows


def placement_summary(d: Json) -> list[list[str]]:
    s = d["summary"]
    cells = [c for m in d["models"] for c in m.get("bandwidths", [])]
    best = sum(1 for c in cells if c.get("ratio_within_budget") is not None and c["ratio_within_budget"] <= 1.0)
    rows = [
        ["cells (model x bandwidth)", str(s["cells"])],
        ["cells where Cleave's plan is the measured best within the budget", f"{best} of {len(cells)}"],
        [
            "ratio to the fastest candidate within the budget: median / max",
            f"{s['median_ratio_within_budget']:.2f} / {s['max_ratio_within_budget']:.2f}",
        ],
        ["ratio to the fastest candidate: median / max", f"{s['median_ratio']:.2f} / {s['max_ratio']:.2f}"],
        ["prediction error of the chosen plan (median)", pct(s["median_abs_error_chosen"]) + "%"],
        ["prediction error of every candidate (median)", pct(s["median_abs_error_all_candidates"]) + "%"],
        ["Cleave under automatic planning over the same plan pinned (median)", f"{s['median_auto_vs_pinned']:.2f}"],
    ]
    for name, v in s["median_speedup_of_cleave_over"].items():
        rows.append([f"speed-up over {name} (median)", x(v)])
    return rows


# ---- pruning.json -----------------------------------------------------------------------------------------------
def placement_real(d: Json) -> list[list[str]]:
    """One row per cell (edge speed x link) of the real-model placement run."""
    rows = []
    for m in d["models"]:
        speed = f"{m['speed']:g}x ({m['speed_achieved']:.1f}x)"
        for c in m["bandwidths"]:
            chosen, within = c["cleave"], c.get("oracle_within_budget") or {}
            rows.append(
                [
                    speed,
                    f"{c['bandwidth_mbit']:g}",
                    chosen["label"],
                    f(chosen["predicted_ms"]),
                    f(chosen["measured"]["e2e_ms"]),
                    plan_label(within.get("label", "-")),
                    f(within.get("e2e_ms")),
                    x(c.get("ratio_within_budget")),
                    plan_label(c["best_alternative"]["label"]),
                    x(c.get("speedup_over_best_alternative")),
                    "yes" if c.get("oracle_is_split") else "no",
                    bottleneck_cell(c.get("bottleneck")),
                ]
            )
    return rows


def placement_real_split_bound(d: Json) -> list[list[str]]:
    """Per cell whose in-budget oracle is a split: the best alternative, the fastest any measured in-budget split
    could be (benchmarks/placement.py: split_bound) and what the 1.5x goal asks of that split's bytes."""
    rows = []
    for m in d["models"]:
        for c in m["bandwidths"]:
            b = c.get("split_bound")
            if not (c.get("oracle_is_split") and b):
                continue
            alt = c["best_alternative"]
            rows.append(
                [
                    f"{m['speed']:g}x, {c['bandwidth_mbit']:g} Mbit/s",
                    f"{plan_label(alt['label'])} {f(alt['e2e_ms'])}",
                    f"`{b['label']}` {f(b['bound_ms'])}",
                    x(b["max_speedup"]),
                    x(b["zero_byte_max_speedup"]),
                    f"{b['bytes_up']:,}",
                    f"{b['goal_bytes']:,.0f}",
                    plan_label(c["cleave"]["label"]),
                    x(c.get("speedup_over_best_alternative")),
                ]
            )
    return rows


def placement_real_map(d: Json) -> list[list[str]]:
    """Per edge speed (``benchmarks/speedup_map.py``): the bandwidths where the best in-budget split beats the better
    of edge-only and in-budget cloud-only, where by 1.5x, the peak, and at each measured bandwidth the map's
    speed-up beside Cleave's paired one."""

    def spans(s: list[list[float]]) -> str:
        return ", ".join(f"{lo:.2g}-{hi:.3g}" for lo, hi in s) or "nowhere"

    rows = []
    for s in d["speeds"]:
        p = s["peak"]
        cells = "; ".join(
            f"{c['mbit']:g}: {x(c['map_speedup'])} / {x(c['measured_speedup'])}{'*' if c['oracle_is_split'] else ''}"
            for c in s["fit"]
        )
        rows.append(
            [
                f"{s['speed']:g}x ({s['speed_achieved']:.1f}x)",
                spans(s["split_wins"]),
                spans(s["reaches_target"]),
                pct(s.get("target_share_of_split_region"), ".0f") + "%",
                f"{x(p['speedup'])} at {p['mbit']:.3g} ({p['split']} / {plan_label(p['alternative'])})",
                cells,
            ]
        )
    return rows


def placement_real_held_out(d: Json, between: Json) -> list[list[str]]:
    """The speed-up map of the grid (``d``) at the bandwidths of a held-out run (``between``), beside what that run
    measured there."""
    at = {(r["speed"], r["mbit"]): r for r in d.get("held_out", [])}
    rows = []
    for m in between["models"]:
        for c in m.get("bandwidths", []):
            r = at.get((m["speed"], c["bandwidth_mbit"]))
            oracle = (c.get("oracle_within_budget") or {}).get("label", "-")
            rows.append(
                [
                    f"{m['speed']:g}x ({m['speed_achieved']:.1f}x)",
                    f"{c['bandwidth_mbit']:g}",
                    f"{x(r['map_speedup'])} ({r['map_split']})" if r else "- (outside the grid's range)",
                    c["cleave"]["label"],
                    x(c.get("speedup_over_best_alternative")),
                    plan_label(oracle) + (" (a split)" if c.get("oracle_is_split") else ""),
                ]
            )
    return rows


def bottleneck_cell(b: Json | None) -> str:
    """The learned bottleneck's latent in a placement cell (``--bottleneck``): its measured ms, its top-1 agreement
    with the plain model, and whether the planner, offered it, makes it the plan."""
    if not b:
        return "-"
    return f"{f(b.get('measured_ms'))}, top-1 {b['top1']:.2f}" + (", the plan" if b.get("becomes_plan") else "")


def placement_real_summary(d: Json) -> list[list[str]]:
    s = d["summary"]
    split = s["speedup_over_best_alternative_in_split_cells"]
    rows = [
        ["cells (edge speed x link)", str(s["cells"])],
        [
            "Cleave / fastest in-budget candidate: median, max (goals 1.05, 1.15)",
            f"{s['median_ratio_within_budget']:.2f} / {s['max_ratio_within_budget']:.2f}",
        ],
        ["cells where the in-budget oracle is a split", str(s["cells_where_oracle_is_split"])],
        [
            "there, Cleave's speed-up over the better of edge-only and in-budget cloud-only (goal 1.5x)",
            ", ".join(x(v) for v in split) or "-",
        ],
        ["prediction error of the chosen plan (median)", pct(s["median_abs_error_chosen"]) + "%"],
        ["Cleave under automatic planning over the same plan pinned (median)", f"{s['median_auto_vs_pinned']:.2f}"],
    ]
    for name, v in s["median_speedup_of_cleave_over"].items():
        rows.append([f"speed-up over {name} (median)", x(v)])
    return rows


def bottleneck(d: Json) -> list[list[str]]:
    """The rate-agreement curve on held-out photos: bytes per image and agreement of every JPEG,
    WebP and bottleneck point and, per reference cut, its cheapest int-k + zstd within 1 point of
    full agreement (else its most agreeing one)."""
    points = d["curve"]["points"]

    def rank(p: Json) -> tuple:  # within 1 point: fewest bytes; otherwise: most agreement
        ok = p["agreement"] >= 0.99
        return (ok, 0 if ok else p["agreement"], -p["bytes_mean"])

    int_k: dict[str, Json] = {}
    for p in points:
        cut = p.get("cut")
        if p["family"].startswith("int-k") and cut and (cut not in int_k or rank(p) > rank(int_k[cut])):
            int_k[cut] = p
    rows = []
    for p in points:
        if p["family"].startswith("int-k") and int_k.get(p.get("cut")) is not p:
            continue
        method = p["method"] if "@" in p["method"] or not p.get("cut") else f"{p['method']} @{p['cut']}"
        rows.append(
            [method, p["family"], f(p["bytes_mean"], ".0f"), f(p["bytes_p95"], ".0f"), pct(p["agreement"], ".0f")]
        )
    return rows


def pruning(d: Json) -> list[list[str]]:
    rows = []
    for r in d["rows"]:
        b, a = r["before"], r["after"]
        rows.append(
            [
                f"{r['model']}, {r['ratio']:.0%}",
                f"{mega(b['parameters'])} -> {mega(a['parameters'])}",
                f"{giga(b['macs'])} -> {giga(a['macs'])} ({x(r['macs_ratio'])})",
                x(r["speedup"], ".1f"),
                f"{r['plan_bytes'] / 1000:.1f} KB",
                f"{r['torchscript_bytes'] / 1e6:.0f} MB",
                f"{r['job_seconds']:.0f} s",
            ]
        )
    return rows


# ---- batching.json ----------------------------------------------------------------------------------------------
def batching(d: Json) -> list[list[str]]:
    by = {(r["mode"], r["streams"]): r for r in d["records"]}
    rows = []
    for streams in sorted({r["streams"] for r in d["records"]}):
        off, on = by.get(("off", streams)), by.get(("on", streams))
        if not (off and on):
            continue
        rows.append(
            [
                str(streams),
                f"{off['throughput_rps']:.1f}",
                f"{off['p50_ms']:.1f} / {off['p99_ms']:.1f}",
                f"{on['throughput_rps']:.1f}",
                f"{on['p50_ms']:.1f} / {on['p99_ms']:.1f}",
                f"{on['mean_batch_size']:.2f}",
                f"x{on['throughput_rps'] / off['throughput_rps']:.2f}",
            ]
        )
    return rows


# ---- load.json --------------------------------------------------------------------------------------------------
def load(d: Json) -> list[list[str]]:
    s = d["summary"]
    placements = ", ".join(f"{k}: {v}" for k, v in s["placements"].items())
    return [
        [
            f"{s['requests']} ({placements} incl. warm-up)",
            f"{s['throughput_req_per_s']:.1f} req/s ({s['throughput_req_per_s'] / d['edges']:.0f} per edge)",
            f"{s['latency_ms_p50']:.1f} / {s['latency_ms_p99']:.1f} / {s['latency_ms_max']:.1f} ms",
            str(s["errors"]),
            str(s["fallbacks"]),
            f"{s['rss_growth_mb_cloud']:+.2f} MB",
            f"{s['rss_growth_mb_edges_max']:+.2f} MB",
            f"{s['anon_slope_mb_per_min_max']:.2f} MB/min",
        ]
    ]


# ---- scale.json -------------------------------------------------------------------------------------------------
def scale(d: Json) -> list[list[str]]:
    by = {(r["config"], r["streams"]): r for r in d["records"]}
    rows = []
    for streams in sorted({r["streams"] for r in d["records"]}):
        cells = [str(streams)]
        for config in ("process", "ray-1", "ray-2"):
            r = by[(config, streams)]
            cells += [f"{r['throughput_rps']:.1f}", f"{r['p50_ms']:.1f} / {r['p99_ms']:.1f}"]
        cells.append(f"x{by[('ray-2', streams)]['throughput_rps'] / by[('ray-1', streams)]['throughput_rps']:.2f}")
        rows.append(cells)
    return rows


def scale_summary(d: Json) -> list[list[str]]:
    s, fleet = d["summary"], d["fleet"]
    best = s["best_rps"]
    return [
        ["cores on this machine (driver, front door and replicas share them)", str(d["cpu_count"])],
        [
            "Ray path's added median latency, one request at a time, alternating between the clouds",
            f"{s['ray_added_p50_ms_interleaved']:+.2f} ms ({s['interleaved_p50_ms']['process']:.1f} -> "
            f"{s['interleaved_p50_ms']['ray-1']:.1f} ms)",
        ],
        ["the same from the 1-stream rows (taken minutes apart)", f"{s['ray_added_p50_ms_1_stream']:+.2f} ms"],
        [
            "best throughput: process / ray-1 / ray-2",
            f"{best['process']:.1f} / {best['ray-1']:.1f} / {best['ray-2']:.1f} req/s",
        ],
        ["2 replicas over 1 (best throughput)", f"x{s['ray2_over_ray1']:.2f}"],
        [
            "one replica's capacity (fleet model input)",
            f"{fleet['per_replica_rps']:.1f} req/s ({fleet['service_ms']:.1f} ms each)",
        ],
        ["errors (wrong, missing or failed replies)", str(s["errors"])],
    ]


def scale_fleet(d: Json) -> list[list[str]]:
    fleet = d["fleet"]
    return [
        [
            str(r["replicas"]),
            str(r["nodes"]),
            f"{r['capacity_rps']:,.0f}",
            f"{r['utilisation'] * 100:.0f} %",
            f"{r['p_wait'] * 100:.1f} %",
            f"{r['p50_ms']:.1f} / {r['p99_ms']:.1f}",
        ]
        for r in fleet["rows"]
    ]


# ---- overhead.json ----------------------------------------------------------------------------------------------
def overhead(d: Json) -> list[list[str]]:
    return [
        [
            f"`{r['cut']}`",
            r["encoding"],
            f"{r['bytes_up']:,}",
            f"{r['e2e_ms_p50']:.1f}",
            f"{r['parts_ms_p50']:.1f}",
            f"{r['overhead_ms_p50']:.2f}",
            f"{r['floor_ms_p50']:.2f}",
            f"{r['edge_internal_overhead_ms_p50']:.2f}",
            f"{r['floor_split_ms_p50']:.2f}",
        ]
        for r in d["records"]
    ]


def overhead_summary(d: Json) -> list[list[str]]:
    s = d["summary"]

    def median_max(prefix: str) -> str:
        return f"{s[prefix + '_median']:.2f} / {s[prefix + '_max']:.2f}"

    # Runs since stop 25 have a floor that does the parts' work, and the instant echo beside it.
    echo = "echo_overhead_ms_p50_under_1MB_median" in s
    same = "same bytes and work" if echo else "same bytes"
    return [
        [
            "Cleave: app hop + split path, median / max over configurations",
            median_max("total_overhead_ms_p50_under_1MB"),
        ],
        [f"floor: bare gRPC, both hops, {same}", median_max("floor_overhead_ms_p50_under_1MB")],
        ["Cleave: split path only (edge to cloud and back)", median_max("split_path_overhead_ms_p50_under_1MB")],
        [f"floor: bare gRPC stream round trip, {same}", median_max("floor_split_overhead_ms_p50_under_1MB")],
        ["Cleave above the floor, request by request: both hops", median_max("excess_overhead_ms_p50_under_1MB")],
        ["Cleave above the floor, request by request: split", median_max("split_excess_overhead_ms_p50_under_1MB")],
    ] + (
        [
            ["echo: bare gRPC, both hops, same bytes, no work", median_max("echo_overhead_ms_p50_under_1MB")],
            ["echo: bare gRPC stream round trip, no work", median_max("echo_split_overhead_ms_p50_under_1MB")],
        ]
        if echo
        else []
    )


# ---- quantization.json ------------------------------------------------------------------------------------------
HEAD_PATHS = (
    ("torch_fp32", "torch fp32 (eager)"),
    ("ort_fp32", "ONNX Runtime fp32"),
    ("torch_fx_int8", "torch.ao FX int8, x86 backend (`prepare_fx` / `convert_fx`)"),
    ("ort_int8 (chosen)", "**ONNX Runtime QOperator int8 (chosen)**"),
)


def quant_latency(d: Json) -> list[list[str]]:
    runs = d["latency"]["threads=1"]
    big, small = runs["resnet18_224_to_layer3"], runs["harness_32_to_layer3"]
    rows = []
    for key, label in HEAD_PATHS:
        rows.append(
            [
                label,
                f"{big['median_ms'][key]:.2f}",
                x(big["speedup_vs_torch_fp32"][key], ".1f"),
                f"{big['cosine_vs_fp32'][key]:.4f}",
                f"{small['median_ms'][key]:.3f}",
                x(small["speedup_vs_torch_fp32"][key], ".1f"),
            ]
        )
    for name in sorted(set(big.get("errors", {})) | set(small.get("errors", {}))):
        why = big.get("errors", {}).get(name) or small["errors"][name]
        rows.append(
            [f"`{name}` (torchao PT2E + X86InductorQuantizer + inductor)", "fails", "", "", "fails", f"`{why}`"]
        )
    return rows


def quant_sizes(d: Json) -> list[list[str]]:
    runs = d["latency"]["threads=1"]
    rows = []
    for name, label in (
        ("resnet18_224_to_layer3", "resnet18 head (224x224)"),
        ("harness_32_to_layer3", "harness head (32x32)"),
    ):
        s = runs[name]["sizes"]
        fp32 = s["fp32_onnx_artifact_bytes"]
        rows.append(
            [
                label,
                mb(s["fp32_params_bytes"]),
                mb(fp32),
                f"{mb(s['int8_artifact_bytes'])} ({x(fp32 / s['int8_artifact_bytes'], '.1f')})",
                f"{mb(s['w4_packed_artifact_bytes'])} ({x(fp32 / s['w4_packed_artifact_bytes'], '.1f')})",
            ]
        )
    return rows


CLIPS = ("minmax", "percentile", "aciq", "lapq")


def _accuracy(d: Json, per_channel: bool) -> list[list[str]]:
    rows: dict[tuple[str, str, int], dict[str, float]] = {}
    floats: dict[tuple[str, str], float] = {}
    for r in d["accuracy"]["rows"]:
        if r["feature_bits"] == 32:
            floats[(r["cut"], r["head"])] = r["acc"]
        elif r["feature_bits"] in (4, 3, 2) and r["per_channel"] == per_channel:
            rows.setdefault((r["cut"], r["head"], r["feature_bits"]), {})[r["clip"]] = r["acc"]
    out = []
    for (cut, head, bits), acc in rows.items():
        if per_channel and len(acc) < 2:
            continue
        out.append(
            [
                f"`{cut}`",
                head,
                pct(floats.get((cut, head)), ".2f"),
                f"{bits} bit",
                *(pct(acc.get(c), ".2f") for c in CLIPS),
            ]
        )
    return out


def quant_accuracy(d: Json) -> list[list[str]]:
    return _accuracy(d, per_channel=False)


def quant_accuracy_per_channel(d: Json) -> list[list[str]]:
    return [row[:-1] for row in _accuracy(d, per_channel=True)]


def feature_mse(d: Json) -> list[list[str]]:
    """ACIQ's relative feature MSE over min-max's, per tensor: geometric mean over a model's cuts."""
    mse: dict[tuple[str, str, int, str], float] = {}
    for r in d["feature_mse"]:
        if not r["per_channel"]:
            mse[(r["model"], r["cut"], r["bits"], r["clip"])] = r["rel_mse"]
    for r in d["accuracy"]["rows"]:
        if r["head"] == "fp32" and not r["per_channel"] and "rel_mse" in r:
            mse[("harness", r["cut"], r["feature_bits"], r["clip"])] = r["rel_mse"]
    out = []
    models = list(dict.fromkeys(k[0] for k in mse))
    for model in models:
        cuts = list(dict.fromkeys(k[1] for k in mse if k[0] == model))
        cells = []
        for bits in (4, 3, 2):
            ratios = [
                mse[(model, c, bits, "aciq")] / mse[(model, c, bits, "minmax")]
                for c in cuts
                if (model, c, bits, "aciq") in mse and (model, c, bits, "minmax") in mse
            ]
            cells.append(x(statistics.geometric_mean(ratios)) if ratios else "-")
            cells[-1] += f" ({min(ratios):.2f}-{max(ratios):.2f})" if len(ratios) > 1 else ""
        out.append([model, str(len(cuts)), *cells])
    return out


def bitalloc(d: Json) -> list[list[str]]:
    return [
        [
            f"`{b['cut']}`",
            f"{b['memory_budget_bytes'] / 1000:.0f} KB / {b['max_distortion']:.0%}",
            f"{min(b['weight_bits'].values())}-{max(b['weight_bits'].values())}",
            str(b["feature_bits"]),
            kb(b["head_bytes"]),
            pct(b["distortion"], ".2f") + "%",
            pct(b["test_accuracy"]),
        ]
        for b in d["bitalloc"]
    ]


def int8_heads(d: Json) -> list[list[str]]:
    """Per cut of the pretrained Lite0 (``benchmarks/int8_heads.py``): top-1 agreement with a float head and
    int8 features, with the int8 head, and the int8 head's speed-up."""
    n = d["photos"]
    rows = []
    for r in d["cuts"]:
        agree = [round(r[k]["top1"] * n) for k in ("float_head_int8_features", "int8_head_float_features")]
        agree.append(round(r["int8_head_int8_features"]["top1"] * n))
        cut = "whole model (edge-only)" if r["cut"] == "_fc" else f"`{r['cut']}` (#{r['index']})"
        rows.append([cut, *(f"{a}/{n}" for a in agree), x(r["speedup"])])
    return rows


def executors(d: Json) -> list[list[str]]:
    """Per cut of the pretrained Lite0 (``benchmarks/executors.py``): head and tail milliseconds on torch and on
    ONNX Runtime, side by side, and the float ONNX Runtime head's top-1 agreement."""
    n = d["photos"]
    rows = []
    for r in d["cuts"]:
        h, t = r["head_ms"], r.get("tail_ms")
        cut = "whole model (edge-only)" if r["cut"] == "_fc" else f"`{r['cut']}` (#{r['index']})"
        rows.append(
            [
                cut,
                f(h["torch"]),
                f(h["ort_float"]),
                f(h["ort_int8"]),
                x(h["torch"] / h["ort_float"]),
                x(h["torch"] / h["ort_int8"]),
                f(t and t["torch"]),
                f(t and t["ort_float"]),
                f"{round(r['ort_float_head']['top1'] * n)}/{n}",
            ]
        )
    return rows


def feature_entropy(d: Json) -> list[list[str]]:
    """Per cut and encoding of the pretrained Lite0 (``benchmarks/feature_entropy.py``): the bytes sent, the zstd
    payload and the codes' entropy bounds, medians over the held-out photos; top-1 agreement on every photo."""
    n = d["photos"]
    rows = []
    for r in d["points"]:
        b = r["bytes"]
        sizes = (b["message"], b["payload"], b["pooled"], b["static_tables"], b["per_channel"])
        rows.append(
            [
                f"`{r['cut']}` {r['encoding']}",
                f"{r['values']:,}",
                *(f"{v:,.0f}" for v in sizes),
                x(r["payload_over_per_channel"]),
                f"{round(r['top1'] * n)}/{n}",
            ]
        )
    return rows


TABLES: dict[str, Table] = {
    "codec": Table(
        ("codec.json",),
        codec,
        ("path", "GB/s encode / decode", "vs naive", "payload bytes", "vs fp32", "before, vs naive"),
    ),
    "zstd_levels": Table(
        ("codec.json",), zstd_levels, ("input", "zstd level", "ratio", "compress GB/s", "decompress GB/s"), "lrrrr"
    ),
    "codec_stages": Table(("codec.json",), codec_stages, ("stage", "int4, ms", "int8, ms"), "lrr"),
    "startup": Table(
        ("startup.json", "startup-before.json"), startup, ("step", "now, s", "before, s", "faster"), "lrrr"
    ),
    "edge_footprint": Table(
        ("edge_footprint.json",),
        edge_footprint,
        ("edge", "installed, MB", "RSS serving, MB", "start to SERVING, s"),
        "lrrr",
    ),
    "plan_time": Table(
        ("plan_time.json",),
        plan_time,
        (
            "model",
            "cold, s",
            "before, s",
            "faster",
            "phases now, s",
            "phases before, s",
            "warm, s",
            "warm before, s",
            "load",
            "best placement",
        ),
        "lrrrrrrrrl",
    ),
    "placement": Table(
        ("placement.json",),
        placement,
        (
            "model",
            "Mbit/s",
            "Cleave's plan",
            "predicted",
            "measured",
            "oracle best",
            "ratio",
            "ratio in budget",
            "edge-only",
            "cloud raw",
            "cloud JPEG",
            "Neurosurgeon",
        ),
    ),
    "placement_summary": Table(("placement.json",), placement_summary, ("measure", "value")),
    "placement_real": Table(
        ("placement_real.json",),
        placement_real,
        (
            "edge (target/achieved)",
            "Mbit/s",
            "Cleave's plan",
            "predicted",
            "measured",
            "oracle in budget",
            "its ms",
            "ratio",
            "best alternative",
            "speed-up",
            "oracle a split",
            "learned bottleneck",
        ),
    ),
    "placement_real_summary": Table(("placement_real.json",), placement_real_summary, ("measure", "value")),
    "placement_real_split_bound": Table(
        ("placement_real.json",),
        placement_real_split_bound,
        (
            "cell",
            "best alternative, ms",
            "best split bound, ms",
            "bound speed-up",
            "with no bytes",
            "its bytes",
            "bytes for 1.5x",
            "Cleave's plan",
            "its speed-up",
        ),
    ),
    "placement_real_held_out": Table(
        ("placement_real_map.json", "placement_between.json"),
        placement_real_held_out,
        (
            "edge (target/achieved)",
            "Mbit/s",
            "map of the grid",
            "Cleave's plan",
            "its paired speed-up",
            "oracle in budget",
        ),
    ),
    "placement_real_map": Table(
        ("placement_real_map.json",),
        placement_real_map,
        (
            "edge (target/achieved)",
            "a split wins at, Mbit/s",
            "by >= 1.5x at",
            "share of the split range (log)",
            "peak",
            "per measured Mbit/s: map / Cleave's paired speed-up (* oracle a split)",
        ),
    ),
    "bottleneck": Table(
        ("bottleneck.json",), bottleneck, ("method", "family", "bytes/image", "p95", "agreement %"), "llrrr"
    ),
    "bottleneck_long": Table(
        ("bottleneck_long.json",), bottleneck, ("method", "family", "bytes/image", "p95", "agreement %"), "llrrr"
    ),
    "bottleneck_affine": Table(
        ("bottleneck_affine.json",), bottleneck, ("method", "family", "bytes/image", "p95", "agreement %"), "llrrr"
    ),
    "bottleneck_levels": Table(
        ("bottleneck_levels.json",), bottleneck, ("method", "family", "bytes/image", "p95", "agreement %"), "llrrr"
    ),
    "pruning": Table(
        ("pruning.json",),
        pruning,
        ("model, channels removed", "params", "MACs", "CPU speed-up", "plan", "TorchScript", "job"),
    ),
    "batching": Table(
        ("batching.json",),
        batching,
        (
            "streams",
            "off: req/s",
            "off: p50 / p99 ms",
            "on: req/s",
            "on: p50 / p99 ms",
            "on: mean batch",
            "speed-up (req/s on/off)",
        ),
        "rrrrrrr",
    ),
    "load": Table(
        ("load.json",),
        load,
        (
            "requests in the measured window",
            "throughput",
            "latency p50 / p99 / max",
            "errors",
            "fallbacks",
            "RSS growth, cloud",
            "RSS growth, edges (max)",
            "anon RSS trend (max)",
        ),
    ),
    "scale": Table(
        ("scale.json",),
        scale,
        (
            "streams",
            "process: req/s",
            "process: p50 / p99 ms",
            "ray 1 replica: req/s",
            "p50 / p99 ms",
            "ray 2 replicas: req/s",
            "p50 / p99 ms",
            "2 replicas / 1",
        ),
        "rrrrrrrr",
    ),
    "scale_summary": Table(("scale.json",), scale_summary, ("measure", "value"), "lr"),
    "scale_fleet": Table(
        ("scale.json",),
        scale_fleet,
        ("replicas", "nodes", "capacity req/s", "utilisation", "requests that queue", "p50 / p99 ms (model)"),
        "rrrrrr",
    ),
    "overhead": Table(
        ("overhead.json",),
        overhead,
        (
            "cut",
            "encoding",
            "bytes up",
            "end to end ms",
            "parts ms",
            "overhead ms",
            "floor ms",
            "split path ms",
            "floor split ms",
        ),
        "llrrrrrrr",
    ),
    "overhead_summary": Table(
        ("overhead.json",), overhead_summary, ("per-request overhead (p50), features under 1 MB", "ms")
    ),
    "quant_latency": Table(
        ("quantization.json",),
        quant_latency,
        ("path", "resnet18 head ms", "speed-up", "cosine vs fp32", "harness head ms", "speed-up"),
    ),
    "quant_sizes": Table(
        ("quantization.json",),
        quant_sizes,
        ("head", "fp32 parameters", "fp32 ONNX artifact", "int8 artifact", "4-bit packed artifact"),
    ),
    "quant_accuracy": Table(
        ("quantization.json",),
        quant_accuracy,
        ("cut", "head", "float %", "features", "min-max", "percentile 99.9", "ACIQ", "LAPQ"),
    ),
    "quant_accuracy_per_channel": Table(
        ("quantization.json",),
        quant_accuracy_per_channel,
        ("cut", "head", "float %", "features", "min-max", "percentile 99.9", "ACIQ"),
    ),
    "quant_accuracy_10k": Table(
        ("quantization_accuracy_10k.json",),
        quant_accuracy,
        ("cut", "head", "float %", "features", "min-max", "percentile 99.9", "ACIQ", "LAPQ"),
    ),
    "feature_mse": Table(
        ("quantization.json",),
        feature_mse,
        ("model", "cuts", "4 bit", "3 bit", "2 bit"),
    ),
    "int8_heads": Table(
        ("int8_heads.json",),
        int8_heads,
        ("cut", "float head, int8 features", "int8 head, float32 features", "int8 head, int8 features", "speed-up"),
        "lrrrr",
    ),
    "executors": Table(
        ("executors.json",),
        executors,
        (
            "head at",
            "torch, ms",
            "ORT float, ms",
            "ORT int8, ms",
            "ORT float speed-up",
            "ORT int8 speed-up",
            "tail: torch, ms",
            "tail: ORT float, ms",
            "ORT float head: top-1",
        ),
        "lrrrrrrrr",
    ),
    "feature_entropy": Table(
        ("feature_entropy.json",),
        feature_entropy,
        (
            "cut, encoding",
            "values",
            "sent, B",
            "zstd payload, B",
            "entropy: one table",
            "per-channel tables from calibration",
            "ideal per-channel tables",
            "payload / ideal",
            "top-1",
        ),
        "lrrrrrrrr",
    ),
    "bitalloc": Table(
        ("quantization.json",),
        bitalloc,
        ("cut", "budget: memory / distortion", "weight bits", "feature bits", "head", "distortion", "test accuracy %"),
    ),
}


def render(name: str, results: Path = RESULTS) -> str:
    """The Markdown of table ``name`` from the JSON files in ``results``."""
    table = TABLES.get(name)
    if table is None:
        raise TableError(f"table:{name}: no such table (known: {', '.join(sorted(TABLES))})")
    data = []
    for source in table.sources:
        path = results / source
        try:
            data.append(json.loads(path.read_text()))
        except FileNotFoundError:
            raise TableError(f"table:{name}: {path} does not exist") from None
        except json.JSONDecodeError as exc:
            raise TableError(f"table:{name}: {path} is not JSON: {exc}") from None
    try:
        rows = table.render(*data)
    except (KeyError, TypeError, ValueError) as exc:
        raise TableError(f"table:{name}: {', '.join(table.sources)} lacks what the table needs: {exc!r}") from None
    return markdown(table.header, rows, table.align)


def regenerate(text: str, results: Path = RESULTS) -> tuple[str, list[str]]:
    """``text`` with every marked table rendered afresh, and the names of the tables that changed."""
    opened = OPENING.findall(text)
    closed = {m.group("name") for m in MARKER.finditer(text)}
    for name in opened:
        if name not in closed:
            raise TableError(f"table:{name}: no closing <!-- /table:{name} --> marker")
    changed: list[str] = []

    def replace(match: re.Match[str]) -> str:
        name = match.group("name")
        body = render(name, results)
        if body != match.group("body"):
            changed.append(name)
        return f"<!-- table:{name} -->\n{body}<!-- /table:{name} -->"

    return MARKER.sub(replace, text), changed


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.tables", description=__doc__.split("\n\n")[0])
    parser.add_argument("--check", action="store_true", help="change nothing; exit 1 if a table is stale")
    parser.add_argument("--docs", type=Path, nargs="+", help="Markdown files (default: README.md and docs/*.md)")
    parser.add_argument("--results", type=Path, default=RESULTS, help="results folder (default: %(default)s)")
    args = parser.parse_args(argv)
    stale = 0
    for doc in args.docs or marked_docs():
        try:
            text = doc.read_text()
            new, changed = regenerate(text, args.results)
        except (OSError, TableError) as exc:
            print(f"{doc}: {exc}", file=sys.stderr)
            return 2
        if not changed:
            continue
        if args.check:
            stale += len(changed)
            print(f"{doc}: stale tables: {', '.join(changed)} (run `python -m benchmarks.tables`)", file=sys.stderr)
        else:
            doc.write_text(new)
            print(f"{doc}: rewrote {', '.join(changed)}")
    return 1 if stale else 0


if __name__ == "__main__":
    sys.exit(main())
