"""Where one split request's time goes: timestamps at each step, client, edge and cloud, on one clock.

Starts ``cleave-cloud`` and ``cleave-edge`` on loopback as :mod:`benchmarks.overhead` does, but each
through a shim (``python -m benchmarks.request_trace shim MODULE ARGS``) that wraps a few functions of
the request path to write a timestamp when they start and end; then pins one cut and encoding and sends
requests one at a time, each followed by a pause. ``time.perf_counter_ns`` is ``CLOCK_MONOTONIC`` on
Linux: one clock for every process on the machine, so the steps of a request line up across processes.
Nothing is changed but the wrapped functions, which only add the marks (about 2 us each).

Prints, per step, the median over requests of the time since the previous mark and since the client
sent the request; the steps between marks of two processes are gRPC's (serialisation, the socket,
the receiving thread's wake-up), the others Cleave's own. Timings are for reading, not for the docs'
tables: the marks cost a little, and a loaded machine stretches every step.

    python -m benchmarks.request_trace [--cut layer2_1_relu_1 --encoding int8 --requests 60]
"""

from __future__ import annotations

import argparse
import collections
import functools
import os
import runpy
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

ENV = "CLEAVE_REQUEST_TRACE"  # the directory the marks go to, one file per process

_fd: int | None = None


def mark(name: str) -> None:
    """Write ``name``, the time in ns and the thread to this process's file (nothing when not tracing)."""
    global _fd
    if _fd is None:
        folder = os.environ.get(ENV)
        _fd = os.open(f"{folder}/{os.getpid()}.marks", os.O_WRONLY | os.O_CREAT | os.O_APPEND) if folder else -1
    if _fd >= 0:
        os.write(_fd, f"{name}\t{time.perf_counter_ns()}\t{threading.current_thread().name}\n".encode())


def _wrap(owner: object, attribute: str, name: str) -> None:
    """Replace ``owner.attribute`` (a function or method) with one that marks its start and end."""
    original = getattr(owner, attribute)

    @functools.wraps(original)
    def traced(*args, **kwargs):
        mark(f"{name} >")
        try:
            return original(*args, **kwargs)
        finally:
            mark(f"{name} <")

    setattr(owner, attribute, traced)


def install(module: str) -> None:
    """Wrap the steps of the request path of daemon ``module`` (before it builds its server)."""
    from runtime import serving

    lenient = serving._lenient

    def traced_lenient(message_class, parse=None):
        deserialize = lenient(message_class, parse)
        name = f"parse {message_class.DESCRIPTOR.name}"

        def traced(data: bytes):
            mark(f"{name} >")
            try:
                return deserialize(data)
            finally:
                mark(f"{name} <")

        return traced

    serving._lenient = traced_lenient
    if module.startswith("cloud_node"):
        from cloud_node import sessions, streams

        _wrap(streams, "_Pending", "cloud first frame")
        _wrap(sessions.Session, "run", "cloud session run")
        _wrap(streams, "to_pieces", "cloud frame result")
        return

    from edge_node import cloud_link, runtime, servicer

    _wrap(servicer.EdgeServicer, "Infer", "edge Infer")
    _wrap(servicer.EdgeServicer, "_check_headers", "edge check input")
    _wrap(servicer.EdgeServicer, "_response", "edge build reply")
    _wrap(runtime.EdgeRuntime, "infer", "edge runtime")
    _wrap(runtime, "encode_apart", "edge encode")
    _wrap(cloud_link.InferStream, "submit", "edge submit")
    _wrap(cloud_link, "CloudReply", "edge result in")  # built on the receiver thread, right before set_result
    _wrap(runtime.Counters, "record", "edge record")
    for backend in ("torch_backend.TorchBackend", "onnx_backend.OnnxBackend"):
        module, cls = backend.split(".")
        try:
            owner = getattr(__import__(f"edge_node.{module}", fromlist=[cls]), cls)
        except ImportError:
            continue
        _wrap(owner, "decode", "edge decode")
        _wrap(owner, "run_head", "edge head")


def shim(argv: list[str]) -> None:
    """``shim MODULE ARGS``: install the marks, then run MODULE as ``python -m MODULE ARGS`` would."""
    module, *args = argv
    install(module)
    sys.argv = [module, *args]
    runpy.run_module(module, run_name="__main__", alter_sys=True)


