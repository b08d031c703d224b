"""The floor under Cleave's overhead: bare gRPC carrying the same bytes in the same shape.

Two bare servers, each a process of its own like Cleave's daemons, built with the same grpcio, the
same thread-pool server, message-size limits and keepalive options (``runtime.serving``), and no
protobuf, interceptors, codec or Python work beyond moving the bytes:

- ``cloud``: a bidirectional stream, like ``SplitInference/Infer``; each message it receives is
  answered on the same stream by one message of the size the message asks for (its first 4 bytes,
  little-endian); the same message back when that is its own size (an echo).
- ``edge``: a unary call, like ``Edge/Infer``; each call sends one message of the size it asks for
  over one long-lived stream to the ``cloud`` server (fed by a queue, as the edge feeds its stream),
  waits for the answer, and returns a message of the size it asks for.

A message may also ask for *work*: CPU time spent where a split request spends it (the edge's head
and encode before the stream, its decode after, the cloud's decode, tail and encode before its
answer), in calls that release the GIL as a model's kernels do. A reply that follows 40 ms of work
costs more to deliver than an instant echo (the waiting threads and their caches have gone cold:
0.15 ms against 0.5 ms from the floor cloud's send to the floor edge's wake-up in one traced run),
and that is the machine's cost, not Cleave's; so :mod:`benchmarks.overhead` asks the floor for the
same work a configuration's requests do, in the same places, and subtracts it.

Both take the daemons' process settings (:func:`runtime.memory.keep_freed_memory`). A client's
unary call to ``edge`` crosses the same two hops with the same bytes as a split request (input up
to the edge, features up to the cloud, result back, outputs back); a client's round trip on the
``cloud`` stream alone is the floor of the split path. ``python -m
benchmarks.overhead`` starts both and measures them beside the daemons; by hand:

    python -m benchmarks.grpc_floor cloud --port 50070 &
    python -m benchmarks.grpc_floor edge --port 50071 --cloud 127.0.0.1:50070 &
"""

from __future__ import annotations

import argparse
import queue
import signal
import struct
import subprocess
import sys
import threading
import time
import zlib
from concurrent import futures
from pathlib import Path

import grpc

from runtime import memory
from runtime.serving import DEFAULT_MAX_MESSAGE_BYTES, KEEPALIVE, message_options, open_channel

SERVICE = "cleave.floor.Floor"
STREAM = f"/{SERVICE}/Stream"
CALL = f"/{SERVICE}/Call"
# Reply bytes and cloud work (microseconds); then, in edge calls only, feature and result bytes and
# the edge's work before sending its features and after receiving the result.
_HEADER = struct.Struct("<IIIIII")
# Steps of work: CRC-32s (GIL released) of 1 MB (a few hundred microseconds) while over 2 ms
# is left, so another thread of the process that wants the GIL gets it between two, and of 16 KB (a few
# microseconds) for the rest, so the work ends within a few microseconds of its time.
_WORK_BLOCK = memoryview(bytes(1 << 20))
_WORK_TAIL = _WORK_BLOCK[: 16 << 10]
ROOT = Path(__file__).resolve().parent.parent


def message(
    size: int, reply: int, feature: int = 0, result: int = 0, work_us: tuple[int, int, int] = (0, 0, 0)
) -> bytes:
    """A message of ``size`` bytes (at least the header) asking for ``reply`` bytes back.

    ``work_us``: microseconds of work (cloud, edge before sending, edge after the result), see the module docstring.
    """
    cloud, before, after = work_us
    return _HEADER.pack(reply, cloud, feature, result, before, after) + bytes(max(size - _HEADER.size, 0))


def work(us: int) -> None:
    """Keep one core busy for ``us`` microseconds without holding the GIL (as a model's kernels do)."""
    if us <= 0:
        return
    end = time.perf_counter() + us / 1e6
    while (left := end - time.perf_counter()) > 0:
        zlib.crc32(_WORK_BLOCK if left > 2e-3 else _WORK_TAIL)


class _Sizes:
    """Messages by size, built once: the floor does not count building them."""

    def __init__(self) -> None:
        self._made: dict[tuple, bytes] = {}
        self._lock = threading.Lock()

    def get(self, size: int, reply: int, feature: int = 0, result: int = 0, work_us: tuple = (0, 0, 0)) -> bytes:
        key = (size, reply, feature, result, work_us)
        with self._lock:
            made = self._made.get(key)
            if made is None:
                made = self._made[key] = message(size, reply, feature, result, work_us)
        return made


