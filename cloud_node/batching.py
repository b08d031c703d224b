"""Dynamic batching: merge concurrent requests to the same model part into one call.

The semantics are Triton's dynamic batcher. Requests for one *key* (a model and the part of it that
runs here: a tail at a cut, or the whole model) queue up in front of one worker thread. The worker
takes the compatible requests at the head of the queue (same number of tensors, same dtypes, same
shapes past the batch dimension) and dispatches them as one batch as soon as their rows add up to
``max_batch_size`` or to one of ``preferred_batch_sizes``, or once the oldest of them has waited
``max_queue_delay_ms``. The batch is concatenated along dim 0, run once under
``torch.inference_mode``, and every output is split back along dim 0 to the requests it came from.

Nothing here knows about gRPC. When batching is off for a key (``enabled: false`` or
``max_batch_size <= 1``), :meth:`Batchers.runner` hands out a :class:`DirectRunner`: the function is
called on the caller's thread exactly as before, with no queue and no thread hop. With batching on
and ``max_queue_delay_ms: 0``, a request that finds the batcher idle and its queue empty would go
alone at once anyway: :meth:`DynamicBatcher.run` runs it on the caller's thread (a batch of one, with
the same stats and callbacks), saving the two thread hand-offs to the worker and back; requests that
arrive meanwhile queue for the worker, which starts once that run is over, as behind one of its own.

Exactness: batching changes nothing but the batch size each kernel sees. CPU convolution and GEMM
kernels pick different blockings for different batch sizes, so a request's outputs in a batch may
differ from its unbatched outputs in the last bits of float32 (about 1e-6 relative); compare with a
tolerance, not for equality. The model must also treat rows independently (BatchNorm in eval mode
does; anything that mixes rows of a batch cannot be batched: set ``max_batch_size: 1`` for it).
"""

from __future__ import annotations

import logging
import threading
import time
from collections import Counter, deque
from collections.abc import Callable, Hashable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import torch

from partitioner.loaded import as_tensor_list
from protos.errors import ResourceExhausted, Unavailable

from .config import BatchSettings  # settings live with the config (no torch there); the batchers take them

log = logging.getLogger(__name__)

WHOLE_MODEL = "whole"  # the part of a key that names the whole model (KServe), instead of a cut index

BatchCallback = Callable[[Hashable, int, float, float], None]
"""``on_batch(key, size, wait_ms, run_ms)``: called after every batch; ``size`` is its rows, ``wait_ms``
how long its oldest request queued, ``run_ms`` the function's run time (concatenation and split included)."""


class BatchKey(NamedTuple):
    """What a batcher serves: ``part`` is a cut index for tails, or :data:`WHOLE_MODEL`."""

    model: str
    part: int | str

    def __str__(self) -> str:
        return f"{self.model}/{self.part}"


class RunResult(NamedTuple):
    """One request's outputs and where its time went."""

    outputs: list[torch.Tensor]
    queue_ms: float  # waiting for the batch to start
    run_ms: float  # the call that produced the outputs (its whole batch's call)
    batch_size: int  # rows in that call


class BatchFuture(Future):
    """A request's outputs (``list[Tensor]``); the timing fields are set before it resolves."""

    queue_ms: float = 0.0
    run_ms: float = 0.0
    batch_size: int = 0


@dataclass
class BatchStats:
    """Counters of one batcher; :meth:`DynamicBatcher.stats` returns a copy."""

    batches: int = 0
    requests: int = 0
    rows: int = 0
    failed_batches: int = 0
    sizes: Counter = field(default_factory=Counter)  # rows per batch -> how many batches had it
    max_queue_depth: int = 0
    wait_ms_total: float = 0.0  # summed over requests
    run_ms_total: float = 0.0  # summed over batches

    @property
    def mean_batch_size(self) -> float:
        return self.rows / self.batches if self.batches else 0.0


