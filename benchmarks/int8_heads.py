"""What an int8 head costs in accuracy and buys in speed, on the pretrained EfficientNet-Lite0 and real photos.

An edge with ``head.weight_bits: 8`` runs every split's head on ONNX Runtime's int8 kernels
(:func:`partitioner.quantized_head.build_quantized_head`, calibrated on the edge's calibration images) and
its planner judges each split through that head. This measures, at a few cuts and for the whole model:

* top-1 agreement with the float model on the first ``--photos`` built-in photos, each alone, as a request
  sends it (the planner's own meters): the float head with int8 features (what a float-head edge sends),
  the int8 head with float32 features, and the int8 head with int8 features;
* the int8 head's speed-up over the float head at batch 1 on one thread
  (:func:`~partitioner.quantized_head.measure_speedups`).

The heads are calibrated as the edge calibrates them by default: on its 8 calibration images, the first 8
of the photos measured here (which favours the int8 head).

    python -m benchmarks.int8_heads            # about 3 minutes on 2 cores
"""

from __future__ import annotations

import argparse
import platform
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch

from benchmarks._results import RESULTS, write
from partitioner.loaded import LoadedModel
from partitioner.models import ModelSpec
from partitioner.photos import calibration_inputs
from partitioner.planner import distortion_meter, head_tail_distortion
from partitioner.quantized_head import build_quantized_head, measure_speedups

#: Cuts of the pretrained Lite0 (early, the planner's usual middle cuts, late) and its last node (the whole
#: model: an edge-only run on int8 kernels).
CUTS = ("conv2d_2", "conv2d_5", "conv2d_11", "conv2d_17", "_fc")
#: Agreement a plan must keep under the default budget (autoplan.min_top1).
MIN_TOP1 = 0.99


def measure(photos: int, calibration: int, repeats: int) -> dict[str, Any]:
    torch.set_num_threads(1)
    spec = ModelSpec(name="lite0", source="efficientnet_lite0_pretrained", input_shape=(1, 3, 224, 224))
    model = LoadedModel.load(spec)
    x = calibration_inputs(spec, None, photos)
    calib = calibration_inputs(spec, None, calibration)
    float_heads = distortion_meter(model, x)
    rows = []
    for name in CUTS:
        cut = model.graph.cut(name)
        _, head, _ = model.parts(cut.index)
        started = time.perf_counter()
        int8 = build_quantized_head(head, calib)
        built_s = time.perf_counter() - started
        int8_heads = head_tail_distortion(model, x, head_at=lambda _index, h=int8: h)
        row: dict[str, Any] = {"cut": name, "index": cut.index, "build_s": round(built_s, 2)}
        for label, meter, encoding in (
            ("float_head_int8_features", float_heads, "int8"),
            ("int8_head_float_features", int8_heads, "raw"),
            ("int8_head_int8_features", int8_heads, "int8"),
        ):
            d = meter(SimpleNamespace(cut_index=cut.index, encoding=encoding))  # what it reads of a Candidate
            row[label] = {"top1": round(d.top1, 4), "rel_error": round(d.rel_error, 4)}
        row["speedup"] = round(measure_speedups(model, calib, [cut.index], repeats=repeats)[cut.index], 3)
        rows.append(row)
        print(
            f"[int8_heads] {name:>9} (#{cut.index}): top-1 float head + int8 features "
            f"{row['float_head_int8_features']['top1']:.3f}, int8 head {row['int8_head_float_features']['top1']:.3f}, "
            f"int8 head + int8 features {row['int8_head_int8_features']['top1']:.3f}; speed-up {row['speedup']:.2f}x",
            flush=True,
        )
    return {
        "model": spec.source,
        "photos": photos,
        "calibration_photos": calibration,
        "threads": 1,
        "min_top1": MIN_TOP1,
        "host": platform.node(),
        "torch": torch.__version__,
        "cuts": rows,
    }


def plot(result: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = result["cuts"]
    labels = [f"{r['cut']}\n#{r['index']}" for r in rows]
    fig, ax = plt.subplots(1, 2, figsize=(11, 4))
    width = 0.27
    series = (
        ("float_head_int8_features", "float head, int8 features"),
        ("int8_head_float_features", "int8 head, float32 features"),
        ("int8_head_int8_features", "int8 head, int8 features"),
    )
    for i, (key, name) in enumerate(series):
        where = [k + (i - 1) * width for k in range(len(rows))]
        ax[0].bar(where, [100 * r[key]["top1"] for r in rows], width, label=name)
    ax[0].axhline(100 * result["min_top1"], color="k", lw=0.8, ls="--", label="budget (1 point lost)")
    ax[0].set_xticks(range(len(rows)), labels, fontsize=8)
    ax[0].set_ylim(50, 101)
    ax[0].set_ylabel(f"top-1 agreement, % of {result['photos']} photos")
    ax[0].legend(fontsize=7, loc="lower left")
    ax[1].bar(range(len(rows)), [r["speedup"] for r in rows], 0.5)
    ax[1].set_xticks(range(len(rows)), labels, fontsize=8)
    ax[1].set_ylabel("int8 head speed-up over float (batch 1, 1 thread)")
    fig.suptitle("EfficientNet-Lite0 (pretrained), built-in photos: int8 heads on ONNX Runtime")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--photos", type=int, default=48, help="photos the agreement is measured on")
    parser.add_argument("--calibration", type=int, default=8, help="photos the int8 heads are calibrated on")
    parser.add_argument("--repeats", type=int, default=15, help="timed runs per head for the speed-up")
    parser.add_argument("--out", type=Path, default=RESULTS / "int8_heads", help="writes OUT.json and OUT.png")
    args = parser.parse_args(argv)
    result = measure(args.photos, args.calibration, args.repeats)
    write(result, args.out, plot, "int8_heads")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
