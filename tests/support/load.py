"""Concurrent, checked load on an edge daemon, for the fault tests.

Worker threads send requests with unique ids (``worker * 1_000_000 + seq``) for as long as they are
told, over unary ``Infer`` and over ``InferStream`` (a few requests in flight per stream). Every reply
is matched to its request by id and checked against the reference output of the input it was sent
(rel error and exact equality), so a reply that went to the wrong request, a lost request or a second
reply for one request all show up in the report. A watcher samples ``GetStatus`` meanwhile.

In-process: ``Load(...).start()`` then ``.finish()``. In a network namespace (where the test process
cannot reach the edge): ``python -m tests.support.load --edge ADDR --model JSON ...`` prints the report as JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import threading
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

import grpc
import torch

from cleave_cli.client import EdgeClient, outputs_of
from compressor import RAW_UNCOMPRESSED, encode
from protos.cleave.v1 import edge_pb2

ID_STRIDE = 1_000_000  # request id = worker * ID_STRIDE + seq
CODE_NAMES = {code.value[0]: code.name for code in grpc.StatusCode}


@dataclass
class Reply:
    """One reply (or error) the app got back."""

    rid: int
    worker: int
    sent: float  # time.monotonic() when sent
    done: float  # ... when the reply or error arrived
    placement: str = ""
    rel_err: float = float("nan")  # vs the reference output of the input sent
    exact: bool = False
    top1: bool = False
    edge_ms: float = 0.0  # the edge's own total time for the request (reply.timing.total_ms)
    note: str = ""
    error: str = ""


@dataclass
class Report:
    sent: dict[int, float] = field(default_factory=dict)  # request id -> time sent
    replies: list[Reply] = field(default_factory=list)
    status: list[dict] = field(default_factory=list)  # GetStatus samples over time

    def to_json(self) -> str:
        return json.dumps({"sent": self.sent, "replies": [asdict(r) for r in self.replies], "status": self.status})

    @classmethod
    def from_json(cls, text: str) -> Report:
        data = json.loads(text)
        return cls(
            sent={int(k): v for k, v in data["sent"].items()},
            replies=[Reply(**r) for r in data["replies"]],
            status=data["status"],
        )

    # -- what the fault tests assert ------------------------------------------------------------
    def problems(self, split_tol: float = 0.02) -> list[str]:
        """Everything that breaks "every request got exactly one correct reply"; empty when none."""
        out = []
        counts = Counter(r.rid for r in self.replies)
        missing = sorted(set(self.sent) - set(counts))
        if missing:
            out.append(f"{len(missing)} requests got no reply, e.g. {missing[:5]}")
        unknown = sorted(set(counts) - set(self.sent))
        if unknown:
            out.append(f"{len(unknown)} replies for requests never sent, e.g. {unknown[:5]}")
        dup = sorted(rid for rid, n in counts.items() if n > 1)
        if dup:
            out.append(f"{len(dup)} requests got more than one reply, e.g. {dup[:5]}")
        errors = [r for r in self.replies if r.error]
        if errors:
            out.append(f"{len(errors)} requests failed, e.g. {errors[0].error}")
        for r in self.replies:
            if r.error:
                continue
            if r.placement == "LOCAL_FALLBACK" and not r.exact:
                out.append(f"request {r.rid}: local reply differs from the model's output (rel err {r.rel_err:.2e})")
            elif not (r.top1 and r.rel_err < split_tol):
                out.append(f"request {r.rid} ({r.placement}): rel err {r.rel_err:.2e}, top-1 equal {r.top1}")
        return out

    def ok(self) -> list[Reply]:
        return [r for r in self.replies if not r.error]

    def local(self) -> list[Reply]:
        return [r for r in self.ok() if r.placement == "LOCAL_FALLBACK"]

    def split(self) -> list[Reply]:
        return [r for r in self.ok() if r.placement == "SPLIT"]

    def summary(self) -> dict:
        lat = sorted(r.done - r.sent for r in self.ok())
        return {
            "sent": len(self.sent),
            "replies": len(self.replies),
            "split": len(self.split()),
            "local": len(self.local()),
            "errors": sum(1 for r in self.replies if r.error),
            "max_latency_s": round(lat[-1], 3) if lat else None,
            "p50_latency_s": round(lat[len(lat) // 2], 3) if lat else None,
        }


class Load:
    """``unary`` + ``streams`` worker threads sending to ``target`` until ``finish()`` (or ``max_per_worker``)."""

    def __init__(
        self,
        target: str,
        inputs: list[torch.Tensor],
        refs: list[torch.Tensor],
        unary: int = 6,
        streams: int = 2,
        stream_window: int = 3,
        pause_s: float = 0.02,
        max_per_worker: int = 2000,
        rpc_timeout_s: float = 30.0,
    ) -> None:
        self.target = target
        self.inputs = [encode(x.contiguous(), RAW_UNCOMPRESSED) for x in inputs]
        self.refs = refs
        self.unary, self.streams, self.stream_window = unary, streams, stream_window
        self.pause_s, self.max_per_worker, self.rpc_timeout_s = pause_s, max_per_worker, rpc_timeout_s
        self.report = Report()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._client = EdgeClient(target)

    # -- control --------------------------------------------------------------------------------
    def start(self) -> Load:
        for w in range(self.unary):
            self._threads.append(threading.Thread(target=self._unary_worker, args=(w + 1,), daemon=True))
        for w in range(self.streams):
            self._threads.append(threading.Thread(target=self._stream_worker, args=(self.unary + w + 1,), daemon=True))
        self._threads.append(threading.Thread(target=self._watch, daemon=True))
        for t in self._threads:
            t.start()
        return self

    def finish(self, timeout: float = 60.0) -> Report:
        """Stop sending, wait for every outstanding reply (bounded), and return the report."""
        self._stop.set()
        deadline = time.monotonic() + timeout
        for t in self._threads:
            t.join(max(deadline - time.monotonic(), 0.0))
        stuck = [t.name for t in self._threads if t.is_alive()]
        if stuck:
            raise TimeoutError(f"load workers still waiting after {timeout}s: {stuck}")
        self._client.close()
        return self.report

    def wait_until(self, predicate, timeout: float, what: str) -> float:
        """Wait (bounded) until ``predicate(report)`` holds; returns the time it did."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self._lock:
                if predicate(self.report):
                    return time.monotonic()
            time.sleep(0.05)
        raise TimeoutError(f"{what}: not within {timeout}s; so far {self.report.summary()}")

    # -- workers --------------------------------------------------------------------------------
    def _request(self, worker: int, seq: int) -> edge_pb2.EdgeInferRequest:
        rid = worker * ID_STRIDE + seq
        with self._lock:
            self.report.sent[rid] = time.monotonic()
        return edge_pb2.EdgeInferRequest(request_id=rid, inputs=[self.inputs[rid % len(self.inputs)]])

    def _record(self, worker: int, rid: int, reply: edge_pb2.EdgeInferResponse | None, error: str = "") -> None:
        done = time.monotonic()
        with self._lock:
            sent = self.report.sent.get(rid, done)
        r = Reply(rid=rid, worker=worker, sent=sent, done=done, error=error)
        if reply is not None and reply.HasField("error") and reply.error.code:
            r.error = f"{CODE_NAMES.get(reply.error.code, reply.error.code)}: {reply.error.message}"
        elif reply is not None:
            r.placement, r.note = edge_pb2.Placement.Name(reply.placement), reply.note
            r.edge_ms = reply.timing.total_ms
            out, ref = outputs_of(reply)[0], self.refs[rid % len(self.refs)]
            r.exact = torch.equal(out, ref)
            r.rel_err = float((out - ref).norm() / ref.norm())
            r.top1 = bool(torch.equal(out.argmax(-1), ref.argmax(-1)))
        with self._lock:
            self.report.replies.append(r)

    def _unary_worker(self, worker: int) -> None:
        for seq in range(1, self.max_per_worker + 1):
            if self._stop.is_set():
                return
            request = self._request(worker, seq)
            try:
                reply = self._client.stub.Infer(request, timeout=self.rpc_timeout_s)
            except grpc.RpcError as exc:
                self._record(worker, request.request_id, None, f"{exc.code().name}: {exc.details()}")
            else:
                if reply.request_id != request.request_id:
                    self._record(worker, reply.request_id, reply)  # shows up as a reply to the wrong request
                else:
                    self._record(worker, request.request_id, reply)
            self._stop.wait(self.pause_s)

    def _stream_worker(self, worker: int) -> None:
        window = threading.Semaphore(self.stream_window)
        outstanding: set[int] = set()

        def requests() -> Iterator[edge_pb2.EdgeInferRequest]:
            for seq in range(1, self.max_per_worker + 1):
                while not window.acquire(timeout=0.1):
                    if self._stop.is_set():
                        return
                if self._stop.is_set():
                    return
                request = self._request(worker, seq)
                outstanding.add(request.request_id)
                yield request
                self._stop.wait(self.pause_s)

        try:
            for reply in self._client.stub.InferStream(requests(), timeout=300):
                outstanding.discard(reply.request_id)
                self._record(worker, reply.request_id, reply)
                window.release()
        except grpc.RpcError as exc:
            for rid in list(outstanding):
                self._record(worker, rid, None, f"stream {exc.code().name}: {exc.details()}")

    def _watch(self) -> None:
        while not self._stop.is_set():
            try:
                s = self._client.status(timeout=5)
            except grpc.RpcError:
                continue
            sample = {
                "t": time.monotonic(),
                "reachable": s.cloud_reachable,
                "error": s.cloud_error,
                "queue": s.queue_depth,
                "fallback": s.counters.fallback,
                "split": s.counters.split,
                "reconnects": s.counters.reconnects,
            }
            with self._lock:
                self.report.status.append(sample)
            self._stop.wait(0.25)


