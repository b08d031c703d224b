"""Scale-out on Ray Serve: 1-16 edge streams against the single-process cloud and the Ray-backed cloud
with 1 and 2 replicas, side by side in one run; then a model of a 1,000-edge fleet from the figures.

Starts three ``cleave-cloud`` processes in turn, serving the same model:

- ``process``: the single-process cloud (tails on its gRPC threads, as without Ray);
- ``ray-1`` and ``ray-2``: ``--ray-address local`` with ``ray: {replicas: 1|2}``: each starts its own
  local Ray instance (``local_num_cpus``, a small object store), deploys the model's tail deployment
  and forwards every request's still-encoded features to a replica, which decodes, runs and encodes.

Each replica declares ``num_cpus: 1``, runs torch with 1 thread and runs one tail at a time (the
requests routed to it wait in it, decoding meanwhile): a replica is one core's worth of tail, so the
replica count is the capacity being measured. The process cloud runs with 1 torch thread per tail too (its gRPC threads
run tails concurrently, so it can use every core). The streams are the ones of
``benchmarks/batching.py`` (closed loop, one request in flight per stream, pre-serialized frames,
every warm-up reply checked against the model's tail); batching is off everywhere (bit-exact).

Per configuration and stream count: throughput, p50/p99 latency, and the machine's busy cores over
the window (from ``/proc/stat``: everything, driver included). On a machine with few cores the
driver, the front door and the replicas share them; the JSON records ``cpu_count``, and the
``ray-2``/``ray-1`` ratio is only meaningful where there are cores for a second replica.

The fleet model (``fleet`` in the JSON; a model, not a measurement): 1,000 edges each sending
``--edge-rps`` requests/s, served by ``c`` replicas of the measured per-replica capacity ``mu``
(``ray-1``'s best throughput) as an M/M/c queue; the front-door hop measured at one stream
(``ray-1`` p50 minus the replica's own time) is added to every request. It gives, for each replica
count, the offered load per replica, and the predicted p50/p99 latency (Erlang C waiting time), and
how many nodes of ``--cores-per-node`` cores that takes (one replica per core).

    python -m benchmarks.scale [--streams 1,2,4,8,16 --seconds 5 --warmup 2]

Writes ``benchmarks/results/scale.json`` and ``scale.png``; ``python -m benchmarks.tables`` renders
the tables in ``docs/ray.md``.

``--quick`` (about 2 minutes) measures only the Ray path's added latency: the process cloud, a
1-replica Ray cloud with Cleave's settings (the direct lane) and a third one, ``--versus``: the same
over Serve's gRPC data plane (``ray-1-grpc``, the default) or with Serve's defaults
(``ray-1-serve-defaults``: ``transport: actor``, access log on, replica methods on their own event
loop), all up at once, one request at a time in turn (``--pairs`` each). It prints the medians, and
writes them to ``--out`` only when that is given. ``--baseline-tree DIR`` replaces the third cloud with
``ray-1-baseline``: the same 1-replica Ray cloud run from another Cleave source tree (an older
commit, e.g. ``git worktree add DIR COMMIT``), so a change to the Ray path is measured against the
code before it, side by side in one run.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import yaml

from cleave_cli.launch import DaemonProcess, cloud_process, free_port
from compressor import EncodingSpec
from partitioner.loaded import LoadedModel
from partitioner.models import ModelSpec

from .batching import Features, cpu_seconds, edge_stream, prepare

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
CONFIGS = ("process", "ray-1", "ray-2")
#: ``ray:`` keys that put a cloud back on Ray Serve's own defaults (what Cleave's settings are measured against).
SERVE_DEFAULTS = {
    "transport": "actor",
    "access_log": True,
    "env": {"RAY_SERVE_RUN_USER_CODE_IN_SEPARATE_THREAD": "1"},
}


def busy_cores() -> tuple[float, float]:
    """(busy jiffies, total jiffies) of the whole machine, from /proc/stat."""
    fields = [float(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0.0)
    return sum(fields) - idle, sum(fields)


async def run_streams(address: str, model: LoadedModel, cut: str, features: Features, streams: int, args) -> dict:
    """``streams`` closed-loop edge streams against ``address``; the window's numbers."""
    opened = asyncio.Barrier(streams + 1)
    window = {"start": float("inf"), "end": float("inf"), "limit_s": args.warmup + args.seconds + 120.0}
    tasks = [
        asyncio.create_task(edge_stream(address, model, cut, features, i, opened, window, args.check_tol))
        for i in range(streams)
    ]
    await opened.wait()
    now = time.perf_counter()
    window["start"], window["end"] = now + args.warmup, now + args.warmup + args.seconds
    await asyncio.sleep(window["start"] - time.perf_counter())
    busy0, total0 = busy_cores()
    await asyncio.sleep(max(window["end"] - time.perf_counter(), 0.0))
    busy1, total1 = busy_cores()
    logs = await asyncio.gather(*tasks)
    latencies = np.array([x for log in logs for x in log.latencies])
    compute = [c for log in logs for c in log.compute_ms]
    return {
        "streams": streams,
        "requests": int(latencies.size),
        "throughput_rps": latencies.size / args.seconds,
        "p50_ms": float(np.percentile(latencies, 50)) if latencies.size else None,
        "p99_ms": float(np.percentile(latencies, 99)) if latencies.size else None,
        "cloud_compute_ms_mean": float(np.mean(compute)) if compute else None,
        "cloud_queue_ms_mean": float(np.mean([q for log in logs for q in log.queue_ms])) if compute else None,
        "busy_cores": (busy1 - busy0) / max(total1 - total0, 1.0) * (os.cpu_count() or 1),
        "checked_in_warmup": sum(log.checked for log in logs),
        "errors": [e for log in logs for e in log.errors],
    }


