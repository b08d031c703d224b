"""The ONNX Runtime backend (see :mod:`edge_node.backend`): an edge bundle, no torch.

Sessions open on first use, from bytes verified against the manifest as they are read: a head's
when a plan first uses its cut, the whole model's when an edge-only plan, the planner's profile or
the first local fallback needs it (about 0.2 s for resnet18, once). An edge serving a split keeps
only its head in memory (:mod:`benchmarks.edge_footprint` measures what that saves);
``preload_whole`` (``preload: true`` in edge.yaml) opens the whole model at start instead.

A request whose features did not reach the cloud is finished by the whole model on its input (a
bundle carries heads, not tails): its head's work is done again, and its answer is the whole
model's, the same as an edge-only plan's.

Threads: sessions are built once per (cut, bits) under :class:`BuildOnce` semantics and then only
read; ONNX Runtime's ``run`` is safe to call from the gRPC handler threads at once.
"""

from __future__ import annotations

import logging
import platform
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, replace
from typing import Any

import numpy as np

from compressor import decode_array
from partitioner.bundle import BundleCut, EdgeBundle, PlanningTables
from partitioner.profile import Profile, measure_codecs
from protos.cleave.v1 import tensor_pb2

log = logging.getLogger(__name__)

FLOAT_BITS = 32
INT8_BITS = 8
MAX_HEAD_SESSIONS = 4  # head sessions kept open (the plan in force holds its own besides)


@dataclass(frozen=True)
class InputCut:
    """Cut 0: the input itself crosses (cloud-only plans)."""

    index: int
    name: str
    live: tuple[str, ...]
    shapes: tuple[tuple[int, ...], ...]
    dtypes: tuple[str, ...]


class _Identity:
    """Cut 0's head: the input as it is."""

    def __repr__(self) -> str:
        return "identity"


class OnnxHead:
    """One head on ONNX Runtime: float or int8 weights."""

    def __init__(self, session: Any, cut: BundleCut, bits: int) -> None:
        self.session = session
        self.cut = cut
        self.bits = bits
        self._input = session.get_inputs()[0].name

    def __call__(self, x: np.ndarray) -> tuple[np.ndarray, ...]:
        return tuple(self.session.run(None, {self._input: x}))


def session_options(threads: int):
    import onnxruntime as ort

    options = ort.SessionOptions()
    if threads:
        options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.log_severity_level = 3
    return options


