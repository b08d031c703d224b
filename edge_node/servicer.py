"""gRPC adapter for the ``Edge`` service that local apps call.

The only place where the library's :class:`~partitioner.placement.Placement` meets the wire's
``cleave.v1.Placement`` enum: :func:`placement_to_proto` and :func:`placement_from_proto` convert.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import grpc

from compressor import RAW_UNCOMPRESSED, CodecError, EncodingSpec, check_header, encode
from compressor.framing import WALK_FROM, PayloadsApart, parse_apart
from partitioner.placement import Placement
from protos.cleave.v1 import edge_pb2, edge_pb2_grpc, tensor_pb2
from protos.cleave.v1 import split_inference_pb2 as si_pb2
from protos.errors import FailedPrecondition, InvalidArgument, NotFound, ResourceExhausted, maps_errors, status_of

from .autoplan import AutoPlanner
from .runtime import ActivePlan, EdgeRuntime, Outcome

_TO_PROTO = {
    Placement.SPLIT: edge_pb2.SPLIT,
    Placement.EDGE_ONLY: edge_pb2.EDGE_ONLY,
    Placement.CLOUD_ONLY: edge_pb2.CLOUD_ONLY,
    Placement.LOCAL_FALLBACK: edge_pb2.LOCAL_FALLBACK,
}
_FROM_PROTO = {value: placement for placement, value in _TO_PROTO.items()}


def placement_to_proto(placement: Placement) -> int:
    """The wire's ``cleave.v1.Placement`` value of ``placement``."""
    return _TO_PROTO[placement]


def placement_from_proto(value: int, field: str = "placement") -> Placement:
    """The placement a wire value names; InvalidArgument naming ``field`` for an unknown or unset one."""
    try:
        return _FROM_PROTO[value]
    except KeyError:
        name = edge_pb2.Placement.Name(value) if value in edge_pb2.Placement.values() else str(value)
        raise InvalidArgument(f"{field}: {name} is not a placement (SPLIT, EDGE_ONLY, CLOUD_ONLY)") from None


def plan_to_proto(plan: ActivePlan, model: str) -> edge_pb2.Plan:
    """``plan`` as ``GetPlan``, ``GetStatus`` and replies report it."""
    message = edge_pb2.Plan(
        model=model,
        placement=placement_to_proto(plan.placement),
        encoding=plan.spec.to_proto(),
        reason=plan.reason,
        objective=plan.objective,
    )
    if plan.predicted is not None:
        p = plan.predicted
        message.predicted_ms = p.total_ms
        message.predicted_bytes = plan.predicted_bytes
        message.predicted.CopyFrom(
            edge_pb2.PredictedLatency(
                edge_ms=p.edge_ms,
                encode_ms=p.encode_ms,
                upload_ms=p.upload_ms,
                rtt_ms=p.rtt_ms,
                decode_ms=p.decode_ms,
                cloud_ms=p.cloud_ms,
                download_ms=p.download_ms,
                total_ms=p.total_ms,
            )
        )
    if plan.cut is not None:
        message.cut_index = plan.cut.index
        message.cut_name = plan.cut.name
    message.weight_bits.update(plan.weight_bits)
    return message


def pin_target(wanted: edge_pb2.Plan) -> tuple[Placement, int | str | None]:
    """The placement and cut a ``Replan`` plan asks for.

    EDGE_ONLY and CLOUD_ONLY need no cut. SPLIT (or no placement, as older clients send) takes
    ``cut_name``, else ``cut_index``; no placement with neither (cut index 0, the input) is cloud-only.
    """
    if wanted.placement == edge_pb2.PLACEMENT_UNSPECIFIED:
        if not wanted.cut_name and wanted.cut_index == 0:
            return Placement.CLOUD_ONLY, None
        placement = Placement.SPLIT
    else:
        placement = placement_from_proto(wanted.placement, "plan.placement")
    if placement == Placement.LOCAL_FALLBACK:
        raise InvalidArgument("plan.placement: LOCAL_FALLBACK is where a request ran, not a plan")
    if placement == Placement.EDGE_ONLY:
        return placement, None
    if placement == Placement.CLOUD_ONLY:
        return placement, wanted.cut_name or wanted.cut_index or None
    return placement, wanted.cut_name or wanted.cut_index


_INPUTS_FIELD = edge_pb2.EdgeInferRequest.DESCRIPTOR.fields_by_name["inputs"].number


