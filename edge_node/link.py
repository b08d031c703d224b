"""Live estimates of the edge-to-cloud link from probes and from the traffic itself."""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass


@dataclass
class LinkEstimate:
    rtt_ms: float = 0.0
    up_mbps: float = 0.0
    down_mbps: float = 0.0
    samples: int = 0


class LinkMonitor:
    """Exponentially weighted averages of RTT and throughput.

    RTT comes from probe round trips. Throughput comes from requests: bytes sent over the time the
    request spent on the wire (round trip minus the cloud's own time minus one RTT). Requests too
    small to say anything about bandwidth are ignored for throughput.
    """

    MIN_BYTES = 16 << 10

    def __init__(self, alpha: float = 0.2) -> None:
        self.alpha = alpha
        self._estimate = LinkEstimate()
        self._lock = threading.Lock()
        self.updated = 0.0  # monotonic time of the last throughput measurement (probe or traffic)

    def _blend(self, old: float, new: float) -> float:
        return new if old == 0.0 else (1 - self.alpha) * old + self.alpha * new

    def record_rtt(self, rtt_ms: float) -> None:
        with self._lock:
            self._estimate.rtt_ms = self._blend(self._estimate.rtt_ms, rtt_ms)

    def record_probe(self, rtt_ms: float, up_mbps: float, down_mbps: float) -> None:
        """An active measurement replaces the estimate: it is the freshest and most direct."""
        with self._lock:
            e = self._estimate
            e.rtt_ms, e.up_mbps, e.down_mbps = rtt_ms, up_mbps, down_mbps
            e.samples += 1
            self.updated = time.monotonic()

    def record_transfer(self, bytes_up: int, bytes_down: int, wire_ms: float) -> None:
        """``wire_ms``: round trip minus the cloud's processing time."""
        with self._lock:
            est = self._estimate
            seconds = max(wire_ms - est.rtt_ms, 0.05) / 1e3
            if bytes_up >= self.MIN_BYTES and bytes_up >= bytes_down:
                est.up_mbps = self._blend(est.up_mbps, bytes_up * 8 / seconds / 1e6)
            elif bytes_down >= self.MIN_BYTES:
                est.down_mbps = self._blend(est.down_mbps, bytes_down * 8 / seconds / 1e6)
            else:
                return  # too small to say anything about bandwidth
            est.samples += 1
            self.updated = time.monotonic()

    def snapshot(self) -> LinkEstimate:
        with self._lock:
            e = self._estimate
            return LinkEstimate(e.rtt_ms, e.up_mbps, e.down_mbps, e.samples)
