"""Active link measurement over ``SplitInference.Probe``: RTT, uplink and downlink throughput.

Bounded in bytes and time: a first small transfer estimates the rate, and the second is sized
to take about ``target_s`` at that rate, capped by ``max_bytes``. A short transfer that reads as a
slow link is confirmed by one sized at its rate (a stalled host is not a slow link). So a probe costs
a fraction of a second on any link from 1 Mbit/s to 1 Gbit/s, and no transfer exceeds ``max_bytes``.
"""

from __future__ import annotations

import queue
import statistics
import time
from dataclasses import dataclass

import grpc

from protos.cleave.v1 import split_inference_pb2 as si_pb2
from protos.cleave.v1 import split_inference_pb2_grpc as si_grpc

PIECE = 8 << 10  # bytes per probe message: small, so the first guess costs little on a slow link
#: A transfer shows the link's rate once it takes this long beyond the RTT: well above the few ms a
#: busy host adds to any transfer (at 100 Mbit/s, 5 ms held a reading to 16-85 Mbit/s at load 6).
MIN_WIRE_S = 0.02


@dataclass(frozen=True)
class ProbeResult:
    rtt_ms: float
    up_mbps: float
    down_mbps: float
    bytes_sent: int
    bytes_received: int
    seconds: float
    timed_out: bool = False  # the deadline cut a transfer short: the rates are upper bounds


class _ProbeStream:
    """One Probe call driven message by message."""

    def __init__(self, stub: si_grpc.SplitInferenceStub, timeout: float) -> None:
        self._outbox: queue.Queue = queue.Queue()
        self._call = stub.Probe(iter(self._outbox.get, None), timeout=timeout)
        self._seq = 0

    def send(self, **fields) -> None:
        self._seq += 1
        self._outbox.put(si_pb2.ProbeMessage(seq=self._seq, **fields))

    def receive(self) -> si_pb2.ProbeMessage:
        return next(self._call)

    def close(self) -> None:
        self._outbox.put(None)
        self._call.cancel()


def _echo_rounds(stream: _ProbeStream, rounds: int) -> list[float]:
    """Round trips of small echo messages, in ms."""
    rtts = []
    for _ in range(rounds):
        t0 = time.perf_counter()
        stream.send(echo=True)
        stream.receive()
        rtts.append((time.perf_counter() - t0) * 1e3)
    return rtts


def probe_rtt(stub: si_grpc.SplitInferenceStub, rounds: int = 3, timeout: float = 5.0) -> list[float]:
    """Only the RTT: ``rounds`` echo round trips, in ms. Raises ``grpc.RpcError`` like :func:`probe_link`."""
    stream = _ProbeStream(stub, timeout)
    try:
        return _echo_rounds(stream, rounds)
    finally:
        stream.close()


def probe_link(
    stub: si_grpc.SplitInferenceStub,
    rtt_rounds: int = 3,
    max_bytes: int = 2 << 20,
    target_s: float = 0.25,
    timeout: float = 15.0,
) -> ProbeResult:
    """Measure the link to the cloud. Raises ``grpc.RpcError`` when the cloud does not answer."""
    started = time.perf_counter()
    stream = _ProbeStream(stub, timeout)
    sent = received = 0
    rtt = None
    transfer = [0, 0.0]  # bytes and start time of the transfer in progress
    try:
        rtt = statistics.median(_echo_rounds(stream, rtt_rounds))

        def upload(nbytes: int) -> tuple[int, float]:
            piece = max(PIECE, nbytes // 16)  # bigger pieces for big transfers: per-message cost must not cap the rate
            pieces = max(nbytes // piece, 1)
            payload = bytes(piece)
            t0 = time.perf_counter()
            transfer[:] = [pieces * piece, t0]
            for _ in range(pieces):
                stream.send(data=payload)
            for _ in range(pieces):
                stream.receive()
            return pieces * piece, time.perf_counter() - t0

        def download(nbytes: int) -> tuple[int, float]:
            t0 = time.perf_counter()
            transfer[:] = [nbytes, t0]
            stream.send(reply_bytes=nbytes)
            reply = stream.receive()
            return len(reply.data), time.perf_counter() - t0

        rates = []
        fastest = float("inf")  # the quickest transfer's round trip, in s: it bounds the RTT from above
        for measure in (upload, download):
            size, moved, shown = PIECE, 0, 0
            while True:
                n, seconds = measure(size)
                moved += n
                fastest = min(fastest, seconds)
                # A transfer that hides inside the RTT says nothing about bandwidth (one 8 KB piece
                # on a fast link would read as hundreds of Mbit/s): grow it until it clearly shows.
                wire = seconds - rtt / 1e3
                rate = n / max(wire, 1e-3)
                if wire >= max(2 * rtt / 1e3, MIN_WIRE_S):
                    # A short transfer that shows may be this host stalling (a busy edge's threads not
                    # scheduled for tens of ms turn 8 KB on a 100 Mbit/s link into 1 Mbit/s), not the
                    # link: a second one, sized by its rate, confirms it or grows on.
                    shown += 1
                    if shown >= 2 or wire >= target_s / 2 or size >= max_bytes:
                        break
                    size = int(min(max(rate * target_s, size), max_bytes))
                elif size >= max_bytes:
                    break
                else:
                    size = int(min(max(rate * target_s, 4 * size), max_bytes))
            if measure is upload:
                sent += moved
            else:
                received += moved
            # A transfer that never showed beyond the RTT (the echoes stalled, so the RTT reads high, and
            # max_bytes crossed within it) bounds the rate from below: n bytes and a round trip took `seconds`.
            # Divided by what is left after the inflated RTT, it read as 16,777 Mbit/s (2 MiB in 1 ms).
            rates.append(n * 8 / (wire if shown else seconds) / 1e6)
        rtt = min(rtt, fastest * 1e3)
        return ProbeResult(rtt, rates[0], rates[1], sent, received, time.perf_counter() - started)
    except grpc.RpcError as exc:
        if exc.code() != grpc.StatusCode.DEADLINE_EXCEEDED or rtt is None or not transfer[0]:
            raise
        # The link is too slow to move even this probe in time: that is a measurement, not a failure.
        # The unfinished transfer bounds the rate from above; use the bound for both directions.
        nbytes, t0 = transfer
        bound = nbytes * 8 / max(time.perf_counter() - t0, 1e-3) / 1e6
        return ProbeResult(rtt, bound, bound, sent, received, time.perf_counter() - started, timed_out=True)
    finally:
        stream.close()


__all__ = ["ProbeResult", "probe_link", "probe_rtt"]
