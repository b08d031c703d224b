"""A model's tail replica: the class Ray Serve runs, one deployment per served model.

Each replica loads the model from the same :class:`~partitioner.models.ModelSpec` as the front door
and refuses to start when its fingerprint differs (edge, front door and replica must run the same
graph and weights). A request's features arrive as encoded bytes and are decoded here.

Batching uses Serve's ``@serve.batch``: the queue lives in the replica, so requests from every front
door that routes to it share batches (Cleave's own batcher lives in one front door and only sees its
sessions). Requests in one batch are grouped by part and by shapes past the batch dimension; each
group is concatenated along dim 0, run once and split back. With ``max_batch_size: 1`` every request
runs alone, exactly as in the single-process cloud (bit-exact).
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections import defaultdict

import torch
from ray import serve

from compressor import CodecError, CodecLimits, decode, encode
from partitioner.loaded import LoadedModel, as_tensor_list, check_features
from partitioner.models import ModelSpec
from protos.cleave.v1 import tensor_pb2
from protos.errors import InvalidArgument, WireError

from .autoscale import LANE_METRIC
from .lane import KV_PREFIX, LaneServer
from .messages import WHOLE_MODEL, TailReply, TailRequest

log = logging.getLogger(__name__)


class ModelMismatch(RuntimeError):
    """The replica loaded different graph or weights than the front door."""


class TailReplica:
    """Decodes features, runs a part of one model (a tail at a cut, or the whole model), encodes outputs."""

    def __init__(
        self,
        spec: ModelSpec,
        fingerprint: str,
        torch_threads: int = 1,
        max_batch_size: int = 1,
        batch_wait_timeout_s: float = 0.0,
        lane: bool = False,
        drain_s: float = 20.0,
    ) -> None:
        if torch_threads > 0:
            torch.set_num_threads(torch_threads)
        self.model = LoadedModel.load(spec)
        if self.model.fingerprint != fingerprint:
            raise ModelMismatch(
                f"model {spec.name!r}: this replica loaded fingerprint {self.model.fingerprint[:16]}..., the front "
                f"door has {fingerprint[:16]}...; every node must load the same graph and weights"
            )
        self._parts: dict[int | str, tuple] = {}
        # One tail call at a time: a replica is ``torch_threads`` cores of compute, and requests beyond
        # the one running wait here (their decoding overlaps). More throughput comes from more
        # replicas or from batching, not from tails contending for the same cores.
        self._compute = threading.Lock()
        self.batching = max_batch_size > 1
        if self.batching:
            self.run_batch.set_max_batch_size(max_batch_size)
            self.run_batch.set_batch_wait_timeout_s(batch_wait_timeout_s)
        try:
            replica_id = serve.get_replica_context().replica_id
            self.replica, full_id = replica_id.unique_id, replica_id.to_full_id_str()
        except Exception:  # noqa: BLE001 - outside Serve (a unit test builds the class directly)
            self.replica, full_id = "local", ""
        # The direct lane (ray.transport: direct): front doors send requests to this replica's own
        # port, found under its replica id in Ray's key-value store (see lane.py).
        self._lane: LaneServer | None = None
        self._lane_key = KV_PREFIX + full_id
        self._drain_s = drain_s
        if lane:
            import ray
            from ray.experimental import internal_kv

            self._lane = LaneServer(self._run_one, host=ray.util.get_node_ip_address())
            internal_kv._internal_kv_put(self._lane_key, self._lane.entry())

    def _run_one(self, request: TailRequest) -> TailReply:
        return self.run_many([(request, time.perf_counter())])[0]

    def record_autoscaling_stats(self) -> dict[str, float]:
        """Serve's hook for custom autoscaling metrics: requests on the direct lane, which Serve does not see."""
        return {LANE_METRIC: float(self._lane.in_flight if self._lane is not None else 0)}

    def __del__(self) -> None:
        """Serve calls this once it has drained its own requests: drain the lane's too, then close it."""
        lane, self._lane = getattr(self, "_lane", None), None
        if lane is None:
            return
        try:
            from ray.experimental import internal_kv

            internal_kv._internal_kv_del(self._lane_key)
        except Exception as exc:  # noqa: BLE001 - shutting down: front doors also drop lanes of dead actors
            log.warning("lane: could not remove this replica's entry: %s", exc)
        left = lane.close(self._drain_s)
        if left:
            log.warning("lane: %d requests still running after %.0fs of draining", left, self._drain_s)

    async def __call__(self, request: TailRequest) -> TailReply:
        if self.batching:
            return await self.run_batch((request, time.perf_counter()))
        return (await asyncio.to_thread(self.run_many, [(request, time.perf_counter())]))[0]

    @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.0)  # both set again in __init__ from ray:
    async def run_batch(self, items: list[tuple[TailRequest, float]]) -> list[TailReply]:
        return await asyncio.to_thread(self.run_many, items)

    def run_many(self, items: list[tuple[TailRequest, float]]) -> list[TailReply]:
        """Decode every request, run compatible ones together, encode each one's outputs."""
        started = time.perf_counter()
        replies: list[TailReply | None] = [None] * len(items)
        decoded: dict[int, list[torch.Tensor]] = {}
        decode_ms: dict[int, float] = {}
        groups: dict[tuple, list[int]] = defaultdict(list)
        for i, (request, _) in enumerate(items):
            t0 = time.perf_counter()
            try:
                tensors = self._decode(request)
            except WireError as exc:
                replies[i] = TailReply(error=(type(exc).__name__, str(exc)), replica=self.replica)
                continue
            decoded[i] = tensors
            decode_ms[i] = (time.perf_counter() - t0) * 1e3
            signature = tuple((t.dtype, tuple(t.shape[1:])) for t in tensors)
            groups[(request.part, signature)].append(i)
        for (part, _), members in groups.items():
            fn = self._part(part)[1]
            gate = time.perf_counter()
            try:
                with self._compute, torch.inference_mode():
                    t0 = time.perf_counter()
                    if len(members) == 1:
                        outputs = [as_tensor_list(fn(*decoded[members[0]]))]
                    else:
                        rows = [decoded[i][0].shape[0] for i in members]
                        joined = [torch.cat(column) for column in zip(*(decoded[i] for i in members), strict=True)]
                        merged = as_tensor_list(fn(*joined))
                        outputs = [list(parts) for parts in zip(*(o.split(rows) for o in merged), strict=True)]
            except Exception as exc:  # noqa: BLE001 - a failing model answers its requests, the replica lives on
                log.error("%s part %s failed", self.model.name, part, exc_info=exc)
                for i in members:
                    replies[i] = TailReply(error=("RuntimeError", f"tail failed: {exc}"), replica=self.replica)
                continue
            compute_ms = (time.perf_counter() - t0) * 1e3
            for i, produced in zip(members, outputs, strict=True):
                request, arrived = items[i]
                t1 = time.perf_counter()
                encoded = tuple(encode(o, request.result_spec).SerializeToString() for o in produced)
                replies[i] = TailReply(
                    outputs=encoded,
                    queue_ms=max((started - arrived) * 1e3, 0.0) + (t0 - gate) * 1e3,
                    decode_ms=decode_ms[i],
                    compute_ms=compute_ms,
                    encode_ms=(time.perf_counter() - t1) * 1e3,
                    batch_size=len(members),
                    replica=self.replica,
                )
        return replies  # type: ignore[return-value]

    def _part(self, part: int | str) -> tuple:
        if part not in self._parts:
            if part == WHOLE_MODEL:
                self._parts[part] = (None, self.model.module)
            else:
                cut, _head, tail = self.model.parts(int(part))
                self._parts[part] = (cut, tail)
        return self._parts[part]

    def _decode(self, request: TailRequest) -> list[torch.Tensor]:
        try:
            cut = self._part(request.part)[0]
        except (KeyError, ValueError) as exc:
            raise InvalidArgument(f"cut: {exc}") from exc
        limits = CodecLimits(max_elements=request.max_elements, max_payload_bytes=request.max_payload_bytes)
        tensors = []
        for i, data in enumerate(request.features):
            msg = tensor_pb2.Tensor()
            try:
                msg.ParseFromString(data)
                tensors.append(decode(msg, limits, self.model.entropy_tables))
            except (CodecError, ValueError) as exc:
                raise InvalidArgument(f"features[{i}]: {exc}") from exc
        if cut is not None:
            try:
                check_features(cut, tensors)
            except ValueError as exc:
                raise InvalidArgument(str(exc)) from exc
        return tensors
