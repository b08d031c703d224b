"""Soak under load: N edge daemons against one cloud, every reply checked, memory watched.

Starts one ``cleave-cloud`` and ``--edges`` ``cleave-edge`` daemons as real processes on loopback.
Each edge serves the same model on a *fixed* split (by default resnet18 at 1x3x64x64, cut
``layer2_1_relu_1``, int8 features, 1 torch thread), so the run measures serving (the app hop, head,
codec, edge-to-cloud stream, the cloud's sessions and tails) and not the planner; ``--cut auto`` lets
each edge plan for itself instead (its probes and re-plans then share the CPU with the load, and any
planned placement is accepted, each reply checked the same way).

``--clients-per-edge`` app threads per edge send ``Edge.Infer`` in closed loop (the next request
goes when the reply is in) for ``--warmup`` seconds, then for ``--seconds`` measured seconds. Every
reply is matched to its request id and checked against the float model's output for the input it
was sent (computed once here): a split reply must agree on top-1 and be within ``--max-rel-err``
relative L2 error (int8 features are lossy), a local-fallback reply must be bit-exact. The cloud's
and every edge's resident memory (psutil, children included) is sampled every second.

Reports total requests, throughput, p50/p99/max latency seen by the apps, errors (RPC failures,
wrong or misrouted outputs, a daemon that died or did not drain cleanly on SIGTERM), fallbacks to
local execution (none expected with a healthy cloud), and the growth of each daemon's RSS and
anonymous RSS (without file-backed pages, which the kernel may drop and re-read: what a leak grows)
from the end of the warm-up to the end, with its least-squares trend (MB/min) over that window. The
warm-up is long because every daemon releases some 10 MB once within its first 20 s of load; measured from
earlier, that one-off step reads as negative growth. Exits non-zero on any error or fallback. Writes
``benchmarks/results/load.json`` and ``load.png`` (throughput in 1 s bins, memory per daemon over
time). The default run takes about two minutes.

    python -m benchmarks.load [--edges 4 --clients-per-edge 1 --seconds 60 --warmup 30]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import platform
import statistics
import sys
import tempfile
import threading
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import grpc
import psutil
import torch
import yaml

from cleave_cli.client import EdgeClient, outputs_of
from cleave_cli.launch import DaemonProcess, cloud_process, edge_process, free_port
from compressor import RAW_UNCOMPRESSED, EncodingSpec, encode
from partitioner.loaded import LoadedModel
from partitioner.models import ModelSpec, calibration_batch
from protos.cleave.v1 import edge_pb2

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
ID_STRIDE = 1_000_000  # request id = client * ID_STRIDE + seq: unique across the run


@dataclass
class Sample:
    """One request as the app saw it."""

    client: int
    edge: int
    sent: float  # seconds since the run's t0
    done: float
    placement: str = ""
    rel_err: float = float("nan")
    note: str = ""  # the edge's reason when a request did not run as planned
    problem: str = ""  # empty: a correct reply


class Driver:
    """Closed-loop app threads against the edges, and a once-a-second RSS sampler of every daemon."""

    def __init__(
        self,
        edges: list[DaemonProcess],
        cloud: DaemonProcess,
        inputs: list[torch.Tensor],
        refs: list[torch.Tensor],
        clients_per_edge: int,
        max_rel_err: float,
        rpc_timeout_s: float,
        auto: bool = False,
    ) -> None:
        self.edges, self.cloud = edges, cloud
        self.wire_inputs = [encode(x.contiguous(), RAW_UNCOMPRESSED) for x in inputs]
        self.refs = refs
        self.clients_per_edge = clients_per_edge
        self.max_rel_err, self.rpc_timeout_s = max_rel_err, rpc_timeout_s
        self.auto = auto  # the edges plan for themselves: any placement but a fallback is a plan
        self.samples: list[Sample] = []
        self.memory: list[dict] = []  # {"t": s, "rss": {"cloud": MB, "edge0": MB, ...}, "anon": {...}}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self.t0 = time.monotonic()

    def run(self, total_s: float) -> None:
        """Load every edge for ``total_s`` seconds (bounded), then wait for the last replies."""
        self.t0 = time.monotonic()
        threads = [threading.Thread(target=self._sample_memory, daemon=True)]
        for e in range(len(self.edges)):
            for c in range(self.clients_per_edge):
                client = e * self.clients_per_edge + c + 1
                threads.append(threading.Thread(target=self._client, args=(client, e), daemon=True))
        for t in threads:
            t.start()
        self._stop.wait(total_s)
        self._stop.set()
        deadline = time.monotonic() + self.rpc_timeout_s + 5
        for t in threads:
            t.join(max(deadline - time.monotonic(), 0.0))
        stuck = [t.name for t in threads if t.is_alive()]
        if stuck:
            raise TimeoutError(f"load threads still waiting after the run: {stuck}")

    def _now(self) -> float:
        return time.monotonic() - self.t0

    def _client(self, client: int, edge: int) -> None:
        app = EdgeClient(self.edges[edge].address)
        try:
            seq = 0
            while not self._stop.is_set():
                seq += 1
                rid = client * ID_STRIDE + seq
                which = rid % len(self.wire_inputs)
                request = edge_pb2.EdgeInferRequest(request_id=rid, inputs=[self.wire_inputs[which]])
                sample = Sample(client=client, edge=edge, sent=self._now(), done=0.0)
                try:
                    reply = app.stub.Infer(request, timeout=self.rpc_timeout_s)
                except grpc.RpcError as exc:
                    sample.problem = f"{exc.code().name}: {exc.details()}"
                else:
                    self._check(sample, rid, reply, self.refs[which])
                sample.done = self._now()
                with self._lock:
                    self.samples.append(sample)
        finally:
            app.close()

    def _check(self, sample: Sample, rid: int, reply: edge_pb2.EdgeInferResponse, ref: torch.Tensor) -> None:
        sample.placement, sample.note = edge_pb2.Placement.Name(reply.placement), reply.note
        if reply.request_id != rid:
            sample.problem = f"reply for request {reply.request_id} to request {rid}"
            return
        if reply.HasField("error") and reply.error.code:
            sample.problem = f"error {reply.error.code}: {reply.error.message}"
            return
        outputs = outputs_of(reply)
        if len(outputs) != 1 or outputs[0].shape != ref.shape:
            sample.problem = f"outputs {[tuple(o.shape) for o in outputs]}, expected one of {tuple(ref.shape)}"
            return
        out = outputs[0]
        sample.rel_err = float((out - ref).norm() / ref.norm())
        if sample.placement == "LOCAL_FALLBACK":
            if not torch.equal(out, ref):
                sample.problem = f"local reply differs from the model (rel err {sample.rel_err:.2e})"
        elif sample.placement != "SPLIT" and not self.auto:
            sample.problem = f"placement {sample.placement} on a fixed split plan ({reply.note})"
        elif not torch.equal(out.argmax(-1), ref.argmax(-1)) or sample.rel_err > self.max_rel_err:
            sample.problem = f"{sample.placement} reply off: rel err {sample.rel_err:.2e}"

    def _sample_memory(self) -> None:
        daemons = {"cloud": self.cloud, **{f"edge{i}": e for i, e in enumerate(self.edges)}}
        procs = {name: psutil.Process(d.proc.pid) for name, d in daemons.items()}
        while True:
            stopping = self._stop.wait(1.0 if self.memory else 0.0)  # one sample at the start, one at the end
            row: dict = {"t": round(self._now(), 3), "rss": {}, "anon": {}}
            for name, proc in procs.items():
                row["rss"][name], row["anon"][name] = memory_mb(proc)
            self.memory.append(row)
            if stopping:
                return


def memory_mb(proc: psutil.Process) -> tuple[float, float]:
    """(RSS, anonymous RSS) of ``proc`` and its children in MB; NaN once it is gone.

    Anonymous RSS leaves out resident file-backed pages (shared libraries, mapped files), which the
    kernel may drop and re-read at any time; it is what a leak grows.
    """
    try:
        rss = anon = 0
        for p in [proc, *proc.children(recursive=True)]:
            with contextlib.suppress(psutil.Error):  # a child may exit meanwhile
                info = p.memory_info()
                rss, anon = rss + info.rss, anon + info.rss - info.shared
        return round(rss / 1e6, 2), round(anon / 1e6, 2)
    except psutil.Error:
        return float("nan"), float("nan")


def percentile(sorted_values: list[float], q: float) -> float:
    """Nearest-rank percentile of an ascending list."""
    return sorted_values[max(math.ceil(q / 100 * len(sorted_values)) - 1, 0)]


def memory_growth(rows: list[dict], warmup_s: float) -> dict:
    """Per daemon and kind (rss, anon): at the start, at the end of the warm-up, at the end, growth, max."""
    warm = [r for r in rows if r["t"] <= warmup_s][-1]
    out: dict = {}
    for kind in ("rss", "anon"):
        for name in rows[0][kind]:
            after = [r for r in rows if r["t"] >= warm["t"]]
            out.setdefault(name, {})[kind] = {
                "start_mb": rows[0][kind][name],
                "after_warmup_mb": warm[kind][name],
                "end_mb": rows[-1][kind][name],
                "growth_mb": round(rows[-1][kind][name] - warm[kind][name], 2),
                "max_mb": max(r[kind][name] for r in after),
                "slope_mb_per_min": round(60 * slope([r["t"] for r in after], [r[kind][name] for r in after]), 3),
            }
    return out


def slope(xs: list[float], ys: list[float]) -> float:
    """Least-squares slope of ys over xs (0 for fewer than two points): a trend that one sample cannot fake."""
    if len(xs) < 2:
        return 0.0
    mx, my = statistics.fmean(xs), statistics.fmean(ys)
    var = sum((x - mx) ** 2 for x in xs)
    return sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True)) / var if var else 0.0


def summarise(driver: Driver, warmup_s: float, seconds: float) -> dict:
    end = warmup_s + seconds
    measured = [s for s in driver.samples if warmup_s <= s.sent < end]
    ok = [s for s in measured if not s.problem]
    latencies = sorted((s.done - s.sent) * 1e3 for s in ok)
    completed = [s for s in driver.samples if warmup_s <= s.done < end and not s.problem]  # good replies in the window
    problems = [s for s in driver.samples if s.problem]
    fallbacks = [s for s in driver.samples if s.placement == "LOCAL_FALLBACK"]
    rel_errs = sorted(
        s.rel_err for s in driver.samples if s.placement not in ("", "LOCAL_FALLBACK") and s.rel_err == s.rel_err
    )
    memory = memory_growth(driver.memory, warmup_s)
    edge_rss = [m["rss"]["growth_mb"] for n, m in memory.items() if n.startswith("edge")]
    edge_anon = [m["anon"]["growth_mb"] for n, m in memory.items() if n.startswith("edge")]
    per_edge = []
    for e in range(len(driver.edges)):
        lat = sorted((s.done - s.sent) * 1e3 for s in ok if s.edge == e)
        per_edge.append(
            {
                "edge": e,
                "requests": sum(1 for s in measured if s.edge == e),
                "req_per_s": round(sum(1 for s in completed if s.edge == e) / seconds, 2),
                "p50_ms": round(statistics.median(lat), 2) if lat else None,
            }
        )
    return {
        "requests": len(measured),
        "requests_including_warmup": len(driver.samples),
        "throughput_req_per_s": round(len(completed) / seconds, 2),
        "latency_ms_p50": round(statistics.median(latencies), 2) if latencies else None,
        "latency_ms_p99": round(percentile(latencies, 99), 2) if latencies else None,
        "latency_ms_max": round(latencies[-1], 2) if latencies else None,
        "errors": len(problems),
        "error_examples": sorted({s.problem for s in problems})[:5],
        "fallbacks": len(fallbacks),
        "fallback_notes": sorted({s.note for s in fallbacks})[:5],
        "placements": dict(Counter(s.placement for s in driver.samples if s.placement)),
        "rel_err_median": round(statistics.median(rel_errs), 5) if rel_errs else None,
        "rel_err_max": round(rel_errs[-1], 5) if rel_errs else None,
        "rss_growth_mb_cloud": memory["cloud"]["rss"]["growth_mb"],
        "rss_growth_mb_edges_max": max(edge_rss),
        "rss_growth_mb_edges_mean": round(statistics.mean(edge_rss), 2),
        "anon_growth_mb_cloud": memory["cloud"]["anon"]["growth_mb"],
        "anon_growth_mb_edges_max": max(edge_anon),
        "anon_slope_mb_per_min_max": max(m["anon"]["slope_mb_per_min"] for m in memory.values()),
        "rss_max_mb": max(m["rss"]["max_mb"] for m in memory.values()),
        "memory": memory,
        "per_edge": per_edge,
    }


def throughput_bins(driver: Driver, total_s: float) -> list[int]:
    """Replies completed per 1 s bin from the start of the load (warm-up included)."""
    bins = [0] * int(total_s)
    for s in driver.samples:
        if not s.problem and 0 <= int(s.done) < len(bins):
            bins[int(s.done)] += 1
    return bins


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    warm, end = result["warmup_s"], result["warmup_s"] + result["seconds"]
    fig, ax = plt.subplots(1, 3, figsize=(18, 4.5))
    bins = result["throughput_per_s"]
    ax[0].stairs(bins, range(len(bins) + 1), label="good replies / s (all edges)")
    ax[0].axvspan(0, warm, color="grey", alpha=0.2, label="warm-up")
    ax[0].axvline(end, color="grey", ls="--", lw=1)
    ax[0].set_xlabel("s since load start")
    ax[0].set_ylabel("replies per 1 s bin")
    s = result["summary"]
    ax[0].set_title(
        f"{result['edges']} edges x {result['clients_per_edge']} clients: {s['throughput_req_per_s']} req/s\n"
        f"p50 {s['latency_ms_p50']} ms, p99 {s['latency_ms_p99']} ms, errors {s['errors']}",
        fontsize=9,
    )
    ax[0].set_ylim(bottom=0)
    ax[0].legend(fontsize=8)
    rows = result["memory_samples"]
    t = [r["t"] for r in rows]
    for i, (kind, label) in enumerate([("rss", "RSS"), ("anon", "anonymous RSS")]):
        a = ax[i + 1]
        for name in rows[0][kind]:
            a.plot(t, [r[kind][name] for r in rows], lw=1.5 if name == "cloud" else 1, label=name)
        a.axvspan(0, warm, color="grey", alpha=0.2)
        a.axvline(end, color="grey", ls="--", lw=1)
        a.set_xlabel("s since load start")
        a.set_ylabel(f"{label} (MB)")
        a.set_title(
            f"{label} per daemon{' (no file-backed pages)' if kind == 'anon' else ''}\n"
            f"growth after warm-up: cloud {s[f'{kind}_growth_mb_cloud']} MB, "
            f"edges max {s[f'{kind}_growth_mb_edges_max']} MB",
            fontsize=9,
        )
        a.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def start_all(daemons: list[DaemonProcess], timeout: float) -> None:
    """Start daemons side by side (their model loading overlaps) and wait until each serves."""
    errors: list[BaseException] = []

    def start(d: DaemonProcess) -> None:
        try:
            d.start(ready_timeout=timeout)
        except BaseException as exc:  # noqa: BLE001 - reported below, with the daemon's log
            errors.append(exc)

    threads = [threading.Thread(target=start, args=(d,)) for d in daemons]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--edges", type=int, default=4)
    parser.add_argument("--clients-per-edge", type=int, default=1, help="closed-loop app threads per edge")
    parser.add_argument("--seconds", type=float, default=60.0, help="measured load, after the warm-up")
    parser.add_argument(
        "--warmup",
        type=float,
        default=30.0,
        help="unmeasured load first: every daemon releases ~10 MB once within its first 20 s of load",
    )
    parser.add_argument("--model", default="resnet18")
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--cut", default="layer2_1_relu_1", help="a cut name or index, cloud, or auto")
    parser.add_argument("--encoding", default="int8", help="feature encoding (compressor grammar)")
    parser.add_argument("--edge-threads", type=int, default=1, help="torch threads per edge daemon")
    parser.add_argument("--cloud-threads", type=int, default=1, help="torch threads of the cloud daemon")
    parser.add_argument("--inputs", type=int, default=8, help="distinct inputs, cycled")
    parser.add_argument(
        "--max-rel-err",
        type=float,
        default=None,
        help="relative L2 error bound of a reply; default 0.02 on a fixed cut, the planner's budget (0.05) with auto",
    )
    parser.add_argument("--rpc-timeout", type=float, default=30.0)
    parser.add_argument("--out", default=str(RESULTS / "load.json"))
    args = parser.parse_args(argv)
    if not (1 <= args.edges <= 16 and 1 <= args.clients_per_edge <= 8 and 0 < args.seconds <= 3600):
        parser.error("bounded: 1-16 edges, 1-8 clients per edge, at most 3600 s")

    if args.max_rel_err is None:
        args.max_rel_err = 0.05 if args.cut == "auto" else 0.02
    torch.set_num_threads(1)  # the driver shares the CPU with the daemons it measures
    entry = {"name": args.model, "source": args.model, "input_shape": [1, 3, args.size, args.size]}
    model = LoadedModel.load(ModelSpec.from_dict(entry))
    inputs = [calibration_batch(model.input_shape, 1, seed=s) for s in range(args.inputs)]
    with torch.inference_mode():
        refs = [model.module(x) for x in inputs]
    del model

    work = Path(tempfile.mkdtemp(prefix="cleave-load-"))
    # Every edge connects from this host without a token (one client for the per-client quotas): make room.
    streams = 2 * args.edges + 4
    cloud_conf = {
        "models": [entry],
        "torch_threads": args.cloud_threads,
        "max_workers": streams + 12,
        "limits": {"max_streams": streams, "max_streams_per_client": streams},
    }
    (work / "cloud.yaml").write_text(yaml.safe_dump(cloud_conf))
    edge_conf = {
        "model": entry,
        "torch_threads": args.edge_threads,
        "plan": {"cut": args.cut, "encoding": args.encoding},
    }
    (work / "edge.yaml").write_text(yaml.safe_dump(edge_conf))
    cloud_port = free_port()
    cloud = cloud_process(work / "cloud.yaml", cloud_port, work / "cloud.log")
    edges = [
        edge_process(work / "edge.yaml", free_port(), cloud_port, work / f"edge{i}.log") for i in range(args.edges)
    ]
    try:
        started = time.monotonic()
        cloud.start()
        start_all(edges, timeout=300.0 if args.cut == "auto" else 120.0)
        print(
            f"cloud + {args.edges} edges serving after {time.monotonic() - started:.1f} s; logs in {work}", flush=True
        )
        driver = Driver(
            edges, cloud, inputs, refs, args.clients_per_edge, args.max_rel_err, args.rpc_timeout, args.cut == "auto"
        )
        total = args.warmup + args.seconds
        print(f"load: {args.warmup:.0f} s warm-up + {args.seconds:.0f} s measured", flush=True)
        driver.run(total)
        dead = [
            f"{d.module} {d.address} exited {d.proc.returncode}" for d in [cloud, *edges] if d.proc.poll() is not None
        ]
        counters = []
        for e in edges:
            app = EdgeClient(e.address)
            try:
                status = app.status()
                counters.append(
                    {
                        "plan": f"{edge_pb2.Placement.Name(status.plan.placement)} at {status.plan.cut_name} "
                        f"({EncodingSpec.from_proto(status.plan.encoding)})",
                        "split": status.counters.split,
                        "fallback": status.counters.fallback,
                        "errors": status.counters.errors,
                        "reconnects": status.counters.reconnects,
                    }
                )
            except grpc.RpcError as exc:
                counters.append({"error": f"{exc.code().name}: {exc.details()}"})
            finally:
                app.close()
    finally:
        codes = [e.stop() for e in edges] + [cloud.stop()]
    summary = summarise(driver, args.warmup, args.seconds)
    # A daemon that died under load, or did not drain and exit cleanly on SIGTERM, is an error too.
    unclean = [
        f"{d.module} {d.address} exited {c} on SIGTERM" for d, c in zip([*edges, cloud], codes, strict=True) if c
    ]
    summary["errors"] += len(dead) + len(unclean)
    summary["error_examples"] += dead + unclean
    result = {
        "benchmark": "load",
        "model": args.model,
        "input_shape": entry["input_shape"],
        "cut": args.cut,
        "encoding": args.encoding,
        "edges": args.edges,
        "clients_per_edge": args.clients_per_edge,
        "warmup_s": args.warmup,
        "seconds": args.seconds,
        "max_rel_err": args.max_rel_err,
        "threads": {"edge": args.edge_threads, "cloud": args.cloud_threads, "driver": 1},
        "platform": {
            "host": platform.node(),
            "machine": platform.machine(),
            "python": platform.python_version(),
            "torch": torch.__version__,
            "grpc": grpc.__version__,
            "cpu_count": os.cpu_count(),
            "cpu_affinity": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        },
        "summary": summary,
        "edge_counters": counters,
        "exit_codes": {"edges": codes[:-1], "cloud": codes[-1]},
        "throughput_per_s": throughput_bins(driver, args.warmup + args.seconds),
        "memory_samples": driver.memory,
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    plot(result, out.with_suffix(".png"))
    s = summary
    print(
        f"{s['requests']} requests in {args.seconds:.0f} s: {s['throughput_req_per_s']} req/s, "
        f"p50 {s['latency_ms_p50']} ms, p99 {s['latency_ms_p99']} ms, max {s['latency_ms_max']} ms; "
        f"errors {s['errors']}, fallbacks {s['fallbacks']}; rel err max {s['rel_err_max']}\n"
        f"RSS growth after warm-up: cloud {s['rss_growth_mb_cloud']} MB, "
        f"edges max {s['rss_growth_mb_edges_max']} MB (mean {s['rss_growth_mb_edges_mean']}); "
        f"anonymous: cloud {s['anon_growth_mb_cloud']} MB, edges max {s['anon_growth_mb_edges_max']} MB; "
        f"trend max {s['anon_slope_mb_per_min_max']} MB/min; max RSS {s['rss_max_mb']} MB\n"
        f"wrote {out} and {out.with_suffix('.png')}"
    )
    for example in s["error_examples"]:
        print(f"error: {example}")
    for note in s["fallback_notes"]:
        print(f"fallback: {note}")
    return 1 if s["errors"] or s["fallbacks"] else 0


if __name__ == "__main__":
    sys.exit(main())
