"""The edge daemon's own Prometheus metrics: where requests ran, their stages, bytes and the link.

Per-RPC counts and latency come from :class:`runtime.metrics.RpcMetrics`. This module adds:

- histograms, fed by the one place an outcome is recorded (``Counters.record`` calls
  :meth:`EdgeMetrics.observe` with every :class:`~edge_node.runtime.Outcome`);
- counters and gauges read from the runtime on every scrape (the runtime already keeps them for
  ``GetStatus``), so the two views can never disagree and the request path pays nothing for them.
"""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client import CollectorRegistry, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from partitioner.placement import Placement
from protos.cleave.v1 import edge_pb2
from runtime.metrics import RPC_BUCKETS, STAGE_BUCKETS, LabelCache

from .runtime import EdgeRuntime, Outcome


class EdgeMetrics:
    """Registers the edge's metrics in ``registry`` and listens to ``runtime``'s outcomes."""

    def __init__(self, registry: CollectorRegistry, runtime: EdgeRuntime) -> None:
        self.runtime = runtime
        self.request_seconds = Histogram(
            "cleave_edge_request_seconds",
            "End-to-end latency of served requests, seconds, by where they ran (local: fell back to the edge).",
            ["placement"],
            buckets=RPC_BUCKETS,
            registry=registry,
        )
        self.stage_seconds = Histogram(
            "cleave_edge_stage_seconds",
            "Per-request stages, seconds: head, encode, transfer (wire and gRPC, cloud time excluded), cloud "
            "(its queue, decode, tail and encode), decode (result), local_tail (after a fallback), "
            "whole_model (edge-only plans).",
            ["stage"],
            buckets=STAGE_BUCKETS,
            registry=registry,
        )
        self._request = LabelCache(self.request_seconds)  # placements and stages: fixed sets
        self._stage = LabelCache(self.stage_seconds)
        registry.register(_RuntimeCollector(runtime))
        runtime.counters.subscribe(self.observe)

    def observe(self, outcome: Outcome) -> None:
        """Record one served request's latency and stage timings."""
        t = outcome.timing
        self._request(outcome.placement.value).observe(t.total_ms / 1e3)
        stage = self._stage
        if outcome.placement == Placement.EDGE_ONLY:
            stage("whole_model").observe(t.edge_compute_ms / 1e3)
            return
        if outcome.placement == Placement.LOCAL_FALLBACK:
            stage("head").observe(max(t.edge_compute_ms - outcome.local_tail_ms, 0.0) / 1e3)
            if t.encode_ms > 0:  # the cloud was tried (deadline or error) before the tail ran here
                stage("encode").observe(t.encode_ms / 1e3)
            stage("local_tail").observe(outcome.local_tail_ms / 1e3)
            return
        cloud_ms = t.cloud_queue_ms + t.cloud_decode_ms + t.cloud_compute_ms + t.cloud_encode_ms
        stage("head").observe(t.edge_compute_ms / 1e3)
        stage("encode").observe(t.encode_ms / 1e3)
        stage("transfer").observe(t.transfer_ms / 1e3)
        stage("cloud").observe(cloud_ms / 1e3)
        stage("decode").observe(t.decode_ms / 1e3)


class _RuntimeCollector(Collector):
    """Counters and gauges the runtime keeps anyway, read consistently when scraped."""

    def __init__(self, runtime: EdgeRuntime) -> None:
        self.runtime = runtime

    def collect(self) -> Iterator[Metric]:
        runtime = self.runtime
        cloud = runtime.link
        c: edge_pb2.Counters = runtime.counters.to_proto(cloud.sessions_opened, cloud.reconnects)  # one snapshot
        requests = CounterMetricFamily(
            "cleave_edge_requests",
            "Requests served, by where they ran: split (head here, tail in the cloud), cloud (the input sent), "
            "edge (edge-only plan), local (meant for the cloud, finished here).",
            labels=["placement"],
        )
        for name, value in (("split", c.split), ("cloud", c.cloud_only), ("edge", c.edge_only), ("local", c.fallback)):
            requests.add_metric([name], value)
        yield requests
        yield CounterMetricFamily(
            "cleave_edge_fallbacks",
            "Requests meant for the cloud that finished here (cloud unreachable, late or failing).",
            value=c.fallback,
        )
        yield CounterMetricFamily(
            "cleave_edge_request_errors", "Accepted requests that failed on the edge itself.", value=c.errors
        )
        yield CounterMetricFamily(
            "cleave_edge_sent_bytes", "Bytes of feature frames sent to the cloud (serialized size).", value=c.bytes_up
        )
        yield CounterMetricFamily(
            "cleave_edge_received_bytes",
            "Bytes of result frames received from the cloud (serialized size).",
            value=c.bytes_down,
        )
        yield CounterMetricFamily(
            "cleave_edge_plan_switches",
            "Plans put in force by a pin or a re-plan (the first included).",
            value=c.plan_switches,
        )
        yield CounterMetricFamily(
            "cleave_edge_sessions_opened",
            "Cloud sessions opened: the first, one per plan switch to a new cut, and each reconnection.",
            value=c.sessions_opened,
        )
        yield CounterMetricFamily(
            "cleave_edge_reconnects",
            "Cloud sessions opened to replace one whose stream broke (the cloud went away or restarted).",
            value=c.reconnects,
        )
        yield GaugeMetricFamily("cleave_edge_inflight", "Requests being served now.", value=runtime.inflight)
        yield GaugeMetricFamily(
            "cleave_edge_cloud_reachable",
            "1 while a cloud session and stream are up.",
            value=int(runtime.link.reachable),
        )
        link = runtime.link.monitor.snapshot()
        yield GaugeMetricFamily("cleave_edge_link_rtt_seconds", "Estimated round-trip time.", value=link.rtt_ms / 1e3)
        yield GaugeMetricFamily(
            "cleave_edge_link_up_mbps", "Estimated uplink bandwidth, Mbit/s (0: not measured).", value=link.up_mbps
        )
        yield GaugeMetricFamily(
            "cleave_edge_link_down_mbps",
            "Estimated downlink bandwidth, Mbit/s (0: not measured).",
            value=link.down_mbps,
        )
        plan = runtime.plan
        info = GaugeMetricFamily(
            "cleave_edge_plan_info", "The plan in force (always 1).", labels=["placement", "cut", "encoding"]
        )
        info.add_metric([plan.placement.value, plan.cut.name if plan.cut else "", str(plan.spec)], 1)
        yield info
