"""Codec throughput on one core: Cleave's encodings side by side with a naive numpy codec.

The input is a 1x256x56x56 post-ReLU float32 activation: the output of resnet50's ``layer1`` for a
real photo (scikit-image's sample images), with batch-norm statistics calibrated on the other sample
photos (no downloaded weights are needed; random convolutions with calibrated BN give the sparsity
and tails of real post-ReLU features). Without torchvision or scikit-image it falls back to a
seeded ``relu(N(0, 1))`` tensor and says so in the JSON.

Each path encodes and decodes the same tensor; the paths run interleaved, one repeat each in a
shuffled (seeded) order, so machine load and cache state hit all of them alike; the median of
``--repeats`` (process CPU time by default, so that waiting for a busy core does not count;
``--clock wall`` for wall time) is reported as GB/s of fp32 input bytes. Cleave's paths take and
return torch tensors, as the torch daemons call the codec, and (``... numpy``) numpy arrays, as the
torch-free edge does; ``..., LZ matches`` is the default with zstd frames of codes that keep their LZ
matches (what ``compressor.zstd.compress_codes`` chooses for codes that repeat), side by side with
the literals-only frames it chooses for this activation. The naive baselines are the ones of
issue 15: min-max, rint, nibble packing with strided slices, zstd level 1 (and the same at 8 bits).
A second table measures zstd levels (-5 to 3), Cleave's level-1 frames for codes (its default, and
the same with LZ matches) and 2 worker threads on the packed 4-bit and 8-bit codes and the fp16
bytes of the same activation: compressed size and compress / decompress speed, which is how the
default was chosen.

The process takes the daemons' malloc settings (:func:`runtime.memory.keep_freed_memory`, as
:mod:`benchmarks.grpc_floor` does): with glibc's defaults, which path pays the page faults of
re-growing a trimmed heap depends on the order the paths run in, and in one run the same decode
took 1.7 ms or 3.7 ms (1,043 faults per call) by its place in the rotation. ``--malloc default``
measures with glibc's defaults instead.

    python -m benchmarks.codec [--repeats 40 --cpu 0 --out benchmarks/results/codec.json]
    python -m benchmarks.codec --before old.json --label "what was measured"  # keeps old.json's paths as 'before'
"""

from __future__ import annotations

import os

for _var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
    os.environ[_var] = "1"

import argparse  # noqa: E402
import json  # noqa: E402
import platform  # noqa: E402
import random  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402
from collections.abc import Callable  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import zstandard  # noqa: E402

from compressor import EncodingSpec, decode, decode_array, encode  # noqa: E402
from compressor import zstd as cleave_zstd  # noqa: E402
from runtime import memory  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent

RESULTS = ROOT / "benchmarks" / "results"
SHAPE = (1, 256, 56, 56)
CLEAVE_SPECS = ("int4", "int4+none", "int4c", "int8", "int8+none", "fp16")
NUMPY_SPECS = ("int4", "int8")  # also from and to numpy arrays, as the torch-free edge calls the codec
MATCHES_SPECS = ("int4", "int8")  # also with the frames of codes that keep LZ matches (compressor/zstd.py)
# Issue 15's goals, GB/s of fp32 input per core: (encode, decode).
GOALS = {"int4": (1.5, 3.0), "int8": (0.8, 2.5)}
LEVELS = (-5, -3, -1, 1, 3)


