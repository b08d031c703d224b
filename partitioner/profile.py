"""Measured latency of a model on this host: per node, per head, and per byte of codec work.

Per-node times come from running the traced graph node by node (an fx Interpreter). They are
biased: the interpreter adds a little to every node and, compiled together, neighbouring kernels
run faster than alone. So whole heads are also timed at a few cuts, and :class:`LatencyCurve` maps
the cumulative per-node sum onto those measurements (piecewise linear between them). That is what
the planner uses: ``head_ms(k)`` for the edge, ``tail_ms(k) = total - head_ms(k)`` for the cloud.

On a host that gets less than one core per wall second (a CPU quota, or other work on its cores), short
timings are not what the same work costs inside a request: a CFS quota lets a burst run at full speed
until the period's share is spent, then stops the process until the next period, so one node or one
codec call lands either whole in a share (its CPU time) or across a stop (a period longer). Medians of
such timings came out at full speed for some nodes and codecs and throttled for others (int4 encoding
1.0 ms/MB against int8's 40 ms/MB on an edge 24x slower than the cloud, and the heads up to the first
block at 1.3% of the model where they do 9%). There, per-node and codec costs are their CPU time times
the host's wall time per CPU second over many periods (what they cost in a sustained run), taken over
the timed runs of the heads and the whole model (:func:`interleaved_ms`'s ``spent``).

Profiles are cached on disk, keyed by model fingerprint, role (edge or cloud), host, CPU quota,
torch version, thread count, input shape (batch included) and dtype: a profile taken elsewhere, or
at another input, says nothing about here.
"""

from __future__ import annotations

import bisect
import functools
import hashlib
import json
import logging
import os
import platform
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from compressor import EncodingSpec, decode, encode
from compressor.errors import CodecError
from protos.cleave.v1 import split_inference_pb2 as si_pb2

from ._lazy import fx, torch  # imported on first use: profiles as data need no torch (the light edge)
from .cpu_limits import CGROUP_ROOT, cgroup_cpu_quota

log = logging.getLogger(__name__)

if TYPE_CHECKING:
    from .loaded import LoadedModel

#: Encodings whose cost per byte is measured on each host (the planner's feature encodings).
PROFILED_ENCODINGS = ("raw", "raw+none", "fp16", "int8", "int6", "int4", "int3", "int2", "jpeg", "webp", "entropy")


@dataclass
class CodecCost:
    """Cost of one encoding on this host, per MB of float32 input."""

    encoding: str
    encode_ms_per_mb: float
    decode_ms_per_mb: float


@dataclass
class Profile:
    """Latency measurements of one model on one host."""

    model: str
    fingerprint: str
    host: str
    torch_version: str
    threads: int
    batch: int
    node_names: list[str]
    node_ms: list[float]  # median per node, in graph order (index k = node k)
    output_bytes: list[int]  # bytes of each node's output
    head_ms: dict[int, float]  # measured whole-head latency at sampled cut indices
    total_ms: float  # measured whole-model latency
    codecs: dict[str, CodecCost] = field(default_factory=dict)
    input_shape: list[int] = field(default_factory=list)  # the input measured at, batch included

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, text: str) -> Profile:
        data = json.loads(text)
        data["head_ms"] = {int(k): v for k, v in data["head_ms"].items()}
        data["codecs"] = {k: CodecCost(**v) for k, v in data["codecs"].items()}
        return cls(**data)

    def curve(self) -> LatencyCurve:
        return LatencyCurve(self)


