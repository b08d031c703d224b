"""The latency model: what each candidate placement costs on a given link.

For cut ``k``, feature encoding ``b`` (bits and codec together)::

    T(k, b) = E(k) + enc(k, b) + bytes(k, b) / BW_up + RTT + dec(k, b) + C(k) + bytes(out) / BW_down

``E`` and ``C`` come from :class:`~partitioner.profile.LatencyCurve` (edge and cloud profiles),
``enc`` and ``dec`` from each host's measured codec cost per MB, and ``bytes(k, b)`` from encoding
the real features of a calibration input at every cut (so zstd's ratio on these activations is
measured, not guessed). Edge-only is ``E(N)``; cloud-only is the split at the input (cut 0).

:class:`CostModel` is plain data, so the planner can be tested on synthetic numbers.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import statistics
from collections.abc import Callable, Collection, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import zstandard

from compressor import EncodingSpec, encode

from ._lazy import fx, torch  # imported on first use: a cost model as data needs no torch (the light edge)
from .placement import Placement
from .profile import Profile, cache_dir

if TYPE_CHECKING:
    from .loaded import LoadedModel

#: Feature encodings the planner tries at every cut: fp32, fp16, then affine 8..2 bits, all with zstd;
#: at 5 and 4 bits also one scale per channel (``int5c``, ``int4c``): a channel's range is then its own, not
#: the widest channel's. On the pretrained EfficientNet-Lite0 and the 48 first built-in photos, each coded
#: alone: per-tensor 4 bits breaks the default budget at middle cuts (6 of 8 calibration photos at
#: ``conv2d_11``; a relative output error of 0.19 at ``conv2d_17``) where per channel keeps it at 0.7x
#: int6's bytes (``conv2d_17``: 7.4 against 10.4 KB, error 0.040); and per-tensor 6 bits changes the class
#: of 2 photos at ``conv2d_11`` (1 at ``_blocks_3__bn2``; the reply coded as a lossy plan's is) where
#: ``int5c`` changes none at 0.9x its bytes (19.4 against 21.2 KB; 19.4 against 21.5):
#: ``pytest tests/test_real_models.py -k per_channel``.
FEATURE_ENCODINGS = ("raw", "fp16", "int8", "int6", "int5c", "int4c", "int4", "int3", "int2")
#: Encodings of the raw input for cloud-only: 8-bit codes per channel (the uint8 image) + zstd, and JPEG
#: and WebP at three qualities each (lossy: judged by the accuracy budget like any feature encoding).
INPUT_ENCODINGS = ("int8c", "jpeg75", "jpeg", "jpeg95", "webp75", "webp", "webp95")
#: A learned bottleneck's latent (the cut ``bottleneck_latent`` of a model spec with a ``bottleneck``),
#: range-coded with its tables; a candidate only where the model has one.
ENTROPY = "entropy"
LATENT_CUT = "bottleneck_latent"
#: Neurosurgeon sends features as they are.
UNCOMPRESSED = "raw+none"
#: How the cloud codes a lossy plan's reply (the model's outputs, each request's alone): 8-bit affine codes +
#: zstd, a quarter of float32 (the pretrained EfficientNet-Lite0's 1,000 logits: 977 B against 3,775, no top-1
#: changed on the 50 built-in photos, relative error at most 0.014: ``pytest tests/test_real_models.py -k
#: coded_reply``). The planner measures a lossy candidate's
#: accuracy on the reply so coded; a plan that keeps the model's values exact gets them back as float32.
REPLY_ENCODING = "int8"

# Shorthands for the placements a candidate can have (members of :class:`Placement`, not copies).
EDGE_ONLY = Placement.EDGE_ONLY
CLOUD_ONLY = Placement.CLOUD_ONLY
SPLIT = Placement.SPLIT


def is_lossless(kind: Placement, encoding: str, input_is_8bit: bool) -> bool:
    """Whether a plan sends what the model computes unchanged: edge-only, float32 features, a bottleneck's
    latent (the model's own integers, range-coded exactly with its tables), or the input as 8-bit codes when
    inputs are 8-bit images (``input_is_8bit``)."""
    if kind == EDGE_ONLY or encoding.partition("+")[0] == "raw" or encoding == ENTROPY:  # raw: whatever the codec
        return True
    return input_is_8bit and kind == CLOUD_ONLY and encoding == "int8c"


def reply_encoding(kind: Placement, encoding: str, input_is_8bit: bool) -> str:
    """How the cloud codes the reply of a plan sending ``encoding``: :data:`REPLY_ENCODING` for a lossy plan,
    "" (float32 as computed) for a lossless one (:func:`is_lossless`) and for edge-only (no reply)."""
    return "" if is_lossless(kind, encoding, input_is_8bit) else REPLY_ENCODING


@dataclass(frozen=True)
class Link:
    """A link as the planner sees it.

    ``overhead_ms``: what each request spends on the wire beyond one RTT and its bytes at these rates
    (framing, flow control, the serving threads at both ends), measured from live requests; predicted
    in every request that goes to the cloud, inside ``Breakdown.rtt_ms``.
    """

    up_mbps: float
    down_mbps: float
    rtt_ms: float
    overhead_ms: float = 0.0

    def __post_init__(self) -> None:
        if self.up_mbps <= 0 or self.down_mbps <= 0 or self.rtt_ms < 0 or self.overhead_ms < 0:
            raise ValueError(f"link: bandwidths must be > 0, RTT and overhead >= 0, got {self}")


@dataclass(frozen=True)
class Breakdown:
    edge_ms: float = 0.0
    encode_ms: float = 0.0
    upload_ms: float = 0.0
    rtt_ms: float = 0.0
    decode_ms: float = 0.0
    cloud_ms: float = 0.0
    download_ms: float = 0.0

    @property
    def total_ms(self) -> float:
        link = self.upload_ms + self.rtt_ms + self.download_ms
        return self.edge_ms + self.encode_ms + link + self.decode_ms + self.cloud_ms

    @property
    def bottleneck_ms(self) -> float:
        """The slowest pipeline stage, for the throughput objective (edge, link, cloud)."""
        link = max(self.upload_ms, self.download_ms)
        return max(self.edge_ms + self.encode_ms, link, self.decode_ms + self.cloud_ms)


@dataclass(frozen=True)
class Candidate:
    """One placement: where to cut and how to encode what crosses."""

    kind: Placement  # SPLIT, CLOUD_ONLY or EDGE_ONLY
    cut_index: int  # -1 for edge-only
    cut_name: str
    encoding: str  # "" for edge-only
    bytes_up: int
    bytes_down: int
    edge_ms: float
    encode_ms: float
    decode_ms: float
    cloud_ms: float
    edge_memory: int  # head weights + peak live activations on the edge, bytes

    @property
    def label(self) -> str:
        if self.kind == EDGE_ONLY:
            return "edge-only"
        where = "cloud-only" if self.kind == CLOUD_ONLY else f"{self.cut_name}#{self.cut_index}"
        return f"{where} {self.encoding}"

    def predict(self, link: Link) -> Breakdown:
        if self.kind == EDGE_ONLY:
            return Breakdown(edge_ms=self.edge_ms)
        return Breakdown(
            edge_ms=self.edge_ms,
            encode_ms=self.encode_ms,
            upload_ms=self.bytes_up * 8 / (link.up_mbps * 1e6) * 1e3,
            rtt_ms=link.rtt_ms + link.overhead_ms,
            decode_ms=self.decode_ms,
            cloud_ms=self.cloud_ms,
            download_ms=self.bytes_down * 8 / (link.down_mbps * 1e6) * 1e3,
        )


@dataclass
class CutCost:
    """Link-independent costs of one cut."""

    index: int
    name: str
    edge_ms: float
    cloud_ms: float
    raw_bytes: int  # fp32 bytes of the live set
    edge_memory: int  # head weights + peak live activations
    weight_bytes: int = 0  # the head's float weights, part of edge_memory
    feature_bytes: dict[str, int] = field(default_factory=dict)  # encoding -> bytes on the wire
    encode_ms: dict[str, float] = field(default_factory=dict)
    decode_ms: dict[str, float] = field(default_factory=dict)


@dataclass
class CostModel:
    """Everything the planner needs about one model on one pair of hosts."""

    model: str
    cuts: list[CutCost]  # cut 0 (the input) first, then the split points
    edge_total_ms: float
    edge_model_memory: int
    output_bytes: int  # the model's outputs as float32, per input
    reply_bytes: int = 0  # the outputs coded as a lossy plan's reply (REPLY_ENCODING), per input; 0: not measured

    def candidates(
        self,
        feature_encodings=FEATURE_ENCODINGS,
        input_encodings=INPUT_ENCODINGS,
        include_uncompressed: bool = True,
        input_is_8bit: bool = True,
    ) -> list[Candidate]:
        """Every placement the measured sizes allow. A lossy candidate's reply is :attr:`reply_bytes` when
        measured (see :func:`reply_encoding`; ``input_is_8bit`` as for it), a lossless one's :attr:`output_bytes`."""
        out = [Candidate(EDGE_ONLY, -1, "", "", 0, 0, self.edge_total_ms, 0.0, 0.0, 0.0, self.edge_model_memory)]
        for cut in self.cuts:
            cloud_only = cut.index == 0
            wanted = list(input_encodings if cloud_only else feature_encodings)
            if ENTROPY in cut.feature_bytes:  # a learned bottleneck's latent: measured when the model has one
                wanted.append(ENTROPY)
            if include_uncompressed:
                wanted.append(UNCOMPRESSED)
            for enc in wanted:
                if enc not in cut.feature_bytes:
                    continue
                kind = CLOUD_ONLY if cloud_only else SPLIT
                coded = self.reply_bytes and reply_encoding(kind, enc, input_is_8bit)
                out.append(
                    Candidate(
                        kind,
                        cut.index,
                        cut.name,
                        enc,
                        cut.feature_bytes[enc],
                        self.reply_bytes if coded else self.output_bytes,
                        cut.edge_ms,
                        cut.encode_ms[enc],
                        cut.decode_ms[enc],
                        cut.cloud_ms,
                        cut.edge_memory,
                    )
                )
        return out

    def with_quantized_heads(self, speedups: Mapping[int, float], weight_bits: int = 8) -> CostModel:
        """The same model with the head of every split quantized (Auto-Split's E(k) at ``weight_bits``).

        ``speedups``: float head time / quantized head time, measured at a few cuts; cuts between
        them are interpolated linearly in cut index, cuts outside take the nearest measurement. Head
        weights shrink to ``weight_bits``. Edge-only keeps the float model; cloud-only has no head.
        """
        if not speedups:
            raise ValueError("speedups: at least one measured cut is needed")
        if any(v <= 0 for v in speedups.values()):
            raise ValueError(f"speedups: must be > 0, got {dict(speedups)}")
        known = sorted(speedups.items())
        cuts = []
        for cut in self.cuts:
            if cut.index == 0:
                cuts.append(cut)
                continue
            factor = float(np.interp(cut.index, [k for k, _ in known], [v for _, v in known]))
            saved = cut.weight_bytes - cut.weight_bytes * weight_bits // 32
            cuts.append(
                replace(
                    cut,
                    edge_ms=cut.edge_ms / factor,
                    edge_memory=cut.edge_memory - saved,
                    weight_bytes=cut.weight_bytes - saved,
                )
            )
        return replace(self, cuts=cuts)

    @classmethod
    def measure(
        cls,
        model: LoadedModel,
        edge: Profile,
        cloud: Profile,
        x: torch.Tensor | None = None,
        feature_encodings=FEATURE_ENCODINGS,
        input_encodings=INPUT_ENCODINGS,
        *,
        workers: int = 1,
        cache: bool = False,
        progress: Callable[[int, int], None] | None = None,
        cuts: Mapping[int, Collection[str]] | None = None,
        memo: dict | None = None,
    ) -> CostModel:
        """Build from the two hosts' profiles, encoding ``x``'s real features at every cut.

        ``x`` may hold several inputs along the batch dimension: each is encoded on its own and the
        median size is used, since zstd's ratio (and so the bytes on the wire) varies from input to input.

        ``workers`` > 1 encodes that many cuts at once, each on one thread of torch's kernels (the
        process-wide torch thread count is 1 meanwhile, then restored: for a CLI, not a daemon that
        serves while it plans); the sizes are the same. ``cache``: read and write the sizes in the
        disk cache (:func:`sizes_cache_path`: the model's fingerprint, ``x`` itself and the
        encodings), so a second build for the same model and calibration inputs encodes nothing.
        ``progress(done, total)`` is called as cuts are encoded.

        ``cuts``: measure only these encodings at these cuts (cut index -> encodings), every encoding
        at the input (cut 0) and :data:`UNCOMPRESSED` (the Neurosurgeon baseline's) at every cut; the
        candidates not measured are left out, though each cut's codec times are there for all. A
        planner that knows which candidates it can reach measures those alone, and more later
        (:meth:`partitioner.planner.Planner.measure_on_demand`); the disk cache keeps what each build measured.
        ``memo``: a dict the caller keeps between builds for the same model and ``x``, so a later
        build for more cuts runs the model on ``x`` only once (``x`` the same inputs: an equal
        tensor will do, such as the same slice taken again). ``memo["recorded"]``, when set, is
        asked first for the values of ``x`` (name -> value, None when it has none): a recording
        of the model on a batch that ``x`` begins (:meth:`partitioner.planner.DistortionMeter.values`).
        """
        x = model.graph.example_input if x is None else x
        wanted = {
            cut.index: (input_encodings if cut.index == 0 else feature_encodings)
            + (UNCOMPRESSED,)
            + ((ENTROPY,) if model.entropy_tables is not None and cut.name == LATENT_CUT else ())
            for cut in model.graph.cuts
        }
        every = wanted
        if cuts is not None:
            wanted = {
                k: encs if k == 0 else tuple(e for e in encs if e == UNCOMPRESSED or e in cuts.get(k, ()))
                for k, encs in wanted.items()
            }
        path = sizes_cache_path(model, x, feature_encodings, input_encodings) if cache else None
        sizes = (_read_sizes(path) if path is not None else None) or {"cuts": {}, "output_bytes": 0, "reply_bytes": 0}
        known = sizes["cuts"]
        todo = {k: tuple(e for e in encs if e not in known.get(k, {})) for k, encs in wanted.items()}
        if any(todo.values()):
            new = _measure_sizes(model, x, todo, workers, progress, memo)
            for k, measured in new["cuts"].items():
                known.setdefault(k, {}).update(measured)
            sizes["output_bytes"], sizes["reply_bytes"] = new["output_bytes"], new["reply_bytes"]
            if path is not None:
                _write_sizes(path, sizes)
        elif progress is not None:
            progress(len(wanted), len(wanted))
        edge_curve, cloud_curve = edge.curve(), cloud.curve()
        weights = _cumulative_weight_bytes(model)
        cuts, peak = [], 0
        for cut in model.graph.cuts:
            peak = max(peak, cut.nbytes)
            cost = CutCost(
                index=cut.index,
                name=cut.name,
                edge_ms=edge_curve.head_ms(cut.index) if cut.index else 0.0,
                cloud_ms=cloud_curve.tail_ms(cut.index) if cut.index else cloud_curve.total_ms,
                raw_bytes=cut.nbytes,
                edge_memory=weights.get(cut.index, 0) + peak,
                weight_bytes=weights.get(cut.index, 0),
            )
            mb = cut.nbytes / 1e6
            measured = known.get(cut.index, {})
            for enc in every[cut.index]:
                key = _codec_key(enc)
                if key == "webp" and key not in edge.codecs:
                    key = "jpeg"  # a profile taken before WebP was profiled: the nearest codec it has
                cost.encode_ms[enc] = edge.codecs[key].encode_ms_per_mb * mb if key in edge.codecs else 0.0
                cost.decode_ms[enc] = cloud.codecs[key].decode_ms_per_mb * mb if key in cloud.codecs else 0.0
                # Not measured (``cuts``), or e.g. JPEG of a non-image. A size the disk cache holds but ``cuts``
                # does not ask for is left out too: a walk then sees what it asked for, whatever an earlier
                # walk measured, so a warm run walks (and screens, from the cache) as the cold one did.
                if measured.get(enc) is not None and enc in wanted[cut.index]:
                    cost.feature_bytes[enc] = measured[enc]
            cuts.append(cost)
        all_weights = sum(p.numel() * p.element_size() for p in model.module.state_dict().values())
        return cls(model.name, cuts, edge.total_ms, all_weights + peak, sizes["output_bytes"], sizes["reply_bytes"])


#: Bumped when what the size cache holds, or how sizes are measured, changes (2: some cuts only, and
#: null for an encoding that does not apply; 3: the coded reply's bytes).
_SIZES_VERSION = 3


def sizes_cache_path(model: LoadedModel, x: torch.Tensor, feature_encodings, input_encodings) -> Path:
    """Where :meth:`CostModel.measure` caches the encoded sizes of ``x``'s features for ``model``.

    Keyed by everything the sizes depend on: the model's fingerprint, the calibration inputs
    (their shape, dtype and every value), the encodings, and the torch and zstd versions.
    """
    key = calibration_key(model, x, str(_SIZES_VERSION), ",".join(feature_encodings), ",".join(input_encodings))
    return cache_dir().parent / "sizes" / f"{key}.json"


def calibration_key(model: LoadedModel, x: torch.Tensor, *extra: str) -> str:
    """A digest of ``model`` (its fingerprint), the inputs ``x`` (every value), the torch and zstd
    versions and ``extra``: the key of what is measured on ``x``, for the disk caches."""
    data = x.detach().cpu().contiguous()
    digest = hashlib.sha256()
    for part in (model.fingerprint, str(tuple(data.shape)), str(data.dtype), torch.__version__, zstandard.__version__):
        digest.update(part.encode() + b"|")
    for part in extra:
        digest.update(part.encode() + b"|")
    digest.update(data.numpy().tobytes())
    return digest.hexdigest()[:32]


def _read_sizes(path: Path) -> dict | None:
    try:
        data = json.loads(path.read_text())
        return {
            "cuts": {int(k): v for k, v in data["cuts"].items()},
            "output_bytes": int(data["output_bytes"]),
            "reply_bytes": int(data["reply_bytes"]),
        }
    except (OSError, ValueError, TypeError, KeyError, AttributeError):
        return None  # absent, stale or corrupt: measured again


def _write_sizes(path: Path, sizes: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".{os.getpid()}.tmp")
    tmp.write_text(json.dumps(sizes))
    tmp.replace(path)


def _measure_sizes(
    model: LoadedModel,
    x: torch.Tensor,
    wanted: dict[int, tuple[str, ...]],
    workers: int,
    progress: Callable[[int, int], None] | None,
    memo: dict | None = None,
) -> dict:
    """Encoded bytes of every cut's live set in every wanted encoding (median over ``x``'s inputs;
    None where the encoding does not apply). ``memo``: see :meth:`CostModel.measure`.

    A live set's size on one input is the sum of its values' sizes, and most values are live at
    several cuts (a residual block's input at every cut inside the block), so each value is encoded
    once per encoding and input, and the cuts add up what their values took.
    """
    if memo is not None and _same_inputs(memo.get("x"), x):
        values = memo["values"]
    else:
        recorded = memo.get("recorded") if memo is not None else None
        values = (recorded(x) if recorded is not None else None) or _all_values(model, x)
        if memo is not None:
            memo.update(x=x, values=values)
    cuts = [cut for cut in model.graph.cuts if wanted.get(cut.index)]
    samples = len(x)
    # Every (value, encoding) some cut needs, in the order cuts need them: one unit of work each.
    units: dict[tuple[str, str], None] = {}
    for cut in cuts:
        for enc in wanted[cut.index]:
            for name in cut.live:
                units[(name, enc)] = None

    def sizes_of(unit: tuple[str, str]) -> list[int] | None:
        name, enc = unit
        value = values[name]
        part = (lambda i: value[i : i + 1]) if value.ndim and value.shape[0] == samples else (lambda i: value)
        spec = EncodingSpec.parse(enc)
        try:
            return [encode(part(i), spec, model.entropy_tables).ByteSize() for i in range(samples)]
        except ValueError:
            return None  # e.g. JPEG of something that is not an image

    per_value: dict[tuple[str, str], list[int] | None] = {}
    if workers > 1:
        # Small tensors encode several times faster on one kernel thread each, side by side.
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            with ThreadPoolExecutor(workers) as pool:
                for unit, sizes in zip(units, pool.map(sizes_of, units), strict=True):
                    per_value[unit] = sizes
                    if progress is not None:
                        progress(len(per_value), len(units))
        finally:
            torch.set_num_threads(threads)
    else:
        for unit in units:
            per_value[unit] = sizes_of(unit)
            if progress is not None:
                progress(len(per_value), len(units))
    measured: dict[int, dict[str, int]] = {}
    for cut in cuts:
        out = measured[cut.index] = {}
        for enc in wanted[cut.index]:
            parts = [per_value[(name, enc)] for name in cut.live]
            good = all(p is not None for p in parts)
            out[enc] = int(statistics.median([sum(p[i] for p in parts) for i in range(samples)])) if good else None
    from .loaded import as_tensor_list

    outputs = as_tensor_list(values["__output__"])
    out_bytes = sum(t.numel() * 4 for t in outputs) // samples
    return {"cuts": measured, "output_bytes": out_bytes, "reply_bytes": _reply_bytes(outputs, samples)}


def _reply_bytes(outputs: list, samples: int) -> int:
    """The median bytes of one input's outputs coded as a lossy plan's reply (:data:`REPLY_ENCODING`); 0 when
    the outputs have no batch dimension to take one input's from."""
    if not all(t.ndim and t.shape[0] == samples for t in outputs):
        return 0
    spec = EncodingSpec.parse(REPLY_ENCODING)
    return int(statistics.median(sum(encode(t[i : i + 1], spec).ByteSize() for t in outputs) for i in range(samples)))


def _same_inputs(known: torch.Tensor | None, x: torch.Tensor) -> bool:
    """Whether ``x`` holds the inputs ``known`` holds: the same tensor, or one equal to it in shape,
    dtype and every value (``calib[:3]`` is a new tensor each time it is sliced)."""
    if known is None:
        return False
    return known is x or (known.shape == x.shape and known.dtype == x.dtype and bool(torch.equal(known, x)))


def _codec_key(enc: str) -> str:
    """The profiled encoding whose per-MB cost stands for ``enc`` (per-channel ~ per-tensor)."""
    spec = EncodingSpec.parse(enc)
    if spec.encoding == "affine":
        return f"int{spec.bits}" + ("+none" if spec.codec == "none" else "")
    if spec.encoding in ("jpeg", "webp"):
        return spec.encoding
    return str(spec)


@functools.cache
def _recorder() -> type:
    """The fx Interpreter that keeps every value (a class made on first use: fx is torch)."""

    class _Recorder(fx.Interpreter):
        def __init__(self, module: fx.GraphModule) -> None:
            super().__init__(module)
            self.values: dict[str, object] = {}

        def run_node(self, n: fx.Node):
            value = super().run_node(n)
            if n.op == "output":
                self.values["__output__"] = value
            elif isinstance(value, torch.Tensor):
                self.values[n.name] = value.clone()  # in-place ops later must not change what crossed
            return value

    return _Recorder


def _all_values(model: LoadedModel, x: torch.Tensor) -> dict[str, object]:
    with torch.inference_mode():
        if model.graph.opaque:
            out = model.module(x)
            return {model.graph.cuts[0].live[0]: x, model.graph.cuts[-1].live[0]: out, "__output__": out}
        recorder = _recorder()(model.graph.module)
        recorder.run(x)
        return recorder.values


def _cumulative_weight_bytes(model: LoadedModel) -> dict[int, int]:
    """Bytes of parameters and buffers the head of each cut needs (each module counted once)."""
    gm = model.graph.module
    if not isinstance(gm, fx.GraphModule):
        total = sum(t.numel() * t.element_size() for t in gm.state_dict().values())
        return {c.index: (total if c.index else 0) for c in model.graph.cuts}
    seen: set[tuple] = set()
    running, out = 0, {}
    for index, node in enumerate(gm.graph.nodes):
        tensors = []
        if node.op == "call_module":
            tensors = list(gm.get_submodule(node.target).state_dict().values())
        elif node.op == "get_attr":
            attr = gm
            for part in node.target.split("."):
                attr = getattr(attr, part)
            tensors = [attr] if isinstance(attr, torch.Tensor) else []
        for t in tensors:
            # By storage, not id(): state_dict() makes new tensor objects, whose ids are reused once freed.
            key = (t.data_ptr(), tuple(t.shape), t.dtype)
            if key not in seen:
                seen.add(key)
                running += t.numel() * t.element_size()
        out[index] = running
    return out
