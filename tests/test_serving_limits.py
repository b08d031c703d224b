"""The pieces behind the serving limits, without a daemon: turns, log escaping, client identity."""

from __future__ import annotations

import logging
import threading
import time

import pytest

from cloud_node.config import CloudConfig
from cloud_node.profiling import TurnLock
from runtime.admission import ServingLimits, client_identity
from runtime.logsafe import EscapingFilter, printable
from runtime.settings import SettingsError


def test_turn_lock_lets_a_waiter_in_at_every_turn() -> None:
    lock = TurnLock()
    order: list[str] = []
    assert lock.acquire()

    def small() -> None:
        assert lock.acquire(timeout=5)
        order.append("small")
        lock.release()

    thread = threading.Thread(target=small)
    thread.start()
    while lock.waiting == 0:
        time.sleep(0.01)
    order.append("big 1")
    lock.pass_turn()  # the small one runs here, then the big one continues
    order.append("big 2")
    lock.release()
    thread.join(5)
    assert order == ["big 1", "small", "big 2"]


def test_turn_lock_waiter_that_times_out_leaves_the_queue() -> None:
    lock = TurnLock()
    assert lock.acquire()
    assert not lock.acquire(timeout=0.05)
    assert lock.waiting == 0
    lock.pass_turn()  # nobody waits: returns at once
    lock.release()
    assert lock.acquire(timeout=0.05)


def test_printable_escapes_control_characters_and_cuts() -> None:
    assert printable("edge-1\n2026-01-01 INFO forged\r\x1b[31m") == "edge-1\\n2026-01-01 INFO forged\\r\\x1b[31m"
    assert printable("x" * 200, limit=10) == "x" * 10 + "...(+190)"


def test_escaping_filter_keeps_every_record_on_one_line() -> None:
    record = logging.LogRecord("t", logging.INFO, __file__, 1, "session for %s", ("a\nb\u2028c",), None)
    assert EscapingFilter().filter(record)
    assert record.getMessage() == "session for a\\nb\\u2028c"


class _Context:
    def __init__(self, metadata: tuple, peer: str) -> None:
        self._metadata, self._peer = metadata, peer

    def invocation_metadata(self) -> tuple:
        return self._metadata

    def peer(self) -> str:
        return self._peer


def test_client_identity_is_the_token_else_the_peer_host() -> None:
    a = client_identity(_Context((("authorization", "Bearer s3cret"),), "ipv4:127.0.0.1:5000"))
    b = client_identity(_Context((("authorization", "Bearer other"),), "ipv4:127.0.0.1:5000"))
    assert a.startswith("token:") and a != b and "s3cret" not in a
    assert client_identity(_Context((), "ipv4:10.0.0.1:5000")) == client_identity(_Context((), "ipv4:10.0.0.1:6000"))
    assert client_identity(_Context((), "ipv6:[::1]:5000")) == "ipv6:[::1]"


@pytest.mark.parametrize(
    ("limits", "message"),
    [
        ({"reserved_workers": 0}, "limits.reserved_workers"),
        ({"max_streams": 29}, "limits.max_streams: 29 must be in"),
        ({"max_concurrent_rpcs": 8}, "limits.max_concurrent_rpcs"),
        ({"max_stream_bytes": 1}, "limits: need max_request_bytes <= max_stream_bytes"),
        ({"max_batch_per_model": {"nope": 4}}, "limits.max_batch_per_model: 'nope' is not served"),
        ({"max_batch_per_model": {"m": 0}}, "limits.max_batch_per_model.m"),
    ],
)
def test_cloud_limits_are_validated_naming_the_field(limits: dict, message: str) -> None:
    with pytest.raises(SettingsError, match=message.replace("[", r"\[")):
        CloudConfig.from_dict({"limits": limits, "models": [{"name": "m", "source": "resnet18"}]})


