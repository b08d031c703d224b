"""Quantization quality and speed: clipping methods, feature and weight bit-widths, the int8 head.

1. **Accuracy** of the harness model (tests.support.harness: synthetic 10-class images, small ResNet
   trained in-process) split at several cuts: float vs features at 8/6/4/3/2 bits with clipping by
   min-max / percentile / ACIQ / LAPQ, per tensor and per channel (LAPQ: per tensor), with the head
   in fp32, int8 (ONNX Runtime QOperator) and 4-bit packed weights. Features are quantized per
   request of ``--request`` images, as the edge would send them.
2. **Feature MSE** (relative: ||Q(f) - f||^2 / ||f||^2) at cuts of random-weight resnet50 and
   mobilenet_v2 with BatchNorm calibrated on synthetic images.
3. **Latency** at batch 1 of a residual-CNN head: torch fp32, ONNX Runtime fp32 / int8 (the chosen
   path), torch.ao FX int8 (x86), torchao PT2E + X86InductorQuantizer + inductor; measured side by
   side, interleaved, in one run. Plus artifact sizes on disk (fp32, int8, 4-bit packed).
4. **Bit allocation** (partitioner.bitalloc) at a few budgets, checked on the test set.

    python -m benchmarks.quantization [--sections accuracy,mse,latency,bitalloc]

Writes benchmarks/results/quantization.json and quantization.png.
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import statistics
import sys
import time
import warnings
from pathlib import Path

import torch
import torchvision

from compressor.offline.lapq import quantize_clipped
from partitioner.bitalloc import allocate_bits
from partitioner.calibration import SplitLoss, lapq_split, quantize_features
from partitioner.graph import trace
from partitioner.models import calibrate_batchnorm
from partitioner.quantized_head import build_quantized_head, head_layers
from tests.support.harness import trained_harness

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
BITS = (8, 6, 4, 3, 2)
CLIPS = {"minmax": {}, "percentile": {"percentile": 99.9}, "aciq": {}}
CUTS = ("layer2_relu", "layer2_relu_1", "layer3_relu_1")  # inside a block (2 live tensors), after it, deepest


def _chunks(x: torch.Tensor, size: int) -> list[torch.Tensor]:
    return [x[i : i + size] for i in range(0, len(x), size)]


def _rel_mse(quantized: list[torch.Tensor], features: list[torch.Tensor]) -> float:
    """Squared error of the quantized features relative to the features' own energy."""
    error = sum(float((q - f).pow(2).sum()) for q, f in zip(quantized, features, strict=True))
    return error / sum(float(f.pow(2).sum()) for f in features)


def _quantized(features: list[torch.Tensor], bits: int, clip: str, per_channel: bool, request: int, clips=None):
    """Quantize features per request of ``request`` images; returns full-size tensors."""
    out = [[] for _ in features]
    for i in range(0, len(features[0]), request):
        part = [f[i : i + request] for f in features]
        if clip == "lapq":
            q = [quantize_clipped(f, bits, float(c)) for f, c in zip(part, clips, strict=True)]
        else:
            q = quantize_features(part, bits, clip, per_channel, **CLIPS[clip])
        for o, t in zip(out, q, strict=True):
            o.append(t)
    return [torch.cat(o) for o in out]


def _accuracy(tail, features: list[torch.Tensor], labels: torch.Tensor) -> float:
    with torch.no_grad():
        logits = torch.cat([tail(*[f[i : i + 250] for f in features]) for i in range(0, len(labels), 250)])
    return float((logits.argmax(1) == labels).float().mean())


