"""Live estimates of the edge-to-cloud link from probes and from the traffic itself."""

from __future__ import annotations

import threading
import time
from collections import deque
from dataclasses import dataclass


@dataclass
class LinkEstimate:
    rtt_ms: float = 0.0
    up_mbps: float = 0.0
    down_mbps: float = 0.0
    samples: int = 0
    overhead_ms: float = 0.0  # what a request spends on the wire beyond one RTT and its bytes at the probed rates


def _median(window: deque[float]) -> float:
    """The median of a short window (0.0 when empty), as ``statistics.median`` gives it, without its
    call: a request runs this with the caches cold after a model's compute. The monitor's one median."""
    n = len(window)
    if n == 0:
        return 0.0
    values = sorted(window)
    return values[n // 2] if n % 2 else (values[n // 2 - 1] + values[n // 2]) / 2


class LinkMonitor:
    """The link as measured most recently.

    RTT comes from probe round trips. Throughput comes from requests: bytes sent over the time the
    request spent on the wire (round trip minus the cloud's own time minus one RTT); each
    direction's estimate is the median of the last ``window`` of them, which ignores a single odd
    request yet follows a real step change (a link dropping 100x) within a few requests, where a
    slow moving average would take dozens. Requests too small to say anything about bandwidth are
    ignored. An active probe is a deliberate measurement over more bytes: it replaces the window.

    A request also pays a fixed cost that a probe does not see: its messages' framing and flow
    control, the serving threads on both sides (slow on a throttled device). Measured against the
    last probe's rates, what a request spent beyond one RTT and its bytes is that overhead (median
    of the last ``window``); it is kept apart from the bandwidth, so a small request's time does not
    read as a slow link, and the planner adds it to every request that goes to the cloud. The overhead
    is capped at ``OVERHEAD_CAP_RTTS`` RTTs (at least ``OVERHEAD_CAP_MS``). A residual over the cap but
    within twice it is a slow request of an overhead near the cap (a throttled edge spends about 2 RTTs
    per request, and half its requests more): it counts as the cap, so the median stays that of the
    residuals as long as fewer than half are over it (dropped, they left only the faster half, and the
    edge 24x slower than the cloud learnt 12.6 ms where its requests paid a median 20.4). A residual
    over twice the cap is the link changing, not overhead: it counts as bandwidth only.

    A request too small to be a bandwidth sample can still confirm the estimate: when its bytes take
    measurably long at the estimated rates and it took that long (within ``CONFIRM_RATIO``), the
    estimate is as fresh as this request, so a slow link carrying small payloads (a JPEG at 1 Mbit/s)
    is not probed every ``probe_interval_s`` with more bytes than its requests send. A request that
    disagrees, or whose bytes hide in the timer's noise, confirms nothing and the probe still runs.
    """

    MIN_BYTES = 16 << 10
    OVERHEAD_CAP_RTTS = 2.0
    OVERHEAD_CAP_MS = 10.0
    CONFIRM_RATIO = 1.5

    def __init__(self, window: int = 5) -> None:
        self._rtt: deque[float] = deque(maxlen=window)
        self._rtt_p50 = 0.0  # the median of _rtt, kept as _rtt changes (probes): requests only read it
        self._up: deque[float] = deque(maxlen=window)
        self._down: deque[float] = deque(maxlen=window)
        self._overhead: deque[float] = deque(maxlen=window)
        self._probed: tuple[float, float] | None = None  # the last probe's (up, down) Mbit/s
        self._samples = 0
        self._lock = threading.Lock()
        self.updated = 0.0  # monotonic time of the last throughput measurement (probe or traffic)

    def record_rtt(self, rtt_ms: float) -> None:
        with self._lock:
            self._rtt.append(rtt_ms)
            self._rtt_p50 = _median(self._rtt)

    def record_probe(self, rtt_ms: float, up_mbps: float, down_mbps: float) -> None:
        with self._lock:
            for window, value in ((self._rtt, rtt_ms), (self._up, up_mbps), (self._down, down_mbps)):
                window.clear()
                window.append(value)
            self._rtt_p50 = rtt_ms
            self._probed = (up_mbps, down_mbps) if up_mbps > 0 and down_mbps > 0 else None
            self._samples += 1
            self.updated = time.monotonic()

    def record_transfer(self, bytes_up: int, bytes_down: int, wire_ms: float) -> None:
        """``wire_ms``: round trip minus the cloud's processing time."""
        with self._lock:
            rtt = self._rtt_p50
            if self._probed is not None:
                up, down = self._probed
                residual = wire_ms - rtt - bytes_up * 8 / (up * 1e3) - bytes_down * 8 / (down * 1e3)
                cap = max(self.OVERHEAD_CAP_RTTS * rtt, self.OVERHEAD_CAP_MS)
                if residual <= 2 * cap:
                    self._overhead.append(min(max(residual, 0.0), cap))
            wire_ms -= _median(self._overhead)
            if wire_ms - rtt < max(1.0, 0.25 * rtt):
                return  # the transfer hid inside the RTT (or timer noise): it says nothing about bandwidth
            seconds = (wire_ms - rtt) / 1e3
            if bytes_up >= self.MIN_BYTES and bytes_up >= bytes_down:
                self._up.append(bytes_up * 8 / seconds / 1e6)
            elif bytes_down >= self.MIN_BYTES:
                self._down.append(bytes_down * 8 / seconds / 1e6)
            else:
                if self._confirms(bytes_up, bytes_down, wire_ms - rtt, rtt):
                    self.updated = time.monotonic()
                return
            self._samples += 1
            self.updated = time.monotonic()

    def _confirms(self, bytes_up: int, bytes_down: int, transfer_ms: float, rtt: float) -> bool:
        """Whether a small request's ``transfer_ms`` says the estimated rates still hold (lock held)."""
        if not (self._up and self._down):
            return False
        up, down = _median(self._up), _median(self._down)
        if up <= 0 or down <= 0:
            return False
        expected = bytes_up * 8 / (up * 1e3) + bytes_down * 8 / (down * 1e3)
        if expected < max(1.0, 0.25 * rtt):
            return False  # the bytes take too little time at these rates to tell a change apart from noise
        return expected / self.CONFIRM_RATIO <= transfer_ms <= expected * self.CONFIRM_RATIO

    def record_stall(self, bytes_up: int, waited_ms: float) -> None:
        """A request sent ``bytes_up`` and got no answer within ``waited_ms``: an upper bound on the uplink.

        On a link that collapsed, requests time out and fall back locally, so no transfer ever completes
        to measure it; without this the estimate would keep the old, fast rate and the plan would stay split.
        """
        if bytes_up < self.MIN_BYTES or waited_ms <= 0:
            return
        bound = bytes_up * 8 / (waited_ms / 1e3) / 1e6
        with self._lock:
            if self._up and bound < 0.5 * _median(self._up):
                self._up.clear()  # a hard bound far under the estimate: older, faster samples are stale
            self._up.append(bound)
            self._samples += 1
            self.updated = time.monotonic()

    def snapshot(self) -> LinkEstimate:
        with self._lock:
            return LinkEstimate(
                self._rtt_p50,
                _median(self._up),
                _median(self._down),
                self._samples,
                _median(self._overhead),
            )