class DirectRunner:
    """Batching off: call the function on the caller's thread, as if no batcher existed."""

    def __init__(self, fn: Callable[..., Any]) -> None:
        self.fn = fn

    def run(self, tensors: Sequence[torch.Tensor]) -> RunResult:
        t0 = time.perf_counter()
        with torch.inference_mode():
            outputs = as_tensor_list(self.fn(*tensors))
        rows = tensors[0].shape[0] if tensors and tensors[0].dim() else 1
        return RunResult(outputs, 0.0, (time.perf_counter() - t0) * 1e3, rows)


class _Request:
    __slots__ = ("tensors", "rows", "signature", "future", "enqueued")

    def __init__(self, tensors: Sequence[torch.Tensor]) -> None:
        self.tensors = list(tensors)
        self.signature, self.rows = _signature(self.tensors)
        self.future = BatchFuture()
        self.enqueued = time.perf_counter()


def _signature(tensors: list[torch.Tensor]) -> tuple[tuple | None, int]:
    """What must match for two requests to share a batch, and this request's rows.

    None (never merged) when a tensor has no batch dimension or the tensors disagree on it.
    """
    if not tensors or any(t.dim() == 0 for t in tensors):
        return None, 1
    rows = tensors[0].shape[0]
    if any(t.shape[0] != rows for t in tensors):
        return None, rows
    return tuple((t.dtype, t.device, tuple(t.shape[1:])) for t in tensors), rows