def parse_infer_request(data: bytes, walk_from: int = WALK_FROM) -> edge_pb2.EdgeInferRequest | PayloadsApart:
    """An app's ``Infer`` request, its inputs' payloads read in place (:func:`~compressor.framing.parse_apart`):
    neither protobuf's parse nor reading the field copies them (twice 0.6 MB for a 224x224 image)."""
    return parse_apart(edge_pb2.EdgeInferRequest, data, _INPUTS_FIELD, walk_from=walk_from)


PARSERS = {"Infer": parse_infer_request, "InferStream": parse_infer_request}
"""What ``Service(..., parsers=...)`` takes for the ``Edge`` service."""


class EdgeServicer(edge_pb2_grpc.EdgeServicer):
    """Serves local apps; ``max_batch`` bounds the rows of one request's input (checked from its header)."""

    def __init__(
        self,
        runtime: EdgeRuntime,
        cloud_target: str,
        stream_window: int,
        autoplanner: AutoPlanner | None = None,
        max_batch: int = 8,
    ) -> None:
        self.runtime = runtime
        self.max_batch = max_batch
        self.autoplanner = autoplanner
        self.cloud_target = cloud_target
        self.stream_window = stream_window
        # The plan of the latest reply and its message, replaced whole: plans are immutable and change
        # rarely, and building the message took 40% of a reply's time (9 of 22 us).
        self._reply_plan: tuple[ActivePlan, edge_pb2.Plan] | None = None

    def _serve(self, request: edge_pb2.EdgeInferRequest | PayloadsApart) -> edge_pb2.EdgeInferResponse:
        model = self.runtime.model
        payloads: list[memoryview] | None = None
        if isinstance(request, PayloadsApart):
            request, payloads = request.message, request.payloads
        if request.model and request.model != model.name:
            raise NotFound(f"model: {request.model!r} is not served here (serving {model.name!r})")
        self._check_headers(request.inputs)
        inputs = []
        for i, tensor in enumerate(request.inputs):
            try:
                # The backend's array (no torch on the ONNX edge), over the payload as it arrived.
                inputs.append(model.decode(tensor, None if payloads is None else payloads[i]))
            except CodecError as exc:
                raise InvalidArgument(f"inputs[{i}]: {exc}") from exc
        outcome = self.runtime.infer(inputs)
        return self._response(request.request_id, outcome)

    def _check_headers(self, tensors: list[tensor_pb2.Tensor]) -> None:
        """Refuse inputs that do not fit the model (count, dtype, shape, batch) before decoding any."""
        model = self.runtime.model
        expected = tuple(model.input_shape)
        if len(tensors) != 1:
            raise InvalidArgument(f"inputs: model {model.name!r} takes 1 tensor, got {len(tensors)}")
        try:
            dtype, shape = check_header(tensors[0])
        except CodecError as exc:
            raise InvalidArgument(f"inputs[0].{str(exc).removeprefix('tensor.')}") from exc
        if dtype != "float32":
            raise InvalidArgument(f"inputs[0].dtype: expected float32, got {dtype}")
        if len(shape) != len(expected) or shape[1:] != expected[1:] or shape[0] < 1:
            raise InvalidArgument(f"inputs[0].shape: expected (N, {', '.join(map(str, expected[1:]))}), got {shape}")
        if shape[0] > self.max_batch:
            raise ResourceExhausted(
                f"inputs[0].shape[0]: batch {shape[0]} exceeds the limit of {self.max_batch} (limits.max_batch)"
            )

    def _plan_message(self, plan: ActivePlan) -> edge_pb2.Plan:
        """``plan`` as replies report it, built once per plan (the reply copies it)."""
        cached = self._reply_plan
        if cached is not None and cached[0] is plan:
            return cached[1]
        message = plan_to_proto(plan, self.runtime.model.name)
        self._reply_plan = (plan, message)
        return message

    def _response(self, request_id: int, outcome: Outcome) -> edge_pb2.EdgeInferResponse:
        return edge_pb2.EdgeInferResponse(
            request_id=request_id,
            # As the cloud sent them when they are RAW already: encoding the decoded arrays again gives
            # the same tensors (and cost 0.2 ms per request with the caches cold after the tail).
            outputs=outcome.raw_outputs
            if outcome.raw_outputs is not None
            else [encode(o, RAW_UNCOMPRESSED) for o in outcome.outputs],
            placement=placement_to_proto(outcome.placement),
            plan=self._plan_message(outcome.plan),
            timing=outcome.timing,
            bytes_up=outcome.bytes_up,
            bytes_down=outcome.bytes_down,
            note=outcome.note,
        )

    @maps_errors
    def Infer(self, request: edge_pb2.EdgeInferRequest | PayloadsApart, context: grpc.ServicerContext):
        return self._serve(request)

    @maps_errors
    def InferStream(self, request_iterator: Iterator[edge_pb2.EdgeInferRequest], context: grpc.ServicerContext):
        """Serve up to ``stream_window`` requests of the stream at once; replies in completion order."""
        replies: queue.Queue = queue.Queue()
        window = threading.Semaphore(self.stream_window)
        done = object()

        def one(request: edge_pb2.EdgeInferRequest | PayloadsApart) -> None:
            try:
                replies.put(self._serve(request))
            except Exception as exc:  # noqa: BLE001 - a bad request answers alone; the stream goes on
                code, message = status_of(exc)
                if isinstance(request, PayloadsApart):
                    request = request.message
                replies.put(
                    edge_pb2.EdgeInferResponse(
                        request_id=request.request_id,
                        error=si_pb2.RequestError(code=code.value[0], message=message),
                    )
                )
            finally:
                window.release()

        broken: list[Exception] = []  # what ended the incoming side early (an undecodable message)

        def read(pool: ThreadPoolExecutor) -> None:
            try:
                for request in request_iterator:
                    window.acquire()
                    pool.submit(one, request)
            except Exception as exc:  # noqa: BLE001 - reported as the stream's status once its replies are out
                broken.append(exc)
            finally:
                pool.shutdown(wait=True)
                replies.put(done)

        pool = ThreadPoolExecutor(max_workers=self.stream_window, thread_name_prefix="edge-stream")
        threading.Thread(target=read, args=(pool,), daemon=True).start()
        while (reply := replies.get()) is not done:
            yield reply
        if broken:
            raise broken[0]

    @maps_errors
    def GetStatus(self, request: edge_pb2.GetStatusRequest, context: grpc.ServicerContext):
        runtime = self.runtime
        link = runtime.link.monitor.snapshot()
        counters = runtime.counters
        auto = self.autoplanner
        return edge_pb2.EdgeStatus(
            model=runtime.model.name,
            fingerprint=runtime.model.fingerprint,
            input_shape=list(runtime.model.input_shape),
            cloud=self.cloud_target,
            cloud_reachable=runtime.link.reachable,
            cloud_error=runtime.link.last_error,
            link=edge_pb2.LinkStatus(
                rtt_ms=link.rtt_ms, up_mbps=link.up_mbps, down_mbps=link.down_mbps, samples=link.samples
            ),
            plan=plan_to_proto(runtime.plan, runtime.model.name),
            queue_depth=runtime.inflight,
            counters=counters.to_proto(runtime.link.sessions_opened, runtime.link.reconnects),
            mean_latency_ms=counters.recent_mean_ms,
            auto_plan=auto is not None and auto.enabled,
            planner_error=auto.error if auto is not None else "",
            backend=runtime.model.describe(),
        )

    @maps_errors
    def GetPlan(self, request: edge_pb2.GetPlanRequest, context: grpc.ServicerContext):
        return plan_to_proto(self.runtime.plan, self.runtime.model.name)

    @maps_errors
    def Replan(self, request: edge_pb2.ReplanRequest, context: grpc.ServicerContext):
        if not request.HasField("plan"):
            if self.autoplanner is None:
                raise FailedPrecondition("plan: this edge runs a fixed cut (start it with --cut auto to plan)")
            self.autoplanner.replan()
            return plan_to_proto(self.runtime.plan, self.runtime.model.name)
        wanted = request.plan
        try:
            spec = EncodingSpec.from_proto(wanted.encoding) if wanted.HasField("encoding") else self.runtime.plan.spec
        except (CodecError, ValueError) as exc:
            raise InvalidArgument(f"plan.encoding: {exc}") from exc
        placement, cut = pin_target(wanted)
        if self.autoplanner is not None:
            self.autoplanner.pin_manually()  # first, so a re-plan in flight cannot undo the pin
        bits: dict[str, int] | int | None = dict(wanted.weight_bits) or None
        if bits is not None and set(bits) == {"*"}:
            bits = bits["*"]  # one width for every layer of the head
        plan = self.runtime.pin(placement, cut, spec, reason=wanted.reason or "pinned by Replan", weight_bits=bits)
        return plan_to_proto(plan, self.runtime.model.name)