def analyse(folder: Path, skip: int = 3) -> list[tuple[str, float, float, int]]:
    """(step, median us since the previous mark, median us since the client sent, requests) per step."""
    events = []
    for path in folder.glob("*.marks"):
        for line in path.read_text().splitlines():
            name, ns, _thread = line.split("\t")
            events.append((int(ns), name, path.stem))
    events.sort()
    requests: list[list[tuple[int, str, str]]] = []
    for event in events:
        if event[1] == "client send":
            requests.append([event])
        elif requests:
            requests[-1].append(event)
    requests = [r for r in requests[skip:] if r[-1][1] == "client received"]
    steps: dict[str, list[tuple[float, float]]] = collections.defaultdict(list)
    longest: list[str] = []
    for request in requests:
        start, previous = request[0][0], request[0][0]
        seen: collections.Counter[str] = collections.Counter()
        names = []
        for t, name, _pid in request:
            seen[name] += 1
            key = f"{name} #{seen[name]}" if seen[name] > 1 else name
            names.append(key)
            steps[key].append(((t - previous) / 1e3, (t - start) / 1e3))
            previous = t
        if len(names) > len(longest):
            longest = names
    return [
        (
            key,
            statistics.median(a for a, _ in steps[key]),
            statistics.median(b for _, b in steps[key]),
            len(steps[key]),
        )
        for key in longest
    ]


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["shim"]:
        shim(argv[1:])
        return 0
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="resnet18")
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--cut", default="layer2_1_relu_1")
    parser.add_argument("--encoding", default="int8")
    parser.add_argument("--requests", type=int, default=60)
    parser.add_argument("--pause-ms", type=float, default=20.0, help="between requests")
    args = parser.parse_args(argv)

    import yaml

    from cleave_cli.client import EdgeClient
    from cleave_cli.images import synthetic_images
    from cleave_cli.launch import cloud_process, edge_process, free_port
    from compressor import RAW_UNCOMPRESSED, encode
    from partitioner.loaded import LoadedModel
    from partitioner.models import ModelSpec
    from protos.cleave.v1 import edge_pb2
    from runtime.serving import open_channel

    entry = {"name": args.model, "source": args.model, "input_shape": [1, 3, args.size, args.size]}
    model = LoadedModel.load(ModelSpec.from_dict(entry))
    x = synthetic_images(1, model.input_shape, seed=0)
    request = edge_pb2.EdgeInferRequest(inputs=[encode(x.contiguous(), RAW_UNCOMPRESSED)]).SerializeToString()
    with tempfile.TemporaryDirectory(prefix="cleave-trace-") as tmp:
        work, marks = Path(tmp), Path(tmp) / "marks"
        marks.mkdir()
        (work / "cloud.yaml").write_text(yaml.safe_dump({"models": [entry]}))
        (work / "edge.yaml").write_text(yaml.safe_dump({"model": entry, "plan": {"cut": "cloud", "encoding": "fp32"}}))
        env = {ENV: str(marks)}
        shimmed = [sys.executable, "-m", "benchmarks.request_trace", "shim"]
        cloud_port = free_port()
        cloud = cloud_process(work / "cloud.yaml", cloud_port, work / "cloud.log", threads=1, env=env)
        cloud.command = [*shimmed, "cloud_node.main"]
        edge = edge_process(work / "edge.yaml", free_port(), cloud_port, work / "edge.log", threads=1, env=env)
        edge.command = [*shimmed, "edge_node.main"]
        try:
            cloud.start()
            edge.start()
            EdgeClient(edge.address).pin(args.cut, args.encoding)
            service = edge_pb2.DESCRIPTOR.services_by_name["Edge"].full_name
            infer = open_channel(edge.address).unary_unary(f"/{service}/Infer")
            os.environ[ENV] = str(marks)
            for _ in range(args.requests):
                mark("client send")
                data = infer(request, timeout=60)
                mark("client received")
                reply = edge_pb2.EdgeInferResponse.FromString(data)
                if reply.note:
                    raise RuntimeError(f"request did not run as planned: {reply.note}")
                time.sleep(args.pause_ms / 1e3)
        finally:
            edge.stop()
            cloud.stop()
        rows = analyse(marks)
    print(f"{args.model} at {args.cut}, {args.encoding}: medians over {rows[0][3] if rows else 0} requests (us)")
    print(f"{'step':<34} {'since previous':>14} {'since sent':>11}")
    for key, step, since, _count in rows:
        print(f"{key:<34} {step:>14.1f} {since:>11.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
