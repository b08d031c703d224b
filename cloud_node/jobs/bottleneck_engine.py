"""The ``bottleneck`` engine: supervised compression at one or more cuts (see docs/bottleneck.md).

For each cut and each rate weight it trains a bottleneck (:mod:`partitioner.bottleneck`) on the
training images, then measures it on held-out images that training never saw (whole image
sources are held out: no crop of a held-out photo is trained on). With the built-in photos, the
training set is the training photos' crops plus ``augment`` random crops per crop, cut from every
picture the installed packages ship except the held-out photographs
(:mod:`partitioner.bottleneck.data`); an uploaded dataset's training part is augmented in place.
The best point (highest held-out agreement, then fewest bytes) ships as artifacts:
``bottleneck.json``, ``bottleneck.edge.safetensors`` and ``bottleneck.cloud.safetensors``;
``curve.json`` and ``curve.png`` hold every point with int-k features (per channel and per tensor)
at the same cuts and the input as JPEG and WebP on the same images.

Progress goes through ``ctx.progress``; cancellation and restarts are the job manager's (the job
process is killed and the job re-queued or marked CANCELLED like any other).
"""

from __future__ import annotations

import json
import statistics
import time
from typing import TYPE_CHECKING, Any

import torch

from partitioner import bottleneck as bn
from partitioner.bottleneck import data as bn_data
from partitioner.bottleneck.compare import int_k_points, jpeg_points, plot_curve
from partitioner.graph import trace
from partitioner.models import fingerprint

from . import evaluate

if TYPE_CHECKING:
    from .engines import JobContext

DEFAULT_RATE_WEIGHTS = (0.05,)
#: Input qualities of the JPEG and WebP references (the high ones: real photos need them to agree).
IMAGE_QUALITIES = (10, 30, 50, 75, 90, 95, 100)
MAX_POINTS = 16
MAX_AUGMENT = 64
AUTO_CUTS = 2


def _auto_cuts(graph: Any) -> list[Any]:
    """Cuts with one 4-D tensor crossing, in the first two thirds of the graph, fewest bytes first."""
    last = max(c.index for c in graph.cuts)
    ok = [
        c for c in graph.cuts if c.index > 0 and c.index < 2 * last / 3 and len(c.live) == 1 and len(c.shapes[0]) == 4
    ]
    return sorted(ok, key=lambda c: (c.nbytes, c.index))[:AUTO_CUTS]


def _images(ctx: JobContext, shape: tuple[int, ...], max_images: int) -> tuple[torch.Tensor, list[int], str]:
    """Training + held-out images, with the source each comes from (for the split)."""
    data = ctx.dataset()
    if data is not None:
        x = torch.from_numpy(data.inputs[:max_images]).float()
        if x.dim() != 4 or tuple(x.shape[1:]) != tuple(shape[1:]):
            raise ValueError(f"dataset.inputs: shape {list(x.shape)} does not fit the model input {list(shape)}")
        return x, list(range(len(x))), "dataset"
    from partitioner import photos

    x = photos.builtin_photos(shape, max_images)
    sources = len(photos._photos())
    return x, [i % sources for i in range(len(x))], "photos"


def check_options(opts: Any) -> None:
    """Validate a job's ``BottleneckOptions`` (ValueError names the field)."""
    for w in opts.rate_weights:
        if not 0 <= w <= 1e3:
            raise ValueError(f"bottleneck.rate_weights: {w} is not in [0, 1000]")
    if not 0 <= opts.holdout < 1:
        raise ValueError(f"bottleneck.holdout: {opts.holdout} is not in (0, 1)")
    if opts.augment > MAX_AUGMENT:
        raise ValueError(f"bottleneck.augment: {opts.augment} is over {MAX_AUGMENT}")
    if opts.budget_s < 0 or opts.target_bytes < 0:
        raise ValueError("bottleneck.budget_s: negative" if opts.budget_s < 0 else "bottleneck.target_bytes: negative")
    per_cut = len(opts.rate_weights) + len(opts.levels)
    if len(opts.cuts) * max(1, per_cut) > MAX_POINTS:
        raise ValueError(f"bottleneck: {len(opts.cuts)} cuts x {per_cut} rate weights and levels is over {MAX_POINTS}")
    if opts.stride not in (0, 1, 2):
        raise ValueError(f"bottleneck.stride: {opts.stride} is not 1 or 2")
    for name in ("latent", "hidden"):
        if getattr(opts, name) > 4096:
            raise ValueError(f"bottleneck.{name}: {getattr(opts, name)} is over 4096")
    if opts.max_images > 4096:
        raise ValueError(f"bottleneck.max_images: {opts.max_images} is over 4096")
    if opts.kind not in ("", *bn.KINDS):
        raise ValueError(f"bottleneck.kind: {opts.kind!r} is not one of {', '.join(bn.KINDS)}")
    if opts.kind == "affine" and opts.stride not in (0, 1):
        raise ValueError("bottleneck.stride: an affine bottleneck codes at stride 1")
    if not 0 <= opts.temperature <= 100:
        raise ValueError(f"bottleneck.temperature: {opts.temperature} is not in (0, 100] (0: 1)")
    if not 0 <= opts.margin_weight <= 1e3:
        raise ValueError(f"bottleneck.margin_weight: {opts.margin_weight} is not in [0, 1000]")
    if not 0 <= opts.mixup <= 1:
        raise ValueError(f"bottleneck.mixup: {opts.mixup} is not in [0, 1]")
    for level in opts.levels:
        if not 1 <= level <= 1e4:
            raise ValueError(f"bottleneck.levels: {level} is not in [1, 10000]")
    if not 0 <= opts.dead_zone < 0.5:
        raise ValueError(f"bottleneck.dead_zone: {opts.dead_zone} is not in [0, 0.5)")
    if (opts.levels or opts.dead_zone) and opts.kind != "affine":
        raise ValueError("bottleneck.levels: fixed steps and a dead zone need kind affine")


