"""Engines and the dispatcher that picks one for a job.

An engine is an object with a ``name`` and ``run(ctx: JobContext) -> None``; it reads the job spec
from ``ctx``, reports progress, writes artifacts through ``ctx.write_artifact`` and fills
``ctx.report``. Built-in engines: ``prune_cnn`` (Torch-Pruning), ``prune_transformer`` (head/FFN
plans), ``quantize`` (weight PTQ), ``sweep`` (ratios x bit-widths, Pareto report) and ``bottleneck``
(a learned encoder/decoder at a cut, :mod:`.bottleneck_engine`). Packages add
engines through the ``cleave.engines`` entry-point group (``name = "pkg.module:EngineClass"``);
only installed packages are consulted, never anything a request names.
"""

from __future__ import annotations

import copy
import json
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from importlib.metadata import entry_points
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import nn

from compressor.offline import (
    CnnPruneConfig,
    PtqConfig,
    apply_transformer_plan,
    gradient_importance,
    magnitude_importance,
    masked_reference,
    plan_from_scores,
    prune_cnn,
    quantize_weights,
)
from compressor.offline.ptq import int8_backend, lapq_weight_clips, register_int8_backend
from partitioner.models import calibration_batch
from protos.cleave.v1 import compression_pb2 as pb

from . import evaluate, models
from .datasets import Dataset, DatasetLimits, load_dataset
from .executor import Evaluations, LocalPool
from .int8 import onnx_int8

register_int8_backend(onnx_int8)  # 8-bit quantize jobs also ship a model that runs on int8 kernels

ENTRY_POINT_GROUP = "cleave.engines"
BUILTIN = ("prune_cnn", "prune_transformer", "quantize", "sweep", "bottleneck")


class Engine(Protocol):
    name: str

    def run(self, ctx: JobContext) -> None: ...


@dataclass
class JobContext:
    """What an engine sees: the spec, the model, the data, and where to put results."""

    spec: pb.JobSpec
    source: models.ModelSource
    workdir: Path
    dataset_path: str = ""
    dataset_format: str = ""
    dataset_limits: DatasetLimits | None = None
    sweep_parallelism: int = 2  # processes a sweep uses (the manager has clamped the spec's ask)
    evaluations: Evaluations | None = None  # where a sweep's points run; None: a LocalPool of sweep_parallelism
    latency_runs: int = 5  # forward passes timed per latency figure
    on_progress: Callable[[float, str], None] = lambda _f, _s: None
    report: dict[str, Any] = field(default_factory=dict)
    artifacts: list[tuple[str, str]] = field(default_factory=list)  # (name, media type)
    _dataset: Dataset | None = None

    def progress(self, fraction: float, stage: str) -> None:
        self.on_progress(max(0.0, min(1.0, fraction)), stage)

    def load_model(self) -> tuple[nn.Module, Any]:
        """The model (eval mode) and its example input, run once: an input shape the model cannot take
        fails here naming ``spec.model.input_shape`` (it failed later as a bare "RuntimeError: Given
        groups=1, weight of size ..." from the engine's first pass)."""
        model, example = models.load(self.source)
        try:
            with torch.inference_mode():
                evaluate.run(model, example)
        except (RuntimeError, ValueError, TypeError, IndexError) as exc:
            x = example["input_ids"] if isinstance(example, dict) else example
            shape = ",".join(map(str, x.shape))
            raise ValueError(
                f"spec.model.input_shape: the model cannot run on an input of shape {shape} "
                f"({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''})"
            ) from exc
        return model, example

    def dataset(self) -> Dataset | None:
        if self._dataset is None and self.dataset_path:
            self._dataset = load_dataset(Path(self.dataset_path), self.dataset_format, self.dataset_limits)
        return self._dataset

    def write_artifact(self, name: str, write: Callable[[Path], None] | bytes | str, media_type: str) -> Path:
        """Write ``name`` in the work directory (fsynced); the manager publishes it on success."""
        path = self.workdir / name
        if isinstance(write, str):
            write = write.encode()
        if isinstance(write, bytes):
            path.write_bytes(write)
        else:
            write(path)
        with open(path, "rb+") as f:
            os.fsync(f.fileno())
        self.artifacts.append((name, media_type))
        return path

    def measure(self, model: nn.Module, example: Any) -> dict[str, Any] | None:
        if self.spec.skip_evaluation:
            return None
        return evaluate.measure(model, example, self.dataset(), runs=self.latency_runs)


