"""Dynamic batching on the cloud: throughput and p50/p99 latency with 1-16 concurrent edge streams, on vs off.

Starts two ``cleave-cloud`` processes on loopback, serving the same model: one with batching off
(the default), one with the ``batching:`` section below. This process plays the edges: for each
stream count in ``--streams`` it opens that many closed-loop *edge streams* against each cloud in
turn (off then on, the order alternating between stream counts so that drift in the machine's load
falls on both). A stream is what one edge daemon holds: its own channel, its own session at the cut
``--cut``, its own ``SplitInference.Infer`` bidirectional stream, and one request in flight (the next
goes when the last result frame of the previous is in). Requests carry features precomputed here by
the model's head for the cut, encoded ``--encoding`` (int8 by default, what an edge sends) and
serialised to ``InferFrame`` bytes once, before the clock starts: the driver only writes bytes and
parses results. The first ``--warmup`` seconds of each run are not counted; then, for ``--seconds``:

- throughput: requests sent and answered within the window, per second;
- latency: per request, from writing its frame to reading its last result frame; p50, p99, mean;
- mean batch size: from the cloud's own Prometheus histogram ``cleave_cloud_batch_size`` (its
  ``--metrics`` endpoint, scraped at both ends of the window: rows run / batches run), with the
  distribution of sizes; with batching off every request runs alone (size 1, no batcher);
- errors: RPC failures, error results, results for the wrong request id, and (during warm-up, where
  every reply is checked) results not matching the model's own tail on the same features. Any error
  makes the script exit non-zero;
- CPU: cores used by the driver (this process) and by the cloud process over the window.

Batching settings (``--max-batch-size 16 --preferred 4,8,16 --max-queue-delay-ms 2``): 16 rows covers
the largest stream count, so with 16 streams a batch can take every stream at once; the preferred
sizes let a batch go without waiting as soon as 4, 8 or 16 requests are queued; and the delay, 2 ms,
is a fraction of one batch-1 tail call here (about 9 ms: ``cloud_compute_ms_mean`` at 1 stream in
the JSON), so a lone stream, whose requests never find company, pays at most 2 ms more per request.
The 1-stream row shows that price; the others show what it buys.

What to expect from closed-loop streams: with 8 and 16 streams they settle into two groups that take
turns, one group's batch running while the other group's requests arrive and queue behind it. When
the worker frees up, the queued group has reached a preferred size (4 or 8) and goes at once, so a
batch holds half the streams (``batch_size_buckets`` in the JSON) and a request's cloud time is about
one batch of queueing plus one batch of compute. The preferred sizes, not the delay, cut these
batches: a 40 ms delay (``--max-queue-delay-ms 40 --streams 8,16``) gave the same sizes. With 4
streams, 2 is not a preferred size: a batch goes at 4 or when the delay runs out, mostly with 3 or 4
rows and sometimes with 1. With batching off, every stream's request runs its tail on its own gRPC
thread, each with the cloud's 2 torch threads: N tails contend for the cores at once, which is why
throughput does not grow with the stream count and latency grows with it.

The default model, resnet18 at 1x3x64x64 cut after ``layer2`` (``layer2_1_relu_1``: a 128x8x8
feature; the tail is layer3, layer4 and the classifier), is small on purpose: with small inputs the
per-call overhead of running a tail (Python, dispatch, thread hand-offs, small kernels that leave
cores idle) dominates, and that is the cost batching amortises on a CPU. The cloud runs with 2
torch threads (``--threads``). The machine this was written on has 2 cores, which the driver and the
cloud share; the driver's own CPU use is in the JSON and printed per run (under a tenth of a core
in the committed run) so a reader can see it is not the bottleneck, but on such a host its share is taken
from the cloud: treat absolute numbers as a lower bound and the on/off ratio, measured side by side
in one run, as the result. Writes ``benchmarks/results/batching.json`` and ``batching.png``.

    python -m benchmarks.batching [--model resnet18 --size 64 --cut layer2_1_relu_1 --streams 1,4,8,16 --seconds 8]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import statistics
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import numpy as np
import torch
import yaml
from prometheus_client.parser import text_string_to_metric_families

from cleave_cli.launch import DaemonProcess, cloud_process, free_port
from compressor import Assembler, EncodingSpec, decode, encode, to_chunks
from partitioner.loaded import LoadedModel, as_tensor_list
from partitioner.models import ModelSpec, calibration_batch
from protos.cleave.v1 import split_inference_pb2 as si_pb2
from protos.cleave.v1 import split_inference_pb2_grpc as si_grpc

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
INFER = "/cleave.v1.SplitInference/Infer"
FEATURE_SETS = 8  # distinct inputs per stream, cycled: request id = index into them
BATCH_METRIC = "cleave_cloud_batch_size"
MODES = ("off", "on")


@dataclass
class Features:
    """Precomputed head outputs for the cut, encoded for the wire, with the tail's expected outputs."""

    encoded: list[list]  # per input: the cleave.v1.Tensor messages of the live set
    expected: list[torch.Tensor]  # per input: the tail's first output on the *decoded* features
    bytes_up: int  # serialized frame size of one request