def activation() -> tuple[np.ndarray, str]:
    """(1, 256, 56, 56) post-ReLU float32 features of a real photo, and where they came from."""
    try:
        import torch
        import torchvision
        from skimage import data
        from skimage.transform import resize
    except ImportError:
        x = np.maximum(np.random.default_rng(0).standard_normal(SHAPE), 0).astype(np.float32)
        return x, "synthetic relu(N(0,1)) (torchvision or scikit-image missing)"
    torch.manual_seed(0)
    model = torchvision.models.resnet50(weights=None)
    mean, std = np.array([0.485, 0.456, 0.406]), np.array([0.229, 0.224, 0.225])

    def batch(names: list[str]) -> torch.Tensor:
        imgs = []
        for name in names:
            img = getattr(data, name)()
            img = img[..., :3] if img.ndim == 3 else np.stack([img] * 3, -1)
            img = resize(img, (224, 224), anti_aliasing=True)  # float in [0, 1]
            imgs.append(((img - mean) / std).transpose(2, 0, 1))
        return torch.from_numpy(np.stack(imgs).astype(np.float32))

    # Calibrate batch-norm statistics on photos (cumulative average), then run the held-out one.
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.reset_running_stats()
            m.momentum = None
    model.train()
    with torch.no_grad():
        model(batch(["coffee", "chelsea", "rocket", "cat", "immunohistochemistry", "hubble_deep_field"]))
        model.eval()
        x = batch(["astronaut"])
        stem = model.maxpool(model.relu(model.bn1(model.conv1(x))))
        feats = model.layer1(stem)
    arr = np.ascontiguousarray(feats.numpy(), dtype=np.float32)
    assert arr.shape == SHAPE, arr.shape
    return arr, "resnet50 layer1 output (post-ReLU) for skimage astronaut, BN calibrated on 6 other sample photos"


def naive_paths(x: np.ndarray) -> dict[str, tuple[Callable[[], object], Callable[[object], np.ndarray]]]:
    """Issue 15's naive numpy codecs: (encode, decode) closures over ``x``."""
    cctx, dctx = zstandard.ZstdCompressor(level=1), zstandard.ZstdDecompressor()
    n = x.size

    def enc4() -> tuple[bytes, float, float]:
        lo, hi = float(x.min()), float(x.max())
        s = (hi - lo) / 15 or 1.0
        q = np.rint((x - lo) / s).astype(np.uint8).reshape(-1)
        return cctx.compress(q[0::2] | (q[1::2] << 4)), lo, s

    def dec4(enc: tuple[bytes, float, float]) -> np.ndarray:
        payload, lo, s = enc
        p = np.frombuffer(dctx.decompress(payload), np.uint8)
        q = np.empty(n, np.uint8)
        q[0::2], q[1::2] = p & 15, p >> 4
        return (q.astype(np.float32) * np.float32(s) + np.float32(lo)).reshape(x.shape)

    def enc8() -> tuple[bytes, float, float]:
        lo, hi = float(x.min()), float(x.max())
        s = (hi - lo) / 255 or 1.0
        return cctx.compress(np.rint((x - lo) / s).astype(np.uint8)), lo, s

    def dec8(enc: tuple[bytes, float, float]) -> np.ndarray:
        payload, lo, s = enc
        q = np.frombuffer(dctx.decompress(payload), np.uint8)
        return (q.astype(np.float32) * np.float32(s) + np.float32(lo)).reshape(x.shape)

    return {"naive int4+zstd1": (enc4, dec4), "naive int8+zstd1": (enc8, dec8)}


def as_input(x: np.ndarray) -> object:
    """What the daemons hand the codec: a torch tensor (sharing ``x``'s memory) where torch is."""
    try:
        import torch
    except ImportError:
        return x
    torch.set_num_threads(1)
    return torch.from_numpy(x)


def cleave_paths(x: np.ndarray) -> dict[str, tuple[Callable[[], object], Callable[[object], object]]]:
    """Cleave's public encode / decode on the tensor the daemons would pass (torch when present)."""
    t = as_input(x)
    paths = {}
    for text in CLEAVE_SPECS:
        spec = EncodingSpec.parse(text)
        paths[f"cleave {text}"] = ((lambda spec=spec: encode(t, spec)), decode)
    for text in NUMPY_SPECS:
        spec = EncodingSpec.parse(text)
        paths[f"cleave {text} numpy"] = ((lambda spec=spec: encode(x, spec)), decode_array)
    for text in MATCHES_SPECS:
        spec = EncodingSpec.parse(text)
        paths[f"cleave {text}, LZ matches"] = ((lambda spec=spec: with_matches(lambda: encode(t, spec))), decode)
    return paths


