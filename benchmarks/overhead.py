"""Daemon and gRPC overhead over loopback: end-to-end latency against the sum of its parts.

Starts ``cleave-cloud`` and ``cleave-edge`` as real processes on loopback, pins each (cut, encoding)
and sends requests from a client in this process. For every request

    parts     = edge compute + encode + cloud decode + cloud compute + cloud encode + edge decode
    overhead  = end-to-end (measured by the client) - parts

so the overhead is everything that is not model compute or codec work: the app-to-edge call, the
edge-to-cloud stream, protobuf (de)serialisation, chunking, thread hand-offs. It is reported in two
parts: the *split path* (inside the edge daemon's own request time: the edge-to-cloud round trip and
the cloud's stream handling) and the *app hop* (the local app's call into the edge daemon, carrying
the raw fp32 input). Medians over ``--repeats`` requests per configuration; JSON and a plot under
benchmarks/results/.

    python -m benchmarks.overhead [--model resnet18 --size 224 --repeats 30]
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import yaml

from cleave_cli.client import EdgeClient
from cleave_cli.images import synthetic_images
from cleave_cli.launch import cloud_process, edge_process, free_port
from partitioner.loaded import LoadedModel
from partitioner.models import ModelSpec

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
PART_FIELDS = (
    "edge_compute_ms",
    "encode_ms",
    "cloud_decode_ms",
    "cloud_compute_ms",
    "cloud_encode_ms",
    "decode_ms",
)


def pick_cuts(model: LoadedModel, count: int) -> list[str]:
    """Cuts spread over the range of feature sizes: single-tensor cuts, from largest to smallest."""
    single = [c for c in model.graph.cuts if len(c.live) == 1 and c.index > 0]
    by_size = sorted(single, key=lambda c: -c.nbytes)
    step = max(len(by_size) // count, 1)
    chosen = by_size[::step][:count]
    return ["cloud"] + [c.name for c in sorted(chosen, key=lambda c: c.index)]


def measure(client: EdgeClient, x: torch.Tensor, repeats: int, warmup: int) -> dict:
    for _ in range(warmup):
        client.infer(x)
    e2e, parts, edge_total, up = [], [], [], []
    for _ in range(repeats):
        started = time.perf_counter()
        reply = client.infer(x)
        e2e.append((time.perf_counter() - started) * 1e3)
        if reply.note:
            raise RuntimeError(f"request did not run as planned: {reply.note}")
        parts.append(sum(getattr(reply.timing, f) for f in PART_FIELDS))
        edge_total.append(reply.timing.total_ms)
        up.append(reply.bytes_up)
    overhead = [a - b for a, b in zip(e2e, parts, strict=True)]
    return {
        "e2e_ms_p50": statistics.median(e2e),
        "parts_ms_p50": statistics.median(parts),
        "overhead_ms_p50": statistics.median(overhead),
        "overhead_ms_p90": sorted(overhead)[int(0.9 * (len(overhead) - 1))],
        "edge_internal_overhead_ms_p50": statistics.median([t - p for t, p in zip(edge_total, parts, strict=True)]),
        "bytes_up": int(statistics.median(up)),
    }


def plot(records: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(1, 2, figsize=(13, 4.5))
    labels = [f"{r['cut']}\n{r['encoding']}" for r in records]
    parts = [r["parts_ms_p50"] for r in records]
    split = [r["edge_internal_overhead_ms_p50"] for r in records]
    app = [r["overhead_ms_p50"] - r["edge_internal_overhead_ms_p50"] for r in records]
    ax[0].bar(labels, parts, label="compute + codec")
    ax[0].bar(labels, split, bottom=parts, label="split-path overhead (edge<->cloud)")
    ax[0].bar(labels, app, bottom=[p + s for p, s in zip(parts, split, strict=True)], label="app->edge hop")
    ax[0].set_ylabel("ms (median)")
    ax[0].set_title("end-to-end latency = parts + overhead")
    ax[0].tick_params(axis="x", labelsize=6, rotation=90)
    ax[0].legend()
    for enc in sorted({r["encoding"] for r in records}):
        sel = sorted((r for r in records if r["encoding"] == enc), key=lambda r: r["bytes_up"])
        kb = [r["bytes_up"] / 1e3 for r in sel]
        line = ax[1].plot(kb, [r["overhead_ms_p50"] for r in sel], "o-", label=f"{enc} total")[0]
        ax[1].plot(
            kb,
            [r["edge_internal_overhead_ms_p50"] for r in sel],
            "x--",
            color=line.get_color(),
            label=f"{enc} split path",
        )
    ax[1].axhline(2.0, color="grey", ls="--", lw=1, label="2 ms target")
    ax[1].set_xscale("log")
    ax[1].set_xlabel("bytes sent per request (KB, log)")
    ax[1].set_ylabel("overhead ms (median)")
    ax[1].set_title("overhead vs bytes on the wire")
    ax[1].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="resnet18")
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--cuts", type=int, default=4, help="cuts besides cloud-only")
    parser.add_argument("--encodings", default="fp32,fp16,int8,int4")
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1, help="torch threads per daemon")
    parser.add_argument("--out", default=str(RESULTS / "overhead.json"))
    args = parser.parse_args(argv)

    entry = {"name": args.model, "source": args.model, "input_shape": [1, 3, args.size, args.size]}
    model = LoadedModel.load(ModelSpec.from_dict(entry))
    x = synthetic_images(1, model.input_shape, seed=0)
    work = Path(tempfile.mkdtemp(prefix="cleave-overhead-"))
    (work / "cloud.yaml").write_text(yaml.safe_dump({"models": [entry]}))
    # A fixed starting cut: every configuration is pinned, and a planner running meanwhile would skew timings.
    (work / "edge.yaml").write_text(yaml.safe_dump({"model": entry, "plan": {"cut": "cloud", "encoding": "fp32"}}))
    cloud_port = free_port()
    cloud = cloud_process(work / "cloud.yaml", cloud_port, work / "cloud.log", threads=args.threads)
    edge = edge_process(work / "edge.yaml", free_port(), cloud_port, work / "edge.log", threads=args.threads)
    records = []
    try:
        cloud.start()
        edge.start()
        client = EdgeClient(edge.address)
        for cut in pick_cuts(model, args.cuts):
            for encoding in args.encodings.split(","):
                client.pin(cut, encoding)
                record = {"cut": cut, "encoding": encoding, **measure(client, x, args.repeats, args.warmup)}
                records.append(record)
                print(
                    f"{cut:<22} {encoding:<6} e2e {record['e2e_ms_p50']:7.2f}"
                    f"  parts {record['parts_ms_p50']:7.2f}"
                    f"  overhead p50 {record['overhead_ms_p50']:5.2f} p90 {record['overhead_ms_p90']:5.2f}"
                    f"  bytes {record['bytes_up']:>9}",
                    flush=True,
                )
    finally:
        edge.stop()
        cloud.stop()
    small = [r for r in records if r["bytes_up"] < 1 << 20]
    summary = {}
    for key, field in [("total", "overhead_ms_p50"), ("split_path", "edge_internal_overhead_ms_p50")]:
        values = [r[field] for r in small]
        summary[f"{key}_overhead_ms_p50_under_1MB_median"] = statistics.median(values) if values else None
        summary[f"{key}_overhead_ms_p50_under_1MB_max"] = max(values) if values else None
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(
        json.dumps(
            {
                "benchmark": "overhead",
                "model": args.model,
                "input_shape": entry["input_shape"],
                "repeats": args.repeats,
                "threads_per_daemon": args.threads,
                "torch": torch.__version__,
                "host": platform.node(),
                "cpu_count": torch.get_num_threads(),
                "summary": summary,
                "records": records,
            },
            indent=2,
        )
    )
    plot(records, out.with_suffix(".png"))
    print(f"summary: {summary}\nwrote {out} and {out.with_suffix('.png')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