class LatencyCurve:
    """Corrected head and tail latency at any cut, from a :class:`Profile`."""

    def __init__(self, profile: Profile) -> None:
        self.total_ms = profile.total_ms
        self._prefix = []
        running = 0.0
        for ms in profile.node_ms:
            running += ms
            self._prefix.append(running)
        # Anchor points (cumulative per-node sum -> measured head time), including both ends.
        anchors = {0.0: 0.0, self._prefix[-1] if self._prefix else 0.0: profile.total_ms}
        end = self._prefix[-1] if self._prefix else 0.0
        for index, ms in profile.head_ms.items():
            # The curve ends at the whole-model time (the most repeated measurement), so a head that
            # holds every node costs exactly what edge-only costs; other heads are capped by it.
            if 0 <= index < len(self._prefix) and self._prefix[index] < end:
                anchors[self._prefix[index]] = min(ms, profile.total_ms)
        xs = sorted(anchors)
        # Head time never decreases with k. Noisy anchors are made monotone by their least-squares monotone fit,
        # which pools a high outlier with the lower anchors after it; carrying the running maximum forward instead
        # let one slow head measurement flatten every later head (and so every later tail) to its value.
        self._xs, self._ys = xs, monotone_fit([anchors[x] for x in xs])

    def head_ms(self, index: int) -> float:
        """Edge compute for cut ``index`` (nodes 0..index)."""
        x = self._prefix[index] if 0 <= index < len(self._prefix) else 0.0
        i = bisect.bisect_left(self._xs, x)
        if i < len(self._xs) and self._xs[i] == x:
            return self._ys[i]
        if i == 0:
            return self._ys[0]
        if i >= len(self._xs):
            return self._ys[-1]
        x0, x1, y0, y1 = self._xs[i - 1], self._xs[i], self._ys[i - 1], self._ys[i]
        return y0 + (y1 - y0) * (x - x0) / (x1 - x0)

    def tail_ms(self, index: int) -> float:
        """Cloud compute for cut ``index`` (nodes index+1..end)."""
        return max(self.total_ms - self.head_ms(index), 0.0)


def monotone_fit(values: Sequence[float]) -> list[float]:
    """The non-decreasing sequence closest to ``values`` in least squares (pool adjacent violators)."""
    blocks: list[list[float]] = []  # [mean, count]
    for v in values:
        blocks.append([float(v), 1.0])
        while len(blocks) > 1 and blocks[-2][0] > blocks[-1][0]:
            (m1, n1), (m2, n2) = blocks[-2], blocks.pop()
            blocks[-1] = [(m1 * n1 + m2 * n2) / (n1 + n2), n1 + n2]
    return [m for m, n in blocks for _ in range(int(n))]


@functools.cache
def _timing_interpreter() -> type:
    """The fx Interpreter that times every node (a class made on first use: fx is torch)."""

    class _TimingInterpreter(fx.Interpreter):
        def __init__(self, module: fx.GraphModule) -> None:
            super().__init__(module)
            self.times: dict[str, float] = {}  # wall ms
            self.cpu_times: dict[str, float] = {}  # the process's CPU ms (every torch thread)
            self.sizes: dict[str, int] = {}

        def run_node(self, n: fx.Node):
            cpu, started = time.process_time(), time.perf_counter()
            value = super().run_node(n)
            self.times[n.name] = (time.perf_counter() - started) * 1e3
            self.cpu_times[n.name] = (time.process_time() - cpu) * 1e3
            self.sizes[n.name] = _nbytes(value)
            return value

    return _TimingInterpreter


def _nbytes(value: object) -> int:
    if isinstance(value, torch.Tensor):
        return value.numel() * value.element_size()
    if isinstance(value, (tuple, list)):
        return sum(_nbytes(v) for v in value)
    return 0


def median_ms(fn: Callable[[], object], repeats: int, warmup: int, between: Callable[[], None] | None = None) -> float:
    """Median wall time of ``fn()`` in ms over ``repeats`` calls, after ``warmup`` untimed ones.

    ``between`` is called before every call, untimed: it may raise to abandon the measurement
    (the caller went away) or wait for its turn (other measurements share the host).
    """
    between = between or _nothing
    for _ in range(warmup):
        between()
        fn()
    samples = []
    for _ in range(repeats):
        between()
        started = time.perf_counter()
        fn()
        samples.append((time.perf_counter() - started) * 1e3)
    return statistics.median(samples)


def _nothing() -> None:
    pass


#: :func:`interleaved_ms` with ``min_rounds`` stops once no part's median moved by more than this share of
#: itself in the last round.
STABLE = 0.02