def accuracy_section(h, args) -> dict:
    graph = trace(h.model, h.test_x[:1])
    calib = h.calibration(256)
    x, y = h.test_x, h.test_y
    float_acc = h.accuracy()
    rows = []
    for cut in CUTS:
        head, tail = graph.split(cut)
        layers = head_layers(head)
        heads = {
            "fp32": head,
            "int8": build_quantized_head(head, calib),
            "w4": build_quantized_head(head, calib, {n: 4 for n in layers}),
        }
        for hname, hq in heads.items():
            with torch.no_grad():
                feats = [torch.cat(t) for t in zip(*[hq(b) for b in _chunks(x, 250)], strict=True)]
            base = _accuracy(tail, feats, y)
            rows.append(
                {"cut": cut, "head": hname, "feature_bits": 32, "clip": "none", "per_channel": False, "acc": base}
            )
            # The full grid for the fp32 head; per tensor for int8; the 4-bit head at a few widths.
            for bits in BITS if hname != "w4" else (8, 4, 3):
                for clip in CLIPS if hname != "w4" else ("minmax", "aciq"):
                    for pc in (False, True) if hname == "fp32" else (False,):
                        q = _quantized(feats, bits, clip, pc, args.request)
                        mse = _rel_mse(q, feats)
                        rows.append(
                            {
                                "cut": cut,
                                "head": hname,
                                "feature_bits": bits,
                                "clip": clip,
                                "per_channel": pc,
                                "acc": _accuracy(tail, q, y),
                                "rel_mse": mse,
                            }
                        )
                if hname == "w4":
                    continue
                loss = SplitLoss(hq, tail, calib, bits)
                r = lapq_split(loss, max_evals=args.lapq_evals, max_seconds=30)
                q = _quantized(feats, bits, "lapq", False, args.request, r.clips)
                mse = _rel_mse(q, feats)
                rows.append(
                    {
                        "cut": cut,
                        "head": hname,
                        "feature_bits": bits,
                        "clip": "lapq",
                        "per_channel": False,
                        "acc": _accuracy(tail, q, y),
                        "rel_mse": mse,
                        "lapq": {"p": r.p, "evals": r.evals, "init_loss": r.init_loss, "loss": r.loss},
                    }
                )
            print(f"  {cut} head={hname}: base {base:.3f}", flush=True)
    return {"float_accuracy": float_acc, "rows": rows}


def mse_section(args) -> list[dict]:
    out = []
    for arch in ("resnet50", "mobilenet_v2"):
        torch.manual_seed(0)
        model = getattr(torchvision.models, arch)(weights=None).eval()
        shape = (4, 3, args.size, args.size)
        calibrate_batchnorm(model, shape)
        x = torch.randn(shape) * 0.5
        g = trace(model, x[:1])
        n = len(g.cuts)
        for cut in [g.cuts[int(n * f)] for f in (0.15, 0.4, 0.7)]:
            head, _ = g.split(cut)
            with torch.no_grad():
                feats = list(head(x))
            for bits in BITS:
                for clip in CLIPS:
                    for pc in (False, True):
                        q = quantize_features(feats, bits, clip, pc, **CLIPS[clip])
                        mse = sum(float((a - b).pow(2).sum()) for a, b in zip(q, feats, strict=True)) / sum(
                            float(f.pow(2).sum()) for f in feats
                        )
                        out.append(
                            {
                                "model": arch,
                                "cut": cut.name,
                                "bits": bits,
                                "clip": clip,
                                "per_channel": pc,
                                "rel_mse": mse,
                            }
                        )
        print(f"  {arch}: done", flush=True)
    return out


def _median_ms(fn, x, repeats: int) -> list[float]:
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn(x)
        times.append((time.perf_counter() - t) * 1e3)
    return times


def latency_section(h, args) -> dict:
    return {f"threads={t}": _latency(h, args, t) for t in (1, args.threads)}