def test_default_serving_limits_fit_the_default_workers() -> None:
    ServingLimits().check(32)
    assert CloudConfig().limits.batch_limit("any") == 8


class _StreamContext:
    """The two ServicerContext calls the watchdog makes: a done-callback and, when idle, cancel."""

    def __init__(self) -> None:
        self.cancelled = threading.Event()

    def add_callback(self, _callback) -> bool:
        return True

    def cancel(self) -> None:
        self.cancelled.set()

    def peer(self) -> str:
        return "ipv4:127.0.0.1:1"

    def invocation_metadata(self):
        return ()


def test_idle_watchdog_ends_an_idle_stream_and_its_thread_stops_on_close() -> None:
    from runtime.admission import IdleWatchdog

    release = threading.Event()

    def requests():
        release.wait(5)
        yield "late"

    watchdog = IdleWatchdog(0.2)
    context = _StreamContext()
    stream = watchdog.watch(requests(), context)
    reader = threading.Thread(target=lambda: next(stream, None))
    reader.start()
    assert context.cancelled.wait(5), "an idle stream was not ended"
    assert watchdog.ended == 1
    release.set()
    reader.join(5)
    thread = watchdog._thread
    assert thread is not None and thread.is_alive()
    watchdog.close()
    assert not thread.is_alive()
    # A closed watchdog starts no new thread.
    watchdog.watch(iter(()), _StreamContext())
    assert watchdog._thread is thread and not thread.is_alive()


class _LateCallbackContext(_StreamContext):
    """gRPC runs done-callbacks when the call has ended, possibly after the client has its status:
    this context keeps them, to run them late (or never)."""

    def __init__(self) -> None:
        super().__init__()
        self.callbacks: list = []

    def add_callback(self, callback) -> bool:
        self.callbacks.append(callback)
        return True


@pytest.mark.parametrize("kind", ["unary_unary", "stream_unary", "unary_stream", "stream_stream"])
def test_a_call_frees_its_slot_when_its_handler_ends_not_when_a_late_callback_runs(kind: str) -> None:
    import grpc

    from runtime.admission import Admission

    def unary(request, context):
        return "answer"

    def stream(request, context):
        yield "one"
        yield "two"

    behaviour = stream if kind.endswith("_stream") else unary
    handler = getattr(grpc, f"{kind}_rpc_method_handler")(behaviour)
    admission = Admission(ServingLimits(reserved_workers=1, max_streams=1, max_streams_per_client=1), 4)

    class Details:
        method = "/cleave.SplitInference/Infer"

    for _ in range(2):  # the second call would be refused if the first still held the only stream slot
        wrapped = admission.intercept_service(lambda _details: handler, Details())
        context = _LateCallbackContext()
        request = iter(["request"]) if kind.startswith("stream_") else "request"
        answer = getattr(wrapped, kind)(request, context)
        if kind.endswith("_stream"):
            assert admission.in_progress == (1, 1)
            assert list(answer) == ["one", "two"]
        else:
            assert answer == "answer"
        assert admission.in_progress == (0, 0)
        for callback in context.callbacks:  # the late callback frees nothing twice
            callback()
        assert admission.in_progress == (0, 0)
    admission.watchdog.close()


def test_a_response_stream_closed_before_it_started_is_freed_by_the_callback() -> None:
    import grpc

    from runtime.admission import Admission

    def stream(request, context):
        yield "never read"

    handler = grpc.unary_stream_rpc_method_handler(stream)
    admission = Admission(ServingLimits(reserved_workers=1, max_streams=1, max_streams_per_client=1), 4)

    class Details:
        method = "/cleave.SplitInference/Infer"

    context = _LateCallbackContext()
    answer = admission.intercept_service(lambda _details: handler, Details()).unary_stream("request", context)
    answer.close()  # the client went away before the first response
    assert admission.in_progress == (1, 1)
    for callback in context.callbacks:
        callback()
    assert admission.in_progress == (0, 0)
    admission.watchdog.close()
