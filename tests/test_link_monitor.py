"""The live link estimate ignores one odd request but follows a real change within a few."""

import pytest

from edge_node.link import LinkMonitor


def test_estimate_follows_a_step_change_and_ignores_outliers() -> None:
    monitor = LinkMonitor(window=5)
    monitor.record_probe(rtt_ms=10.0, up_mbps=100.0, down_mbps=100.0)
    nbytes = 125_000  # 1 Mbit
    for _ in range(4):
        monitor.record_transfer(nbytes, 100, wire_ms=10.0 + 10.0)  # 1 Mbit in 10 ms: 100 Mbit/s
    monitor.record_transfer(nbytes, 100, wire_ms=10.0 + 1000.0)  # one slow request: 1 Mbit/s
    assert monitor.snapshot().up_mbps == 100.0
    for _ in range(2):
        monitor.record_transfer(nbytes, 100, wire_ms=10.0 + 1000.0)  # the link really dropped
    assert abs(monitor.snapshot().up_mbps - 1.0) < 1e-6
    before = monitor.snapshot().samples
    monitor.record_transfer(100, 100, wire_ms=50.0)  # too small to say anything
    monitor.record_transfer(nbytes, 100, wire_ms=10.5)  # hidden inside the RTT: says nothing either
    assert monitor.snapshot().samples == before
    assert monitor.snapshot().rtt_ms == 10.0


def test_a_probe_replaces_what_requests_said() -> None:
    monitor = LinkMonitor(window=5)
    for _ in range(5):
        monitor.record_transfer(125_000, 100, wire_ms=10.0)
    monitor.record_probe(rtt_ms=80.0, up_mbps=0.3, down_mbps=0.4)
    snap = monitor.snapshot()
    assert (snap.rtt_ms, snap.up_mbps, snap.down_mbps) == (80.0, 0.3, 0.4)


def test_a_request_that_times_out_bounds_the_uplink() -> None:
    monitor = LinkMonitor(window=5)
    monitor.record_probe(rtt_ms=10.0, up_mbps=100.0, down_mbps=100.0)
    before = monitor.snapshot().samples
    monitor.record_stall(bytes_up=1_000, waited_ms=5_000.0)  # too small to bound anything useful
    assert monitor.snapshot().samples == before
    # 125 kB unanswered after 10 s: the uplink moved 1 Mbit in no less than 10 s, so at most 0.1 Mbit/s.
    monitor.record_stall(bytes_up=125_000, waited_ms=10_000.0)
    snap = monitor.snapshot()
    assert snap.up_mbps == pytest.approx(0.1)
    assert snap.samples == before + 1
    assert snap.down_mbps == 100.0  # nothing was learnt about the downlink


def test_a_fixed_cost_per_request_is_kept_apart_from_the_bandwidth() -> None:
    """Small requests that each pay 10 ms more than the probe's RTT and rates: overhead, not a slow link."""
    monitor = LinkMonitor(window=5)
    monitor.record_probe(rtt_ms=10.0, up_mbps=20.0, down_mbps=20.0)
    nbytes = 50_000  # 20 ms at 20 Mbit/s
    for _ in range(5):
        monitor.record_transfer(nbytes, 2_000, wire_ms=10.0 + 20.0 + 0.8 + 10.0)
    snap = monitor.snapshot()
    assert snap.overhead_ms == pytest.approx(10.0)
    assert snap.up_mbps == pytest.approx(20.0 * 20.0 / 20.8, rel=0.01)  # without it: 9.8 Mbit/s
    # A residual far over the RTT is the link changing: bandwidth, not overhead.
    for _ in range(3):
        monitor.record_transfer(nbytes, 2_000, wire_ms=10.0 + 400.0)
    snap = monitor.snapshot()
    assert snap.overhead_ms == pytest.approx(10.0) and snap.up_mbps < 1.1


def test_slow_requests_of_an_overhead_near_the_cap_count_at_the_cap() -> None:
    """A throttled edge pays about 2 RTTs per request, half its requests more: not the median of the fast half."""
    monitor = LinkMonitor(window=5)
    monitor.record_probe(rtt_ms=10.0, up_mbps=100.0, down_mbps=100.0)  # overhead cap: 2 RTTs, 20 ms
    for residual in (12.0, 25.0, 14.0, 26.0, 27.0):  # median 25; dropping those over the cap left 13
        monitor.record_transfer(0, 0, wire_ms=10.0 + residual)
    assert monitor.snapshot().overhead_ms == pytest.approx(20.0)
    for residual in (12.0, 14.0, 16.0):  # a faster majority: their median, not the cap
        monitor.record_transfer(0, 0, wire_ms=10.0 + residual)
    assert monitor.snapshot().overhead_ms == pytest.approx(16.0)


def test_small_requests_that_match_the_estimate_keep_it_fresh() -> None:
    """A 9 KB image at 1 Mbit/s (72 ms on the wire) confirms the estimate; nothing else does."""
    monitor = LinkMonitor(window=5)
    monitor.record_probe(rtt_ms=10.0, up_mbps=1.0, down_mbps=1.0)
    probed_at = monitor.updated
    samples = monitor.snapshot().samples
    monitor.record_transfer(9_000, 100, wire_ms=10.0 + 73.0)  # as the estimate says: 72.8 ms
    confirmed_at = monitor.updated
    assert confirmed_at > probed_at
    assert monitor.snapshot().samples == samples  # fresher, but not a bandwidth sample
    monitor.record_transfer(9_000, 100, wire_ms=10.0 + 4.0)  # 18x faster: the link changed
    monitor.record_transfer(9_000, 100, wire_ms=10.0 + 400.0)  # 5x slower: changed too
    assert monitor.updated == confirmed_at
    fast = LinkMonitor(window=5)
    fast.record_probe(rtt_ms=10.0, up_mbps=100.0, down_mbps=100.0)
    probed_at = fast.updated
    fast.record_transfer(9_000, 100, wire_ms=10.0 + 0.8)  # 0.7 ms expected: lost in the timer's noise
    assert fast.updated == probed_at


def test_the_running_medians_are_statistics_medians() -> None:
    import random
    import statistics
    from collections import deque

    from edge_node.link import _median

    rng = random.Random(3)
    for n in range(12):
        window = deque((rng.uniform(0, 50) for _ in range(n)), maxlen=5)
        assert _median(window) == (statistics.median(window) if window else 0.0)
    monitor = LinkMonitor(window=4)
    for rtt in (5.0, 1.0, 9.0, 2.0, 7.0, 3.0):
        monitor.record_rtt(rtt)
        assert monitor._rtt_p50 == statistics.median(monitor._rtt) == monitor.snapshot().rtt_ms
    monitor.record_probe(4.0, 100.0, 100.0)
    assert monitor._rtt_p50 == 4.0 == monitor.snapshot().rtt_ms