def _latency(h, args, threads: int) -> dict:
    torch.set_num_threads(threads)
    results: dict = {}
    resnet = torchvision.models.resnet18(weights=None).eval()
    calibrate_batchnorm(resnet, (2, 3, 224, 224))
    cases = {
        "resnet18_224_to_layer3": (resnet, torch.randn(1, 3, 224, 224), "layer3_1_relu_1", torch.randn(8, 3, 224, 224)),
        "harness_32_to_layer3": (h.model, h.test_x[:1], "layer3_relu_1", h.calibration(64)),
    }
    for name, (model, x, cut, calib) in cases.items():
        g = trace(model, x)
        head, _ = g.split(cut)
        runners, errors, sizes = {"torch_fp32": head}, {}, {}
        q8 = build_quantized_head(head, calib, threads=threads)
        runners["ort_int8 (chosen)"] = q8
        fp32 = build_quantized_head(head, calib, {n: 32 for n in head_layers(head)}, threads=threads)
        runners["ort_fp32"] = fp32
        w4 = build_quantized_head(head, calib, {n: 4 for n in head_layers(head)}, threads=threads)
        sizes = {
            "fp32_params_bytes": 4 * sum(p.numel() for p in head.parameters()),
            "fp32_onnx_artifact_bytes": fp32.nbytes_on_disk,
            "int8_artifact_bytes": q8.nbytes_on_disk,
            "w4_packed_artifact_bytes": w4.nbytes_on_disk,
        }
        try:
            from torch.ao.quantization import get_default_qconfig_mapping
            from torch.ao.quantization.quantize_fx import convert_fx, prepare_fx

            torch.backends.quantized.engine = "x86"
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                prepared = prepare_fx(copy.deepcopy(head), get_default_qconfig_mapping("x86"), (x,))
                with torch.no_grad():
                    prepared(calib)
                runners["torch_fx_int8"] = convert_fx(prepared)
        except Exception as e:  # noqa: BLE001 - record why an alternative is unavailable
            errors["torch_fx_int8"] = f"{type(e).__name__}: {e}"[:300]
        try:
            import torchao.quantization.pt2e.quantizer.x86_inductor_quantizer as xiq
            from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e

            start = time.perf_counter()
            exported = torch.export.export(copy.deepcopy(head), (x,)).module()
            quantizer = xiq.X86InductorQuantizer().set_global(xiq.get_default_x86_inductor_quantization_config())
            prepared = prepare_pt2e(exported, quantizer)
            prepared(calib)
            compiled = torch.compile(convert_pt2e(prepared))
            with torch.no_grad():
                compiled(x)
            results.setdefault("compile_seconds", {})[f"{name}/pt2e_inductor_int8"] = time.perf_counter() - start
            runners["pt2e_inductor_int8"] = compiled
        except Exception as e:  # noqa: BLE001
            errors["pt2e_inductor_int8"] = f"{type(e).__name__}: {e}"[:300]
        with torch.no_grad():
            for fn in runners.values():
                for _ in range(5):
                    fn(x)
            samples: dict[str, list[float]] = {k: [] for k in runners}
            for _ in range(args.rounds):  # interleaved rounds: contention hits every runner alike
                for k, fn in runners.items():
                    samples[k] += _median_ms(fn, x, args.repeats)
            ref = head(x)[0]
            cos = {
                k: float(torch.nn.functional.cosine_similarity(fn(x)[0].flatten(), ref.flatten(), dim=0))
                for k, fn in runners.items()
            }
        med = {k: statistics.median(v) for k, v in samples.items()}
        results[name] = {
            "median_ms": med,
            "speedup_vs_torch_fp32": {k: med["torch_fp32"] / v for k, v in med.items()},
            "cosine_vs_fp32": cos,
            "errors": errors,
            "sizes": sizes,
        }
        print(f"  {name} threads={threads}: {json.dumps({k: round(v, 3) for k, v in med.items()})}", flush=True)
    return results


def bitalloc_section(h) -> list[dict]:
    graph = trace(h.model, h.test_x[:1])
    calib = h.calibration(128)
    out = []
    for cut, budget, max_d in [
        ("layer3_relu_1", 60_000, 0.01),
        ("layer3_relu_1", 40_000, 0.05),
        ("layer2_relu_1", 20_000, 0.01),
    ]:
        start = time.perf_counter()
        a = allocate_bits(graph, cut, calib, budget, max_d)
        seconds = time.perf_counter() - start
        head, tail = graph.split(cut)
        q = build_quantized_head(head, h.calibration(256), a.weight_bits)
        feats = [torch.cat(t) for t in zip(*[q(b) for b in _chunks(h.test_x, 250)], strict=True)]
        acc = _accuracy(tail, _quantized(feats, a.feature_bits, "aciq", False, 50), h.test_y)
        out.append(
            {
                "cut": cut,
                "memory_budget_bytes": budget,
                "max_distortion": max_d,
                "weight_bits": a.weight_bits,
                "feature_bits": a.feature_bits,
                "head_bytes": a.head_bytes,
                "head_artifact_bytes": q.nbytes_on_disk,
                "distortion": a.distortion,
                "feasible": a.feasible,
                "test_accuracy": acc,
                "seconds": seconds,
            }
        )
    return out