def prepare(model: LoadedModel, cut_name: str, spec: EncodingSpec) -> Features:
    """Run the head once per input, encode, and compute what the cloud must answer for each."""
    _cut, head, tail = model.parts(cut_name)
    inputs = calibration_batch(model.input_shape, FEATURE_SETS, seed=11)
    encoded, expected = [], []
    with torch.inference_mode():
        for i in range(FEATURE_SETS):
            live = as_tensor_list(head(inputs[i : i + 1]))
            messages = [encode(t, spec) for t in live]
            encoded.append(messages)
            # The cloud runs the tail on what it decodes, so that is the reference, lossy codec or not.
            expected.append(as_tensor_list(tail(*[decode(m) for m in messages]))[0])
    sizes = [len(b) for b in serialize_frames("x" * 32, encoded[0], 0)]
    return Features(encoded, expected, sum(sizes))


def serialize_frames(session_id: str, tensors: list, request_id: int) -> list[bytes]:
    """One request as serialized ``InferFrame`` bytes (session id on the first frame, ``last`` on the last)."""
    groups = list(to_chunks(tensors, 1 << 20))
    return [
        si_pb2.InferFrame(
            session_id=session_id if i == 0 else "", request_id=request_id, chunks=g, last=i == len(groups) - 1
        ).SerializeToString()
        for i, g in enumerate(groups)
    ]


# -- the cloud's side of the measurement --------------------------------------------------------------


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of process ``pid`` so far (all its threads), from /proc."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def batch_histogram(metrics_port: int) -> dict[str, float]:
    """The cloud's ``cleave_cloud_batch_size`` histogram summed over models: sum, count and buckets."""
    with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10) as reply:
        text = reply.read().decode()
    out: dict[str, float] = {"sum": 0.0, "count": 0.0}
    for family in text_string_to_metric_families(text):
        if family.name != BATCH_METRIC:
            continue
        for sample in family.samples:
            if sample.name.endswith("_sum"):
                out["sum"] += sample.value
            elif sample.name.endswith("_count"):
                out["count"] += sample.value
            elif sample.name.endswith("_bucket"):
                key = f"le_{sample.labels['le']}"
                out[key] = out.get(key, 0.0) + sample.value
    return out


@dataclass
class Snapshot:
    wall: float
    driver_cpu: float
    cloud_cpu: float
    batches: dict[str, float]


def snapshot(cloud: DaemonProcess, metrics_port: int) -> Snapshot:
    return Snapshot(
        time.perf_counter(), time.process_time(), cpu_seconds(cloud.proc.pid), batch_histogram(metrics_port)
    )