def _macs(module: torch.nn.Module, x: torch.Tensor) -> int:
    """A module's multiply-adds over ``x``: its own count where it has one (an affine bottleneck's
    per-channel steps, which ``count_macs`` does not see: it counts convolutions and linears)."""
    own = getattr(module, "macs", None)
    return own(x) if callable(own) else evaluate.count_macs(module, x)


class BottleneckEngine:
    """Learned bottleneck; artifacts bottleneck.{json,edge.safetensors,cloud.safetensors}, curve.{json,png}."""

    name = "bottleneck"

    def run(self, ctx: JobContext) -> None:
        opts = ctx.spec.bottleneck
        check_options(opts)
        # each point (rate weight, levels): trained at a rate weight, or (levels >= 1) untrained, fixed steps
        settings = [(w, 0.0) for w in opts.rate_weights] + [(0.0, v) for v in opts.levels]
        settings = settings or [(w, 0.0) for w in DEFAULT_RATE_WEIGHTS]
        holdout = opts.holdout or 0.3
        budget = opts.budget_s or 120.0
        ctx.progress(0.02, "loading the model")
        model, example = ctx.load_model()
        if not isinstance(example, torch.Tensor) or example.dim() != 4:
            raise ValueError("model: a bottleneck needs an image model with one (N, C, H, W) input")
        graph = trace(model, example[:1])
        cuts = [graph.cut(int(c) if c.isdigit() else c) for c in opts.cuts] if opts.cuts else _auto_cuts(graph)
        if not cuts:
            raise ValueError("bottleneck.cuts: the model has no cut with a single (N, C, H, W) tensor crossing")
        if len(cuts) * len(settings) > MAX_POINTS:
            raise ValueError(
                f"bottleneck: {len(cuts)} cuts x {len(settings)} rate weights and levels is over {MAX_POINTS}"
            )
        images, sources, origin = _images(ctx, tuple(example.shape), opts.max_images or 50)
        train_idx, held_idx = bn.split_by_group(len(images), sources, holdout)
        copies = opts.augment or 3
        if origin == "photos":  # more pictures than the training photos: every one not held out
            names = bn_data.photo_names()
            held_names = sorted({names[sources[i]] for i in held_idx})
            ctx.progress(0.03, f"cutting {copies * len(train_idx)} random crops (held out: {', '.join(held_names)})")
            extra = bn_data.random_crops(
                bn_data.pool(held_out=held_names), tuple(example.shape), copies * len(train_idx), seed=1
            )
            train_x = torch.cat([images[train_idx], extra])
        else:
            train_x = bn.augment(images[train_idx], copies, seed=1)
        held_x = images[held_idx]
        base = {
            "fingerprint": fingerprint(model),
            "source": ctx.source.torchvision or (ctx.source.upload_meta or {}).get("architecture", ""),
            "input_shape": list(example.shape),
        }
        ctx.progress(0.08, "JPEG reference on the held-out images")
        points: list[dict[str, Any]] = [
            dict(p, cut=None) for fmt in ("jpeg", "webp") for p in jpeg_points(model, held_x, IMAGE_QUALITIES, fmt)
        ]
        trained: list[tuple[dict[str, Any], bn.Bottleneck]] = []
        per_point = budget / (len(cuts) * len(settings))
        total = len(cuts) * len(settings)
        done = 0
        for cut in cuts:
            head, tail = graph.split(cut)
            bn.cut_features(head, images[:1])  # the cut crosses one 4-D tensor (ValueError otherwise)
            points += [dict(p, cut=cut.name) for p in int_k_points(head, tail, held_x, (8, 4, 3, 2), per_tensor=True)]
            ctx.progress(0.1 + 0.8 * done / total, f"cut {cut.name}: features of {len(train_x)} training images")
            features = bn.teacher_features(head, tail, train_x)
            for w, levels in settings:
                lo, span = 0.1 + 0.8 * done / total, 0.8 / total
                stage = f"cut {cut.name}, " + (f"{levels:g} levels" if levels else f"rate weight {w:g}")
                kind = opts.kind or "conv"
                channels = cut.shapes[0][1]
                config = bn.BottleneckConfig(
                    channels=channels,
                    latent=channels if kind == "affine" else opts.latent or 8,
                    hidden=opts.hidden or 32,
                    stride=opts.stride or 1,
                    kind=kind,
                )
                tc = bn.TrainConfig(
                    rate_weight=w,
                    target_bytes=opts.target_bytes,
                    budget_s=per_point,
                    temperature=opts.temperature or 1.0,
                    margin_weight=opts.margin_weight,
                    mixup=opts.mixup,
                    levels=levels,
                    dead_zone=opts.dead_zone,
                )
                model_b = bn.train(
                    head,
                    tail,
                    train_x,
                    config,
                    tc,
                    progress=lambda f, s, lo=lo, span=span, stage=stage: ctx.progress(lo + span * f, f"{stage}: {s}"),
                    cut=(cut.index, cut.name),
                    features=features,
                )
                measured = bn.evaluate(model_b, head, tail, held_x)
                tag = f"L{levels:g}" if levels else f"w{w:g}"
                point = {
                    "method": f"bottleneck{'' if kind == 'conv' else '-' + kind}@{cut.name}/{tag}"
                    + (f"/dz{opts.dead_zone:g}" if opts.dead_zone else ""),
                    "family": "bottleneck",
                    "kind": kind,
                    "cut": cut.name,
                    "rate_weight": w,
                    "levels": levels,
                    "dead_zone": opts.dead_zone,
                    **measured,
                    **self._costs(model_b, head, images[:1]),
                    "train_seconds": model_b.history["train_seconds"],
                    "steps": model_b.history["steps"],
                }
                points.append(point)
                trained.append((point, model_b))
                done += 1
        ctx.progress(0.92, "writing the artifacts")
        best_point, best = max(trained, key=lambda pb_: (pb_[0]["agreement"], -pb_[0]["bytes_mean"]))
        bn.save(best, ctx.workdir, base)
        for name, media in (
            (bn.artifacts.DESCRIPTION, "application/json"),
            (bn.artifacts.EDGE_FILE, "application/x-safetensors"),
            (bn.artifacts.CLOUD_FILE, "application/x-safetensors"),
        ):
            ctx.write_artifact(name, (ctx.workdir / name).read_bytes(), media)
        curve = {"model": base, "images": origin, "held_out": len(held_x), "trained_on": len(train_x), "points": points}
        ctx.write_artifact("curve.json", json.dumps(curve, indent=1), "application/json")
        png = plot_curve(points, f"{base['source']}: held-out {origin} ({len(held_x)} images)")
        if png is not None:
            ctx.write_artifact("curve.png", png, "image/png")
        int8 = {p["cut"]: p for p in points if p["method"] == "int8+zstd"}
        ctx.report.update(
            engine=self.name,
            images=origin,
            train_images=len(train_x),
            held_out_images=len(held_x),
            best=best_point,
            int8_at_best_cut=int8.get(best_point["cut"]),
            bytes_vs_int8=round(best_point["bytes_mean"] / int8[best_point["cut"]]["bytes_mean"], 4)
            if best_point["cut"] in int8
            else None,
            bottleneck_fingerprint=bn.fingerprint(ctx.workdir),
            points=len(points),
        )

    @staticmethod
    def _costs(model_b: bn.Bottleneck, head: Any, one: torch.Tensor) -> dict[str, Any]:
        """Encoder MACs and the edge's measured latency per image (head + encoder + range coding)."""
        feats = bn.cut_features(head, one)
        times = []
        with torch.inference_mode():
            for _ in range(6):
                t = time.perf_counter()
                model_b.encode(bn.cut_features(head, one))
                times.append((time.perf_counter() - t) * 1e3)
            dec = []
            data = model_b.encode(feats)
            for _ in range(5):
                t = time.perf_counter()
                model_b.decode(data, 1)
                dec.append((time.perf_counter() - t) * 1e3)
        return {
            "encoder_macs": _macs(model_b.encoder, feats),
            "decoder_macs": _macs(model_b.decoder, torch.zeros(model_b.latent_shape(1))),
            "edge_ms": round(statistics.median(times[1:]), 3),
            "decoder_ms": round(statistics.median(dec), 3),
        }
