"""Learned bottleneck on the pretrained EfficientNet-Lite0 with held-out real photos.

Runs the ``bottleneck`` engine in-process exactly as a job does: the built-in photos (10 photographs,
5 crops each), 3 of the 10 photographs held out whole (15 images training never sees), the other 7
augmented for training; one bottleneck per cut and rate weight within ``--budget`` seconds in all;
int-k + zstd at the same cuts and the input as JPEG on the same held-out images. Writes
benchmarks/results/bottleneck.{json,png} with the goals of issue 18 evaluated: at <= 1 point of
agreement lost, bytes <= 0.5x the best plain int-k + zstd cut and <= 0.5x the JPEG quality that
reaches the same agreement.

    python -m benchmarks.bottleneck [--cuts add_3 --rate-weights 0.005,0.02,0.1 --latent 16 --budget 360]
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch

from cloud_node.jobs.engines import JobContext, get_engine
from cloud_node.jobs.models import ModelSource
from protos.cleave.v1 import compression_pb2 as pb

ROOT = Path(__file__).resolve().parent.parent

RESULTS = ROOT / "benchmarks" / "results"


def goals(points: list[dict]) -> dict:
    """The issue's goals on the held-out curve: the bottleneck point within 1 point of full
    agreement with the fewest bytes, against the cheapest int-k cut and JPEG at that agreement."""
    ours = [p for p in points if p["family"] == "bottleneck"]
    target = 0.99
    ok = [p for p in ours if p["agreement"] >= target]
    best = min(ok, key=lambda p: p["bytes_mean"]) if ok else max(ours, key=lambda p: p["agreement"])
    level = max(target, 0.0) if ok else best["agreement"]

    def cheapest(family: str) -> dict | None:
        cands = [p for p in points if p["family"].startswith(family) and p["agreement"] >= level]
        return min(cands, key=lambda p: p["bytes_mean"]) if cands else None

    intk, jpeg = cheapest("int-k"), cheapest("JPEG")
    return {
        "agreement_level": level,
        "bottleneck": best,
        "reached_within_1_point": bool(ok),
        "best_int_k": intk,
        "jpeg_at_same_agreement": jpeg,
        "ratio_vs_int_k": best["bytes_mean"] / intk["bytes_mean"] if intk else None,
        "ratio_vs_jpeg": best["bytes_mean"] / jpeg["bytes_mean"] if jpeg else None,
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cuts", default="add_3")
    ap.add_argument("--rate-weights", default="0.005,0.02,0.1")
    ap.add_argument("--latent", type=int, default=16)
    ap.add_argument("--stride", type=int, default=1)
    ap.add_argument("--budget", type=float, default=360.0, help="training seconds, all points together")
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default=str(RESULTS / "bottleneck"))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    opts = pb.BottleneckOptions(
        cuts=args.cuts.split(","),
        rate_weights=[float(w) for w in args.rate_weights.split(",")],
        latent=args.latent,
        stride=args.stride,
        budget_s=args.budget,
        holdout=0.3,
        augment=3,
    )
    source = ModelSource(torchvision="efficientnet_lite0_pretrained", input_shape=(1, 3, args.size, args.size))
    with tempfile.TemporaryDirectory() as tmp:
        ctx = JobContext(
            spec=pb.JobSpec(engine="bottleneck", bottleneck=opts),
            source=source,
            workdir=Path(tmp),
            on_progress=lambda f, s: print(f"{f:5.2f} {s}", flush=True),
        )
        t0 = time.perf_counter()
        get_engine("bottleneck").run(ctx)
        wall = time.perf_counter() - t0
        curve = json.loads((Path(tmp) / "curve.json").read_text())
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        if (Path(tmp) / "curve.png").exists():
            shutil.copy(Path(tmp) / "curve.png", out.with_suffix(".png"))
    result = {
        "command": " ".join(sys.argv),
        "host": {"python": platform.python_version(), "torch": torch.__version__, "threads": args.threads},
        "job_seconds": round(wall, 1),
        "report": ctx.report,
        "goals": goals(curve["points"]),
        "curve": curve,
    }
    out.with_suffix(".json").write_text(json.dumps(result, indent=1))
    g = result["goals"]
    print(
        json.dumps({k: g[k] for k in ("agreement_level", "reached_within_1_point", "ratio_vs_int_k", "ratio_vs_jpeg")})
    )
    for p in curve["points"]:
        print(f"{p['method']:<28} {p['bytes_mean']:>9.0f} B  agreement {p['agreement']:.3f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