def with_matches(fn: Callable[[], object]) -> object:
    """``fn()`` with every zstd frame of codes made with LZ matches (``compressor.zstd.CODES_PARAMS``),
    as Cleave made them before literals-only frames and does without zstandard's CFFI backend."""
    lib, cleave_zstd._lib = cleave_zstd._lib, None
    try:
        return fn()
    finally:
        cleave_zstd._lib = lib


#: What a repeat's time is: the process's CPU time (default: on a shared machine, time spent waiting
#: for the core is not the codec's; zstd's worker threads count) or wall-clock time (``--clock wall``).
CLOCKS = {"cpu": time.process_time, "wall": time.perf_counter}
_clock = CLOCKS["cpu"]


def _time(fn: Callable[[], object]) -> tuple[float, object]:
    start = _clock()
    out = fn()
    return _clock() - start, out


def run_paths(paths: dict, repeats: int, nbytes: int) -> dict[str, dict]:
    enc_t: dict[str, list[float]] = {k: [] for k in paths}
    dec_t: dict[str, list[float]] = {k: [] for k in paths}
    sizes: dict[str, int] = {}
    for enc, dec in paths.values():  # warm-up: caches, zstd contexts, lazy imports
        dec(enc())
    rng = random.Random(0)
    for _ in range(repeats):
        order = list(paths)
        rng.shuffle(order)  # no path always runs after the same one (a fixed order biased identical paths by ~10%)
        for name in order:
            enc, dec = paths[name]
            te, msg = _time(enc)
            td, _ = _time(lambda dec=dec, msg=msg: dec(msg))
            enc_t[name].append(te)
            dec_t[name].append(td)
            sizes[name] = len(msg.payload) if hasattr(msg, "payload") else len(msg[0])
    out = {}
    for name in paths:
        e, d = statistics.median(enc_t[name]), statistics.median(dec_t[name])
        out[name] = {
            "encode_ms": round(e * 1e3, 3),
            "decode_ms": round(d * 1e3, 3),
            "encode_gbps": round(nbytes / e / 1e9, 3),
            "decode_gbps": round(nbytes / d / 1e9, 3),
            "payload_bytes": sizes[name],
            "ratio_vs_fp32": round(nbytes / sizes[name], 2),
        }
    return out


def stages(x: np.ndarray, repeats: int) -> dict[str, dict[str, float]]:
    """Where the default 4-bit and 8-bit codecs spend their time: each stage of Cleave's encode and
    decode alone, on the same activation (median ms, same clock), interleaved."""
    from compressor import blocked, quant
    from compressor.codec import _value_range, crc32

    flat = x.reshape(-1)
    plans: dict[str, dict[str, Callable[[], object]]] = {}
    for bits in (4, 8):
        msg = encode(x, EncodingSpec.parse(f"int{bits}"))
        lo, hi = _value_range(x)  # as the codec: the max alone for a non-negative tensor (lo 0)
        s, z = quant.affine_params_array(lo, hi, bits)
        codes = cleave_zstd.decompress(msg.payload, msg.raw_size, writable=False)
        out = np.empty(codes.size, np.uint8)  # reused by every repeat, as the codec reuses its thread's buffer
        dequantize = blocked.dequantize4 if bits == 4 else blocked.dequantize8  # as decode: in blocks
        plans[f"int{bits}"] = {
            "encode: value range (the max alone if non-negative)": lambda: _value_range(x),
            "encode: quantize and pack": lambda bits=bits, s=s, z=z, lo=lo, hi=hi, out=out: blocked.quantize_pack(
                flat, bits, s, z, lo, hi, True, out
            ),
            "encode: zstd": lambda codes=codes: cleave_zstd.compress(codes, 1, codes=True),
            "copy the payload out of the message, crc32": lambda msg=msg: crc32(msg.payload),
            "decode: zstd": lambda msg=msg: cleave_zstd.decompress(msg.payload, msg.raw_size, writable=False),
            "decode: unpack and dequantize": lambda codes=codes, s=s, z=z, f=dequantize: f(codes, flat.size, s, z),
        }
    times: dict[str, dict[str, list[float]]] = {k: {name: [] for name in plan} for k, plan in plans.items()}
    rng = random.Random(1)
    for _ in range(repeats):
        for k, plan in plans.items():
            order = list(plan)
            rng.shuffle(order)  # in a fixed order, the stage right after min-max ran ~0.1 ms slower
            for name in order:
                times[k][name].append(_time(plan[name])[0])
    return {k: {name: round(statistics.median(t) * 1e3, 3) for name, t in v.items()} for k, v in times.items()}