def start_cloud(work: Path, name: str, entry: dict, args, tree: str | None = None) -> DaemonProcess:
    """Start the cloud ``name`` (a ``CONFIGS`` name, ``ray-1-serve-defaults`` or ``ray-1-baseline``).

    ``tree``: run it from that Cleave source tree (``PYTHONPATH``) instead of this one.
    """
    streams = max(args.streams) + 4
    config: dict = {
        "models": [entry],
        "torch_threads": 1,
        "max_workers": streams + 12,
        "limits": {"max_streams": streams, "max_streams_per_client": streams},
    }
    if name.startswith("ray-"):
        replicas = int(name.split("-")[1])
        config["ray"] = {
            **(SERVE_DEFAULTS if name.endswith("-serve-defaults") else {}),
            **({"transport": "grpc"} if name.endswith("-grpc") else {}),
            "address": "local",
            "replicas": replicas,
            "min_replicas": replicas,
            "max_replicas": replicas,
            "num_cpus": 1,
            "torch_threads": 1,
            "max_ongoing_requests": args.max_ongoing,
            "local_num_cpus": max(args.ray_cpus, replicas),
            "local_object_store_mb": 200,
            "app_name": f"bench-{name}",
        }
    path = work / f"cloud-{name}.yaml"
    path.write_text(yaml.safe_dump(config))
    env = {"PYTHONPATH": str(Path(tree).resolve())} if tree else None
    return cloud_process(path, free_port(), work / f"cloud-{name}.log", env=env).start(ready_timeout=300)


def erlang_c(c: int, a: float) -> float:
    """Probability that a request waits in an M/M/c queue with offered load ``a`` = lambda/mu (< c)."""
    term, total = 1.0, 1.0
    for k in range(1, c):
        term *= a / k
        total += term
    last = term * a / c / (1 - a / c)
    return last / (total + last)


def wait_quantile(q: float, wait_p: float, rate: float) -> float:
    """The ``q`` quantile (ms) of an M/M/c waiting time: P(W > t) = ``wait_p`` * exp(-``rate`` t)."""
    return 0.0 if wait_p <= 1 - q else math.log(wait_p / (1 - q)) / rate * 1e3


def fleet_model(records: list[dict], args) -> dict:
    """M/M/c prediction for ``args.edges`` edges from the measured per-replica capacity and hop cost."""
    ray1 = [r for r in records if r["config"] == "ray-1"]
    proc1 = next(r for r in records if r["config"] == "process" and r["streams"] == 1)
    one = next(r for r in ray1 if r["streams"] == 1)
    mu = max(r["throughput_rps"] for r in ray1)  # requests/s one replica sustains
    service_ms = 1e3 / mu
    base_ms = one["p50_ms"]  # one request alone, through the front door, a replica and back
    offered = args.edges * args.edge_rps
    rows = []
    least = math.floor(offered / mu) + 1
    for c in sorted({least, least + 1, math.ceil(least * 1.25), math.ceil(least * 1.5), least * 2}):
        a = offered / mu
        wait_p = erlang_c(c, a)
        rate = c * mu - offered  # the waiting time's exponential tail: P(W > t) = C * exp(-rate t)

        rows.append(
            {
                "replicas": c,
                "nodes": math.ceil(c / args.cores_per_node),
                "utilisation": a / c,
                "p_wait": wait_p,
                # base_ms holds a median service time; an exponential service's p99 is ln(100)/ln(2)
                # times its median. Summing the two quantiles over-states p99 (a conservative bound).
                "p50_ms": base_ms + wait_quantile(0.5, wait_p, rate),
                "p99_ms": base_ms + service_ms * (math.log(100) - math.log(2)) + wait_quantile(0.99, wait_p, rate),
                "capacity_rps": c * mu,
            }
        )
    return {
        "what": "a model (M/M/c), not a measurement: Poisson arrivals, exponential service at the measured mean",
        "edges": args.edges,
        "edge_rps": args.edge_rps,
        "offered_rps": offered,
        "per_replica_rps": mu,
        "service_ms": service_ms,
        "single_request_ms": base_ms,
        "ray_hop_ms": one["p50_ms"] - proc1["p50_ms"],
        "cores_per_node": args.cores_per_node,
        "rows": rows,
    }


