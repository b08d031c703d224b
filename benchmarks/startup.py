"""Start-up times of the CLI and the daemons, as a user sees them (wall clock, median of a few runs).

    python -m benchmarks.startup                        # this tree; writes benchmarks/results/startup.json
    python -m benchmarks.startup --root /other/checkout --out /tmp/before.json   # another tree, same venv

Measures ``cleave --help``, ``cleave plan --help``, ``cleave info`` against a running cloud,
``cleave status``, ``cleave infer --random 1`` (torch makes the inputs) and ``cleave infer photo.png``
against a running edge, and for each daemon the time
from exec to its first health answer (listening) and to health SERVING (models loaded). Self-contained:
it starts the daemons itself and speaks only the standard gRPC health protocol to them, so it measures
an older tree as well as this one. Numbers depend on the machine's load: run it on a quiet one.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from cleave_cli.launch import free_port

ROOT = Path(__file__).resolve().parent.parent


class Tree:
    """A checkout to measure: its modules run with it first on ``PYTHONPATH``."""

    def __init__(self, root: Path, python: str) -> None:
        self.root = root
        self.python = python
        self.env = {**os.environ, "PYTHONPATH": str(root), "PYTHONUNBUFFERED": "1"}

    def cli(self, *args: str) -> list[str]:
        # What the `cleave` console script runs.
        return [self.python, "-c", "import sys; from cleave_cli.main import main; sys.exit(main())", *args]

    def time_cli(self, args: list[str]) -> float:
        start = time.perf_counter()
        done = subprocess.run(self.cli(*args), cwd=self.root, env=self.env, capture_output=True, text=True)
        elapsed = time.perf_counter() - start
        if done.returncode != 0:
            raise RuntimeError(f"cleave {' '.join(args)} exited {done.returncode}:\n{done.stderr[-2000:]}")
        return elapsed

    def start_daemon(self, module: str, args: list[str], port: int, log: Path) -> tuple[subprocess.Popen, dict]:
        """Start a daemon; return it with the seconds to its first health answer and to SERVING."""
        with open(log, "ab") as out:
            start = time.perf_counter()
            proc = subprocess.Popen(
                [self.python, "-m", module, *args], cwd=self.root, env=self.env, stdout=out, stderr=subprocess.STDOUT
            )
        listening = None
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = health_pb2_grpc.HealthStub(channel)
            while time.perf_counter() - start < 300:
                if proc.poll() is not None:
                    raise RuntimeError(f"{module} exited {proc.returncode}: see {log}")
                try:
                    status = stub.Check(health_pb2.HealthCheckRequest(), timeout=0.5).status
                except grpc.RpcError:
                    time.sleep(0.02)
                    continue
                now = time.perf_counter() - start
                listening = listening if listening is not None else now
                if status == health_pb2.HealthCheckResponse.SERVING:
                    return proc, {"listening_s": listening, "serving_s": now}
                time.sleep(0.02)
        proc.kill()
        raise TimeoutError(f"{module} not SERVING after 300 s: see {log}")


def stop(proc: subprocess.Popen) -> None:
    proc.terminate()
    try:
        proc.wait(30)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def summary(samples: list[float]) -> dict:
    return {"median_s": round(statistics.median(samples), 3), "runs_s": [round(s, 3) for s in samples]}


def write_photo(path: Path) -> Path:
    """A 320x240 colour PNG (gradients), so the measurement needs no data set."""
    import numpy as np
    from PIL import Image

    ramp = np.linspace(0, 255, 240 * 320, dtype=np.float32).reshape(240, 320)
    Image.fromarray(np.stack([ramp, ramp[::-1], 255 - ramp], axis=-1).astype(np.uint8)).save(path)
    return path


def measure(tree: Tree, runs: int, daemon_runs: int, model: str, cut: str, logs: Path) -> dict:
    results: dict[str, dict] = {}
    results["cleave --help"] = summary([tree.time_cli(["--help"]) for _ in range(runs)])
    results["cleave plan --help"] = summary([tree.time_cli(["plan", "--help"]) for _ in range(runs)])
    cloud_times, edge_times = [], []
    for i in range(daemon_runs):
        cloud_port, edge_port = free_port(), free_port()
        cloud, t = tree.start_daemon(
            "cloud_node.main", ["--port", str(cloud_port), "--model", model], cloud_port, logs / "cloud.log"
        )
        cloud_times.append(t)
        try:
            edge_args = ["--port", str(edge_port), "--cloud", f"127.0.0.1:{cloud_port}", "--model", model]
            edge, t = tree.start_daemon("edge_node.main", [*edge_args, "--cut", cut], edge_port, logs / "edge.log")
            edge_times.append(t)
            try:
                if i == 0:  # the client commands, against the first pair
                    cloud_at, edge_at = f"127.0.0.1:{cloud_port}", f"127.0.0.1:{edge_port}"
                    results["cleave info"] = summary(
                        [tree.time_cli(["info", "--cloud", cloud_at]) for _ in range(runs)]
                    )
                    results["cleave status"] = summary(
                        [tree.time_cli(["status", "--edge", edge_at]) for _ in range(runs)]
                    )
                    results["cleave infer --random 1"] = summary(
                        [tree.time_cli(["infer", "--edge", edge_at, "--random", "1"]) for _ in range(runs)]
                    )
                    photo = write_photo(logs / "photo.png")  # an image file: the path an app's image takes
                    results["cleave infer photo.png"] = summary(
                        [tree.time_cli(["infer", str(photo), "--edge", edge_at]) for _ in range(runs)]
                    )
            finally:
                stop(edge)
        finally:
            stop(cloud)
    for name, times in (("cleave-cloud", cloud_times), ("cleave-edge", edge_times)):
        for key, label in (("listening_s", "to listen"), ("serving_s", "to SERVING")):
            results[f"{name} {label}"] = summary([t[key] for t in times])
    return results


def git_commit(root: Path) -> str:
    done = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True, text=True)
    dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root, capture_output=True)
    return done.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--root", type=Path, default=ROOT, help="checkout to measure (default: this one)")
    p.add_argument("--python", default=sys.executable, help="interpreter with the dependencies (default: this one)")
    p.add_argument("--runs", type=int, default=5, help="runs of each CLI command (default: 5)")
    p.add_argument("--daemon-runs", type=int, default=3, help="starts of each daemon (default: 3)")
    p.add_argument("--model", default="resnet18", help="model both daemons serve (default: resnet18)")
    p.add_argument("--cut", default="layer2_1_relu_1", help="the edge's pinned cut (default: layer2_1_relu_1)")
    p.add_argument(
        "--out", type=Path, default=ROOT / "benchmarks/results/startup.json", help="results file (default: %(default)s)"
    )
    args = p.parse_args(argv)
    tree = Tree(args.root.resolve(), args.python)
    with tempfile.TemporaryDirectory(prefix="cleave-startup-") as logs:
        results = measure(tree, args.runs, args.daemon_runs, args.model, args.cut, Path(logs))
    report = {
        "tree": str(tree.root),
        "commit": git_commit(tree.root),
        "host": platform.node(),
        "cpus": os.cpu_count(),
        "load_avg_1m_at_end": os.getloadavg()[0],
        "model": args.model,
        "results": results,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    width = max(map(len, results))
    for name, r in results.items():
        print(f"{name:<{width}}  {r['median_s']:7.3f} s  (median of {len(r['runs_s'])})")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