def _shape_of(output: Any) -> tuple[int, ...]:
    return tuple((output if isinstance(output, torch.Tensor) else output[0]).shape)


def _check_output(before: Any, after: Any) -> None:
    """Pruning must not change what the model returns, only how it computes it."""
    if _shape_of(before) != _shape_of(after):
        raise RuntimeError(f"pruned model output shape {_shape_of(after)} differs from {_shape_of(before)}")


class PruneCnn:
    """Structured channel pruning; artifacts model.ts, model.pt2, plan.json, report.json."""

    name = "prune_cnn"

    def run(self, ctx: JobContext) -> None:
        opts = ctx.spec.prune
        ctx.progress(0.02, "loading the model")
        model, example = ctx.load_model()
        if models.kind_of(model) != "cnn" or isinstance(model, torch.jit.ScriptModule):
            raise ValueError(
                "model: structured pruning needs a CNN as an nn.Module (a torchvision name or a "
                "safetensors upload with its architecture), not a TorchScript/.pt2 file"
            )
        config = CnnPruneConfig(
            ratio=opts.ratio,
            global_pruning=opts.global_pruning,
            layer_ratios=dict(opts.layer_ratios),
            ignored_layers=list(opts.ignored_layers),
            prune_classifier=opts.prune_classifier,
            round_to=opts.round_to,
            importance=opts.importance or "l1",
        )
        config.validate(model)
        ctx.progress(0.05, "measuring the original")
        with torch.no_grad():
            ref_out = model(example)
        before = ctx.measure(model, example)
        t0 = time.perf_counter()
        base = {"source": ctx.source.torchvision or ctx.source.upload_meta or {}, "seed": ctx.source.seed}
        plan = prune_cnn(model, example, config, lambda f, s: ctx.progress(0.1 + 0.4 * f, s), base=base)
        prune_s = time.perf_counter() - t0
        with torch.no_grad():
            _check_output(ref_out, model(example))
        ctx.progress(0.55, "exporting TorchScript")
        traced = torch.jit.trace(model, example, check_trace=False)
        ctx.write_artifact("model.ts", lambda p: torch.jit.save(traced, str(p)), "application/x-torchscript")
        ctx.progress(0.65, "exporting .pt2")
        try:
            program = torch.export.export(model, (example,))
            ctx.write_artifact("model.pt2", lambda p: torch.export.save(program, str(p)), "application/x-pt2")
        except Exception as exc:  # some graphs do not export; the TorchScript and the plan still stand
            ctx.report["pt2_error"] = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
        plan_json = plan.to_json()
        ctx.write_artifact("plan.json", plan_json, "application/json")
        ctx.progress(0.8, "measuring the pruned model")
        after = ctx.measure(model, example)
        ctx.report.update(
            engine=self.name,
            config=config.__dict__,
            prune_seconds=round(prune_s, 3),
            plan_bytes=len(plan_json),
            steps=len(plan.steps),
            before=before,
            after=after,
        )
        if not plan.steps:
            ctx.report["warning"] = nothing_pruned(config)


def nothing_pruned(config: CnnPruneConfig) -> str:
    """The report's warning for a prune job whose plan removes no channel, with the likely reason."""
    if config.ratio == 0 and not any(config.layer_ratios.values()):
        why = "the ratio is 0 and no layer ratio is set"
    else:
        why = (
            f"no layer had channels to remove at ratio {config.ratio} (importance {config.importance}, "
            f"global {config.global_pruning}, round_to {config.round_to}, {len(config.ignored_layers)} layers "
            "ignored): raise the ratio, lower round_to or ignore fewer layers"
        )
    return f"nothing was pruned: {why}; the artifacts are the original model"