class OnnxBackend:
    """Serves an :class:`~partitioner.bundle.EdgeBundle` on ONNX Runtime's CPU provider."""

    kind = "onnx bundle"
    fallback = "the whole model here (the bundle has no tails)"
    entropy_tables = None

    def __init__(self, bundle: EdgeBundle, threads: int = 0, preload_whole: bool = False) -> None:
        import onnxruntime as ort

        self._ort = ort
        self.bundle = bundle
        self.threads = threads
        m = bundle.manifest
        self.name = m.name
        self.fingerprint = m.fingerprint
        self.input_shape = tuple(m.input_shape)
        self._tables: PlanningTables | None = None
        self._whole = None
        self._whole_input = ""
        self._whole_lock = threading.Lock()  # one open of the whole model's session
        costs0 = self.tables.costs[0]
        self.input_cut = InputCut(0, costs0.name, (costs0.name,), (self.input_shape,), (m.input_dtype,))
        self._heads: OrderedDict[tuple[int, int], OnnxHead] = OrderedDict()
        self._building: dict[tuple[int, int], threading.Event] = {}
        self._lock = threading.Lock()  # guards _heads and _building
        if preload_whole:
            self.whole  # noqa: B018 - opens the session now

    @property
    def whole(self):
        """The whole model's session, opened on first use."""
        whole = self._whole
        if whole is None:
            with self._whole_lock:
                if self._whole is None:
                    session = self._session(self.bundle.manifest.whole)
                    self._whole_input = session.get_inputs()[0].name
                    self._whole = session
                whole = self._whole
        return whole

    @property
    def tables(self) -> PlanningTables:
        if self._tables is None:
            self._tables = self.bundle.planning()
        return self._tables

    def describe(self) -> str:
        return f"onnx bundle {self.bundle.root} (onnxruntime {self._ort.__version__})"

    def _session(self, file: str):
        data = self.bundle.read(file)  # hashed again as it is read: what runs is what the manifest lists
        session = self._ort.InferenceSession(data, session_options(self.threads), providers=["CPUExecutionProvider"])
        # ORT's Python wrapper keeps the model's bytes (to rebuild the session on a provider change, which
        # this backend never asks for): a second copy of every weight, freed here.
        if getattr(session, "_model_bytes", None) is not None:
            session._model_bytes = None
        return session

    # -- parts -----------------------------------------------------------------------------------
    def parts(self, key: int | str) -> tuple[Any, Any, Any]:
        if key in (0, "0", self.input_cut.name):
            return self.input_cut, _Identity(), None
        cut = self.bundle.cut(key)
        return cut, self.head(cut, FLOAT_BITS), None

    def head(self, cut: BundleCut, bits: int) -> OnnxHead:
        """The head of ``cut`` at ``bits`` (32 float, 8 int8), opened once and kept (a few at most)."""
        key = (cut.index, bits)
        while True:
            with self._lock:
                head = self._heads.get(key)
                if head is not None:
                    self._heads.move_to_end(key)
                    return head
                waiting = self._building.get(key)
                if waiting is None:
                    self._building[key] = threading.Event()
                    break
            waiting.wait()
        try:
            session = self._session(cut.head if bits == FLOAT_BITS else cut.head_int8)
            head = OnnxHead(session, cut, bits)
            with self._lock:
                self._heads[key] = head
                while len(self._heads) > MAX_HEAD_SESSIONS:
                    self._heads.popitem(last=False)
            return head
        finally:
            with self._lock:
                self._building.pop(key).set()

    def quantized(self, cut: Any, head: Any, bits: int | dict[str, int]) -> tuple[Any, dict[str, int]]:
        if cut.index == 0:
            return head, {}
        values = set(bits.values()) if isinstance(bits, dict) else {bits}
        if values == {FLOAT_BITS}:
            return self.head(cut, FLOAT_BITS), {}
        if values != {INT8_BITS}:
            raise ValueError(
                f"the ONNX bundle has float (32) and int8 (8) heads; {sorted(values)} bits need the torch edge"
            )
        return self.head(cut, INT8_BITS), {"*": INT8_BITS}

    # -- running ---------------------------------------------------------------------------------
    def run(self, inputs: list) -> list:
        whole = self.whole
        return list(whole.run(None, {self._whole_input: _array(inputs[0])}))

    def run_head(self, head: Any, inputs: list) -> tuple:
        if isinstance(head, _Identity):
            return (inputs[0],)
        return head(_array(inputs[0]))

    def run_tail(self, cut: Any, tail: Any, inputs: list, features: tuple) -> list:
        return self.run(inputs)

    def decode(self, tensor: tensor_pb2.Tensor, payload: bytes | memoryview | None = None) -> np.ndarray:
        # Read-only (a RAW tensor is a view over its payload, not a copy): a request's inputs and the
        # cloud's outputs are only read here (ONNX Runtime's run, encode, the reply's raw encode).
        return decode_array(tensor, writable=False, payload=payload)

    # -- planning --------------------------------------------------------------------------------
    def edge_profile(self) -> Profile:
        """This host's profile: the bundle's per-node curve re-anchored on the heads and whole model
        as ONNX Runtime runs them here (back to back, see :func:`sustained_ms`), and this host's codec costs."""
        x = np.random.default_rng(0).standard_normal(self.input_shape, dtype=np.float32)
        total = sustained_ms(lambda: self.run([x]))
        heads = {}
        for cut in self.bundle.manifest.cuts:
            head = self.head(cut, FLOAT_BITS)
            heads[cut.index] = sustained_ms(lambda head=head: head(x))
        base = self.tables.profile
        return replace(
            base,
            host=platform.node(),
            torch_version=f"onnxruntime {self._ort.__version__}",
            threads=self.threads,
            head_ms=heads,
            total_ms=total,
            codecs=measure_codecs(),
        )

    def speedups(self) -> dict[int, float]:
        """Float head time over int8 head time at each cut of the bundle, measured here."""
        x = np.random.default_rng(0).standard_normal(self.input_shape, dtype=np.float32)
        out = {}
        for cut in self.bundle.manifest.cuts:
            f, q = self.head(cut, FLOAT_BITS), self.head(cut, INT8_BITS)
            out[cut.index] = sustained_ms(lambda f=f: f(x)) / max(sustained_ms(lambda q=q: q(x)), 1e-6)
        return out


def sustained_ms(fn, min_s: float = 0.25, min_runs: int = 3, warmup: int = 1) -> float:
    """Wall ms per call of ``fn`` called back to back for at least ``min_s`` seconds (after ``warmup``).

    Not a median of single calls: under a CPU quota (a cgroup's cpu.max, as a phone's or a Pi's share
    of a core is emulated) a short call fits in one period's quota and looks as fast as on a free core,
    while a stream of requests runs at the quota's pace. The mean over a run long enough to span
    periods is what the planner must compare with the cloud's time.
    """
    for _ in range(warmup):
        fn()
    runs, started = 0, time.perf_counter()
    while runs < min_runs or time.perf_counter() - started < min_s:
        fn()
        runs += 1
    return (time.perf_counter() - started) * 1e3 / runs


def _array(x: Any) -> np.ndarray:
    return np.ascontiguousarray(x, dtype=np.float32)
