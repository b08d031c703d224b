"""The cloud daemon's own Prometheus metrics: tail requests, their stages and bytes, sessions, jobs.

Per-RPC counts and latency come from :class:`runtime.metrics.RpcMetrics`; this module adds what
happens inside the ``Infer`` streams (one gRPC call carries many requests, some of which fail on
their own while the stream goes on) and the state a scrape reads directly (open sessions, jobs by
state, the batcher's queue). Outcomes and stage timings are recorded where the stream's results
pass through the servicer, so the session and batching logic stay free of metrics code; bytes are
counted where gRPC parses and serializes the stream's messages (:meth:`CloudMetrics.wire_bytes`),
from the bytes themselves.
"""

from __future__ import annotations

import logging
import sqlite3
from collections.abc import Hashable, Iterable, Iterator
from typing import Any

import grpc
from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from protos.cleave.v1 import split_inference_pb2 as si_pb2
from runtime.metrics import STAGE_BUCKETS, LabelCache
from runtime.serving import WireBytes

from .jobs.store import CANCELLED, FAILED, QUEUED, RUNNING, SUCCEEDED, JobStore
from .sessions import SessionManager

log = logging.getLogger(__name__)

JOB_STATES = (QUEUED, RUNNING, SUCCEEDED, FAILED, CANCELLED)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)
_CODE_NAMES = {code.value[0]: code.name for code in grpc.StatusCode}


class CloudMetrics:
    """Metrics of the tail requests served on ``Infer`` streams, plus gauges read on scrape."""

    def __init__(
        self, registry: CollectorRegistry, sessions: SessionManager | None = None, jobs: JobStore | None = None
    ) -> None:
        self.requests = Counter(
            "cleave_cloud_tail_requests_total",
            "Tail requests answered on Infer streams, by status code (a failed request does not end its stream).",
            ["code"],
            registry=registry,
        )
        self.stage = Histogram(
            "cleave_cloud_stage_seconds",
            "Per-request cloud stages, seconds: queue (batching), decode (features), compute (tail), encode (result).",
            ["stage"],
            buckets=STAGE_BUCKETS,
            registry=registry,
        )
        self.received_bytes = Counter(
            "cleave_cloud_received_bytes_total",
            "Bytes of feature frames received on Infer streams (serialized message size).",
            registry=registry,
        )
        self.sent_bytes = Counter(
            "cleave_cloud_sent_bytes_total",
            "Bytes of result frames sent on Infer streams (serialized message size).",
            registry=registry,
        )
        self.batch_size = Histogram(
            "cleave_cloud_batch_size",
            "Requests run together in one batch, by model (only with batching: on).",
            ["model"],
            buckets=BATCH_BUCKETS,
            registry=registry,
        )
        # Status codes, stages and model names: fixed sets.
        self._requests = LabelCache(self.requests)
        self._stage = LabelCache(self.stage)
        self._batch_size = LabelCache(self.batch_size)
        batchers = getattr(sessions, "batchers", None)
        if batchers is not None:
            batchers.add_listener(self.on_batch)
        self._registry = registry
        registry.register(_StateCollector(sessions, batchers))
        if jobs is not None:
            self.watch_jobs(jobs)

    def watch_jobs(self, jobs: JobStore) -> None:
        """Report ``cleave_jobs{state}`` from ``jobs`` on every scrape."""
        self._registry.register(_JobsCollector(jobs))

    def on_batch(self, key: Hashable, size: int, wait_ms: float = 0.0, run_ms: float = 0.0) -> None:
        """The batcher's ``on_batch(key, size, wait_ms, run_ms)`` hook: one batch of ``size`` ran."""
        self._batch_size(getattr(key, "model", str(key))).observe(size)

    # -- the Infer stream ------------------------------------------------------------------------
    def wire_bytes(self) -> dict[str, WireBytes]:
        """``Service(..., wire_bytes=...)`` for SplitInference: ``Infer``'s frames and results counted
        by the length of their bytes as they arrive and leave, without encoding them again."""
        return {"Infer": WireBytes(received=self.received_bytes.inc, sent=self.sent_bytes.inc)}

    def results(self, results: Iterable[si_pb2.InferResult]) -> Iterator[si_pb2.InferResult]:
        """Pass an Infer stream's results through, counting outcomes and stage timings."""
        for result in results:
            if result.last:
                self._record(result)
            yield result

    def _record(self, result: si_pb2.InferResult) -> None:
        if result.HasField("error"):
            # The cloud sets these codes itself (from gRPC's set), so the label values stay few.
            self._requests(_CODE_NAMES.get(result.error.code, str(result.error.code))).inc()
            return
        self._requests("OK").inc()
        timing = result.timing
        if timing.queue_ms > 0:  # only a batcher measures a queue; 0 means there was none
            self._stage("queue").observe(timing.queue_ms / 1e3)
        self._stage("decode").observe(timing.decode_ms / 1e3)
        self._stage("compute").observe(timing.compute_ms / 1e3)
        self._stage("encode").observe(timing.encode_ms / 1e3)


class _StateCollector(Collector):
    """Gauges read when scraped: open sessions and batch queues."""

    def __init__(self, sessions: SessionManager | None, batchers: Any = None) -> None:
        self.sessions = sessions
        self.batchers = batchers  # cloud_node.batching.Batchers: queue_depth(model)

    def collect(self) -> Iterator[GaugeMetricFamily]:
        if self.sessions is None:
            return
        yield GaugeMetricFamily(
            "cleave_cloud_sessions", "Edge sessions open (not closed or expired).", value=len(self.sessions)
        )
        queue = GaugeMetricFamily(
            "cleave_cloud_queue_depth", "Requests waiting for a batch, by model (0 without batching).", labels=["model"]
        )
        for model in self.sessions.registry.models:
            queue.add_metric([model], self.batchers.queue_depth(model) if self.batchers is not None else 0)
        yield queue


class _JobsCollector(Collector):
    """``cleave_jobs{state}``: Compression jobs in the store by state, counted when scraped."""

    def __init__(self, jobs: JobStore) -> None:
        self.jobs = jobs

    def collect(self) -> Iterator[GaugeMetricFamily]:
        try:
            counts = [(state, self.jobs.count([state])) for state in JOB_STATES]
        except sqlite3.Error as exc:  # closed during shutdown: report nothing rather than fail the scrape
            log.debug("jobs gauge: %s", exc)
            return
        family = GaugeMetricFamily("cleave_jobs", "Compression jobs in the store, by state.", labels=["state"])
        for state, count in counts:
            family.add_metric([state], count)
        yield family