class _Codes:
    """Cleave's level-1 frame for codes (``compressor.zstd.compress(..., codes=True)``), as a compressor."""

    def compress(self, data: bytes) -> bytes:
        return cleave_zstd.compress(data, 1, codes=True)


def zstd_levels(x: np.ndarray, repeats: int) -> list[dict]:
    """zstd levels on the bytes Cleave actually compresses: packed 4-bit and 8-bit codes, fp16; for
    codes also Cleave's level-1 frame for codes (its default: literals only where a sample says it
    costs at most ~3% more bytes, ``compressor.zstd.compress_codes``), the same with LZ matches
    (``compressor.zstd.CODES_PARAMS``) and zstd's own level 1 with 2 worker threads (threads: the
    goals are per core, and a frame this small is one zstd job anyway)."""
    q4 = encode(as_input(x), EncodingSpec.parse("int4+none")).payload
    q8 = encode(as_input(x), EncodingSpec.parse("int8+none")).payload
    f16 = x.astype(np.float16).tobytes()
    rows = []
    dctx = zstandard.ZstdDecompressor()
    for what, raw in (("int4 codes", q4), ("int8 codes", q8), ("fp16", f16)):
        variants = [(level, "", zstandard.ZstdCompressor(level=level, write_content_size=True)) for level in LEVELS]
        if what != "fp16":
            variants.append((1, "codes", _Codes()))  # Cleave's default for codes: here literals only
            variants.append((1, "matches", cleave_zstd._compressor(1, 0, codes=True)))  # with LZ matches
            variants.append((1, "t2", zstandard.ZstdCompressor(level=1, threads=2, write_content_size=True)))
        comp: list[list[float]] = [[] for _ in variants]
        dec: list[list[float]] = [[] for _ in variants]
        frames: list[bytes] = [b""] * len(variants)
        for _ in range(repeats):  # interleaved, as the paths are
            for k, (_, _, cctx) in enumerate(variants):
                te, frames[k] = _time(lambda cctx=cctx, raw=raw: cctx.compress(raw))
                td, _ = _time(lambda frame=frames[k]: dctx.decompress(frame))
                comp[k].append(te)
                dec[k].append(td)
        for k, (level, variant, _) in enumerate(variants):
            rows.append(
                {
                    "input": what,
                    "level": level,
                    "variant": variant,
                    "raw_bytes": len(raw),
                    "compressed_bytes": len(frames[k]),
                    "ratio": round(len(raw) / len(frames[k]), 3),
                    "compress_gbps": round(len(raw) / statistics.median(comp[k]) / 1e9, 3),
                    "decompress_gbps": round(len(raw) / statistics.median(dec[k]) / 1e9, 3),
                }
            )
    return rows


