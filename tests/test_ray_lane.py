"""The direct lane's sockets (cloud_node/ray_backend/lane.py) without Ray: frames, token, drain, lost replicas.

The Ray-backed tests (tests/test_ray_serving.py) run the same lane inside Serve replicas.
"""

from __future__ import annotations

import socket
import threading
import time

import pytest

from cloud_node.ray_backend import lane
from cloud_node.ray_backend.lane import DRAINING, LaneLost, Lanes, LaneServer, pack_request, unpack_request
from cloud_node.ray_backend.messages import TailReply, TailRequest
from compressor import EncodingSpec

SPEC = EncodingSpec(encoding="affine", bits=4, codec="zstd")


def request(tag: bytes, part: int | str = 3) -> TailRequest:
    return TailRequest(
        part=part, features=(tag, b"\x00" * 70_000), result_spec=SPEC, max_elements=9, max_payload_bytes=99
    )


def echo(req: TailRequest) -> TailReply:
    return TailReply(outputs=(req.features[0][::-1], b""), decode_ms=1.5, batch_size=1, replica="r1")


class Directory:
    """Published entries and live replica ids, as Ray's key-value store and named actors would hold them."""

    def __init__(self, entries: dict[str, bytes], alive: set[str]) -> None:
        self.entries, self.live, self.reads = entries, alive, 0

    def replicas(self, prefix: str) -> list[str]:
        return [r for r in self.entries if r.startswith(prefix)]

    def entry(self, replica: str) -> bytes | None:
        self.reads += 1
        return self.entries.get(replica)

    def forget(self, replica: str) -> None:
        del self.entries[replica]

    def alive(self) -> set[str]:
        return set(self.live)


def lanes_for(*servers: LaneServer) -> Lanes:
    entries = {f"app#m#r{i}": s.entry() for i, s in enumerate(servers)}
    return Lanes({"m": "app#m#"}, Directory(entries, set(entries)))


def test_a_request_and_its_reply_cross_the_lane_intact() -> None:
    header, blobs = pack_request(request(b"abc", part="whole"))
    assert unpack_request(header, blobs) == request(b"abc", part="whole")
    server = LaneServer(echo)
    lanes = lanes_for(server)
    try:
        for tag in (b"one", b"two", b""):  # the second and third reuse the first's connection
            reply = lanes.call("m", request(tag), timeout_s=5)
            assert reply.outputs == (tag[::-1], b"") and reply.decode_ms == 1.5 and reply.error is None
        assert lanes.call("other", request(b"x"), timeout_s=5) is None  # no lane: the caller uses Serve's handle
        deadline = time.monotonic() + 5  # counted down once the reply is sent, a moment after the caller has it
        while server.in_flight and time.monotonic() < deadline:
            time.sleep(0.01)
        assert server.in_flight == 0
    finally:
        lanes.close()
        server.close(0)


def test_a_connection_with_a_wrong_token_is_closed_unanswered() -> None:
    server = LaneServer(echo)
    try:
        host, port = server.address.rsplit(":", 1)
        with socket.create_connection((host, int(port)), 5) as sock:
            sock.sendall(b"\x00" * 16)
            sock.settimeout(5)
            assert sock.recv(1) == b""  # closed without a reply
    finally:
        server.close(0)


def test_a_connection_that_never_gives_its_token_is_closed_at_the_auth_deadline(monkeypatch) -> None:
    monkeypatch.setattr(lane, "AUTH_TIMEOUT_S", 0.3)
    server = LaneServer(echo)
    try:
        host, port = server.address.rsplit(":", 1)
        with socket.create_connection((host, int(port)), 5) as sock:
            sock.sendall(b"\x01" * 5)  # part of a token, then nothing
            sock.settimeout(5)
            t0 = time.monotonic()
            assert sock.recv(1) == b""  # closed by the replica, not kept waiting
            assert time.monotonic() - t0 < 3
    finally:
        server.close(0)


def test_connections_past_the_cap_are_closed_unread(monkeypatch) -> None:
    monkeypatch.setattr(lane, "MAX_CONNECTIONS", 2)
    server = LaneServer(echo)
    host, port = server.address.rsplit(":", 1)
    held = [socket.create_connection((host, int(port)), 5) for _ in range(2)]
    try:
        time.sleep(0.2)  # both accepted and waiting for their tokens
        with socket.create_connection((host, int(port)), 5) as third:
            third.settimeout(5)
            assert third.recv(1) == b""
        lanes = lanes_for(server)  # the held ones still count: this one is refused too
        with pytest.raises(LaneLost):
            lanes.call("m", request(b"x"), timeout_s=5)
    finally:
        for sock in held:
            sock.close()
        server.close(0)


@pytest.mark.parametrize(
    ("header", "field"),
    [
        ({"part": [1], "max_elements": 9, "max_payload_bytes": 99}, "part"),
        ({"part": True, "max_elements": 9, "max_payload_bytes": 99}, "part"),
        ({"part": 3, "max_elements": "9", "max_payload_bytes": 99}, "max_elements"),
        ({"part": 3, "max_elements": 9, "max_payload_bytes": -1}, "max_payload_bytes"),
        ({"part": 3, "max_elements": 9}, "max_payload_bytes"),
    ],
)
def test_a_request_frame_with_a_field_of_the_wrong_type_is_refused_naming_it(header: dict, field: str) -> None:
    _, blobs = pack_request(request(b"abc"))
    with pytest.raises(ValueError, match=field):
        unpack_request(header, blobs)


