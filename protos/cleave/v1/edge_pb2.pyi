from protos.cleave.v1 import tensor_pb2 as _tensor_pb2
from protos.cleave.v1 import split_inference_pb2 as _split_inference_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Placement(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    PLACEMENT_UNSPECIFIED: _ClassVar[Placement]
    SPLIT: _ClassVar[Placement]
    EDGE_ONLY: _ClassVar[Placement]
    CLOUD_ONLY: _ClassVar[Placement]
    LOCAL_FALLBACK: _ClassVar[Placement]
PLACEMENT_UNSPECIFIED: Placement
SPLIT: Placement
EDGE_ONLY: Placement
CLOUD_ONLY: Placement
LOCAL_FALLBACK: Placement

class Plan(_message.Message):
    __slots__ = ("model", "placement", "cut_index", "cut_name", "encoding", "predicted_bytes", "predicted_ms", "reason", "weight_bits", "predicted", "objective")
    class WeightBitsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: int
        def __init__(self, key: _Optional[str] = ..., value: _Optional[int] = ...) -> None: ...
    MODEL_FIELD_NUMBER: _ClassVar[int]
    PLACEMENT_FIELD_NUMBER: _ClassVar[int]
    CUT_INDEX_FIELD_NUMBER: _ClassVar[int]
    CUT_NAME_FIELD_NUMBER: _ClassVar[int]
    ENCODING_FIELD_NUMBER: _ClassVar[int]
    PREDICTED_BYTES_FIELD_NUMBER: _ClassVar[int]
    PREDICTED_MS_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    WEIGHT_BITS_FIELD_NUMBER: _ClassVar[int]
    PREDICTED_FIELD_NUMBER: _ClassVar[int]
    OBJECTIVE_FIELD_NUMBER: _ClassVar[int]
    model: str
    placement: Placement
    cut_index: int
    cut_name: str
    encoding: _tensor_pb2.TensorEncoding
    predicted_bytes: int
    predicted_ms: float
    reason: str
    weight_bits: _containers.ScalarMap[str, int]
    predicted: PredictedLatency
    objective: str
    def __init__(self, model: _Optional[str] = ..., placement: _Optional[_Union[Placement, str]] = ..., cut_index: _Optional[int] = ..., cut_name: _Optional[str] = ..., encoding: _Optional[_Union[_tensor_pb2.TensorEncoding, _Mapping]] = ..., predicted_bytes: _Optional[int] = ..., predicted_ms: _Optional[float] = ..., reason: _Optional[str] = ..., weight_bits: _Optional[_Mapping[str, int]] = ..., predicted: _Optional[_Union[PredictedLatency, _Mapping]] = ..., objective: _Optional[str] = ...) -> None: ...

class PredictedLatency(_message.Message):
    __slots__ = ("edge_ms", "encode_ms", "upload_ms", "rtt_ms", "decode_ms", "cloud_ms", "download_ms", "total_ms")
    EDGE_MS_FIELD_NUMBER: _ClassVar[int]
    ENCODE_MS_FIELD_NUMBER: _ClassVar[int]
    UPLOAD_MS_FIELD_NUMBER: _ClassVar[int]
    RTT_MS_FIELD_NUMBER: _ClassVar[int]
    DECODE_MS_FIELD_NUMBER: _ClassVar[int]
    CLOUD_MS_FIELD_NUMBER: _ClassVar[int]
    DOWNLOAD_MS_FIELD_NUMBER: _ClassVar[int]
    TOTAL_MS_FIELD_NUMBER: _ClassVar[int]
    edge_ms: float
    encode_ms: float
    upload_ms: float
    rtt_ms: float
    decode_ms: float
    cloud_ms: float
    download_ms: float
    total_ms: float
    def __init__(self, edge_ms: _Optional[float] = ..., encode_ms: _Optional[float] = ..., upload_ms: _Optional[float] = ..., rtt_ms: _Optional[float] = ..., decode_ms: _Optional[float] = ..., cloud_ms: _Optional[float] = ..., download_ms: _Optional[float] = ..., total_ms: _Optional[float] = ...) -> None: ...

class EdgeInferRequest(_message.Message):
    __slots__ = ("request_id", "inputs", "model")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    INPUTS_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    request_id: int
    inputs: _containers.RepeatedCompositeFieldContainer[_tensor_pb2.Tensor]
    model: str
    def __init__(self, request_id: _Optional[int] = ..., inputs: _Optional[_Iterable[_Union[_tensor_pb2.Tensor, _Mapping]]] = ..., model: _Optional[str] = ...) -> None: ...

class StageTiming(_message.Message):
    __slots__ = ("edge_compute_ms", "encode_ms", "transfer_ms", "cloud_decode_ms", "cloud_compute_ms", "cloud_encode_ms", "decode_ms", "total_ms", "cloud_queue_ms")
    EDGE_COMPUTE_MS_FIELD_NUMBER: _ClassVar[int]
    ENCODE_MS_FIELD_NUMBER: _ClassVar[int]
    TRANSFER_MS_FIELD_NUMBER: _ClassVar[int]
    CLOUD_DECODE_MS_FIELD_NUMBER: _ClassVar[int]
    CLOUD_COMPUTE_MS_FIELD_NUMBER: _ClassVar[int]
    CLOUD_ENCODE_MS_FIELD_NUMBER: _ClassVar[int]
    DECODE_MS_FIELD_NUMBER: _ClassVar[int]
    TOTAL_MS_FIELD_NUMBER: _ClassVar[int]
    CLOUD_QUEUE_MS_FIELD_NUMBER: _ClassVar[int]
    edge_compute_ms: float
    encode_ms: float
    transfer_ms: float
    cloud_decode_ms: float
    cloud_compute_ms: float
    cloud_encode_ms: float
    decode_ms: float
    total_ms: float
    cloud_queue_ms: float
    def __init__(self, edge_compute_ms: _Optional[float] = ..., encode_ms: _Optional[float] = ..., transfer_ms: _Optional[float] = ..., cloud_decode_ms: _Optional[float] = ..., cloud_compute_ms: _Optional[float] = ..., cloud_encode_ms: _Optional[float] = ..., decode_ms: _Optional[float] = ..., total_ms: _Optional[float] = ..., cloud_queue_ms: _Optional[float] = ...) -> None: ...

class EdgeInferResponse(_message.Message):
    __slots__ = ("request_id", "outputs", "placement", "plan", "timing", "bytes_up", "bytes_down", "note", "error")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    OUTPUTS_FIELD_NUMBER: _ClassVar[int]
    PLACEMENT_FIELD_NUMBER: _ClassVar[int]
    PLAN_FIELD_NUMBER: _ClassVar[int]
    TIMING_FIELD_NUMBER: _ClassVar[int]
    BYTES_UP_FIELD_NUMBER: _ClassVar[int]
    BYTES_DOWN_FIELD_NUMBER: _ClassVar[int]
    NOTE_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    request_id: int
    outputs: _containers.RepeatedCompositeFieldContainer[_tensor_pb2.Tensor]
    placement: Placement
    plan: Plan
    timing: StageTiming
    bytes_up: int
    bytes_down: int
    note: str
    error: _split_inference_pb2.RequestError
    def __init__(self, request_id: _Optional[int] = ..., outputs: _Optional[_Iterable[_Union[_tensor_pb2.Tensor, _Mapping]]] = ..., placement: _Optional[_Union[Placement, str]] = ..., plan: _Optional[_Union[Plan, _Mapping]] = ..., timing: _Optional[_Union[StageTiming, _Mapping]] = ..., bytes_up: _Optional[int] = ..., bytes_down: _Optional[int] = ..., note: _Optional[str] = ..., error: _Optional[_Union[_split_inference_pb2.RequestError, _Mapping]] = ...) -> None: ...

class GetStatusRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class LinkStatus(_message.Message):
    __slots__ = ("rtt_ms", "up_mbps", "down_mbps", "samples")
    RTT_MS_FIELD_NUMBER: _ClassVar[int]
    UP_MBPS_FIELD_NUMBER: _ClassVar[int]
    DOWN_MBPS_FIELD_NUMBER: _ClassVar[int]
    SAMPLES_FIELD_NUMBER: _ClassVar[int]
    rtt_ms: float
    up_mbps: float
    down_mbps: float
    samples: int
    def __init__(self, rtt_ms: _Optional[float] = ..., up_mbps: _Optional[float] = ..., down_mbps: _Optional[float] = ..., samples: _Optional[int] = ...) -> None: ...

class Counters(_message.Message):
    __slots__ = ("requests", "split", "edge_only", "cloud_only", "fallback", "errors", "bytes_up", "bytes_down", "reconnects", "plan_switches", "sessions_opened")
    REQUESTS_FIELD_NUMBER: _ClassVar[int]
    SPLIT_FIELD_NUMBER: _ClassVar[int]
    EDGE_ONLY_FIELD_NUMBER: _ClassVar[int]
    CLOUD_ONLY_FIELD_NUMBER: _ClassVar[int]
    FALLBACK_FIELD_NUMBER: _ClassVar[int]
    ERRORS_FIELD_NUMBER: _ClassVar[int]
    BYTES_UP_FIELD_NUMBER: _ClassVar[int]
    BYTES_DOWN_FIELD_NUMBER: _ClassVar[int]
    RECONNECTS_FIELD_NUMBER: _ClassVar[int]
    PLAN_SWITCHES_FIELD_NUMBER: _ClassVar[int]
    SESSIONS_OPENED_FIELD_NUMBER: _ClassVar[int]
    requests: int
    split: int
    edge_only: int
    cloud_only: int
    fallback: int
    errors: int
    bytes_up: int
    bytes_down: int
    reconnects: int
    plan_switches: int
    sessions_opened: int
    def __init__(self, requests: _Optional[int] = ..., split: _Optional[int] = ..., edge_only: _Optional[int] = ..., cloud_only: _Optional[int] = ..., fallback: _Optional[int] = ..., errors: _Optional[int] = ..., bytes_up: _Optional[int] = ..., bytes_down: _Optional[int] = ..., reconnects: _Optional[int] = ..., plan_switches: _Optional[int] = ..., sessions_opened: _Optional[int] = ...) -> None: ...

class EdgeStatus(_message.Message):
    __slots__ = ("model", "fingerprint", "input_shape", "cloud", "cloud_reachable", "cloud_error", "link", "plan", "queue_depth", "counters", "mean_latency_ms", "auto_plan", "planner_error", "backend")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    FINGERPRINT_FIELD_NUMBER: _ClassVar[int]
    INPUT_SHAPE_FIELD_NUMBER: _ClassVar[int]
    CLOUD_FIELD_NUMBER: _ClassVar[int]
    CLOUD_REACHABLE_FIELD_NUMBER: _ClassVar[int]
    CLOUD_ERROR_FIELD_NUMBER: _ClassVar[int]
    LINK_FIELD_NUMBER: _ClassVar[int]
    PLAN_FIELD_NUMBER: _ClassVar[int]
    QUEUE_DEPTH_FIELD_NUMBER: _ClassVar[int]
    COUNTERS_FIELD_NUMBER: _ClassVar[int]
    MEAN_LATENCY_MS_FIELD_NUMBER: _ClassVar[int]
    AUTO_PLAN_FIELD_NUMBER: _ClassVar[int]
    PLANNER_ERROR_FIELD_NUMBER: _ClassVar[int]
    BACKEND_FIELD_NUMBER: _ClassVar[int]
    model: str
    fingerprint: str
    input_shape: _containers.RepeatedScalarFieldContainer[int]
    cloud: str
    cloud_reachable: bool
    cloud_error: str
    link: LinkStatus
    plan: Plan
    queue_depth: int
    counters: Counters
    mean_latency_ms: float
    auto_plan: bool
    planner_error: str
    backend: str
    def __init__(self, model: _Optional[str] = ..., fingerprint: _Optional[str] = ..., input_shape: _Optional[_Iterable[int]] = ..., cloud: _Optional[str] = ..., cloud_reachable: _Optional[bool] = ..., cloud_error: _Optional[str] = ..., link: _Optional[_Union[LinkStatus, _Mapping]] = ..., plan: _Optional[_Union[Plan, _Mapping]] = ..., queue_depth: _Optional[int] = ..., counters: _Optional[_Union[Counters, _Mapping]] = ..., mean_latency_ms: _Optional[float] = ..., auto_plan: _Optional[bool] = ..., planner_error: _Optional[str] = ..., backend: _Optional[str] = ...) -> None: ...

class GetPlanRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ReplanRequest(_message.Message):
    __slots__ = ("plan",)
    PLAN_FIELD_NUMBER: _ClassVar[int]
    plan: Plan
    def __init__(self, plan: _Optional[_Union[Plan, _Mapping]] = ...) -> None: ...