class PruneTransformer:
    """Attention-head / FFN-neuron plan; artifacts plan.json, report.json."""

    name = "prune_transformer"

    def run(self, ctx: JobContext) -> None:
        opts = ctx.spec.prune
        ctx.progress(0.02, "loading the model")
        model, example = ctx.load_model()
        if models.kind_of(model) != "transformer":
            raise ValueError("model: not a BERT, RoBERTa, DistilBERT or GPT-2 style Transformer")
        importance = opts.importance or "magnitude"
        if importance not in ("magnitude", "gradient"):
            raise ValueError(f"prune.importance: {importance!r} is not magnitude or gradient for Transformers")
        before = ctx.measure(model, example)
        ctx.progress(0.3, f"scoring heads and neurons ({importance})")
        if importance == "gradient":
            heads, neurons = gradient_importance(model, self._calibration(ctx, example))
        else:
            heads, neurons = magnitude_importance(model)
        plan = plan_from_scores(model, heads, neurons, opts.head_ratio, opts.ffn_ratio)
        plan_json = plan.to_json()
        ctx.write_artifact("plan.json", plan_json, "application/json")
        ctx.progress(0.6, "checking the plan against a masked reference")
        pruned = apply_transformer_plan(copy.deepcopy(model), plan)
        reference = masked_reference(model, plan)
        with torch.no_grad():
            diff = (_hidden(pruned(**example)) - _hidden(reference(**example))).abs().max().item()
        after = ctx.measure(pruned, example)
        ctx.report.update(
            engine=self.name,
            importance=importance,
            plan_bytes=len(plan_json),
            heads_pruned={str(k): v for k, v in plan.heads.items() if v},
            neurons_pruned={str(k): len(v) for k, v in plan.neurons.items()},
            reference_max_abs_diff=diff,
            before=before,
            after=after,
        )
        if not any(plan.heads.values()) and not any(plan.neurons.values()):
            ctx.report["warning"] = (
                f"nothing was pruned: head_ratio {opts.head_ratio} and ffn_ratio {opts.ffn_ratio} remove no "
                "attention head and no FFN neuron; the plan is empty"
            )

    @staticmethod
    def _calibration(ctx: JobContext, example: dict) -> list[dict[str, torch.Tensor]]:
        data = ctx.dataset()
        if data is None:
            return [example]
        ids = torch.from_numpy(data.inputs).long()
        labels = torch.from_numpy(data.labels)
        return [{"input_ids": ids[i : i + 8], "labels": labels[i : i + 8]} for i in range(0, min(len(ids), 64), 8)]


def _hidden(out: Any) -> torch.Tensor:
    return out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]


class Quantize:
    """Weight PTQ; artifacts model.qweights.safetensors (packed codes), report.json."""

    name = "quantize"

    def run(self, ctx: JobContext) -> None:
        opts = ctx.spec.quantize
        use_lapq = opts.clip == "lapq"  # an optimiser over all layers, not a per-tensor clipper
        clip = "minmax" if use_lapq else opts.clip or "minmax"
        config = PtqConfig(bits=opts.bits or 8, clip=clip, per_channel=not opts.per_tensor)
        config.validate()
        ctx.progress(0.05, "loading the model")
        model, example = ctx.load_model()
        before = ctx.measure(model, example)
        clips, lapq_report = None, None
        if use_lapq:
            if not isinstance(example, torch.Tensor):
                raise ValueError("quantize.clip: lapq needs a model with a single tensor input")
            ctx.progress(0.2, f"LAPQ: optimising per-layer clipping at {config.bits} bits")
            calib = calibration_batch(tuple(example.shape), 8)
            clips, result = lapq_weight_clips(model, calib, config.bits, max_evals=120, max_seconds=60)
            lapq_report = {
                "loss": result.loss,
                "init_loss": result.init_loss,
                "p": result.p,
                "evals": result.evals,
                "stopped": result.stopped,
            }
        ctx.progress(0.4, f"quantizing weights to {config.bits} bits ({opts.clip or clip})")
        packed = quantize_weights(model, config, clips)
        from safetensors.torch import save_file

        path = ctx.write_artifact(
            "model.qweights.safetensors", lambda p: save_file(packed, str(p)), "application/x-safetensors"
        )
        after = ctx.measure(model, example)
        if after is not None:
            after["size_bytes"] = path.stat().st_size
        int8 = self._int8(ctx, model, example) if config.bits == 8 else None
        ctx.report.update(
            engine=self.name,
            bits=config.bits,
            clip=opts.clip or config.clip,
            lapq=lapq_report,
            per_channel=config.per_channel,
            artifact_bytes=path.stat().st_size,
            before=before,
            after=after,
            int8_execution=int8 or "only for 8-bit jobs (lower widths ship packed codes)",
        )

    @staticmethod
    def _int8(ctx: JobContext, model: nn.Module, example: Any) -> dict[str, Any] | str:
        """An int8 artifact that runs on int8 kernels, when a backend is registered and the model allows."""
        convert = int8_backend()
        if convert is None or not isinstance(example, torch.Tensor):
            return "no int8 backend for this model"
        ctx.progress(0.7, "building the int8 model")
        try:
            runnable = convert(model, example)
        except (ValueError, RuntimeError, TypeError) as exc:  # e.g. a model fx cannot trace
            return f"int8 conversion failed: {exc}"
        artifact = ctx.write_artifact("model.int8.pt", lambda p: runnable.save(p), "application/x-cleave-int8-head")
        measured = ctx.measure(runnable, example)
        return {"artifact": "model.int8.pt", "size_bytes": artifact.stat().st_size, "measured": measured}