def batch_sizes(before: dict[str, float], after: dict[str, float]) -> tuple[float | None, dict[str, int]]:
    """Mean rows per batch over the window, and how many batches fell in each histogram bucket."""
    batches = after["count"] - before["count"]
    if batches <= 0:
        return None, {}
    cumulative = {k: after[k] - before.get(k, 0.0) for k in after if k.startswith("le_")}
    bounds = sorted(cumulative, key=lambda k: float(k[3:]))
    per_bucket, below = {}, 0.0
    for k in bounds:
        count = cumulative[k] - below
        below = cumulative[k]
        if count:
            per_bucket[f"<={k[3:].removesuffix('.0')}"] = int(count)
    return (after["sum"] - before["sum"]) / batches, per_bucket


# -- the edge streams -------------------------------------------------------------------------------


@dataclass
class StreamLog:
    """What one stream saw: latencies (ms) and cloud queue times of requests completed in the window."""

    latencies: list[float] = field(default_factory=list)
    queue_ms: list[float] = field(default_factory=list)
    compute_ms: list[float] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    checked: int = 0


async def edge_stream(
    address: str,
    model: LoadedModel,
    cut: str,
    features: Features,
    index: int,
    opened: asyncio.Barrier,
    window: dict[str, float],
    check_tol: float,
) -> StreamLog:
    """One edge: a session and an ``Infer`` stream, closed loop, until ``window['end']``.

    Every stream waits on ``opened`` (whether its session opened or not) so that no stream starts its
    clock before all are connected; the first problem on a stream is recorded and ends that stream.
    """
    log = StreamLog()
    async with grpc.aio.insecure_channel(address) as channel:
        stub = si_grpc.SplitInferenceStub(channel)
        try:
            request = si_pb2.OpenSessionRequest(
                model=model.name, fingerprint=model.fingerprint, cut=cut, client=f"bench-{index}"
            )
            session_id = (await stub.OpenSession(request, timeout=30)).session_id
        except grpc.aio.AioRpcError as exc:
            log.errors.append(f"stream {index}: OpenSession: {exc.code().name} {exc.details()}")
            await opened.wait()
            return log
        # Pre-serialized: the driver writes bytes (no request serializer), so its per-request cost is the RPC's.
        frames = [
            serialize_frames(session_id, features.encoded[(index + k) % FEATURE_SETS], k) for k in range(FEATURE_SETS)
        ]
        infer = channel.stream_stream(
            INFER, request_serializer=None, response_deserializer=si_pb2.InferResult.FromString
        )
        await opened.wait()  # every stream is open before the clock starts
        call = infer(timeout=window["limit_s"])
        try:
            await closed_loop(call, frames, features, index, window, check_tol, log)
            await call.done_writing()
            while (extra := await call.read()) is not grpc.aio.EOF:
                raise RuntimeError(f"a result nobody asked for (request {extra.request_id})")
        except grpc.aio.AioRpcError as exc:
            log.errors.append(f"stream {index}: {exc.code().name} {exc.details()}")
        except RuntimeError as exc:
            log.errors.append(f"stream {index}: {exc}")
            call.cancel()
        await stub.CloseSession(si_pb2.CloseSessionRequest(session_id=session_id), timeout=30)
    return log


async def closed_loop(
    call: grpc.aio.StreamStreamCall,
    frames: list[list[bytes]],
    features: Features,
    index: int,
    window: dict[str, float],
    check_tol: float,
    log: StreamLog,
) -> None:
    """Send, wait for the whole result, repeat, until the window ends; RuntimeError on a wrong reply."""
    k = 0
    while (started := time.perf_counter()) < window["end"]:
        slot = k % FEATURE_SETS
        k += 1
        warm = started < window["start"]
        for frame in frames[slot]:
            await call.write(frame)
        assembler = Assembler()
        while True:
            result = await call.read()
            if result is grpc.aio.EOF:
                raise RuntimeError("the cloud ended the stream")
            if result.HasField("error"):
                raise RuntimeError(f"request {result.request_id}: error result: {result.error.message}")
            if result.request_id != slot:
                raise RuntimeError(f"result for request {result.request_id} while {slot} was in flight")
            if warm:  # warm-up: check every reply against the model's tail
                assembler.add(result.chunks)
            if result.last:
                break
        done = time.perf_counter()
        if warm:
            output = decode(assembler.finish()[0])
            expected = features.expected[(index + slot) % FEATURE_SETS]
            if not torch.allclose(output, expected, rtol=check_tol, atol=check_tol):
                diff = (output - expected).abs().max().item()
                raise RuntimeError(f"request {slot}: output differs from the model's tail by {diff:.2e}")
            log.checked += 1
        elif done <= window["end"]:
            log.latencies.append((done - started) * 1e3)
            log.queue_ms.append(result.timing.queue_ms)
            log.compute_ms.append(result.timing.compute_ms)


