"""What the edge costs a device: the torch-free edge (an edge bundle on ONNX Runtime) beside the torch
edge, side by side in one run.

    make test-edge                                    # creates .venv-edge (no torch), if not there yet
    python -m benchmarks.edge_footprint               # writes benchmarks/results/edge_footprint.{json,png}

For each edge: the installed size of what it needs (the packages of ``pip install cleave``, against
those of ``pip install cleave[cloud]``, summed from each environment's installed files), the edge
daemon's resident memory serving resnet18 at 224x224 split at one cut, float heads (after warm-up
requests; peak too), and the time from exec to health SERVING. The bundle edge opens its whole
model on first use (a fallback, an edge-only plan); "preload" is the same edge with it opened at
start. One cloud daemon (torch) serves them all.
Goals (issue 15): <= 300 MB installed, <= 200 MB RSS, <= 3 s to SERVING.
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
import numpy as np
import yaml
from grpc_health.v1 import health_pb2, health_pb2_grpc

from cleave_cli.client import EdgeClient
from cleave_cli.launch import free_port

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
SHAPE = (1, 3, 224, 224)
GOALS = {"install_mb": 300, "rss_mb": 200, "serving_s": 3.0}

# Sums the installed files of a distribution and of everything it requires (extras as asked), in the
# interpreter it runs in. Run by each environment's own python.
CLOSURE = r"""
import json, re, sys
from importlib import metadata
def norm(name): return re.sub(r"[-_.]+", "-", name).lower()
seen, sizes, todo = set(), {}, [(sys.argv[1], set(sys.argv[2].split(",")) - {""})]
while todo:
    name, extras = todo.pop()
    key = norm(name)
    if key in seen: continue
    try: dist = metadata.distribution(name)
    except metadata.PackageNotFoundError: continue
    seen.add(key)
    sizes[key] = sum((f.size or 0) for f in (dist.files or []))
    for req in dist.requires or []:
        spec, _, marker = req.partition(";")
        wanted = re.findall(r"extra\s*==\s*['\"]([^'\"]+)['\"]", marker)
        if wanted and not (set(map(norm, wanted)) & set(map(norm, extras))): continue
        if marker.strip() and not wanted:
            from packaging.markers import Marker
            try:
                if not Marker(marker).evaluate({"extra": ""}): continue
            except Exception: pass
        m = re.match(r"\s*([A-Za-z0-9_.-]+)\s*(\[([^\]]*)\])?", spec)
        todo.append((m.group(1), set(x.strip() for x in (m.group(3) or "").split(",") if x.strip())))
print(json.dumps(sizes))
"""


def closure_bytes(python: str, extras: str) -> dict[str, int]:
    """Installed bytes of ``cleave[extras]`` and its dependencies in ``python``'s environment."""
    done = subprocess.run([python, "-c", CLOSURE, "cleave", extras], capture_output=True, text=True, check=True)
    return json.loads(done.stdout)


def rss_kb(pid: int) -> tuple[int, int]:
    """(VmRSS, VmHWM) of ``pid`` in KiB, from /proc."""
    fields = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        fields[key] = value.strip()
    return int(fields["VmRSS"].split()[0]), int(fields["VmHWM"].split()[0])


def wait_serving(address: str, proc: subprocess.Popen, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    with grpc.insecure_channel(address) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise RuntimeError(f"daemon on {address} exited with {proc.returncode}")
            try:
                if stub.Check(health_pb2.HealthCheckRequest(), timeout=1).status == 1:
                    return
            except grpc.RpcError:
                pass
            time.sleep(0.02)
    raise TimeoutError(f"{address} not SERVING after {timeout}s")


def env(cache: Path) -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(ROOT), "CLEAVE_CACHE": str(cache), "PYTHONUNBUFFERED": "1"}