class Sweep:
    """Grid of pruning ratios x weight bit-widths evaluated in parallel (local processes, or Ray
    tasks: :mod:`.executor`); Pareto report (JSON, PNG)."""

    name = "sweep"

    def run(self, ctx: JobContext) -> None:
        ratios = list(ctx.spec.sweep.ratios) or [0.0, 0.3, 0.5]
        bits = list(ctx.spec.sweep.bits) or [32, 8]
        for b in bits:
            if b not in (2, 3, 4, 5, 6, 8, 32):
                raise ValueError(f"sweep.bits: {b} is not one of 2,3,4,5,6,8,32")
        for r in ratios:
            if not 0.0 <= r < 1.0:
                raise ValueError(f"sweep.ratios: {r} is not in [0, 1)")
        src = ctx.source
        if any(r > 0 for r in ratios) and (src.transformer or src.upload_format in ("TORCHSCRIPT", "EXPORTED_PROGRAM")):
            raise ValueError(
                "sweep.ratios: pruning ratios need a CNN given as a torchvision name or safetensors upload"
            )
        workers = max(1, ctx.sweep_parallelism)
        grid = [(round(r, 4), b) for r in ratios for b in bits]
        args = (ctx.spec.SerializeToString(), ctx.source, ctx.dataset_path, ctx.dataset_format)
        points = []
        executor = ctx.evaluations or LocalPool(workers)
        results = executor.map(sweep_point, [(*args, r, b) for r, b in grid])
        try:
            for i, point in enumerate(results):
                points.append(point)
                ctx.progress(0.05 + 0.85 * (i + 1) / len(grid), f"{i + 1}/{len(grid)} configurations")
        finally:
            results.close()  # an error or a cancel stops the points not yet done
        metric = sweep_metric(points)
        front = pareto(points)
        for p in points:
            p["pareto"] = p in front
        result = {"grid": {"ratios": ratios, "bits": bits}, "metric": metric, "points": points}
        ctx.write_artifact("sweep.json", json.dumps(result, indent=1), "application/json")
        png = plot_pareto(points)
        if png is not None:
            ctx.write_artifact("sweep.png", png, "image/png")
        ctx.report.update(
            engine=self.name,
            points=len(points),
            parallelism=workers,
            executor=executor.name,
            metric=metric,
            pareto=[summary(p) for p in front],
        )
        if metric == "accuracy":
            ctx.report["pareto_latency"] = [summary(p) for p in pareto(points, cost="latency_ms")]
        elif ctx.dataset_path:
            ctx.report["warning"] = (
                "the dataset gave no accuracy (the model's output is not (N, classes) logits): "
                "the Pareto front trades size against latency"
            )


def sweep_point(
    spec_bytes: bytes, source: models.ModelSource, dataset_path: str, dataset_format: str, ratio: float, bits: int
) -> dict[str, Any]:
    """One grid point, in a pool process: prune, quantize, measure."""
    torch.set_num_threads(1)
    spec = pb.JobSpec.FromString(spec_bytes)
    model, example = models.load(source)
    data = load_dataset(Path(dataset_path), dataset_format) if dataset_path else None
    if ratio > 0:
        opts = spec.prune
        prune_cnn(
            model,
            example,
            CnnPruneConfig(
                ratio=ratio,
                importance=opts.importance or "l1",
                global_pruning=opts.global_pruning,
                round_to=opts.round_to,
            ),
        )
    size = evaluate.state_bytes(model)
    if bits < 32:
        packed = quantize_weights(model, PtqConfig(bits=bits, clip=spec.quantize.clip or "minmax"))
        from safetensors.torch import save

        size = len(save(packed))
    m = evaluate.measure(model, example, data, runs=3)
    m.update(ratio=ratio, bits=bits, size_bytes=size)
    return m