async def run_streams(
    cloud: DaemonProcess,
    metrics_port: int,
    model: LoadedModel,
    cut: str,
    features: Features,
    streams: int,
    warmup: float,
    seconds: float,
    check_tol: float,
) -> dict:
    """``streams`` concurrent edge streams against ``cloud``; the window's numbers."""
    opened = asyncio.Barrier(streams + 1)
    # Set once every stream is open; until then every request counts as warm-up.
    window = {"start": float("inf"), "end": float("inf"), "limit_s": warmup + seconds + 120.0}
    tasks = [
        asyncio.create_task(edge_stream(cloud.address, model, cut, features, i, opened, window, check_tol))
        for i in range(streams)
    ]
    await opened.wait()
    now = time.perf_counter()
    window["start"], window["end"] = now + warmup, now + warmup + seconds
    await asyncio.sleep(window["start"] - time.perf_counter())
    before = await asyncio.to_thread(snapshot, cloud, metrics_port)
    await asyncio.sleep(max(window["end"] - time.perf_counter(), 0.0))
    after = await asyncio.to_thread(snapshot, cloud, metrics_port)
    logs = await asyncio.gather(*tasks)
    elapsed = after.wall - before.wall
    latencies = np.array([x for log in logs for x in log.latencies])
    mean_batch, distribution = batch_sizes(before.batches, after.batches)
    return {
        "streams": streams,
        "requests": int(latencies.size),
        "throughput_rps": latencies.size / seconds,
        "p50_ms": float(np.percentile(latencies, 50)) if latencies.size else None,
        "p99_ms": float(np.percentile(latencies, 99)) if latencies.size else None,
        "mean_ms": float(latencies.mean()) if latencies.size else None,
        "cloud_queue_ms_mean": statistics.fmean(q for log in logs for q in log.queue_ms) if latencies.size else None,
        "cloud_compute_ms_mean": statistics.fmean(c for log in logs for c in log.compute_ms)
        if latencies.size
        else None,
        "mean_batch_size": mean_batch,
        "batch_size_buckets": distribution,
        "batches": int(after.batches["count"] - before.batches["count"]),
        "driver_cpu_cores": (after.driver_cpu - before.driver_cpu) / elapsed,
        "cloud_cpu_cores": (after.cloud_cpu - before.cloud_cpu) / elapsed,
        "checked_in_warmup": sum(log.checked for log in logs),
        "errors": [e for log in logs for e in log.errors],
    }


# -- orchestration --------------------------------------------------------------------------------


def start_cloud(work: Path, mode: str, entry: dict, args: argparse.Namespace) -> tuple[DaemonProcess, int]:
    """A cloud with batching ``mode`` ('off' or 'on') and a Prometheus endpoint; returns it and the metrics port."""
    metrics_port = free_port()
    config: dict = {"models": [entry], "metrics": {"listen": str(metrics_port)}}
    # Every stream comes from this one process (one client, one peer): make room past the per-client default.
    streams = max(int(s) for s in args.streams.split(",")) + 4
    config["max_workers"] = streams + 12
    config["limits"] = {"max_streams": streams, "max_streams_per_client": streams}
    if mode == "on":
        config["batching"] = {
            "enabled": True,
            "max_batch_size": args.max_batch_size,
            "preferred_batch_sizes": args.preferred,
            "max_queue_delay_ms": args.max_queue_delay_ms,
        }
    path = work / f"cloud-{mode}.yaml"
    path.write_text(yaml.safe_dump(config))
    cloud = cloud_process(path, free_port(), work / f"cloud-{mode}.log", threads=args.threads)
    cloud.start()
    return cloud, metrics_port


