"""What a bottleneck is compared with, on the same held-out images: the plain cut with int-k
features + zstd, and the input sent as JPEG or WebP (cloud-only), each as bytes per image and top-1
agreement with the original model; and the rate-agreement plot of all of them.

Bytes are the whole encoded tensor message (payload plus the scales and zero points it carries),
what a frame puts on the wire, so per-channel codes at a cut with many channels pay for their
parameters."""

from __future__ import annotations

import io
from typing import Any

import numpy as np
import torch
from torch import nn

from compressor import codec
from compressor.spec import EncodingSpec

from .train import _logits, cut_features

__all__ = ["int_k_points", "jpeg_points", "plot_curve"]


def _summary(sizes: list[int], agree: int, **extra: Any) -> dict[str, Any]:
    arr = np.asarray(sizes, dtype=np.float64)
    return {
        **extra,
        "bytes_mean": float(arr.mean()),
        "bytes_p95": float(np.percentile(arr, 95)),
        "agreement": agree / max(1, len(sizes)),
    }


def int_k_points(
    head: nn.Module,
    tail: nn.Module,
    images: torch.Tensor,
    bits: tuple[int, ...] = (8, 4, 2),
    per_tensor: bool = False,
) -> list[dict[str, Any]]:
    """Per-channel affine int-k features + zstd at the cut, each image coded alone (the decoded
    images go through the tail as one batch); with
    ``per_tensor`` also one scale for the whole tensor (``int{b}t``), often fewer bytes."""
    feats = cut_features(head, images)
    points = []
    layouts = ((True, ""), (False, "t")) if per_tensor else ((True, ""),)
    with torch.inference_mode():
        teacher = _logits(tail(feats)).argmax(-1)
        for per_channel, suffix in layouts:
            for b in bits:
                spec = EncodingSpec(encoding="affine", bits=b, per_channel=per_channel, codec="zstd")
                msgs = [codec.encode(feats[i : i + 1], spec) for i in range(len(feats))]
                decoded = torch.cat([torch.as_tensor(codec.decode(m)) for m in msgs])
                agree = int((_logits(tail(decoded)).argmax(-1) == teacher).sum())
                sizes = [m.ByteSize() for m in msgs]
                method = f"int{b}{suffix}+zstd"
                points.append(_summary(sizes, agree, method=method, family="int-k+zstd at the cut"))
    return points


def jpeg_points(
    model: nn.Module,
    images: torch.Tensor,
    qualities: tuple[int, ...] = (10, 30, 50, 75, 90),
    fmt: str = "jpeg",
) -> list[dict[str, Any]]:
    """The input sent as JPEG (or WebP: ``fmt="webp"``; the cloud runs the whole model), at each quality."""
    points = []
    family = {"jpeg": "JPEG input (cloud-only)", "webp": "WebP input (cloud-only)"}[fmt]
    with torch.inference_mode():
        teacher = _logits(model(images)).argmax(-1)
        for q in qualities:
            spec = EncodingSpec(encoding=fmt, quality=q, codec="none")
            msgs = [codec.encode(images[i : i + 1], spec) for i in range(len(images))]
            decoded = torch.cat([torch.as_tensor(codec.decode(m)) for m in msgs])
            agree = int((_logits(model(decoded)).argmax(-1) == teacher).sum())
            sizes = [m.ByteSize() for m in msgs]
            points.append(_summary(sizes, agree, method=f"{fmt}{q}", family=family))
    return points


def plot_curve(points: list[dict[str, Any]], title: str) -> bytes | None:
    """A PNG of agreement against bytes per image (log scale), one series per method family."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    fig, ax = plt.subplots(figsize=(6.5, 4))
    families: dict[str, list[dict[str, Any]]] = {}
    for p in points:
        families.setdefault(p.get("family", p["method"]), []).append(p)
    for i, (fam, pts) in enumerate(sorted(families.items())):
        pts = sorted(pts, key=lambda p: p["bytes_mean"])
        xs, ys = [p["bytes_mean"] for p in pts], [p["agreement"] for p in pts]
        ax.plot(xs, ys, "o-", color=f"C{i}", label=fam)
        for p in pts:
            ax.annotate(p["method"], (p["bytes_mean"], p["agreement"]), fontsize=6)
    ax.set_xscale("log")
    ax.set_xlabel("bytes per image (mean, held-out)")
    ax.set_ylabel("top-1 agreement with the float model")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=7)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100, bbox_inches="tight")
    plt.close(fig)
    return buf.getvalue()