def references(model_spec: dict, n: int = 8) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """``n`` distinct inputs for ``model_spec`` and the float model's outputs for them."""
    from partitioner.loaded import LoadedModel
    from partitioner.models import ModelSpec, calibration_batch

    model = LoadedModel.load(ModelSpec.from_dict(model_spec))
    inputs = [calibration_batch(model.input_shape, 1, seed=s) for s in range(n)]
    with torch.inference_mode():
        refs = [model.module(x) for x in inputs]
    return inputs, refs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--edge", required=True)
    parser.add_argument("--model", required=True, help="the edge's model spec, as JSON")
    parser.add_argument("--seconds", type=float, required=True, help="at most this long")
    parser.add_argument("--ready-file", help="created once --ready-split split replies are in")
    parser.add_argument("--ready-split", type=int, default=10)
    parser.add_argument(
        "--resume-file",
        help="once it holds a time.monotonic() value T: stop 1 s after a split reply to a request sent after T",
    )
    parser.add_argument("--unary", type=int, default=6)
    parser.add_argument("--streams", type=int, default=2)
    parser.add_argument("--pause", type=float, default=0.02)
    args = parser.parse_args()
    torch.set_num_threads(1)
    inputs, refs = references(json.loads(args.model))
    load = Load(args.edge, inputs, refs, unary=args.unary, streams=args.streams, pause_s=args.pause).start()
    deadline, stop_at = time.monotonic() + args.seconds, None
    while time.monotonic() < min(deadline, stop_at or deadline):
        time.sleep(0.05)
        with load._lock:
            split = load.report.split()
        if args.ready_file and len(split) >= args.ready_split and not os.path.exists(args.ready_file):
            Path(args.ready_file).touch()
        if stop_at is None and args.resume_file and os.path.exists(args.resume_file):
            text = Path(args.resume_file).read_text().strip()
            if text and any(r.sent > float(text) for r in split):
                stop_at = time.monotonic() + 1.0
    print(load.finish().to_json())


if __name__ == "__main__":
    main()