def plot(records: list[dict], speedups: dict[int, float], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    fig, ax = plt.subplots(1, 2, figsize=(12, 4.5))
    colors = {"off": "tab:grey", "on": "tab:blue"}
    for mode in MODES:
        sel = sorted((r for r in records if r["mode"] == mode), key=lambda r: r["streams"])
        n = [r["streams"] for r in sel]
        ax[0].plot(n, [r["throughput_rps"] for r in sel], "o-", color=colors[mode], label=f"batching {mode}")
        ax[1].plot(n, [r["p50_ms"] for r in sel], "o-", color=colors[mode], label=f"p50, batching {mode}")
        ax[1].plot(n, [r["p99_ms"] for r in sel], "x--", color=colors[mode], label=f"p99, batching {mode}")
    on = {r["streams"]: r for r in records if r["mode"] == "on"}
    for n, speedup in speedups.items():
        below = speedup < 1  # under the "off" point: write it underneath
        ax[0].annotate(
            f"x{speedup:.2f}",
            (n, on[n]["throughput_rps"]),
            textcoords="offset points",
            xytext=(0, -14 if below else 8),
            ha="center",
        )
    streams = sorted(speedups)
    for a in ax:
        a.set_xscale("log", base=2)
        a.set_xticks(streams, [str(s) for s in streams])
        a.set_xlabel("concurrent edge streams")
        a.legend(fontsize=8)
    ax[0].set_ylabel("requests / s")
    ax[0].set_title("throughput (speed-up on/off annotated)")
    ax[0].set_ylim(0, 1.15 * max(r["throughput_rps"] for r in records))
    ax[1].set_ylabel("latency, ms (log)")
    ax[1].set_yscale("log")
    ax[1].yaxis.set_major_formatter(matplotlib.ticker.ScalarFormatter())
    ax[1].yaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    ax[1].set_title("latency per request: p50 and p99")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


async def measure_all(
    clouds: dict[str, tuple[DaemonProcess, int]],
    model: LoadedModel,
    features: Features,
    stream_counts: list[int],
    args: argparse.Namespace,
) -> list[dict]:
    """Every (streams, mode), modes alternating first so that drift in the host's load hits both."""
    records = []
    for i, n in enumerate(stream_counts):
        for mode in MODES if i % 2 == 0 else MODES[::-1]:
            cloud, metrics_port = clouds[mode]
            record = await run_streams(
                cloud, metrics_port, model, args.cut, features, n, args.warmup, args.seconds, args.check_tol
            )
            if mode == "off":
                # No batcher: every request runs alone, and the batch histogram must have seen nothing.
                if record["batches"]:
                    record["errors"].append(f"batching off, yet the cloud ran {record['batches']} batches")
                record["mean_batch_size"] = 1.0
            records.append({"mode": mode, **record})
            print(
                f"batching {mode:<3} streams {n:>2}: {record['throughput_rps']:7.1f} req/s"
                f"  p50 {record['p50_ms'] or 0:6.2f} ms  p99 {record['p99_ms'] or 0:6.2f} ms"
                f"  batch {record['mean_batch_size'] or 0:5.2f}  queue {record['cloud_queue_ms_mean'] or 0:5.2f} ms"
                f"  cpu driver {record['driver_cpu_cores']:.2f} cloud {record['cloud_cpu_cores']:.2f}"
                f"  errors {len(record['errors'])}",
                flush=True,
            )
            for error in record["errors"][:5]:
                print(f"    error: {error}", flush=True)
    return records


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="resnet18")
    parser.add_argument("--size", type=int, default=64, help="input height and width")
    parser.add_argument("--cut", default="layer2_1_relu_1", help="the split: a cut name of the model's graph")
    parser.add_argument("--encoding", default="int8", help="feature encoding (compressor.EncodingSpec text)")
    parser.add_argument("--streams", default="1,4,8,16", help="comma-separated concurrent stream counts")
    parser.add_argument("--seconds", type=float, default=8.0, help="measured seconds per (mode, streams)")
    parser.add_argument("--warmup", type=float, default=1.5, help="unmeasured seconds before each window")
    parser.add_argument("--threads", type=int, default=2, help="the cloud's torch threads")
    parser.add_argument("--max-batch-size", type=int, default=16)
    parser.add_argument("--preferred", default="4,8,16", help="preferred batch sizes, comma-separated")
    parser.add_argument("--max-queue-delay-ms", type=float, default=2.0)
    parser.add_argument("--check-tol", type=float, default=1e-4, help="warm-up check: batched vs the model's tail")
    parser.add_argument("--out", default=str(RESULTS / "batching.json"))
    args = parser.parse_args(argv)
    args.preferred = [int(s) for s in args.preferred.split(",") if s]
    stream_counts = [int(s) for s in args.streams.split(",")]

    torch.set_num_threads(1)  # the driver's own torch work is the one-off precompute
    entry = {"name": args.model, "source": args.model, "input_shape": [1, 3, args.size, args.size]}
    model = LoadedModel.load(ModelSpec.from_dict(entry))
    features = prepare(model, args.cut, EncodingSpec.parse(args.encoding))
    print(f"{args.model} 1x3x{args.size}x{args.size} cut {args.cut} {args.encoding}: {features.bytes_up} B/request")

    work = Path(tempfile.mkdtemp(prefix="cleave-batching-"))
    clouds: dict[str, tuple[DaemonProcess, int]] = {}
    started = time.perf_counter()
    try:
        for mode in MODES:
            clouds[mode] = start_cloud(work, mode, entry, args)
        # One event loop for every run: grpc.aio binds to the loop it first runs on.
        records = asyncio.run(measure_all(clouds, model, features, stream_counts, args))
    finally:
        for cloud, _port in clouds.values():
            cloud.stop()
    by = {(r["mode"], r["streams"]): r for r in records}
    speedups = {
        n: by["on", n]["throughput_rps"] / by["off", n]["throughput_rps"]
        for n in stream_counts
        if by["off", n]["throughput_rps"]
    }
    errors = sum(len(r["errors"]) for r in records)
    summary = {
        "speedup_throughput_on_over_off": {str(n): round(s, 3) for n, s in speedups.items()},
        "errors": errors,
        "driver_cpu_cores_max": max(r["driver_cpu_cores"] for r in records),
        "wall_s": round(time.perf_counter() - started, 1),
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(
        json.dumps(
            {
                "benchmark": "batching",
                "model": args.model,
                "input_shape": entry["input_shape"],
                "cut": args.cut,
                "encoding": args.encoding,
                "bytes_per_request": features.bytes_up,
                "seconds": args.seconds,
                "warmup_s": args.warmup,
                "cloud_torch_threads": args.threads,
                "batching": {
                    "max_batch_size": args.max_batch_size,
                    "preferred_batch_sizes": args.preferred,
                    "max_queue_delay_ms": args.max_queue_delay_ms,
                },
                "platform": {
                    "host": platform.node(),
                    "platform": platform.platform(),
                    "machine": platform.machine(),
                    "processor": platform.processor(),
                    "python": platform.python_version(),
                    "torch": torch.__version__,
                    "grpc": grpc.__version__,
                    "cpu_count": os.cpu_count(),
                    "note": "driver and cloud share these cores",
                },
                "summary": summary,
                "records": records,
            },
            indent=2,
        )
    )
    plot(records, speedups, out.with_suffix(".png"))
    print("speed-up (throughput on/off): " + ", ".join(f"{n} streams x{s:.2f}" for n, s in speedups.items()))
    print(f"errors: {errors}; wrote {out} and {out.with_suffix('.png')} in {summary['wall_s']} s")
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
