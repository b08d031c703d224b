"""Run inside a network namespace by tests: stream requests at an edge daemon for a while and
report, as JSON on stdout, every reply's placement and error plus the plan over time."""

from __future__ import annotations

import argparse
import json
import os
import threading
import time

import grpc
import numpy as np

from cleave_cli.client import EdgeClient
from protos.cleave.v1 import edge_pb2


def _input(shape: tuple[int, ...]):
    """A synthetic input: the planner's own where torch is installed, plain noise where it is not
    (the torch-free edge's environment, tests/edge)."""
    try:
        from partitioner.models import calibration_batch
    except ImportError:
        return np.random.default_rng(3).random(shape, dtype=np.float32)
    return calibration_batch(shape, 1, seed=3)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--edge", required=True)
    parser.add_argument("--seconds", type=float, required=True, help="at most this long")
    parser.add_argument("--stop-file", help="stop early once this file exists")
    parser.add_argument("--shape", default="1,3,64,64")
    args = parser.parse_args()
    client = EdgeClient(args.edge)
    x = _input(tuple(int(d) for d in args.shape.split(",")))
    plans, replies, errors = [], [], []
    stop = threading.Event()

    def watch() -> None:
        while not stop.is_set():
            s = client.status()
            plans.append(
                {
                    "t": time.monotonic(),
                    "placement": edge_pb2.Placement.Name(s.plan.placement),
                    "cut": s.plan.cut_name,
                    "encoding": s.plan.encoding.encoding,
                    "switches": s.counters.plan_switches,
                    "up_mbps": s.link.up_mbps,
                    "reason": s.plan.reason,
                }
            )
            stop.wait(0.25)

    watcher = threading.Thread(target=watch)
    watcher.start()
    started = time.monotonic()
    while time.monotonic() - started < args.seconds and not (args.stop_file and os.path.exists(args.stop_file)):
        try:
            r = client.infer(x, timeout=30)
            replies.append(
                {
                    "t": time.monotonic(),
                    "placement": edge_pb2.Placement.Name(r.placement),
                    "outputs": len(r.outputs),
                    "note": r.note,
                    "ms": r.timing.total_ms,
                }
            )
        except grpc.RpcError as exc:
            errors.append(f"{exc.code().name}: {exc.details()}")
    stop.set()
    watcher.join()
    print(json.dumps({"started": started, "plans": plans, "replies": replies, "errors": errors}))


if __name__ == "__main__":
    main()