def interleaved_ms(
    parts: dict[int, Callable[[object], object]],
    x: object,
    rounds: int,
    between: Callable[[], None] | None = None,
    *,
    min_rounds: int | None = None,
    spent: list[float] | None = None,
) -> dict[int, float]:
    """Median wall time in ms of each ``parts[k](x)``, timed in ``rounds`` rounds that run every part once.

    One warm-up round first. Timing the parts round-robin rather than one after another puts every part under
    the same conditions: a host whose speed drifts (other work, a CPU quota's periods, frequency) moves all of
    them together, so their ratios, which is what the latency curve uses, stay right.

    ``min_rounds``: stop after that many rounds (at least 2) or more, once no part's median has moved by more
    than :data:`STABLE` of itself in the last round: on a steady host the rounds after that change next to
    nothing, and a drifting one runs them all. ``spent``: ``[wall ms, CPU ms]``, to which every timed call's
    wall time and the process's CPU time in it are added. Their ratio is the host's wall time per CPU
    second: over calls that span many CPU-quota periods, what a CPU second costs here in a sustained run
    (about 1 on a free core, 1/quota under a CFS quota of less than a core, more under other work; under
    1 when torch's threads run in parallel).
    """
    between = between or _nothing
    samples: dict[int, list[float]] = {k: [] for k in parts}
    last: dict[int, float] | None = None
    for r in range(rounds + 1):
        for k, fn in parts.items():
            between()
            cpu, started = time.process_time(), time.perf_counter()
            fn(x)
            if r:
                samples[k].append((time.perf_counter() - started) * 1e3)
                if spent is not None:
                    spent[0] += samples[k][-1]
                    spent[1] += (time.process_time() - cpu) * 1e3
        if r and min_rounds is not None:
            medians = {k: statistics.median(v) for k, v in samples.items()}
            steady = last is not None and all(abs(m - last[k]) <= STABLE * m for k, m in medians.items())
            if steady and r >= max(min_rounds, 2):
                break
            last = medians
    return {k: statistics.median(v) for k, v in samples.items()}


def node_costs(walls: Sequence[Sequence[float]], cpus: Sequence[Sequence[float]], per_cpu: float) -> list[float]:
    """Each node's cost in ms from its runs' wall and CPU times, ``per_cpu`` the host's wall per CPU second.

    On a host that gets less than a core (``per_cpu`` > 1: a CPU quota, other work), a node's wall time
    is its CPU time, or that plus a wait for the quota's next period when the share ran out inside it:
    the median then takes small nodes at full speed and big ones throttled, which bends the curve
    between its anchors. Their CPU time times ``per_cpu`` is what each costs in a sustained run. With
    a core or more (torch's threads in parallel) the wall time is the cost, as it was.
    """
    if per_cpu > 1.0:
        return [statistics.median(c) * per_cpu for c in cpus]
    return [statistics.median(w) for w in walls]


def sample_cut_indices(model: LoadedModel, count: int) -> list[int]:
    """``count`` cut indices spread evenly over the graph (the whole-head correction points)."""
    cuts = model.graph.cuts
    if len(cuts) <= count:
        return [c.index for c in cuts]
    step = (len(cuts) - 1) / (count - 1)
    return sorted({cuts[round(i * step)].index for i in range(count)})