def measure_edge(label: str, argv: list[str], config: dict, workdir: Path, cache: Path, requests: int, starts: int):
    """Start the edge ``starts`` times (time to SERVING each), serve ``requests`` on the last, read its memory."""
    times, result = [], {}
    for i in range(starts):
        port = free_port()
        path = workdir / f"{label}.yaml"
        path.write_text(yaml.safe_dump({**config, "listen": f"127.0.0.1:{port}"}))
        log = open(workdir / f"{label}.log", "ab")  # noqa: SIM115 - closed below
        started = time.perf_counter()
        proc = subprocess.Popen([*argv, "--config", str(path)], cwd=ROOT, env=env(cache), stdout=log, stderr=log)
        try:
            wait_serving(f"127.0.0.1:{port}", proc, 300)
            times.append(time.perf_counter() - started)
            if i == starts - 1:
                client = EdgeClient(f"127.0.0.1:{port}")
                x = np.random.default_rng(0).random(SHAPE, dtype=np.float32)
                latencies, placements = [], set()
                for _ in range(requests):
                    reply = client.infer(x)
                    placements.add(reply.placement)
                    latencies.append(reply.timing.total_ms)
                status = client.status()
                rss, peak = rss_kb(proc.pid)
                result = {
                    "backend": status.backend,
                    "plan": f"{status.plan.cut_name} {status.plan.encoding.encoding}",
                    "placements": sorted(placements),
                    "rss_mb": rss / 1024,
                    "peak_rss_mb": peak / 1024,
                    "median_request_ms": statistics.median(latencies[requests // 4 :]),
                }
        finally:
            proc.terminate()
            proc.wait(30)
            log.close()
    result["serving_s"] = statistics.median(times)
    result["serving_s_runs"] = times
    return result


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.edge_footprint", description=__doc__.splitlines()[0])
    p.add_argument("--edge-python", default=str(ROOT / ".venv-edge" / "bin" / "python"), help="the torch-free venv")
    p.add_argument("--torch-python", default=sys.executable, help="an environment with cleave[cloud]")
    p.add_argument("--bundle", type=Path, help="resnet18 224x224 bundle (default: built into the cache)")
    p.add_argument("--cut", help="where both edges split (default: the bundle's second cut, add_4 for resnet18)")
    p.add_argument("--requests", type=int, default=30)
    p.add_argument("--starts", type=int, default=3, help="starts of each edge, for the time to SERVING")
    p.add_argument("--out", type=Path, default=RESULTS / "edge_footprint.json")
    args = p.parse_args(argv)
    cache = ROOT / ".cache" / "edge_footprint"
    cache.mkdir(parents=True, exist_ok=True)
    bundle = args.bundle or cache / "resnet18-224"
    if not (bundle / "manifest.json").exists():
        cmd = [args.torch_python, "-m", "cleave_cli.main", "bundle", "--model", "resnet18", "--out", str(bundle)]
        subprocess.run(
            [*cmd, "--input-shape", ",".join(map(str, SHAPE)), "--max-cuts", "4"], env=env(cache), check=True
        )
    manifest = json.loads((bundle / "manifest.json").read_text())
    cut = args.cut or manifest["cuts"][1]["name"]

    sizes = {
        "onnx bundle": closure_bytes(args.edge_python, ""),
        "torch": closure_bytes(args.torch_python, "cloud"),
    }
    model = {"name": "resnet18", "source": "resnet18", "input_shape": list(SHAPE)}
    with tempfile.TemporaryDirectory(prefix="cleave-footprint-") as tmp:
        work = Path(tmp)
        cloud_port = free_port()
        (work / "cloud.yaml").write_text(yaml.safe_dump({"models": [model], "listen": f"127.0.0.1:{cloud_port}"}))
        cloud_log = open(work / "cloud.log", "ab")  # noqa: SIM115 - closed below
        cloud = subprocess.Popen(
            [args.torch_python, "-m", "cloud_node.main", "--config", str(work / "cloud.yaml")],
            cwd=ROOT, env=env(cache), stdout=cloud_log, stderr=cloud_log,
        )  # fmt: skip
        try:
            wait_serving(f"127.0.0.1:{cloud_port}", cloud, 600)
            common = {"cloud": f"127.0.0.1:{cloud_port}", "torch_threads": 1, "plan": {"cut": cut, "encoding": "int8"}}
            edges = {
                "onnx bundle": measure_edge(
                    "light", [args.edge_python, "-m", "edge_node.main"], {**common, "bundle": str(bundle.resolve())},
                    work, cache, args.requests, args.starts,
                ),
                "onnx bundle, preload": measure_edge(
                    "preload", [args.edge_python, "-m", "edge_node.main"],
                    {**common, "bundle": str(bundle.resolve()), "preload": True}, work, cache, args.requests, 1,
                ),
                "torch": measure_edge(
                    "torch", [args.torch_python, "-m", "edge_node.main"], {**common, "model": model},
                    work, cache, args.requests, args.starts,
                ),
            }  # fmt: skip
        finally:
            cloud.terminate()
            cloud.wait(60)
            cloud_log.close()
    sizes["onnx bundle, preload"] = sizes["onnx bundle"]
    for name, sizes_of in sizes.items():
        edges[name]["install_mb"] = sum(sizes_of.values()) / 1e6
        edges[name]["largest_packages_mb"] = {
            k: round(v / 1e6, 1) for k, v in sorted(sizes_of.items(), key=lambda kv: -kv[1])[:6]
        }
    result = {
        "benchmark": "edge_footprint",
        "model": "resnet18",
        "input_shape": list(SHAPE),
        "cut": cut,
        "encoding": "int8",
        "bundle_mb": sum(f["bytes"] for f in manifest["files"].values()) / 1e6,
        "goals": GOALS,
        "edges": edges,
        "host": {"machine": platform.machine(), "python": platform.python_version(), "cpus": os.cpu_count()},
        "note": "one cloud (torch) serves both edges; torch_threads 1; RSS after the requests, on this machine's load",
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    plot(result, args.out.with_suffix(".png"))
    for name, e in edges.items():
        print(
            f"{name:12} install {e['install_mb']:7.0f} MB  RSS {e['rss_mb']:6.0f} MB (peak {e['peak_rss_mb']:.0f})  "
            f"SERVING after {e['serving_s']:.2f} s  request {e['median_request_ms']:.1f} ms"
        )
    return 0


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    edges = result["edges"]
    names = list(edges)
    metrics = [("install_mb", "installed, MB"), ("rss_mb", "RSS serving, MB"), ("serving_s", "start to SERVING, s")]
    fig, axes = plt.subplots(1, 3, figsize=(11, 3.4))
    for ax, (key, title) in zip(axes, metrics, strict=True):
        values = [edges[n][key] for n in names]
        ax.bar(names, values, color=["tab:green", "tab:olive", "tab:gray"][: len(names)])
        ax.tick_params(axis="x", labelsize=7)
        ax.axhline(result["goals"][key], color="tab:red", linestyle="--", linewidth=1, label="goal")
        ax.set_title(title)
        ax.set_yscale("log" if max(values) / max(min(values), 1e-9) > 20 else "linear")
        for i, v in enumerate(values):
            ax.text(i, v, f"{v:.0f}" if v >= 10 else f"{v:.2f}", ha="center", va="bottom")
        ax.legend(loc="upper left", fontsize=8)
    fig.suptitle(
        f"edge footprint: {result['model']} {'x'.join(map(str, result['input_shape'][2:]))}, split at {result['cut']}"
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    sys.exit(main())