def plot(records: list[dict], fleet: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2, ax3) = plt.subplots(1, 3, figsize=(15, 4.2))
    for name in CONFIGS:
        rows = sorted((r for r in records if r["config"] == name), key=lambda r: r["streams"])
        s = [r["streams"] for r in rows]
        ax1.plot(s, [r["throughput_rps"] for r in rows], "o-", label=name)
        ax2.plot(s, [r["p50_ms"] for r in rows], "o-", label=f"{name} p50")
        ax2.plot(s, [r["p99_ms"] for r in rows], "x--", label=f"{name} p99")
    for ax, title, unit in ((ax1, "throughput", "requests/s"), (ax2, "latency", "ms")):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("edge streams")
        ax.set_ylabel(unit)
        ax.set_title(title)
        ax.legend(fontsize=7)
    rows = fleet["rows"]
    ax3.plot([r["replicas"] for r in rows], [r["p99_ms"] for r in rows], "o-", label="p99 (model)")
    ax3.plot([r["replicas"] for r in rows], [r["p50_ms"] for r in rows], "o-", label="p50 (model)")
    ax3.set_xlabel("replicas")
    ax3.set_ylabel("ms")
    ax3.set_title(f"model: {fleet['edges']} edges x {fleet['edge_rps']:g} req/s")
    ax3.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def interleaved(addresses: dict[str, str], model: LoadedModel, cut: str, features: Features, pairs: int) -> dict:
    """One request at a time, alternating between the clouds in ``addresses`` (name -> host:port).

    Both see the same machine load at the same moments, so the difference of their medians is the
    Ray path's added latency, free of the drift between runs taken one after the other. Returns the
    medians of the round trip (``p50_ms``) and of each cloud's own timing of a request: ``queue_ms``
    is, for a Ray cloud, its front door's call minus the replica's decode + tail + encode (the hop
    to the replica and back), ``work_ms`` that decode + tail + encode.
    """
    import queue

    import grpc

    from protos.cleave.v1 import split_inference_pb2 as si_pb2
    from protos.cleave.v1 import split_inference_pb2_grpc as si_grpc

    from .batching import serialize_frames

    links, channels = {}, []
    for name, address in addresses.items():
        channel = grpc.insecure_channel(address)
        channels.append(channel)
        stub = si_grpc.SplitInferenceStub(channel)
        sid = stub.OpenSession(
            si_pb2.OpenSessionRequest(model=model.name, fingerprint=model.fingerprint, cut=cut), timeout=30
        ).session_id
        outbox: queue.Queue = queue.Queue()
        links[name] = (outbox, stub.Infer(iter(outbox.get, None), timeout=600), sid)
    latencies: dict[str, list[float]] = {name: [] for name in addresses}
    queue: dict[str, list[float]] = {name: [] for name in addresses}
    work: dict[str, list[float]] = {name: [] for name in addresses}
    try:
        order = list(links)
        for k in range(pairs + 10):  # the first 10 pairs warm up
            # Each round starts at the next cloud, so that no cloud is always the one asked right after
            # the process cloud's tail (three runs had the cloud in that place 0.6-1.9 ms slower in its
            # replica's own decode + tail + encode, with the same replica code).
            for name in order[k % len(order) :] + order[: k % len(order)]:
                outbox, replies, sid = links[name]
                frames = serialize_frames(sid, features.encoded[k % len(features.encoded)], k + 1)
                started = time.perf_counter()
                for frame in frames:
                    outbox.put(si_pb2.InferFrame.FromString(frame))
                while not (result := next(replies)).last:
                    pass
                if result.HasField("error") or result.request_id != k + 1:
                    raise RuntimeError(f"{name}: request {k + 1}: {result.error.message or result.request_id}")
                if k >= 10:
                    latencies[name].append((time.perf_counter() - started) * 1e3)
                    queue[name].append(result.timing.queue_ms)
                    work[name].append(result.timing.decode_ms + result.timing.compute_ms + result.timing.encode_ms)
    finally:
        for outbox, _, _ in links.values():
            outbox.put(None)
        for channel in channels:
            channel.close()
    return {
        part: {name: float(np.median(values)) for name, values in series.items()}
        for part, series in (("p50_ms", latencies), ("queue_ms", queue), ("work_ms", work))
    }


