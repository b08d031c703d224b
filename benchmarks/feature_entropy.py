"""How far the bytes a split sends are from what any lossless coder of the same codes could send.

On the pretrained EfficientNet-Lite0 and the built-in photos, at the cuts and encodings the placement
grid's in-budget oracles use, this encodes each photo's features alone, as a request does, and compares
the zstd payload with three entropy bounds of the same quantization codes:

* ``pooled``: one ideal table per message (the codes' zeroth-order entropy): what zstd's Huffman literals
  aim at;
* ``per_channel``: one ideal table per channel and message, the tables free (a lower bound for every
  coder that codes each value on its own, however it models channels);
* ``static_tables``: one table per channel, counted on the first ``--calibration`` photos and used on the
  others (what a range coder with shipped tables, such as the learned bottleneck's, would send).

If the payload is close to these bounds, no lossless coder of these codes can cut a split's bytes much;
only fewer or coarser values (lower bit widths, a learned bottleneck) can, and those are judged by the
accuracy budget. ``needed_bytes`` reads, from ``placement_real.json`` when it is there, the bytes at which
the placement grid's best measured split would have reached a 1.5x speed-up.

Entropy is counted on the held-out photos (those after the first ``--calibration``); bytes are medians.
``top1`` is each encoding's top-1 agreement with the float model on all the photos, each alone (the
planner's meter): fewer bits per value are what would cut bytes further, and this is what they cost.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import torch

from benchmarks._results import RESULTS, write
from compressor import codec, zstd
from compressor.bitpack import unpack_array
from compressor.spec import EncodingSpec
from partitioner.loaded import LoadedModel, as_tensor_list
from partitioner.models import ModelSpec
from partitioner.photos import calibration_inputs
from partitioner.planner import distortion_meter

#: (cut, encoding) pairs: the in-budget oracles' splits in placement_real.json, int6 where it was one, and
#: fewer bits at the 4x, 1 Mbit/s cell's split.
POINTS = (
    ("conv2d_2", "int5c"),
    ("conv2d_5", "int5c"),
    ("conv2d_11", "int5c"),
    ("conv2d_11", "int6"),
    ("conv2d_17", "int4c"),
    ("conv2d_17", "int6"),
    ("conv2d_17", "int3c"),
    ("conv2d_17", "int2c"),
)


def _entropy_bits(counts: np.ndarray) -> float:
    """Bits an ideal coder spends on a sequence with these symbol ``counts`` (its own table, free)."""
    total = counts.sum()
    p = counts[counts > 0] / total
    return float(-(p * np.log2(p)).sum() * total)


def codes_of(msg: Any) -> np.ndarray:
    """The quantization codes an affine, zstd-coded tensor message carries, shaped as the tensor."""
    shape = tuple(msg.shape)
    raw = zstd.decompress(msg.payload, msg.raw_size)
    return unpack_array(raw, msg.bits, math.prod(shape)).reshape(shape)


def measure_point(features: np.ndarray, cut: str, encoding: str, calibration: int, top1: float) -> dict[str, Any]:
    """Bytes and entropy bounds for one cut's ``features`` (N x C x H x W, one photo per row); ``top1``: the
    encoding's top-1 agreement with the float model, as the planner measures it."""
    spec = EncodingSpec.parse(encoding)
    levels = 2**spec.bits
    messages = [codec.encode(features[i : i + 1], spec) for i in range(len(features))]
    codes = [codes_of(m) for m in messages]
    channels = features.shape[1]
    tables = np.stack(
        [
            np.bincount(np.concatenate([c[0, k].ravel() for c in codes[:calibration]]), minlength=levels) + 0.1
            for k in range(channels)
        ]
    )
    log_tables = -np.log2(tables / tables.sum(axis=1, keepdims=True))
    rows: dict[str, list[float]] = {k: [] for k in ("message", "payload", "pooled", "per_channel", "static_tables")}
    for msg, c in zip(messages[calibration:], codes[calibration:], strict=True):
        per_channel = [c[0, k].ravel() for k in range(channels)]
        rows["message"].append(msg.ByteSize())
        rows["payload"].append(len(msg.payload))
        rows["pooled"].append(_entropy_bits(np.bincount(c.ravel(), minlength=levels)) / 8)
        rows["per_channel"].append(sum(_entropy_bits(np.bincount(v, minlength=levels)) for v in per_channel) / 8)
        rows["static_tables"].append(sum(float(log_tables[k][v].sum()) for k, v in enumerate(per_channel)) / 8)
    med = {k: float(np.median(v)) for k, v in rows.items()}
    return {
        "cut": cut,
        "encoding": encoding,
        "top1": round(top1, 4),
        "shape": list(features.shape[1:]),
        "values": int(math.prod(features.shape[1:])),
        "bytes": {k: round(v, 1) for k, v in med.items()},
        "payload_over_per_channel": round(med["payload"] / med["per_channel"], 3),
        "bits_per_value": {k: round(8 * med[k] / math.prod(features.shape[1:]), 3) for k in ("payload", "per_channel")},
    }