def measure_codecs(encodings=PROFILED_ENCODINGS, numel: int = 1 << 18, repeats: int = 5) -> dict[str, CodecCost]:
    """Encode/decode cost of each encoding on ReLU-like data (1 MB of float32 by default).

    Each cost is the median CPU time of its calls (on this thread: the codec runs on the calling thread)
    times this host's wall time per CPU second over every timed call (at least 1): a codec call of a
    millisecond under a CPU quota either fits in the period's share or waits a period, so its wall time
    says little about what it costs inside a request, where the edge's head has spent the share already.
    """
    # numpy, not torch: the light edge measures its codec costs too (the codec gives the same bytes for both).
    rng = np.random.default_rng(0)
    features = np.maximum(rng.standard_normal((1, 64, numel // 64), dtype=np.float32), 0)
    side = int((numel // 3) ** 0.5)
    ramp = np.linspace(-2, 2, side, dtype=np.float32)
    image = np.ascontiguousarray(np.broadcast_to(ramp[:, None] + ramp[None, :], (1, 3, side, side)))
    cpu_ms: dict[str, tuple[float, float]] = {}  # encoding -> (encode, decode) CPU ms per MB
    spent = [0.0, 0.0]  # wall and CPU ms over every timed call
    for text in encodings:
        spec = EncodingSpec.parse(text)
        x, tables = (image if spec.encoding in ("jpeg", "webp") else features), None
        if spec.encoding == "entropy":  # a bottleneck's latent: range coding of rounded Laplace values
            try:
                x, tables = _latent_and_tables(rng, min(numel, 1 << 14))  # decoding is slow: 64 KB is enough
            except CodecError:  # the coder (constriction, the `bottleneck` extra) is not installed
                continue
        mb = x.size * 4 / 1e6
        msg = encode(x, spec, tables)
        enc = _cpu_ms(lambda x=x, spec=spec, t=tables: encode(x, spec, t), repeats, 1, spent)
        dec = _cpu_ms(lambda msg=msg, t=tables: decode(msg, tables=t), repeats, 1, spent)
        cpu_ms[text] = (enc / mb, dec / mb)
    per_cpu = max(spent[0] / max(spent[1], 1e-6), 1.0)  # single-threaded codecs: a CPU ms costs at least a wall ms
    return {text: CodecCost(text, enc * per_cpu, dec * per_cpu) for text, (enc, dec) in cpu_ms.items()}


def _cpu_ms(fn: Callable[[], object], repeats: int, warmup: int, spent: list[float]) -> float:
    """Median CPU time of ``fn()`` on this thread in ms; adds the calls' wall and CPU ms to ``spent``."""
    for _ in range(warmup):
        fn()
    samples = []
    for _ in range(repeats):
        cpu, started = time.thread_time(), time.perf_counter()
        fn()
        samples.append((time.thread_time() - cpu) * 1e3)
        spent[0] += (time.perf_counter() - started) * 1e3
        spent[1] += samples[-1]
    return statistics.median(samples)


def _latent_and_tables(rng: np.random.Generator, numel: int) -> tuple[np.ndarray, Any]:
    """A latent of ``numel`` values like a bottleneck's (64 channels of rounded Laplace values,
    scale 2) and tables that fit them, for timing the range coder per MB of float32 latent."""
    from compressor.entropy import EntropyTables, _constriction

    _constriction()  # CodecError without the coder
    half = 16
    values = np.arange(-half, half + 1)
    pmf = np.exp(-np.abs(values) / 2.0)
    latent = np.clip(np.round(rng.laplace(0.0, 2.0, (1, 64, 64, numel // 4096))), -half, half).astype(np.float32)
    return latent, EntropyTables(pmf=np.tile(pmf / pmf.sum(), (64, 1)), offset=-half)


def profile_input(model: LoadedModel, input_shape: Sequence[int] | None = None) -> torch.Tensor:
    """The input a profile of ``model`` is measured at: its example input, or synthetic inputs of
    ``input_shape`` (batch included) when that differs from the model's configured shape."""
    x = model.graph.example_input
    if input_shape is None or tuple(input_shape) == tuple(x.shape):
        return x
    if len(input_shape) != x.dim() or any(int(d) < 1 for d in input_shape):
        raise ValueError(
            f"input_shape: {list(input_shape)} does not fit {model.name!r}, whose inputs are {list(x.shape)}"
        )
    from .models import calibration_batch

    return calibration_batch(tuple(int(d) for d in input_shape), int(input_shape[0])).to(x.dtype)


def profile_model(
    model: LoadedModel,
    repeats: int = 10,
    warmup: int = 3,
    head_samples: int = 8,
    batch: int | None = None,
    input_shape: Sequence[int] | None = None,
    between: Callable[[], None] | None = None,
) -> Profile:
    """Profile ``model`` on this host at its example input (or ``input_shape``; or ``batch`` copies of it).

    The whole model and the heads at ``head_samples`` cuts are timed round-robin (:func:`interleaved_ms`)
    in ``repeats // 2`` rounds (at least 3; fewer than asked once their medians hold still), after
    ``warmup - 1`` untimed runs of the whole model and a warm-up round; then every node is timed in as
    many interpreted runs.

    ``between`` is called before each run of the model or a part of it (see :func:`median_ms`).
    """
    between = between or _nothing
    x = profile_input(model, input_shape)
    if batch is not None and batch != x.shape[0]:
        x = x[:1].expand(batch, *x.shape[1:]).contiguous()
    module = model.graph.module
    with torch.inference_mode():
        for _ in range(max(warmup - 1, 0)):  # the rounds below begin with a warm-up round of every part
            between()
            module(x)
        # The whole model (key -1) is timed in the same rounds as the heads: the curve's end anchor and its other
        # anchors then come from the same conditions (timed apart, a faster whole-model run flattened the tails).
        # The same calls give the host's wall time per CPU second, which node costs need: the whole model is
        # not timed again on its own for it.
        parts = {-1: module, **{index: model.parts(index)[1] for index in sample_cut_indices(model, head_samples)}}
        spent = [0.0, 0.0]
        heads = interleaved_ms(parts, x, max(repeats // 2, 3), between, min_rounds=3, spent=spent)
        total = heads.pop(-1)
        per_cpu = spent[0] / max(spent[1], 1e-6)
        if isinstance(module, fx.GraphModule) and not model.graph.opaque:
            runs = []
            for _ in range(max(repeats // 2, 3)):
                between()
                interp = _timing_interpreter()(module)
                interp.run(x)
                runs.append(interp)
            names = [n.name for n in module.graph.nodes if n.op != "output"]
            node_ms = node_costs(
                [[r.times.get(name, 0.0) for r in runs] for name in names],
                [[r.cpu_times.get(name, 0.0) for r in runs] for name in names],
                per_cpu,
            )
            out_bytes = [runs[0].sizes.get(name, 0) for name in names]
        else:  # opaque graph: one node, the whole model
            names, node_ms, out_bytes = ["input", "output"], [0.0, total], [_nbytes(x), 0]
    return Profile(
        model=model.name,
        fingerprint=model.fingerprint,
        host=platform.node(),
        torch_version=torch.__version__,
        threads=torch.get_num_threads(),
        batch=int(x.shape[0]),
        node_names=names,
        node_ms=node_ms,
        output_bytes=out_bytes,
        head_ms=heads,
        total_ms=total,
        codecs=measure_codecs(),
        input_shape=list(x.shape),
    )


def cache_dir() -> Path:
    return Path(os.environ.get("CLEAVE_CACHE", Path.home() / ".cache" / "cleave")) / "profiles"


def cpu_quota(proc_cgroup: Path = Path("/proc/self/cgroup"), root: Path = CGROUP_ROOT) -> str:
    """This process's CPU limit from its cgroup or an ancestor's ("0.250" cores), or "none": part of a profile's
    cache key, so that a profile measured under one quota is not reused under another."""
    quota = cgroup_cpu_quota(proc_cgroup, root)
    return "none" if quota is None else f"{quota:.3f}"


#: Bumped when how a profile is measured changes, so cached profiles are measured again (2: heads and the whole model
#: timed round-robin; 3: node and codec costs from CPU time on a host that gets less than a core).
PROFILE_VERSION = 3


def cache_key(model: LoadedModel, batch: int, role: str = "", input_shape: Sequence[int] | None = None) -> str:
    """The cache entry of ``model``'s profile here: everything that changes its timings is in it."""
    x = model.graph.example_input
    sample = tuple(input_shape[1:]) if input_shape is not None else tuple(x.shape[1:])
    parts = [
        model.fingerprint,
        role,
        platform.node(),
        cpu_quota(),
        torch.__version__,
        str(torch.get_num_threads()),
        str(batch),
        "x".join(str(int(d)) for d in sample),
        str(x.dtype),
        str(PROFILE_VERSION),
    ]
    return hashlib.sha256("|".join(parts).encode()).hexdigest()[:32]


#: A profile measured while more tasks wanted the CPUs than there are (the 1-minute load average per
#: CPU above this, before or after measuring) is used but not cached: its timings are this moment's
#: contention, not what the host costs later, and a cached one would be reused as if they were
#: (a whole Lite0 timed at 831 ms under load 8 on 2 cores, 20 ms on the quiet machine).
#: ``CLEAVE_PROFILE_MAX_LOAD`` sets another limit (``inf``: always cache).
MAX_LOAD_PER_CPU = 1.0


def busy_load() -> float | None:
    """The 1-minute load average when it is above the limit per CPU (the machine is busy), else None."""
    try:
        limit = float(os.environ.get("CLEAVE_PROFILE_MAX_LOAD", MAX_LOAD_PER_CPU))
        load = os.getloadavg()[0]
    except (OSError, ValueError):
        return None
    return load if load > limit * (os.cpu_count() or 1) else None


def cached_profile(
    model: LoadedModel,
    batch: int | None = None,
    refresh: bool = False,
    role: str = "",
    input_shape: Sequence[int] | None = None,
    **kwargs,
) -> Profile:
    """The profile of ``model`` on this host at ``input_shape`` (default: the model's own), from the
    disk cache when it has one.

    ``role`` ("edge", "cloud") keeps the two daemons' profiles apart when they share a host and a
    cache directory, as they do in tests and network-namespace benchmarks.
    """
    x = profile_input(model, input_shape)  # a shape that does not fit fails here, before the cache
    batch = batch or int(x.shape[0])
    path = cache_dir() / f"{cache_key(model, batch, role, x.shape)}.json"
    if not refresh and path.exists():
        try:
            return Profile.from_json(path.read_text())
        except (ValueError, TypeError, KeyError):
            pass  # a stale or corrupt cache entry is simply measured again
    before = busy_load()
    profile = profile_model(model, batch=batch, input_shape=x.shape, **kwargs)
    load = max(before or 0.0, busy_load() or 0.0)
    if load:
        log.warning(
            "profile of %s measured while the machine was busy (load %.1f on %d CPUs): used now, not cached;"
            " it is measured again next time",
            model.name,
            load,
            os.cpu_count() or 1,
        )
        return profile
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".{os.getpid()}.tmp")  # two processes measuring one profile do not share a file
    tmp.write_text(profile.to_json())
    tmp.replace(path)
    return profile


def to_proto(profile: Profile) -> si_pb2.ProfileResponse:
    """The wire form of a profile (``SplitInference.Profile``)."""
    return si_pb2.ProfileResponse(
        model=profile.model,
        fingerprint=profile.fingerprint,
        nodes=[
            si_pb2.NodeTiming(name=n, ms=ms, output_bytes=b)
            for n, ms, b in zip(profile.node_names, profile.node_ms, profile.output_bytes, strict=True)
        ],
        total_ms=profile.total_ms,
        host=profile.host,
        head_ms=profile.head_ms,
        codecs=[
            si_pb2.CodecCost(
                encoding=c.encoding, encode_ms_per_mb=c.encode_ms_per_mb, decode_ms_per_mb=c.decode_ms_per_mb
            )
            for c in profile.codecs.values()
        ],
        threads=profile.threads,
        torch_version=profile.torch_version,
        batch=profile.batch,
        input_shape=profile.input_shape,
    )


def from_proto(msg: si_pb2.ProfileResponse) -> Profile:
    """A profile received from another host; raises ValueError when it is inconsistent."""
    if not msg.nodes or msg.total_ms <= 0:
        raise ValueError("profile: no nodes or no total time")
    if any(ms < 0 for ms in [n.ms for n in msg.nodes] + list(msg.head_ms.values())):
        raise ValueError("profile: negative time")
    return Profile(
        model=msg.model,
        fingerprint=msg.fingerprint,
        host=msg.host,
        torch_version=msg.torch_version,
        threads=msg.threads,
        batch=msg.batch,
        node_names=[n.name for n in msg.nodes],
        node_ms=[n.ms for n in msg.nodes],
        output_bytes=[n.output_bytes for n in msg.nodes],
        head_ms=dict(msg.head_ms),
        total_ms=msg.total_ms,
        codecs={c.encoding: CodecCost(c.encoding, c.encode_ms_per_mb, c.decode_ms_per_mb) for c in msg.codecs},
        input_shape=list(msg.input_shape),
    )


def scaled(profile: Profile, factor: float, host: str | None = None) -> Profile:
    """``profile`` as a host ``factor`` times slower (< 1: faster) would measure it.

    For planning offline, when the other host cannot be asked: an estimate, not a measurement.
    """
    return replace(
        profile,
        host=host or f"{profile.host} x{factor:g}",
        node_ms=[ms * factor for ms in profile.node_ms],
        head_ms={k: ms * factor for k, ms in profile.head_ms.items()},
        total_ms=profile.total_ms * factor,
        codecs={
            k: CodecCost(c.encoding, c.encode_ms_per_mb * factor, c.decode_ms_per_mb * factor)
            for k, c in profile.codecs.items()
        },
    )
