"""Daemon and gRPC overhead over loopback: end-to-end latency against the sum of its parts and the floor.

Starts ``cleave-cloud`` and ``cleave-edge`` as real processes on loopback, pins each (cut, encoding)
and sends requests from a client in this process. For every request

    parts     = edge compute + encode + cloud decode + cloud compute + cloud encode + edge decode
    overhead  = end-to-end (measured by the client) - parts

so the overhead is everything that is not model compute or codec work: the app-to-edge call, the
edge-to-cloud stream, protobuf (de)serialisation, chunking, thread hand-offs. The client serializes
its request once and parses each reply after the clock stops, as the floor's client sends and
receives bytes (the app's own encoding of its input is not the daemons' overhead). The overhead is
reported in two parts: the *split path* (inside the edge daemon's own request time: the edge-to-cloud
round trip and the cloud's stream handling) and the *app hop* (the local app's call into the edge
daemon, carrying the raw fp32 input).

Beside each request, in the same run, the *floor* (:mod:`benchmarks.grpc_floor`): bare gRPC servers
in processes of their own moving the same bytes in the same shape, with nothing else to do: a unary
call carrying the app's request bytes to a floor edge, which sends the feature bytes over a
long-lived stream to a floor cloud and gets the result bytes back (*floor*, against the overhead),
and a round trip on that stream alone (*floor split*, against the split path). Cleave, floor and
floor split take turns request by request, so the noise of a shared machine hits all three alike;
the *excess* is the median over requests of each one's overhead minus the floor measured right after it.
The floor servers spend the same CPU time as the configuration's parts (medians of its warm-up
requests), in the same places, and the floor is its call's time minus that work: a reply that comes
after 40 ms of work costs more to deliver than an instant echo, on any server. The instant echo
(no work) is measured beside it too (*echo*, *echo split*), for reference.
Medians over ``--repeats`` requests per configuration; JSON and a plot under benchmarks/results/.

    python -m benchmarks.overhead [--model resnet18 --size 224 --repeats 40]
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import yaml

from benchmarks.grpc_floor import Floor
from cleave_cli.images import synthetic_images
from cleave_cli.launch import DaemonProcess, cloud_process, edge_process, free_port
from compressor import RAW_UNCOMPRESSED, encode
from partitioner.loaded import LoadedModel
from partitioner.models import ModelSpec
from protos.cleave.v1 import edge_pb2
from runtime.serving import open_channel

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
UNDER = 1 << 20  # the summary covers requests whose features are under 1 MB


def pick_cuts(model: LoadedModel, count: int) -> list[str]:
    """Cuts spread over the range of feature sizes: single-tensor cuts, from largest to smallest."""
    single = [c for c in model.graph.cuts if len(c.live) == 1 and c.index > 0]
    by_size = sorted(single, key=lambda c: -c.nbytes)
    step = max(len(by_size) // count, 1)
    chosen = by_size[::step][:count]
    return ["cloud"] + [c.name for c in sorted(chosen, key=lambda c: c.index)]


def p50(values: list[float]) -> float:
    return statistics.median(values)


def p90(values: list[float]) -> float:
    return sorted(values)[int(0.9 * (len(values) - 1))]


def ms_since(started: float) -> float:
    return (time.perf_counter() - started) * 1e3


def work_us(replies: list[edge_pb2.EdgeInferResponse]) -> tuple[int, int, int]:
    """The parts' medians as the floor's work: (cloud, edge before sending, edge after the result), in us."""

    def us(*fields: str) -> int:
        return round(p50([sum(getattr(r.timing, f) for f in fields) for r in replies]) * 1e3)

    cloud = us("cloud_decode_ms", "cloud_compute_ms", "cloud_encode_ms")
    return cloud, us("edge_compute_ms", "encode_ms"), us("decode_ms")


def measure(infer, request: bytes, floor: Floor, repeats: int, warmup: int) -> dict:
    """Cleave's requests, each followed by the floor's measurements with the same bytes.

    ``infer``: ``Edge/Infer`` taking and returning bytes; ``request``: an ``EdgeInferRequest``, serialized.
    """
    replies = [edge_pb2.EdgeInferResponse.FromString(infer(request, timeout=60)) for _ in range(warmup)]
    sizes = {
        "request": len(request),
        "feature": int(p50([r.bytes_up for r in replies])),
        "result": int(p50([r.bytes_down for r in replies])),
        "response": int(p50([r.ByteSize() for r in replies])),
    }
    work = work_us(replies)
    work_ms, cloud_work_ms = sum(work) / 1e3, work[0] / 1e3
    call, split = floor.prepare(sizes["request"], sizes["feature"], sizes["result"], sizes["response"], work)
    echo_call, echo_split = floor.prepare(sizes["request"], sizes["feature"], sizes["result"], sizes["response"])
    for _ in range(warmup):
        for message in (call, echo_call):
            floor.call(message)
        for message in (split, echo_split):
            floor.split(message)
    e2e, parts, edge_total, up, floor_ms, floor_split_ms, echo_ms, echo_split_ms = ([] for _ in range(8))
    for _ in range(repeats):
        started = time.perf_counter()
        data = infer(request, timeout=60)
        e2e.append(ms_since(started))
        reply = edge_pb2.EdgeInferResponse.FromString(data)
        if reply.note:
            raise RuntimeError(f"request did not run as planned: {reply.note}")
        parts.append(sum(getattr(reply.timing, f) for f in PART_FIELDS))
        edge_total.append(reply.timing.total_ms)
        up.append(reply.bytes_up)
        for run, message, spent, into in (
            (floor.call, call, work_ms, floor_ms),
            (floor.split, split, cloud_work_ms, floor_split_ms),
            (floor.call, echo_call, 0.0, echo_ms),
            (floor.split, echo_split, 0.0, echo_split_ms),
        ):
            started = time.perf_counter()
            run(message)
            into.append(ms_since(started) - spent)
    overhead = [a - b for a, b in zip(e2e, parts, strict=True)]
    split_path = [t - p for t, p in zip(edge_total, parts, strict=True)]
    # Each request against the floor measured right after it: on a busy machine the pairs see the same load.
    excess = [o - f for o, f in zip(overhead, floor_ms, strict=True)]
    split_excess = [o - f for o, f in zip(split_path, floor_split_ms, strict=True)]
    return {
        "e2e_ms_p50": p50(e2e),
        "parts_ms_p50": p50(parts),
        "overhead_ms_p50": p50(overhead),
        "overhead_ms_p90": p90(overhead),
        "edge_internal_overhead_ms_p50": p50(split_path),
        "floor_ms_p50": p50(floor_ms),
        "floor_split_ms_p50": p50(floor_split_ms),
        "echo_ms_p50": p50(echo_ms),
        "echo_split_ms_p50": p50(echo_split_ms),
        "floor_work_us": list(work),
        "excess_ms_p50": p50(excess),
        "split_excess_ms_p50": p50(split_excess),
        "bytes_up": int(p50(up)),
        "bytes_down": sizes["result"],
        "request_bytes": sizes["request"],
        "response_bytes": sizes["response"],
    }


def rss_mb(process: DaemonProcess) -> float | None:
    """The daemon's resident memory now (Linux), in MB."""
    try:
        for line in Path(f"/proc/{process.proc.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except (OSError, AttributeError):
        pass
    return None


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
    ax[0].legend(fontsize=7, loc="lower left")
    small = sorted((r for r in records if r["bytes_up"] < UNDER), key=lambda r: r["bytes_up"])
    kb = [r["bytes_up"] / 1e3 for r in small]
    for key, label, style in (
        ("overhead_ms_p50", "Cleave overhead (app hop + split path)", "o-"),
        ("floor_ms_p50", "floor: bare gRPC, both hops, same work", "o--"),
        ("echo_ms_p50", "echo: bare gRPC, both hops, no work", "o:"),
        ("edge_internal_overhead_ms_p50", "Cleave split path", "x-"),
        ("floor_split_ms_p50", "floor: bare gRPC stream round trip, same work", "x--"),
        ("echo_split_ms_p50", "echo: bare gRPC stream round trip, no work", "x:"),
    ):
        ax[1].plot(kb, [r[key] for r in small], style, label=label)
    ax[1].axhline(1.0, color="grey", ls=":", lw=1, label="1 ms goal")
    ax[1].set_xscale("log")
    ax[1].set_ylim(bottom=0)
    ax[1].set_xlabel("feature bytes sent per request (KB, log; under 1 MB)")
    ax[1].set_ylabel("ms (median)")
    ax[1].set_title("overhead against the bare-gRPC floor, same bytes, same run")
    ax[1].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def summarize(records: list[dict]) -> dict:
    """Medians and maxima, over the configurations whose features are under 1 MB, of their medians."""
    small = [r for r in records if r["bytes_up"] < UNDER]
    summary: dict[str, float | None] = {}
    for key, field in [
        ("total", "overhead_ms_p50"),
        ("split_path", "edge_internal_overhead_ms_p50"),
        ("floor", "floor_ms_p50"),
        ("floor_split", "floor_split_ms_p50"),
        ("echo", "echo_ms_p50"),
        ("echo_split", "echo_split_ms_p50"),
        ("excess", "excess_ms_p50"),
        ("split_excess", "split_excess_ms_p50"),
    ]:
        values = [r[field] for r in small]
        summary[f"{key}_overhead_ms_p50_under_1MB_median"] = p50(values) if values else None
        summary[f"{key}_overhead_ms_p50_under_1MB_max"] = max(values) if values else None
    return summary


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="resnet18")
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--cuts", type=int, default=4, help="cuts besides cloud-only")
    parser.add_argument("--encodings", default="fp32,fp16,int8,int4")
    parser.add_argument("--repeats", type=int, default=40)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1, help="torch threads per daemon")
    parser.add_argument("--out", default=str(RESULTS / "overhead.json"))
    args = parser.parse_args(argv)

    started = time.monotonic()
    entry = {"name": args.model, "source": args.model, "input_shape": [1, 3, args.size, args.size]}
    model = LoadedModel.load(ModelSpec.from_dict(entry))
    x = synthetic_images(1, model.input_shape, seed=0)
    request = edge_pb2.EdgeInferRequest(inputs=[encode(x.contiguous(), RAW_UNCOMPRESSED)]).SerializeToString()
    work = Path(tempfile.mkdtemp(prefix="cleave-overhead-"))
    (work / "cloud.yaml").write_text(yaml.safe_dump({"models": [entry]}))
    # A fixed starting cut: every configuration is pinned, and a planner running meanwhile would skew timings.
    (work / "edge.yaml").write_text(yaml.safe_dump({"model": entry, "plan": {"cut": "cloud", "encoding": "fp32"}}))
    cloud_port = free_port()
    cloud = cloud_process(work / "cloud.yaml", cloud_port, work / "cloud.log", threads=args.threads)
    edge = edge_process(work / "edge.yaml", free_port(), cloud_port, work / "edge.log", threads=args.threads)
    records = []
    memory = {}
    try:
        cloud.start()
        edge.start()
        from cleave_cli.client import EdgeClient

        client = EdgeClient(edge.address)
        service = edge_pb2.DESCRIPTOR.services_by_name["Edge"].full_name
        infer = open_channel(edge.address).unary_unary(f"/{service}/Infer")  # bytes in, bytes out, as the floor's
        with Floor(free_port(), free_port()) as floor:
            for cut in pick_cuts(model, args.cuts):
                for encoding in args.encodings.split(","):
                    client.pin(cut, encoding)
                    measured = measure(infer, request, floor, args.repeats, args.warmup)
                    record = {"cut": cut, "encoding": encoding, **measured}
                    records.append(record)
                    print(
                        f"{cut:<16} {encoding:<5} e2e {record['e2e_ms_p50']:6.2f}"
                        f"  parts {record['parts_ms_p50']:6.2f}"
                        f"  overhead {record['overhead_ms_p50']:5.2f} (floor {record['floor_ms_p50']:4.2f},"
                        f" echo {record['echo_ms_p50']:4.2f})"
                        f"  split path {record['edge_internal_overhead_ms_p50']:4.2f}"
                        f" (floor {record['floor_split_ms_p50']:4.2f}, echo {record['echo_split_ms_p50']:4.2f})"
                        f"  bytes {record['bytes_up']:>9}",
                        flush=True,
                    )
        memory = {"edge_rss_mb": rss_mb(edge), "cloud_rss_mb": rss_mb(cloud)}
    finally:
        edge.stop()
        cloud.stop()
    shutil.rmtree(work, ignore_errors=True)  # the daemons' configs and logs (kept when the run failed)
    summary = summarize(records)
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
                "seconds": round(time.monotonic() - started, 1),
                "summary": summary,
                "memory": memory,
                "records": records,
            },
            indent=2,
        )
    )
    plot(records, out.with_suffix(".png"))
    print(f"summary: {summary}\nmemory: {memory}\nwrote {out} and {out.with_suffix('.png')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