def needed_bytes(placement: Path) -> list[dict[str, Any]]:
    """Per cell of the placement grid whose in-budget oracle is a split: the best split's bytes and the bytes
    it needed for a 1.5x speed-up (``split_bound.goal_bytes``; 0 where even zero bytes were not enough)."""
    if not placement.exists():
        return []
    data = json.loads(placement.read_text())
    cells = []
    for model in data["models"]:
        for cell in model["bandwidths"]:
            bound = cell.get("split_bound")
            if not cell.get("oracle_is_split") or not bound:
                continue
            cells.append(
                {
                    "speed": model["speed"],
                    "bandwidth_mbit": cell["bandwidth_mbit"],
                    "split": bound["label"],
                    "bytes_up": bound["bytes_up"],
                    "needed_bytes": round(bound["goal_bytes"]),
                    "max_speedup": round(bound["max_speedup"], 3),
                    "zero_byte_max_speedup": round(bound["zero_byte_max_speedup"], 3),
                }
            )
    return cells


def measure(photos: int, calibration: int, points: tuple[tuple[str, str], ...]) -> dict[str, Any]:
    torch.set_num_threads(2)
    spec = ModelSpec(name="lite0", source="efficientnet_lite0_pretrained", input_shape=(1, 3, 224, 224))
    model = LoadedModel.load(spec)
    x = calibration_inputs(spec, None, photos)
    meter = distortion_meter(model, x)
    rows = []
    features: dict[str, np.ndarray] = {}
    for cut, encoding in points:
        if cut not in features:
            _, head, _ = model.parts(model.graph.cut(cut).index)
            with torch.no_grad():
                (f,) = as_tensor_list(head(x))  # these cuts carry one tensor
            features[cut] = f.numpy()
        index = model.graph.cut(cut).index
        top1 = meter(SimpleNamespace(cut_index=index, encoding=encoding)).top1  # what it reads of a Candidate
        row = measure_point(features[cut], cut, encoding, calibration, top1)
        rows.append(row)
        b = row["bytes"]
        print(
            f"[feature_entropy] {cut:>9} {encoding:>5}: message {b['message']:.0f} B, zstd payload {b['payload']:.0f}, "
            f"entropy: pooled {b['pooled']:.0f}, per channel {b['per_channel']:.0f}, "
            f"static tables {b['static_tables']:.0f}; top-1 {top1:.3f}",
            flush=True,
        )
    return {
        "model": spec.source,
        "photos": photos,
        "calibration_photos": calibration,
        "held_out_photos": photos - calibration,
        "host": platform.node(),
        "torch": torch.__version__,
        "points": rows,
        "placement_cells": needed_bytes(RESULTS / "placement_real.json"),
    }


def plot(result: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = result["points"]
    series = (
        ("payload", "zstd payload (sent)"),
        ("pooled", "entropy, one table"),
        ("static_tables", "entropy, per-channel tables from calibration"),
        ("per_channel", "entropy, ideal per-channel tables"),
    )
    fig, ax = plt.subplots(figsize=(10, 4))
    width = 0.2
    for i, (key, name) in enumerate(series):
        where = [k + (i - 1.5) * width for k in range(len(rows))]
        ax.bar(where, [r["bytes"][key] / 1000 for r in rows], width, label=name)
    ax.set_xticks(range(len(rows)), [f"{r['cut']}\n{r['encoding']}" for r in rows], fontsize=8)
    ax.set_yscale("log")
    ax.set_ylabel(f"KB per photo (median of {result['held_out_photos']})")
    ax.legend(fontsize=7)
    ax.set_title("EfficientNet-Lite0 (pretrained), built-in photos: split bytes vs lossless bounds")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--photos", type=int, default=48, help="built-in photos, each encoded alone")
    parser.add_argument("--calibration", type=int, default=8, help="photos the static tables are counted on")
    parser.add_argument("--out", type=Path, default=RESULTS / "feature_entropy", help="writes OUT.json and OUT.png")
    args = parser.parse_args(argv)
    if not 0 < args.calibration < args.photos:
        parser.error("--calibration must be at least 1 and leave held-out photos")
    result = measure(args.photos, args.calibration, POINTS)
    write(result, args.out, plot, "feature_entropy")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