class StreamClient:
    """One long-lived bidirectional stream fed by a queue; one round trip at a time."""

    def __init__(self, channel: grpc.Channel) -> None:
        self._outbox: queue.SimpleQueue = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._replies = channel.stream_stream(STREAM)(iter(self._outbox.get, None))

    def roundtrip(self, data: bytes) -> bytes:
        with self._lock:
            self._outbox.put(data)
            return next(self._replies)

    def close(self) -> None:
        self._outbox.put(None)


def _server(port: int, handlers: dict[str, grpc.RpcMethodHandler]) -> grpc.Server:
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=32),
        options=message_options(DEFAULT_MAX_MESSAGE_BYTES) + [("grpc.so_reuseport", 0)] + KEEPALIVE.server_options(),
    )
    server.add_generic_rpc_handlers([grpc.method_handlers_generic_handler(SERVICE, handlers)])
    server.add_insecure_port(f"127.0.0.1:{port}")
    return server


def serve_cloud(port: int) -> grpc.Server:
    sizes = _Sizes()

    def stream(requests, _context):
        for data in requests:
            reply, cloud_us = _HEADER.unpack_from(data)[:2]
            work(cloud_us)
            yield data if reply == len(data) else sizes.get(reply, 0)

    return _server(port, {"Stream": grpc.stream_stream_rpc_method_handler(stream)})


def serve_edge(port: int, cloud: str) -> grpc.Server:
    sizes = _Sizes()
    channel = open_channel(cloud)
    grpc.channel_ready_future(channel).result(timeout=60)  # the floor cloud is started first
    link = StreamClient(channel)

    def call(data: bytes, _context) -> bytes:
        reply, cloud_us, feature, result, before_us, after_us = _HEADER.unpack_from(data)
        work(before_us)
        link.roundtrip(sizes.get(feature, result, work_us=(cloud_us, 0, 0)))
        work(after_us)
        return sizes.get(reply, 0)

    return _server(port, {"Call": grpc.unary_unary_rpc_method_handler(call)})


class Floor:
    """Both floor servers as child processes, and a client of each; ``with Floor() as floor:``."""

    def __init__(self, cloud_port: int, edge_port: int) -> None:
        run = [sys.executable, "-m", "benchmarks.grpc_floor"]
        self._procs = [
            subprocess.Popen([*run, "cloud", "--port", str(cloud_port)], cwd=ROOT),
            subprocess.Popen([*run, "edge", "--port", str(edge_port), "--cloud", f"127.0.0.1:{cloud_port}"], cwd=ROOT),
        ]
        self._sizes = _Sizes()
        self._cloud = open_channel(f"127.0.0.1:{cloud_port}")
        self._edge = open_channel(f"127.0.0.1:{edge_port}")
        for channel in (self._cloud, self._edge):
            grpc.channel_ready_future(channel).result(timeout=60)
        self._call = self._edge.unary_unary(CALL)
        self._stream = StreamClient(self._cloud)

    def prepare(
        self, request: int, feature: int, result: int, response: int, work_us: tuple[int, int, int] = (0, 0, 0)
    ) -> tuple[bytes, bytes]:
        """The messages of one request of these sizes: (edge call, cloud stream), built outside the timing.

        ``work_us``: (cloud, edge before sending, edge after the result) microseconds of work; the cloud's
        work is done on the stream round trip too.
        """
        call = self._sizes.get(request, response, feature, result, work_us)
        return call, self._sizes.get(feature, result, work_us=(work_us[0], 0, 0))

    def call(self, data: bytes) -> bytes:
        """Both hops: the client's unary call to the floor edge, which crosses its stream to the floor cloud."""
        return self._call(data, timeout=60)

    def split(self, data: bytes) -> bytes:
        """The split path alone: a round trip on a stream to the floor cloud."""
        return self._stream.roundtrip(data)

    def close(self) -> None:
        self._stream.close()
        self._cloud.close()
        self._edge.close()
        for proc in self._procs:
            proc.send_signal(signal.SIGTERM)
        for proc in self._procs:
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()

    def __enter__(self) -> Floor:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("role", choices=("cloud", "edge"))
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--cloud", help="the floor cloud's address (edge only)")
    args = parser.parse_args(argv)
    memory.keep_freed_memory()  # as the daemons do: the floor pays no page faults they do not pay
    server = serve_cloud(args.port) if args.role == "cloud" else serve_edge(args.port, args.cloud)
    stopped = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stopped.set())
    signal.signal(signal.SIGINT, lambda *_: stopped.set())
    server.start()
    stopped.wait()
    server.stop(0)
    return 0


if __name__ == "__main__":
    sys.exit(main())
