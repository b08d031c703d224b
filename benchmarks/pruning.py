"""Structured channel pruning of torchvision CNNs: what it saves, and what the job costs.

For each model and ratio, runs the ``prune_cnn`` engine in-process exactly as a job does (load,
measure, prune with Torch-Pruning, export TorchScript and .pt2, write the plan, measure again) and
records parameters, MACs and weight size before and after, the plan's size and the job's wall time,
and CPU latency at batch 1 with ``--threads`` torch threads: the original and the served TorchScript
timed alternately, ``--runs`` each, medians, so that load on the machine hits both alike. JSON and a plot go to
benchmarks/results/pruning.{json,png}. Random weights (weights=None): the figures are about cost,
not accuracy.

    python -m benchmarks.pruning [--models resnet18,resnet50,mobilenet_v2,vgg16 --ratios 0.3,0.5,0.7 --size 224]
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

from cloud_node.jobs.engines import JobContext, PruneCnn
from cloud_node.jobs.models import ModelSource, load
from protos.cleave.v1 import compression_pb2 as pb

ROOT = Path(__file__).resolve().parent.parent


def interleaved_latency(a: torch.nn.Module, b: torch.nn.Module, x: torch.Tensor, runs: int) -> tuple[float, float]:
    """Median latencies (ms) of ``a`` and ``b``, timed alternately so that load on the machine hits both alike."""
    ta, tb = [], []
    with torch.inference_mode():
        a(x), b(x)  # warm-up
        for _ in range(runs):
            for model, times in ((a, ta), (b, tb)):
                t = time.perf_counter()
                model(x)
                times.append((time.perf_counter() - t) * 1e3)
    return statistics.median(ta), statistics.median(tb)


def run_one(model: str, ratio: float, size: int, runs: int) -> dict:
    spec = pb.JobSpec(engine="prune_cnn", prune=pb.PruneOptions(ratio=ratio))
    source = ModelSource(torchvision=model, input_shape=(1, 3, size, size))
    with tempfile.TemporaryDirectory() as tmp:
        ctx = JobContext(spec=spec, source=source, workdir=Path(tmp), latency_runs=1)
        t = time.perf_counter()
        PruneCnn().run(ctx)
        job_s = time.perf_counter() - t
        sizes = {p.name: p.stat().st_size for p in Path(tmp).iterdir()}
        pruned = torch.jit.load(str(Path(tmp) / "model.ts"))
    original, x = load(source)
    before, after = ctx.report["before"], ctx.report["after"]
    before["latency_ms"], after["latency_ms"] = (round(v, 2) for v in interleaved_latency(original, pruned, x, runs))
    row = {
        "model": model,
        "ratio": ratio,
        "job_seconds": round(job_s, 2),
        "prune_seconds": ctx.report["prune_seconds"],
        "plan_bytes": ctx.report["plan_bytes"],
        "torchscript_bytes": sizes.get("model.ts"),
        "pt2_bytes": sizes.get("model.pt2"),
        "before": before,
        "after": after,
        "params_ratio": round(before["parameters"] / after["parameters"], 2),
        "macs_ratio": round(before["macs"] / after["macs"], 2),
        "speedup": round(before["latency_ms"] / after["latency_ms"], 2),
    }
    print(
        f"{model:<13} {ratio:>4}  params {before['parameters'] / 1e6:6.2f}M -> {after['parameters'] / 1e6:6.2f}M  "
        f"MACs {before['macs'] / 1e9:6.2f}G -> {after['macs'] / 1e9:6.2f}G ({row['macs_ratio']}x)  "
        f"latency {before['latency_ms']:7.1f} -> {after['latency_ms']:7.1f} ms ({row['speedup']}x)  "
        f"TorchScript {sizes.get('model.ts', 0) / 1e6:.1f} MB  plan {row['plan_bytes']} B  job {job_s:.1f} s",
        flush=True,
    )
    return row


def plot(rows: list[dict], path: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for model in dict.fromkeys(r["model"] for r in rows):
        mine = [r for r in rows if r["model"] == model]
        axes[0].plot([r["ratio"] for r in mine], [r["macs_ratio"] for r in mine], "o-", label=model)
        axes[1].plot([r["ratio"] for r in mine], [r["speedup"] for r in mine], "o-", label=model)
    axes[0].set(xlabel="channel ratio removed", ylabel="MACs reduction (x)", title="MACs")
    axes[1].set(xlabel="channel ratio removed", ylabel="CPU speed-up (x)", title="CPU latency, batch 1")
    axes[0].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", default="resnet18,resnet50,mobilenet_v2,vgg16")
    p.add_argument("--ratios", default="0.3,0.5,0.7")
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--runs", type=int, default=10)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    rows = [run_one(m, float(r), args.size, args.runs) for m in args.models.split(",") for r in args.ratios.split(",")]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    meta = {
        "torch": torch.__version__,
        "threads": args.threads,
        "size": args.size,
        "cpu": platform.processor(),
        "machine": platform.machine(),
    }
    (out / "pruning.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    plot(rows, out / "pruning.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