class DynamicBatcher:
    """Queue and worker thread for one key; see the module docstring for when batches go.

    Life cycle: construct, :meth:`start` (the worker thread), :meth:`close`. Callers' threads only
    append to the queue under ``_cond``; the worker owns everything else (the batch it runs).
    """

    def __init__(
        self,
        key: Hashable,
        fn: Callable[..., Any],
        settings: BatchSettings,
        on_batch: BatchCallback | None = None,
    ) -> None:
        settings.validate()
        self.key = key
        self.fn = fn
        self.settings = settings
        self._on_batch = on_batch
        self._preferred = frozenset(settings.preferred_batch_sizes)
        self._delay_s = settings.max_queue_delay_ms / 1e3
        self._queue: deque[_Request] = deque()
        self._cond = threading.Condition()
        self._closed = False
        self._running = False  # a batch is running (the worker's, or a caller's own: see run); under _cond
        self._stats = BatchStats()
        self._thread = threading.Thread(target=self._loop, name=f"batcher-{key}", daemon=True)

    def start(self) -> DynamicBatcher:
        """Start the worker thread; returns self. Requests queued before it starts wait for it."""
        self._thread.start()
        return self

    # -- callers -----------------------------------------------------------------------------------
    def submit(self, tensors: Sequence[torch.Tensor]) -> BatchFuture:
        """Queue one request (each tensor with its leading batch dimension); the future gives its outputs."""
        request = _Request(tensors)
        with self._cond:
            self._enqueue(request)
        return request.future

    def _enqueue(self, request: _Request) -> None:
        """Under ``_cond``: queue ``request`` for the worker, or refuse it (closed, queue full)."""
        if self._closed:
            raise Unavailable(f"batcher {self.key}: shutting down")
        if len(self._queue) >= self.settings.max_queue_size:
            raise ResourceExhausted(
                f"batching queue for {self.key}: {self.settings.max_queue_size} requests already waiting"
            )
        self._queue.append(request)
        self._stats.max_queue_depth = max(self._stats.max_queue_depth, len(self._queue))
        self._cond.notify()

    def run(self, tensors: Sequence[torch.Tensor]) -> RunResult:
        """Submit and wait: the same contract as :meth:`DirectRunner.run`.

        With no queue delay, a request that finds nothing running and nothing queued runs here, on the
        caller's thread, as the batch of one the worker would have made of it at once.
        """
        request = _Request(tensors)
        with self._cond:
            alone = self._delay_s == 0 and not self._running and not self._queue and not self._closed
            if alone:
                self._running = True
            else:
                self._enqueue(request)
        if alone:
            self._execute([request])  # clears _running and wakes the worker (requests that queued meanwhile)
        future = request.future
        outputs = future.result()
        return RunResult(outputs, future.queue_ms, future.run_ms, future.batch_size)

    def queue_depth(self) -> int:
        """Requests waiting now (not counting the batch being run)."""
        return len(self._queue)

    def stats(self) -> BatchStats:
        with self._cond:
            s = self._stats
            return BatchStats(
                s.batches,
                s.requests,
                s.rows,
                s.failed_batches,
                Counter(s.sizes),
                s.max_queue_depth,
                s.wait_ms_total,
                s.run_ms_total,
            )

    def close(self, timeout: float | None = 10.0) -> None:
        """Refuse new requests, run the queued ones without waiting for company, stop the worker."""
        with self._cond:
            self._closed = True
            self._cond.notify()
        if self._thread.is_alive():
            self._thread.join(timeout)

    # -- worker ------------------------------------------------------------------------------------
    def _loop(self) -> None:
        while (batch := self._next_batch()) is not None:
            self._execute(batch)

    def _next_batch(self) -> list[_Request] | None:
        with self._cond:
            while True:
                if not self._queue or self._running:  # nothing to do, or a caller runs its own batch of one
                    if self._closed and not self._queue:
                        return None
                    self._cond.wait()
                    continue
                take, ready = self._candidate()
                wait = self._queue[0].enqueued + self._delay_s - time.perf_counter()
                if ready or wait <= 0 or self._closed:
                    for request in take:
                        self._queue.remove(request)
                    self._running = True
                    return take
                self._cond.wait(wait)

    def _candidate(self) -> tuple[list[_Request], bool]:
        """The batch the head of the queue would form now, and whether it should go without waiting.

        Compatible requests are taken in arrival order while they fit in ``max_batch_size``. The batch
        is ready when its rows reach ``max_batch_size`` or a preferred size; when several requests
        piled up, it is cut at the largest preferred size they reach.
        """
        head = self._queue[0]
        take, rows = [head], head.rows
        cut_at = 1 if rows in self._preferred else 0
        if head.signature is not None:
            for request in list(self._queue)[1:]:
                if request.signature != head.signature:
                    continue
                if rows + request.rows > self.settings.max_batch_size:
                    break
                take.append(request)
                rows += request.rows
                if rows in self._preferred:
                    cut_at = len(take)
        if rows >= self.settings.max_batch_size:
            return take, True
        if cut_at:
            return take[:cut_at], True
        return take, False

    def _execute(self, batch: list[_Request]) -> None:
        """Run ``batch`` (``_running`` set by whoever took it), then clear ``_running`` before the results go
        out: a request that arrives once its caller has an answer finds the batcher idle, even while this
        thread is still handing out the other results and calling the metrics hook."""
        started = time.perf_counter()
        rows = [r.rows for r in batch]
        size = sum(rows)
        error: BaseException | None = None
        try:
            with torch.inference_mode():
                if len(batch) == 1:  # nothing to merge: the request's own tensors, bit-exact
                    parts = [as_tensor_list(self.fn(*batch[0].tensors))]
                else:
                    inputs = [torch.cat(column) for column in zip(*(r.tensors for r in batch), strict=True)]
                    parts = _split(as_tensor_list(self.fn(*inputs)), rows)
        except BaseException as exc:  # noqa: BLE001 - a failed batch fails its own requests, not the worker
            error = exc
        finally:
            finished = time.perf_counter()
            run_ms = (finished - started) * 1e3
            waits = [(started - r.enqueued) * 1e3 for r in batch]
            with self._cond:
                s = self._stats
                s.batches += 1
                s.requests += len(batch)
                s.rows += size
                s.sizes[size] += 1
                s.failed_batches += error is not None
                s.wait_ms_total += sum(waits)
                s.run_ms_total += run_ms
                self._running = False  # the model is done with this batch: the next may start
                self._cond.notify()  # the worker, when a caller ran its own batch of one
        for i, (request, wait_ms) in enumerate(zip(batch, waits, strict=True)):
            future = request.future
            future.queue_ms, future.run_ms, future.batch_size = wait_ms, run_ms, size
            if error is not None:
                future.set_exception(error)
            else:
                future.set_result(parts[i])
        if self._on_batch is not None:
            try:
                self._on_batch(self.key, size, max(waits), run_ms)
            except Exception:  # noqa: BLE001 - a broken metrics hook must not stop serving
                log.exception("on_batch callback failed for %s", self.key)