async def measure_all(model: LoadedModel, entry: dict, features: Features, args, work: Path) -> dict:
    records = []
    hop = None
    keep = start_cloud(work, "process", entry, args) if "process" in args.configs else None
    try:
        for name in args.configs:
            cloud = keep if name == "process" else start_cloud(work, name, entry, args)
            try:
                for streams in args.streams:
                    record = {
                        "config": name,
                        **await run_streams(cloud.address, model, args.cut, features, streams, args),
                    }
                    records.append(record)
                    print(
                        f"{name:>8} {streams:>3} streams: {record['throughput_rps']:7.1f} req/s  "
                        f"p50 {record['p50_ms']:6.2f} ms  p99 {record['p99_ms']:6.2f} ms  "
                        f"busy {record['busy_cores']:.2f} cores  errors {len(record['errors'])}",
                        file=sys.stderr,
                    )
                if name == "ray-1" and keep is not None:
                    both = {"process": keep.address, "ray-1": cloud.address}
                    hop = await asyncio.to_thread(interleaved, both, model, args.cut, features, args.pairs)
                    print(f"interleaved, one request at a time: {hop}", file=sys.stderr)
            finally:
                if cloud is not keep:
                    cloud.stop(timeout=60)
    finally:
        if keep is not None:
            keep.stop(timeout=60)
    return {"records": records, "interleaved": hop}


def replica_pids(app: str) -> list[int]:
    """Processes of Serve application ``app``'s replicas here (Ray titles them ``ServeReplica:APP:...``)."""
    pids = []
    for entry in Path("/proc").iterdir():
        try:
            if entry.name.isdigit() and f"ServeReplica:{app}:".encode() in (entry / "cmdline").read_bytes():
                pids.append(int(entry.name))
        except OSError:  # the process ended meanwhile
            continue
    return pids


