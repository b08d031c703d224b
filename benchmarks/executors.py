"""Float heads and tails on ONNX Runtime against torch, on the pretrained EfficientNet-Lite0 and real photos.

The torch edge runs float heads in torch (eager, the traced graph) and int8 heads on ONNX Runtime; the
cloud runs tails and whole models in torch; the torch-free edge runs float heads on ONNX Runtime. This
times, at batch 1 on one thread and side by side (each repeat runs every variant once, in turn):

* each head at a few cuts, and the whole model (an edge-only run): torch float, ONNX Runtime float (the
  graph ``cleave bundle`` exports for the torch-free edge), ONNX Runtime int8 (as
  ``head.weight_bits: 8`` builds it, calibrated on the edge's 8 calibration photos);
* each tail at those cuts: torch float against ONNX Runtime float;

and measures what the float ONNX Runtime head does to top-1 agreement with the float model on the first
``--photos`` built-in photos (the planner's meter, each photo alone, features sent as float32; its
``rel_error`` includes the reply's 8-bit coding, as for every plan it measures).

So it shows how much of an int8 head's speed-up over the float head (``benchmarks/int8_heads.py``) comes
from ONNX Runtime itself rather than from int8.
"""

from __future__ import annotations

import argparse
import platform
import time
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import torch

from benchmarks._results import RESULTS, write
from partitioner.loaded import LoadedModel, as_tensor_list
from partitioner.models import ModelSpec
from partitioner.photos import calibration_inputs
from partitioner.planner import head_tail_distortion
from partitioner.quantized_head import QuantizedHead, _export_onnx, build_quantized_head

#: Cuts of the pretrained Lite0 (as in int8_heads.py); ``_fc`` is the whole model.
CUTS = ("conv2d_2", "conv2d_5", "conv2d_11", "conv2d_17", "_fc")


def float_on_ort(module: torch.fx.GraphModule, example: torch.Tensor) -> QuantizedHead:
    """``module`` on ONNX Runtime as the torch-free edge runs it: exported as ``cleave bundle`` exports its
    float heads (no weights changed), callable like the head."""
    with torch.no_grad():
        outputs = len(as_tensor_list(module(example)))
    return QuantizedHead(_export_onnx(module, example, outputs), {}, {}, outputs, threads=1)


def side_by_side(variants: dict[str, Callable[[], Any]], repeats: int, warmup: int = 3) -> dict[str, float]:
    """Median milliseconds of each variant, every repeat running each once, the order rotated."""
    names = list(variants)
    for _ in range(warmup):
        for name in names:
            variants[name]()
    times: dict[str, list[float]] = {name: [] for name in names}
    for r in range(repeats):
        for name in names[r % len(names) :] + names[: r % len(names)]:
            started = time.perf_counter()
            variants[name]()
            times[name].append(1000 * (time.perf_counter() - started))
    return {name: round(float(np.median(t)), 3) for name, t in times.items()}


def measure(photos: int, calibration: int, repeats: int) -> dict[str, Any]:
    torch.set_num_threads(1)
    spec = ModelSpec(name="lite0", source="efficientnet_lite0_pretrained", input_shape=(1, 3, 224, 224))
    model = LoadedModel.load(spec)
    x = calibration_inputs(spec, None, photos)
    calib = calibration_inputs(spec, None, calibration)
    one = x[:1]
    rows = []
    for name in CUTS:
        cut = model.graph.cut(name)
        _, head, tail = model.parts(cut.index)
        ort_float = float_on_ort(head, one)
        int8 = build_quantized_head(head, calib, threads=1)
        with torch.inference_mode():
            heads = side_by_side(
                {
                    "torch": lambda h=head: h(one),
                    "ort_float": lambda h=ort_float: h(one),
                    "ort_int8": lambda h=int8: h(one),
                },
                repeats,
            )
        with torch.no_grad():  # not inference mode: the tail's export traces it
            (features,) = as_tensor_list(head(one))  # these cuts carry one tensor
        row: dict[str, Any] = {"cut": name, "index": cut.index, "head_ms": heads}
        if name != "_fc":
            ort_tail = float_on_ort(tail, features)
            with torch.inference_mode():
                row["tail_ms"] = side_by_side(
                    {"torch": lambda t=tail, f=features: t(f), "ort_float": lambda t=ort_tail, f=features: t(f)},
                    repeats,
                )
        meter = head_tail_distortion(model, x, head_at=lambda _index, h=ort_float: h)
        d = meter(SimpleNamespace(cut_index=cut.index, encoding="raw"))  # what it reads of a Candidate
        row["ort_float_head"] = {"top1": round(d.top1, 4), "rel_error": float(f"{d.rel_error:.3g}")}
        rows.append(row)
        tails = row.get("tail_ms", {})
        print(
            f"[executors] {name:>9} (#{cut.index}): head torch {heads['torch']:.1f} ms, "
            f"ORT float {heads['ort_float']:.1f}, ORT int8 {heads['ort_int8']:.1f}; "
            f"tail torch {tails.get('torch', 0):.1f}, ORT float {tails.get('ort_float', 0):.1f}; "
            f"ORT float head top-1 {d.top1:.3f}, rel error {d.rel_error:.2g}",
            flush=True,
        )
    return {
        "model": spec.source,
        "photos": photos,
        "calibration_photos": calibration,
        "threads": 1,
        "repeats": repeats,
        "host": platform.node(),
        "torch": torch.__version__,
        "onnxruntime": __import__("onnxruntime").__version__,
        "cuts": rows,
    }


def plot(result: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = result["cuts"]
    labels = ["whole model" if r["cut"] == "_fc" else f"{r['cut']}\n#{r['index']}" for r in rows]
    fig, ax = plt.subplots(1, 2, figsize=(11, 4))
    width = 0.27
    for i, (key, name) in enumerate((("torch", "torch float"), ("ort_float", "ORT float"), ("ort_int8", "ORT int8"))):
        ax[0].bar([k + (i - 1) * width for k in range(len(rows))], [r["head_ms"][key] for r in rows], width, label=name)
    ax[0].set_xticks(range(len(rows)), labels, fontsize=8)
    ax[0].set_ylabel("head, ms (batch 1, 1 thread)")
    ax[0].legend(fontsize=7)
    tails = [r for r in rows if "tail_ms" in r]
    for i, (key, name) in enumerate((("torch", "torch float"), ("ort_float", "ORT float"))):
        ax[1].bar([k + (i - 0.5) * 0.4 for k in range(len(tails))], [r["tail_ms"][key] for r in tails], 0.4, label=name)
    ax[1].set_xticks(range(len(tails)), [f"{r['cut']}\n#{r['index']}" for r in tails], fontsize=8)
    ax[1].set_ylabel("tail, ms (batch 1, 1 thread)")
    ax[1].legend(fontsize=7)
    fig.suptitle("EfficientNet-Lite0 (pretrained): torch against ONNX Runtime")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--photos", type=int, default=48, help="photos the agreement is measured on")
    parser.add_argument("--calibration", type=int, default=8, help="photos the int8 heads are calibrated on")
    parser.add_argument("--repeats", type=int, default=30, help="timed runs per variant")
    parser.add_argument("--out", type=Path, default=RESULTS / "executors", help="writes OUT.json and OUT.png")
    args = parser.parse_args(argv)
    result = measure(args.photos, args.calibration, args.repeats)
    write(result, args.out, plot, "executors")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