def plot(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(1, 3, figsize=(17, 4.8))
    rows = report["accuracy"]["rows"]
    cut = "layer2_relu_1"
    for head, style in (("fp32", "-"), ("int8", "--")):
        for clip in ("minmax", "percentile", "aciq", "lapq"):
            sel = sorted(
                (
                    r
                    for r in rows
                    if r["cut"] == cut and r["head"] == head and r["clip"] == clip and not r["per_channel"]
                ),
                key=lambda r: r["feature_bits"],
            )
            ax[0].plot(
                [r["feature_bits"] for r in sel],
                [100 * r["acc"] for r in sel],
                style,
                marker="o",
                label=f"{clip}, {head} head",
            )
    ax[0].axhline(100 * report["accuracy"]["float_accuracy"], color="grey", lw=1, label="float")
    ax[0].set_xlabel("feature bits (per tensor)")
    ax[0].set_ylabel("test accuracy %")
    ax[0].set_title(f"harness model, cut {cut}")
    ax[0].legend(fontsize=6)
    for model, style in (("resnet50", "-"), ("mobilenet_v2", "--")):
        for clip in CLIPS:
            by_bits: dict[int, list[float]] = {}
            for r in report["feature_mse"]:
                if r["model"] == model and r["clip"] == clip and not r["per_channel"]:
                    by_bits.setdefault(r["bits"], []).append(r["rel_mse"])
            bits = sorted(by_bits)
            ax[1].plot(bits, [statistics.mean(by_bits[b]) for b in bits], style, marker="o", label=f"{model} {clip}")
    ax[1].set_yscale("log")
    ax[1].set_xlabel("feature bits (per tensor)")
    ax[1].set_ylabel("relative MSE (mean over 3 cuts)")
    ax[1].set_title("random-weight models, BN calibrated")
    ax[1].legend(fontsize=6)
    lat = report["latency"][min(report["latency"])]  # 1 thread: the least disturbed by other jobs
    names = [k for k in lat if isinstance(lat[k], dict) and "median_ms" in lat[k]]
    width = 0.8 / max(len(names), 1)
    runners = sorted({r for n in names for r in lat[n]["median_ms"]})
    for i, n in enumerate(names):
        ax[2].bar(
            [j + i * width for j in range(len(runners))],
            [lat[n]["speedup_vs_torch_fp32"].get(r, 0) for r in runners],
            width,
            label=n,
        )
    ax[2].set_xticks([j + width / 2 for j in range(len(runners))], runners, rotation=20, fontsize=7)
    ax[2].axhline(1.0, color="grey", lw=1)
    ax[2].set_ylabel("speed-up over torch fp32 (batch 1)")
    ax[2].set_title(f"head latency, {min(report['latency'])}")
    ax[2].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--request", type=int, default=50, help="images per request when quantizing features")
    parser.add_argument("--lapq-evals", type=int, default=60)
    parser.add_argument("--size", type=int, default=160, help="input size for resnet50 / mobilenet_v2 MSE")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--sections", default="accuracy,mse,latency,bitalloc")
    parser.add_argument(
        "--test-images", type=int, default=1000, help="held-out images for accuracy (1000: 0.1 point per image)"
    )
    parser.add_argument("--out", default=str(RESULTS / "quantization.json"))
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    h = trained_harness(n_test=args.test_images)
    print(f"harness: test accuracy {h.accuracy():.4f} (trained in {h.train_seconds:.1f}s, 0 = cached)", flush=True)
    report = {
        "host": {
            "platform": platform.platform(),
            "cpus": torch.get_num_threads(),
            "torch": torch.__version__,
            "note": "shared machine (other jobs running): compare ratios measured side by side, not absolute times",
        },
        "harness": {
            "test_accuracy": h.accuracy(),
            "test_images": len(h.test_y),
            "train_seconds": h.train_seconds,
            "cache": str(h.cache_path),
        },
    }
    sections = {
        "accuracy": lambda: accuracy_section(h, args),
        "feature_mse": lambda: mse_section(args),
        "latency": lambda: latency_section(h, args),
        "bitalloc": lambda: bitalloc_section(h),
    }
    wanted = args.sections.split(",")
    for name, run in sections.items():
        if name.split("_")[-1] in wanted or name in wanted:
            print(f"{name} ...", flush=True)
            report[name] = run()
    torch.set_num_threads(args.threads)
    report["seconds"] = time.perf_counter() - started
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=1))
    if all(k in report for k in sections):
        plot(report, out.with_suffix(".png"))
    print(f"wrote {out} and {out.with_suffix('.png')} in {report['seconds']:.0f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
