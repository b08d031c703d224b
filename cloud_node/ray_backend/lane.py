"""The direct lane (``ray.transport: direct``): the front door talks to each replica over a socket of its own.

Serve still owns the replicas (placement, health checks, autoscaling, draining); only the request
path skips Serve's router and Ray's RPC, whose Python on both sides and process wake-ups cost a few
ms per call on a small machine (measured in docs/ray.md). Each replica listens on a TCP port of its
node, guarded by a random token, and publishes ``{address, token}`` in Ray's key-value store under
its Serve replica id; a front door lists those entries, keeps the ones whose replica actor is alive,
and sends each request to the replica with the fewest of its own requests in flight.

Wire format, both ways: a 4-byte big-endian length, a JSON header, then the byte blobs the header
lists (no pickle: the bytes are protobuf messages the replica decodes with the front door's limits).
A connection starts with the token; a wrong token closes it. A replica that is draining answers
:data:`DRAINING` and the front door sends the request elsewhere.

Needs neither ray nor torch, so both sides and the tests import it anywhere.
"""

from __future__ import annotations

import contextlib
import hmac
import json
import logging
import secrets
import socket
import struct
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Protocol

from compressor import EncodingSpec
from protos.cleave.v1 import tensor_pb2

from .messages import TailReply, TailRequest

log = logging.getLogger(__name__)

#: Key prefix of each replica's entry in Ray's internal key-value store (then its Serve replica id).
KV_PREFIX = "cleave-lane/"
#: The error kind a draining replica answers with: not a failure, the front door goes elsewhere.
DRAINING = "Draining"
TOKEN_BYTES = 16
#: A connection must present its token within this long: one that says nothing is closed, not kept waiting.
AUTH_TIMEOUT_S = 5.0
#: Connections a replica keeps at once (each has a thread); past it, new ones are closed unread.
MAX_CONNECTIONS = 256
MAX_HEADER = 1 << 16
MAX_BLOBS = 1 << 31  # what one frame may carry in all (the codec limits apply again when decoding)
_LEN = struct.Struct(">I")


class LaneLost(ConnectionError):
    """The replica behind a lane went away (closed, refused, reset, or draining): send the request elsewhere."""


# -- frames ------------------------------------------------------------------------------------------


def _recv_exact(sock: socket.socket, n: int) -> bytes:
    buf = bytearray(n)
    view, got = memoryview(buf), 0
    while got < n:
        k = sock.recv_into(view[got:])
        if k == 0:
            raise LaneLost("connection closed")
        got += k
    return bytes(buf)


def send_frame(sock: socket.socket, header: dict, blobs: Iterable[bytes] = ()) -> None:
    blobs = list(blobs)
    head = json.dumps({**header, "blobs": [len(b) for b in blobs]}, separators=(",", ":")).encode()
    sock.sendall(b"".join([_LEN.pack(len(head)), head, *blobs]))


def recv_frame(sock: socket.socket) -> tuple[dict, list[bytes]]:
    (n,) = _LEN.unpack(_recv_exact(sock, _LEN.size))
    if n > MAX_HEADER:
        raise ValueError(f"lane frame header of {n} bytes (at most {MAX_HEADER})")
    header = json.loads(_recv_exact(sock, n))
    if not isinstance(header, dict):
        raise ValueError(f"lane frame header is a {type(header).__name__}, not an object")
    sizes = header.pop("blobs", [])
    if not isinstance(sizes, list) or not all(isinstance(s, int) and s >= 0 for s in sizes) or sum(sizes) > MAX_BLOBS:
        raise ValueError("lane frame: bad blob sizes")
    data = _recv_exact(sock, sum(sizes))
    blobs, at = [], 0
    for s in sizes:
        blobs.append(data[at : at + s])
        at += s
    return header, blobs


def pack_request(request: TailRequest) -> tuple[dict, list[bytes]]:
    header = {
        "part": request.part,
        "max_elements": request.max_elements,
        "max_payload_bytes": request.max_payload_bytes,
    }
    return header, [request.result_spec.to_proto().SerializeToString(), *request.features]


def unpack_request(header: dict, blobs: list[bytes]) -> TailRequest:
    """The request a frame carries; ValueError naming the field that is missing or of the wrong type."""
    if not blobs:
        raise ValueError("lane request without its result spec")
    part = header.get("part")
    if isinstance(part, bool) or not isinstance(part, (int, str)):
        raise ValueError(f"lane request: part must be a cut index or name, got {type(part).__name__}")
    limits = {}
    for key in ("max_elements", "max_payload_bytes"):
        value = header.get(key)
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise ValueError(f"lane request: {key} must be an integer >= 0, got {value!r}")
        limits[key] = value
    spec = tensor_pb2.TensorEncoding()
    spec.ParseFromString(blobs[0])
    return TailRequest(part=part, features=tuple(blobs[1:]), result_spec=EncodingSpec.from_proto(spec), **limits)