def zstd_frames(x: np.ndarray) -> dict[str, dict]:
    """What the default 4-bit and 8-bit frames are made of: the bytes that zstd's Huffman stage decodes
    (literals) against those LZ matches copy. Decompressing them is mostly decoding Huffman literals, so
    the LZ stage's parameters (window, match table, minimum match, strategy) barely move decode speed."""
    out = {}
    for text in ("int4", "int8"):
        msg = encode(x, EncodingSpec.parse(text))
        blocks = cleave_zstd.frame_blocks(msg.payload)
        huffman = sum(b.get("literal_bytes", 0) for b in blocks if b.get("literals") == "huffman")
        out[text] = {
            "raw_bytes": msg.raw_size,
            "frame_bytes": len(msg.payload),
            "blocks": len(blocks),
            "huffman_literal_bytes": huffman,
            "huffman_literal_fraction": round(huffman / msg.raw_size, 3),
            "literal_section_bytes": sum(b.get("literals_section", 0) for b in blocks),
            "sequences": sum(b.get("sequences", 0) for b in blocks),
        }
    return out


def plot(result: dict, path: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    paths = result["paths"]
    names = list(paths)
    fig, axes = plt.subplots(1, 2, figsize=(13, 4.5))
    ypos = np.arange(len(names))
    axes[0].barh(ypos - 0.2, [paths[n]["encode_gbps"] for n in names], 0.4, label="encode")
    axes[0].barh(ypos + 0.2, [paths[n]["decode_gbps"] for n in names], 0.4, label="decode")
    axes[0].set_yticks(ypos, names)
    axes[0].invert_yaxis()
    for goal, style in ((1.5, ":"), (3.0, "--")):
        axes[0].axvline(goal, color="gray", linestyle=style, linewidth=1)
    clock = result.get("clock", "wall-clock time")
    axes[0].set(xlabel=f"GB/s of fp32 input, one core (median, {clock})", title="Codec, 1x256x56x56 post-ReLU")
    axes[0].legend(loc="lower right")
    for what in dict.fromkeys(r["input"] for r in result["zstd_levels"]):
        mine = [r for r in result["zstd_levels"] if r["input"] == what]
        levels = [r for r in mine if not r.get("variant")]  # zstd's own levels as a line, the variants as points
        (line,) = axes[1].plot([r["compress_gbps"] for r in levels], [r["ratio"] for r in levels], "o-", label=what)
        others = [r for r in mine if r.get("variant")]
        axes[1].plot([r["compress_gbps"] for r in others], [r["ratio"] for r in others], "s", color=line.get_color())
        for r in mine:
            label = f"L{r['level']}" + (f" {r['variant']}" if r.get("variant") else "")
            axes[1].annotate(label, (r["compress_gbps"], r["ratio"]), fontsize=8)
    axes[1].set(xlabel="zstd compress GB/s (of its input)", ylabel="compression ratio", title="zstd levels")
    axes[1].set_xscale("log")
    axes[1].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=40)
    ap.add_argument("--cpu", type=int, default=None, help="core to pin to (default: the first allowed)")
    ap.add_argument("--out", type=Path, default=RESULTS / "codec.json")
    ap.add_argument("--label", default="", help="free text stored in the JSON (e.g. the commit measured)")
    ap.add_argument("--before", type=Path, help="a JSON of this script run on older code: stored under 'before'")
    ap.add_argument("--clock", choices=sorted(CLOCKS), default="cpu", help="process CPU time (default) or wall time")
    ap.add_argument(
        "--malloc",
        choices=("daemon", "default"),
        default="daemon",
        help="glibc's thresholds as the daemons set them (default: runtime.memory.keep_freed_memory) or glibc's own",
    )
    args = ap.parse_args()
    kept = args.malloc == "daemon" and memory.keep_freed_memory()
    global _clock
    _clock = CLOCKS[args.clock]
    cpu = args.cpu if args.cpu is not None else min(os.sched_getaffinity(0))
    os.sched_setaffinity(0, {cpu})

    x, source = activation()
    nbytes = x.nbytes
    paths = {**naive_paths(x), **cleave_paths(x)}
    load_before = os.getloadavg()
    measured = run_paths(paths, args.repeats, nbytes)
    levels = zstd_levels(x, max(args.repeats // 2, 5))
    parts = stages(x, max(args.repeats // 2, 5))
    frames = zstd_frames(x)
    load_after = os.getloadavg()

    naive = {4: measured["naive int4+zstd1"], 8: measured["naive int8+zstd1"]}
    for name, row in measured.items():
        if name.startswith("cleave int"):
            base = naive[4 if "int4" in name else 8]
            row["encode_vs_naive"] = round(row["encode_gbps"] / base["encode_gbps"], 2)
            row["decode_vs_naive"] = round(row["decode_gbps"] / base["decode_gbps"], 2)
    goals = {}
    for text, (enc_goal, dec_goal) in GOALS.items():
        row = measured[f"cleave {text}"]
        goals[text] = {
            "encode_goal_gbps": enc_goal,
            "decode_goal_gbps": dec_goal,
            "encode_met": row["encode_gbps"] >= enc_goal,
            "decode_met": row["decode_gbps"] >= dec_goal,
            "not_slower_than_naive": row["encode_vs_naive"] >= 1.0 and row["decode_vs_naive"] >= 1.0,
        }
    result = {
        "label": args.label,
        "input": {"shape": list(SHAPE), "source": source, "zero_fraction": round(float((x == 0).mean()), 3)},
        "machine": {
            "cpu": platform.processor() or platform.machine(),
            "pinned_core": cpu,
            "load_avg_before": [round(v, 2) for v in load_before],
            "load_avg_after": [round(v, 2) for v in load_after],
            "python": platform.python_version(),
            "numpy": np.__version__,
            "zstandard": zstandard.__version__,
        },
        "repeats": args.repeats,
        "clock": {"cpu": "process CPU time", "wall": "wall-clock time"}[args.clock],
        "malloc": "the daemons' thresholds (keep_freed_memory)" if kept else "glibc's defaults",
        "default_spec": {"int4": str(EncodingSpec.parse("int4").to_proto()).replace("\n", " ")},
        "paths": measured,
        "goals": goals,
        "zstd_levels": levels,
        "stages_ms": parts,
        "zstd_frames": frames,
    }
    if args.before:
        before = json.loads(args.before.read_text())
        result["before"] = {"label": before.get("label", ""), "paths": before["paths"]}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    plot(result, args.out.with_suffix(".png"))
    old = result.get("before", {}).get("paths", {})
    print(f"{'path':<22}{'enc GB/s':>10}{'dec GB/s':>10}{'bytes':>10}{'enc/naive':>11}{'dec/naive':>11}", end="")
    print(f"{'before: enc/naive':>19}{'dec/naive':>11}" if old else "")
    for name, row in measured.items():
        print(
            f"{name:<22}{row['encode_gbps']:>10.3f}{row['decode_gbps']:>10.3f}{row['payload_bytes']:>10}"
            f"{row.get('encode_vs_naive', ''):>11}{row.get('decode_vs_naive', ''):>11}",
            end="",
        )
        was = old.get(name, {})
        print(f"{was.get('encode_vs_naive', ''):>19}{was.get('decode_vs_naive', ''):>11}" if old else "")
    for r in levels:
        print(
            f"zstd {r['input']:<11} level {r['level']:>3} {r['variant']:<5}: ratio {r['ratio']:.3f}  "
            f"compress {r['compress_gbps']:.2f} GB/s  decompress {r['decompress_gbps']:.2f} GB/s"
        )
    for k, v in parts.items():
        print(f"{k} stages, ms: " + ", ".join(f"{name} {ms:.3f}" for name, ms in v.items()))
    for k, f in frames.items():
        print(
            f"{k} frame: {f['frame_bytes']} bytes in {f['blocks']} blocks for {f['raw_bytes']}; "
            f"Huffman-coded literals {f['huffman_literal_bytes']} bytes ({f['huffman_literal_fraction']:.0%} of "
            f"the output, in {f['literal_section_bytes']} of the frame's bytes), {f['sequences']} matches"
        )
    print(f"load average {load_before} -> {load_after}; wrote {args.out}")


if __name__ == "__main__":
    main()