def quick(model: LoadedModel, entry: dict, features: Features, args, work: Path) -> dict:
    """The Ray path's added median latency, Cleave's settings and Serve's defaults side by side."""
    names = ("process", "ray-1", "ray-1-baseline" if args.baseline_tree else f"ray-1-{args.versus}")
    clouds: dict[str, DaemonProcess] = {}
    try:
        for name in names:
            tree = args.baseline_tree if name.endswith("-baseline") else None
            clouds[name] = start_cloud(work, name, entry, args, tree=tree)
        # CPU time per request, front door and replicas apart: unlike the medians, it hardly moves with
        # the machine's other load, so it shows a change of per-request work where the noise hides it.
        pids = {
            n: {"front_door": [c.proc.pid], "replica": replica_pids(f"bench-{n}-{model.name}")}
            for n, c in clouds.items()
        }
        before = {n: {k: sum(map(cpu_seconds, v)) for k, v in p.items()} for n, p in pids.items()}
        medians = interleaved({n: c.address for n, c in clouds.items()}, model, args.cut, features, args.pairs)
        cpu_ms = {
            n: {k: (sum(map(cpu_seconds, v)) - before[n][k]) / (args.pairs + 10) * 1e3 for k, v in p.items()}
            for n, p in pids.items()
        }
    finally:
        for cloud in clouds.values():
            cloud.stop(timeout=60)
    return {
        "what": "one request at a time, alternating between the clouds; median ms",
        "pairs": args.pairs,
        "baseline_tree": args.baseline_tree,
        "cpu_count": os.cpu_count(),
        "load_average_1m": os.getloadavg()[0],
        **medians,
        "cpu_ms_per_request": cpu_ms,
        "added_p50_ms": {n: medians["p50_ms"][n] - medians["p50_ms"]["process"] for n in names[1:]},
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.scale", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="resnet18")
    p.add_argument("--size", type=int, default=64)
    p.add_argument("--cut", default="layer2_1_relu_1")
    p.add_argument("--streams", default="1,2,4,8,16", type=lambda s: [int(v) for v in s.split(",")])
    p.add_argument("--seconds", type=float, default=5.0)
    p.add_argument("--warmup", type=float, default=2.0)
    p.add_argument("--ray-cpus", type=int, default=2, help="CPUs the local Ray instance may use")
    p.add_argument("--check-tol", type=float, default=0.0, help="warm-up replies must match the tail (0: bit-exact)")
    p.add_argument("--edges", type=int, default=1000, help="fleet model: edges")
    p.add_argument("--edge-rps", type=float, default=5.0, help="fleet model: requests/s per edge")
    p.add_argument("--cores-per-node", type=int, default=16, help="fleet model: replicas per node")
    p.add_argument("--max-ongoing", type=int, default=8, help="ray.max_ongoing_requests of each replica")
    p.add_argument("--pairs", type=int, default=150, help="interleaved single requests per cloud (added latency)")
    p.add_argument("--configs", default=",".join(CONFIGS), type=lambda s: s.split(","), help="a subset to run")
    p.add_argument("--work", help="keep the clouds' configs and logs here (default: a temporary folder)")
    p.add_argument("--out", help=f"where the JSON goes (default {RESULTS / 'scale.json'}; --quick: only if given)")
    p.add_argument("--quick", action="store_true", help="only the added latency (about 2 minutes)")
    p.add_argument(
        "--baseline-tree",
        metavar="DIR",
        help="--quick: also run a 1-replica Ray cloud from this Cleave source tree (instead of Serve's defaults)",
    )
    p.add_argument(
        "--versus",
        choices=("grpc", "serve-defaults"),
        default="grpc",
        help="--quick: the third cloud: transport grpc (Serve's gRPC data plane, Cleave's other settings) "
        "or Serve's defaults; ray-1 uses the default transport, direct",
    )
    args = p.parse_args(argv)
    torch.set_num_threads(1)  # the reference tails run with the replicas' and the cloud's thread count
    entry = {"name": args.model, "source": args.model, "input_shape": [1, 3, args.size, args.size]}
    model = LoadedModel.load(ModelSpec.from_dict(entry))
    features = prepare(model, args.cut, EncodingSpec(encoding="affine", bits=8))
    if args.work:
        Path(args.work).mkdir(parents=True, exist_ok=True)
    if args.quick:
        with tempfile.TemporaryDirectory(prefix="cleave-scale-") as tmp:
            measured = quick(model, entry, features, args, Path(args.work or tmp))
        print(json.dumps(measured, indent=2))
        if args.out:
            Path(args.out).write_text(json.dumps(measured, indent=2) + "\n")
        return 0
    if args.work:
        measured = asyncio.run(measure_all(model, entry, features, args, Path(args.work)))
    else:
        with tempfile.TemporaryDirectory(prefix="cleave-scale-") as tmp:
            measured = asyncio.run(measure_all(model, entry, features, args, Path(tmp)))
    records, hop = measured["records"], measured["interleaved"]
    errors = [e for r in records for e in r["errors"]]
    by = {(r["config"], r["streams"]): r for r in records}
    best = {name: max(r["throughput_rps"] for r in records if r["config"] == name) for name in args.configs}
    if set(args.configs) != set(CONFIGS) or 1 not in args.streams:
        print(json.dumps(records, indent=2))  # a partial run: numbers only, no JSON for the docs
        return 1 if any(r["errors"] for r in records) else 0
    fleet = fleet_model(records, args)
    result = {
        "benchmark": "scale",
        "model": entry,
        "cut": args.cut,
        "encoding": "affine 8-bit",
        "seconds": args.seconds,
        "warmup": args.warmup,
        "cpu_count": os.cpu_count(),
        "machine": platform.machine(),
        "python": platform.python_version(),
        "records": records,
        "summary": {
            "ray_added_p50_ms_1_stream": by[("ray-1", 1)]["p50_ms"] - by[("process", 1)]["p50_ms"],
            "interleaved_p50_ms": hop["p50_ms"],
            "interleaved_cloud_queue_ms": hop["queue_ms"],
            "interleaved_cloud_work_ms": hop["work_ms"],
            "ray_added_p50_ms_interleaved": hop["p50_ms"]["ray-1"] - hop["p50_ms"]["process"],
            "best_rps": best,
            "ray2_over_ray1": best["ray-2"] / best["ray-1"],
            "errors": len(errors),
        },
        "fleet": fleet,
    }
    out = Path(args.out or RESULTS / "scale.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    plot(records, fleet, out.with_suffix(".png"))
    print(json.dumps(result["summary"], indent=2))
    if errors:
        print("errors:\n" + "\n".join(errors[:20]), file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