def _split(outputs: list[torch.Tensor], rows: list[int]) -> list[list[torch.Tensor]]:
    """Per request, its slice of every output; an output without the batch dimension is an error."""
    total = sum(rows)
    for i, out in enumerate(outputs):
        if out.dim() == 0 or out.shape[0] != total:
            raise ValueError(
                f"output {i} has shape {tuple(out.shape)}, not a leading batch dimension of {total}: "
                "this model cannot be batched (set batching max_batch_size: 1 for it)"
            )
    slices = [out.split(rows) for out in outputs]
    return [[s[i] for s in slices] for i in range(len(rows))]


class Batchers:
    """The daemon's batchers, one per key, created on first use with that model's settings.

    ``settings_for(model_name)`` resolves a model's settings (defaults plus its overrides);
    ``on_batch`` callbacks (see :data:`BatchCallback`) see every batch of every key.
    """

    def __init__(
        self,
        settings_for: Callable[[str], BatchSettings] | BatchSettings,
        on_batch: BatchCallback | None = None,
    ) -> None:
        if isinstance(settings_for, BatchSettings):
            settings_for.validate()
            fixed = settings_for
            settings_for = lambda _model: fixed  # noqa: E731
        self._settings_for = settings_for
        # Replaced, never mutated, under _lock: the worker threads iterate a snapshot.
        self._listeners: tuple[BatchCallback, ...] = (on_batch,) if on_batch else ()
        self._batchers: dict[BatchKey, DynamicBatcher] = {}
        self._lock = threading.Lock()  # guards _batchers and _listeners

    def settings(self, model: str) -> BatchSettings:
        """The batching settings ``model`` runs with."""
        return self._settings_for(model)

    def add_listener(self, on_batch: BatchCallback) -> None:
        """Also call ``on_batch`` after every batch (metrics hook up here)."""
        with self._lock:
            self._listeners = (*self._listeners, on_batch)

    def runner(self, model: str, part: int | str, fn: Callable[..., Any]) -> DirectRunner | DynamicBatcher:
        """What runs ``fn`` (model ``model``'s ``part``) for a caller: shared batcher, or a direct call."""
        settings = self._settings_for(model)
        if not settings.active:
            return DirectRunner(fn)
        key = BatchKey(model, part)
        with self._lock:
            batcher = self._batchers.get(key)
            if batcher is None:
                batcher = self._batchers[key] = DynamicBatcher(key, fn, settings, self._notify).start()
                log.info(
                    "batching %s: max %d rows, preferred %s, delay %.1f ms",
                    key,
                    settings.max_batch_size,
                    settings.preferred_batch_sizes or "-",
                    settings.max_queue_delay_ms,
                )
        return batcher

    def run(self, model: str, part: int | str, fn: Callable[..., Any], tensors: Sequence[torch.Tensor]) -> RunResult:
        """Run one request through ``fn``, batched with others when the model's settings say so."""
        return self.runner(model, part, fn).run(tensors)

    def queue_depth(self, model: str | None = None) -> int:
        """Requests waiting in every batcher (of ``model`` only, when given)."""
        with self._lock:
            batchers = list(self._batchers.items())
        return sum(b.queue_depth() for k, b in batchers if model is None or k.model == model)

    def stats(self) -> dict[BatchKey, BatchStats]:
        with self._lock:
            batchers = list(self._batchers.items())
        return {k: b.stats() for k, b in batchers}

    def close(self) -> None:
        with self._lock:
            batchers, self._batchers = list(self._batchers.values()), {}
        for batcher in batchers:
            batcher.close()

    def _notify(self, key: Hashable, size: int, wait_ms: float, run_ms: float) -> None:
        for listener in self._listeners:  # a snapshot: add_listener replaces the tuple
            try:
                listener(key, size, wait_ms, run_ms)
            except Exception:  # noqa: BLE001 - one broken hook must not hide the batch from the others
                log.exception("on_batch listener failed for %s", key)
