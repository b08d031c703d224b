"""Profiles taken under a CPU quota: node and codec costs are what they cost in a sustained run.

A CFS quota lets a process run at full speed until the period's share is spent, then stops it until the
next period. Timed one by one, a short call either fits in a share (its CPU time) or waits a period, so
medians of wall times took some codecs at full speed and others throttled (int4 at 1.0 ms/MB, int8 at
40 ms/MB on an edge 24x slower than the cloud). These tests run the profile's timing code on a simulated
quota (:class:`CfsClock`), where the result can be compared with the sustained cost exactly.
"""

from __future__ import annotations

import math
import types

import pytest

from partitioner import profile as profile_mod
from partitioner.profile import Profile, interleaved_ms, measure_codecs, node_costs


class CfsClock:
    """Wall and CPU clocks of one single-threaded process under a CFS quota of ``cores`` per ``period_ms``."""

    def __init__(self, cores: float, period_ms: float) -> None:
        self.cores, self.period = cores, period_ms
        self.wall = self.cpu = 0.0  # ms
        self.share = cores * period_ms  # CPU ms left in the current period

    def work(self, cpu_ms: float) -> None:
        """Run ``cpu_ms`` of CPU work: at full speed while the period's share lasts, then wait for the next."""
        while cpu_ms > 1e-12:
            boundary = (math.floor(self.wall / self.period + 1e-9) + 1) * self.period
            if self.share <= 1e-12:  # throttled: nothing runs until the next period
                self.wall, self.share = boundary, self.cores * self.period
                continue
            run = min(cpu_ms, self.share, boundary - self.wall)
            self.wall += run
            self.cpu += run
            self.share -= run
            cpu_ms -= run
            if self.wall >= boundary - 1e-12:
                self.share = self.cores * self.period

    def module(self) -> types.SimpleNamespace:
        """A stand-in for the ``time`` module (seconds, as time's clocks)."""
        return types.SimpleNamespace(
            perf_counter=lambda: self.wall / 1e3,
            process_time=lambda: self.cpu / 1e3,
            thread_time=lambda: self.cpu / 1e3,
        )


# CPU ms per call of each codec on the simulated edge: a small one (fits in a share) and larger ones.
CPU_MS = {"int4": (0.4, 0.3), "int8": (1.6, 0.5), "raw": (3.0, 2.0)}
MB = (1 << 18) * 4 / 1e6  # measure_codecs' features: 2**18 float32 values


@pytest.fixture
def quota(monkeypatch: pytest.MonkeyPatch) -> CfsClock:
    """A 0.1-core quota with 10 ms periods (a share of 1 ms), whose clocks the profile module reads."""
    clock = CfsClock(cores=0.1, period_ms=10.0)
    monkeypatch.setattr(profile_mod, "time", clock.module())

    def encode(x, spec, tables=None):
        clock.work(CPU_MS[str(spec)][0])
        return str(spec)

    def decode(msg, tables=None):
        clock.work(CPU_MS[msg][1])

    monkeypatch.setattr(profile_mod, "encode", encode)
    monkeypatch.setattr(profile_mod, "decode", decode)
    return clock


def test_the_simulated_quota_throttles_like_cfs() -> None:
    clock = CfsClock(cores=0.1, period_ms=10.0)
    clock.work(0.5)
    assert clock.wall == pytest.approx(0.5)  # inside the share: full speed
    clock.work(1.0)  # 0.5 left in this period's share, then the rest in the next period
    assert clock.wall == pytest.approx(10.5) and clock.cpu == pytest.approx(1.5)
    clock.work(100.0)
    assert clock.wall / clock.cpu == pytest.approx(10.0, rel=0.1)  # sustained: 1/quota


def test_codec_costs_under_a_quota_are_their_sustained_cost(quota: CfsClock) -> None:
    costs = measure_codecs(tuple(CPU_MS), numel=1 << 18, repeats=5)
    for name, (enc, dec) in CPU_MS.items():
        # A CPU ms costs 1/quota wall ms over many periods, whether or not one call happened to fit in a share.
        assert costs[name].encode_ms_per_mb * MB == pytest.approx(enc / quota.cores, rel=0.25), name
        assert costs[name].decode_ms_per_mb * MB == pytest.approx(dec / quota.cores, rel=0.25), name
    # Their ratios are the CPU ratios: timed by wall, int4 (fits in a share) came out 10x cheaper than it is.
    assert costs["int4"].encode_ms_per_mb / costs["int8"].encode_ms_per_mb == pytest.approx(0.4 / 1.6, rel=0.1)


def test_codec_costs_on_a_free_core_are_their_times(monkeypatch: pytest.MonkeyPatch) -> None:
    clock = CfsClock(cores=1.0, period_ms=10.0)  # a whole core: never throttled
    monkeypatch.setattr(profile_mod, "time", clock.module())
    monkeypatch.setattr(profile_mod, "encode", lambda x, spec, tables=None: clock.work(CPU_MS[str(spec)][0]) or "raw")
    monkeypatch.setattr(profile_mod, "decode", lambda msg, tables=None: clock.work(CPU_MS[msg][1]))
    cost = measure_codecs(("raw",), numel=1 << 18, repeats=3)["raw"]
    assert cost.encode_ms_per_mb * MB == pytest.approx(3.0) and cost.decode_ms_per_mb * MB == pytest.approx(2.0)


def test_wall_per_cpu_is_one_over_the_quota_over_many_periods(quota: CfsClock) -> None:
    spent = [0.0, 0.0]
    median = interleaved_ms({0: lambda _: quota.work(7.0)}, None, rounds=10, spent=spent)[0]
    per_cpu = spent[0] / spent[1]
    assert per_cpu == pytest.approx(1 / quota.cores, rel=0.1)
    assert median == pytest.approx(7.0 / quota.cores, rel=0.15)


def test_node_costs_under_a_quota_keep_the_cpu_shape() -> None:
    # Three nodes of 0.2, 0.2 and 2 CPU ms under a 1 ms share: timed by wall, the small ones fit in the
    # share (0.2 ms) and the big one waits a period or two (21 ms), a 52x ratio for a 10x one in CPU.
    walls = [[0.2, 0.2, 0.2], [0.2, 0.2, 0.2], [21.0, 21.0, 21.0]]
    cpus = [[0.2, 0.2, 0.2], [0.2, 0.2, 0.2], [2.0, 2.0, 2.0]]
    costs = node_costs(walls, cpus, per_cpu=10.0)
    assert costs == pytest.approx([2.0, 2.0, 20.0])
    # The curve between its anchors follows them: a head of the two small nodes is 1/6 of the three.
    p = Profile("m", "f", "h", "t", 1, 1, ["a", "b", "c"], costs, [0, 0, 0], {}, total_ms=240.0)
    assert p.curve().head_ms(1) == pytest.approx(240.0 * 4 / 24)
    # With a core or more (torch's threads in parallel: wall per CPU second under 1), wall times are the cost.
    assert node_costs(walls, cpus, per_cpu=0.5) == pytest.approx([0.2, 0.2, 21.0])