_TIMINGS = ("queue_ms", "decode_ms", "compute_ms", "encode_ms", "batch_size", "replica")


def pack_reply(reply: TailReply) -> tuple[dict, list[bytes]]:
    header = {k: getattr(reply, k) for k in _TIMINGS}
    header["error"] = list(reply.error) if reply.error is not None else None
    return header, list(reply.outputs)


def unpack_reply(header: dict, blobs: list[bytes]) -> TailReply:
    error = header.get("error")
    return TailReply(
        outputs=tuple(blobs), error=tuple(error) if error else None, **{k: header[k] for k in _TIMINGS if k in header}
    )


# -- the replica's side ------------------------------------------------------------------------------


class LaneServer:
    """Listens on ``host`` for front doors and answers each request with ``run(request) -> TailReply``.

    One thread accepts, one thread per connection reads a request, runs it and writes the reply (the
    replica's own lock serialises the tails). ``in_flight`` counts requests read and not yet answered:
    the replica reports it to Serve's autoscaler, and :meth:`close` waits for it to reach zero.
    """

    def __init__(self, run: Callable[[TailRequest], TailReply], host: str = "127.0.0.1") -> None:
        self._run = run
        self.token = secrets.token_bytes(TOKEN_BYTES)
        self._lock = threading.Lock()
        self._idle = threading.Condition(self._lock)
        self._in_flight = 0
        self._draining = False
        self._conns: set[socket.socket] = set()
        self._listener = socket.create_server((host, 0))
        self.address = f"{host}:{self._listener.getsockname()[1]}"
        threading.Thread(target=self._accept, name="lane-accept", daemon=True).start()

    @property
    def in_flight(self) -> int:
        with self._lock:
            return self._in_flight

    def entry(self) -> bytes:
        """What the replica publishes: where to connect, and the token to open with."""
        return json.dumps({"address": self.address, "token": self.token.hex()}).encode()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self._listener.accept()
            except OSError:
                return  # closed
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            with self._lock:
                if self._draining or len(self._conns) >= MAX_CONNECTIONS:
                    conn.close()
                    continue
                self._conns.add(conn)
            threading.Thread(target=self._serve, args=(conn,), name="lane-conn", daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        try:
            conn.settimeout(AUTH_TIMEOUT_S)
            if not hmac.compare_digest(_recv_exact(conn, TOKEN_BYTES), self.token):
                log.warning("lane: a connection opened with a wrong token; closed")
                return
            conn.settimeout(None)  # a front door keeps its connection open between requests
            while True:
                header, blobs = recv_frame(conn)
                with self._lock:
                    draining = self._draining
                    if not draining:
                        self._in_flight += 1
                if draining:
                    send_frame(conn, *pack_reply(TailReply(error=(DRAINING, "replica is shutting down"))))
                    continue
                try:
                    reply = self._run(unpack_request(header, blobs))
                    send_frame(conn, *pack_reply(reply))
                finally:
                    with self._lock:
                        self._in_flight -= 1
                        self._idle.notify_all()
        except (OSError, ValueError, KeyError, LaneLost) as exc:
            # The front door went away, or spoke nonsense (or never gave its token): its connection ends, the
            # replica lives on.
            if isinstance(exc, ValueError):
                log.warning("lane: a connection sent a bad frame (%s); closed", exc)
        finally:
            with self._lock:
                self._conns.discard(conn)
            conn.close()

    def close(self, grace_s: float) -> int:
        """Stop taking requests, wait up to ``grace_s`` for those in flight, close; how many were still running."""
        with self._lock:
            self._draining = True
        self._listener.close()
        deadline = time.monotonic() + grace_s
        with self._lock:
            while self._in_flight and (left := deadline - time.monotonic()) > 0:
                self._idle.wait(left)
            left_running, conns = self._in_flight, list(self._conns)
        for conn in conns:
            with contextlib.suppress(OSError):
                conn.shutdown(socket.SHUT_RDWR)
        return left_running


# -- the front door's side ---------------------------------------------------------------------------


@dataclass
class Endpoint:
    """One replica's lane as this front door sees it; mutated only under :class:`Lanes`' lock."""

    replica: str  # Serve's full replica id (its actor's name)
    host: str
    port: int
    token: bytes
    in_flight: int = 0
    idle: list[socket.socket] = field(default_factory=list)


class Directory(Protocol):
    """Where replicas publish their lanes (Ray's key-value store and named actors, in serving.py)."""

    def replicas(self, prefix: str) -> list[str]:
        """Replica ids with an entry under ``prefix``."""

    def entry(self, replica: str) -> bytes | None:
        """That replica's published entry (None: gone meanwhile)."""

    def forget(self, replica: str) -> None:
        """Delete a dead replica's entry (a killed replica cannot delete its own)."""

    def alive(self) -> set[str]:
        """Ids of the replicas whose actor is alive."""


class Lanes:
    """The front door's lanes to every live replica of each model, and the calls over them.

    :meth:`refresh` reads ``directory``: it adds the lanes of new live replicas, drops those of
    replicas gone, and deletes the entries that dead replicas left behind. Every piece of state is
    under ``self._lock``; a socket is used by one call at a time.
    """

    def __init__(self, prefixes: dict[str, str], directory: Directory, connect_timeout_s: float = 2.0) -> None:
        self._prefixes = prefixes  # model -> the key prefix of its replicas' entries
        self._directory = directory
        self._connect_timeout_s = connect_timeout_s
        self._lock = threading.Lock()
        self._endpoints: dict[str, dict[str, Endpoint]] = {m: {} for m in prefixes}
        self._refreshed = 0.0

    def refresh(self) -> None:
        """Re-read every model's live replicas; keep the connections of those still there."""
        directory = self._directory
        alive = directory.alive()
        found: dict[str, dict[str, bytes | None]] = {}
        for model, prefix in self._prefixes.items():
            listed = directory.replicas(prefix)
            for dead in (r for r in listed if r not in alive):
                directory.forget(dead)
            with self._lock:
                known = set(self._endpoints[model])
            # Only new replicas' entries are read: an entry never changes while its replica lives.
            found[model] = {r: None if r in known else directory.entry(r) for r in listed if r in alive}
        closing = []
        with self._lock:
            self._refreshed = time.monotonic()
            for model, entries in found.items():
                now = self._endpoints[model]
                for gone in set(now) - set(entries):
                    closing += now.pop(gone).idle
                for replica, raw in entries.items():
                    if replica in now or raw is None:
                        continue
                    try:
                        entry = json.loads(raw)
                        host, port = entry["address"].rsplit(":", 1)
                        now[replica] = Endpoint(replica, host, int(port), bytes.fromhex(entry["token"]))
                    except (ValueError, KeyError) as exc:
                        log.warning("lane: replica %s published a bad entry: %s", replica, exc)
        for sock in closing:
            sock.close()

    def endpoints(self, model: str) -> list[str]:
        with self._lock:
            return sorted(self._endpoints.get(model, {}))

    def _pick(self, model: str) -> tuple[Endpoint, socket.socket | None] | None:
        with self._lock:
            live = list(self._endpoints.get(model, {}).values())
            if not live:
                return None
            best = min(live, key=lambda e: e.in_flight)
            best.in_flight += 1
            return best, (best.idle.pop() if best.idle else None)

    def _drop(self, model: str, endpoint: Endpoint) -> None:
        with self._lock:
            if self._endpoints.get(model, {}).get(endpoint.replica) is endpoint:
                del self._endpoints[model][endpoint.replica]
            idle, endpoint.idle = endpoint.idle, []
        for sock in idle:
            sock.close()

    def call(self, model: str, request: TailRequest, timeout_s: float) -> TailReply | None:
        """Send ``request`` to one of ``model``'s replicas; None when no lane is known (use Serve's handle).

        Raises:
            LaneLost: the replica went away under the call (dropped from the lanes; send it elsewhere).
            TimeoutError: no reply within ``timeout_s`` (the connection is closed, the reply discarded).
        """
        picked = self._pick(model)
        if picked is None:
            with self._lock:
                stale = time.monotonic() - self._refreshed > 0.2
            if stale:
                self.refresh()
                picked = self._pick(model)
            if picked is None:
                return None
        endpoint, sock = picked
        reusable = False
        try:
            if sock is None:
                try:
                    sock = socket.create_connection((endpoint.host, endpoint.port), self._connect_timeout_s)
                except OSError as exc:
                    raise LaneLost(f"connect: {exc}") from exc
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                sock.sendall(endpoint.token)
            sock.settimeout(timeout_s)
            try:
                send_frame(sock, *pack_request(request))
                reply = unpack_reply(*recv_frame(sock))
            except TimeoutError:
                raise
            except (OSError, ValueError) as exc:
                raise LaneLost(str(exc) or type(exc).__name__) from exc
            if reply.error is not None and reply.error[0] == DRAINING:
                raise LaneLost("replica draining")
            reusable = True
            return reply
        except LaneLost:
            self._drop(model, endpoint)
            raise
        finally:
            with self._lock:
                endpoint.in_flight -= 1
                if reusable and sock is not None and endpoint.replica in self._endpoints.get(model, {}):
                    endpoint.idle.append(sock)
                    sock = None
            if sock is not None:
                sock.close()

    def close(self) -> None:
        with self._lock:
            socks = [s for eps in self._endpoints.values() for e in eps.values() for s in e.idle]
            self._endpoints = {m: {} for m in self._prefixes}
        for sock in socks:
            sock.close()