def test_a_bad_frame_from_an_authenticated_peer_ends_only_its_connection() -> None:
    server = LaneServer(echo)
    host, port = server.address.rsplit(":", 1)
    try:
        for payload in (b"[1,2]", b'{"part":{"x":1},"max_elements":1,"max_payload_bytes":1,"blobs":[2]}xx'):
            with socket.create_connection((host, int(port)), 5) as sock:
                head = payload.split(b"xx")[0]
                sock.sendall(server.token + len(head).to_bytes(4, "big") + payload)
                sock.settimeout(5)
                assert sock.recv(1) == b""
        assert lanes_for(server).call("m", request(b"ok"), timeout_s=5).outputs[0] == b"ko"  # still serving
        deadline = time.monotonic() + 5  # counted down once the reply is sent, a moment after the caller has it
        while server.in_flight and time.monotonic() < deadline:
            time.sleep(0.01)
        assert server.in_flight == 0
    finally:
        server.close(0)


def test_a_lost_replica_raises_lanelost_and_leaves_the_lanes() -> None:
    server = LaneServer(echo)
    lanes = lanes_for(server)
    assert lanes.call("m", request(b"a"), timeout_s=5).outputs[0] == b"a"
    server.close(0)  # its pooled connection is shut down, its port closed
    with pytest.raises(LaneLost):
        lanes.call("m", request(b"b"), timeout_s=5)
    assert lanes.endpoints("m") == []


def test_closing_waits_for_requests_in_flight_and_answers_later_ones_draining() -> None:
    started, release = threading.Event(), threading.Event()

    def slow(req: TailRequest) -> TailReply:
        started.set()
        release.wait(10)
        return echo(req)

    server = LaneServer(slow)
    lanes = lanes_for(server)
    replies: list[TailReply] = []
    caller = threading.Thread(target=lambda: replies.append(lanes.call("m", request(b"inflight"), timeout_s=10)))
    caller.start()
    assert started.wait(5)
    # Another front door asking during the drain is turned away (port closed): it goes elsewhere.
    other = lanes_for(server)
    host, port = server.address.rsplit(":", 1)
    still_running: list[int] = []  # close()'s answer: the caller's reply and it race to their lists
    closing = threading.Thread(target=lambda: still_running.append(server.close(10)))
    t0 = time.monotonic()
    closing.start()
    time.sleep(0.2)
    assert closing.is_alive(), "close() returned with a request still in flight"
    with pytest.raises(LaneLost):
        other.call("m", request(b"late"), timeout_s=5)
    release.set()
    caller.join(5)
    closing.join(5)
    assert replies[0].outputs[0] == b"thgilfni" and still_running == [0] and time.monotonic() - t0 < 5
    assert server.in_flight == 0
    with pytest.raises(OSError):
        socket.create_connection((host, int(port)), 1).close()


def test_a_reply_later_than_the_timeout_raises_timeouterror() -> None:
    release = threading.Event()
    server = LaneServer(lambda req: (release.wait(5), echo(req))[1])
    lanes = lanes_for(server)
    try:
        with pytest.raises(TimeoutError):
            lanes.call("m", request(b"a"), timeout_s=0.2)
        assert lanes.endpoints("m") != []  # slow is not lost: the replica stays, that connection is closed
    finally:
        release.set()
        lanes.close()
        server.close(1)


def test_requests_go_to_the_replica_with_fewest_in_flight() -> None:
    release, seen = threading.Event(), []
    servers = []
    for name in ("a", "b"):

        def run(req: TailRequest, name: str = name) -> TailReply:
            seen.append(name)
            release.wait(5)
            return echo(req)

        servers.append(LaneServer(run))
    lanes = lanes_for(*servers)
    try:
        callers = [threading.Thread(target=lanes.call, args=("m", request(b"x"), 5)) for _ in range(2)]
        for c in callers:
            c.start()
        deadline = time.monotonic() + 5
        while len(seen) < 2 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert sorted(seen) == ["a", "b"]  # the second call did not queue behind the first
        release.set()
        for c in callers:
            c.join(5)
    finally:
        lanes.close()
        for s in servers:
            s.close(1)


def test_a_dead_replicas_entry_is_ignored_and_deleted_and_live_entries_are_read_once() -> None:
    server = LaneServer(echo)
    entries = {"app#m#dead": server.entry(), "app#m#live": server.entry(), "app#other#x": server.entry()}
    directory = Directory(entries, {"app#m#live", "app#other#x"})
    lanes = Lanes({"m": "app#m#"}, directory)
    try:
        lanes.refresh()
        assert lanes.endpoints("m") == ["app#m#live"]
        assert sorted(entries) == ["app#m#live", "app#other#x"]  # the dead one's entry is gone
        lanes.refresh()
        assert directory.reads == 1  # a known replica's entry is not read again
        directory.live.discard("app#m#live")
        lanes.refresh()
        assert lanes.endpoints("m") == []
    finally:
        server.close(0)


def test_a_draining_reply_is_not_an_answer() -> None:
    server = LaneServer(lambda req: TailReply(error=(DRAINING, "x")))
    lanes = lanes_for(server)
    try:
        with pytest.raises(LaneLost):
            lanes.call("m", request(b"a"), timeout_s=5)
    finally:
        server.close(0)