def sweep_metric(points: list[dict[str, Any]]) -> str:
    """What a sweep's points are judged on besides their cost: ``"accuracy"`` when every point has
    one (a labelled dataset and a classifier), else ``"latency_ms"``. One metric for all points:
    comparing one point's accuracy with another's latency would mean nothing."""
    return "accuracy" if points and all(p.get("accuracy") is not None for p in points) else "latency_ms"


def summary(point: dict[str, Any]) -> dict[str, Any]:
    """A sweep point as the report lists it."""
    return {k: point.get(k) for k in ("ratio", "bits", "size_bytes", "latency_ms", "accuracy")}


def pareto(points: list[dict[str, Any]], cost: str = "size_bytes") -> list[dict[str, Any]]:
    """Points no other point beats on both ``cost`` (lower: ``size_bytes`` or ``latency_ms``) and
    accuracy (higher); on size and latency when not every point has an accuracy."""
    metric = sweep_metric(points)

    def key(p: dict[str, Any]) -> tuple[float, float]:
        return p[cost], -p["accuracy"] if metric == "accuracy" else p["latency_ms"]

    front = []
    for p in points:
        a = key(p)
        if not any(key(q)[0] <= a[0] and key(q)[1] <= a[1] and key(q) != a for q in points):
            front.append(p)
    return front


def plot_pareto(points: list[dict[str, Any]]) -> bytes | None:
    """A PNG of size vs accuracy (or latency), Pareto points highlighted; None without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    import io

    metric = sweep_metric(points)
    fig, ax = plt.subplots(figsize=(6, 4))
    for p in points:
        ax.scatter(p["size_bytes"] / 1e6, p[metric], c="C3" if p.get("pareto") else "C0")
        ax.annotate(f"r{p['ratio']}/b{p['bits']}", (p["size_bytes"] / 1e6, p[metric]), fontsize=7)
    ax.set_xlabel("size (MB)")
    ax.set_ylabel(metric)
    ax.set_title("sweep: red = Pareto front")
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100, bbox_inches="tight")
    plt.close(fig)
    return buf.getvalue()


def die_with_parent() -> None:
    """Linux: have the kernel kill this process when its parent dies (a kill -9 of the daemon)."""
    try:
        import ctypes
        import signal

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def user_engines() -> dict[str, Any]:
    """Entry points of installed packages in the ``cleave.engines`` group, by name."""
    return {ep.name: ep for ep in entry_points(group=ENTRY_POINT_GROUP) if ep.name not in BUILTIN}


def engine_names() -> list[str]:
    return [*BUILTIN, *sorted(user_engines())]


def get_engine(name: str) -> Engine:
    builtin = {"prune_cnn": PruneCnn, "prune_transformer": PruneTransformer, "quantize": Quantize, "sweep": Sweep}
    if name in builtin:
        return builtin[name]()
    if name == "bottleneck":  # imported on use: it pulls the entropy coder (the `bottleneck` extra)
        from .bottleneck_engine import BottleneckEngine

        return BottleneckEngine()
    eps = user_engines()
    if name not in eps:
        raise ValueError(f"engine: {name!r} is not one of {', '.join(engine_names())}")
    obj = eps[name].load()
    return obj() if isinstance(obj, type) else obj


def dispatch(requested: str, model_kind: str) -> str:
    """The engine a job runs: ``prune`` picks by model kind; any other name must exist.

    Raises:
        ValueError: naming the ``engine`` field.
    """
    name = requested or "prune"
    if name == "prune":
        if model_kind == "transformer":
            return "prune_transformer"
        if model_kind == "cnn":
            return "prune_cnn"
        raise ValueError(f"engine: 'prune' needs a CNN or a supported Transformer, the model is {model_kind!r}")
    if name not in engine_names():
        raise ValueError(f"engine: {name!r} is not one of prune, {', '.join(engine_names())}")
    return name
