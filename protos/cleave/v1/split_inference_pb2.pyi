from protos.cleave.v1 import tensor_pb2 as _tensor_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class GetBundleRequest(_message.Message):
    __slots__ = ("model",)
    MODEL_FIELD_NUMBER: _ClassVar[int]
    model: str
    def __init__(self, model: _Optional[str] = ...) -> None: ...

class BundleChunk(_message.Message):
    __slots__ = ("manifest", "path", "offset", "data")
    MANIFEST_FIELD_NUMBER: _ClassVar[int]
    PATH_FIELD_NUMBER: _ClassVar[int]
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    manifest: bytes
    path: str
    offset: int
    data: bytes
    def __init__(self, manifest: _Optional[bytes] = ..., path: _Optional[str] = ..., offset: _Optional[int] = ..., data: _Optional[bytes] = ...) -> None: ...

class CutInfo(_message.Message):
    __slots__ = ("index", "name", "live", "nbytes")
    INDEX_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    LIVE_FIELD_NUMBER: _ClassVar[int]
    NBYTES_FIELD_NUMBER: _ClassVar[int]
    index: int
    name: str
    live: _containers.RepeatedScalarFieldContainer[str]
    nbytes: int
    def __init__(self, index: _Optional[int] = ..., name: _Optional[str] = ..., live: _Optional[_Iterable[str]] = ..., nbytes: _Optional[int] = ...) -> None: ...

class ModelInfo(_message.Message):
    __slots__ = ("name", "fingerprint", "input_shape", "input_dtype", "cuts")
    NAME_FIELD_NUMBER: _ClassVar[int]
    FINGERPRINT_FIELD_NUMBER: _ClassVar[int]
    INPUT_SHAPE_FIELD_NUMBER: _ClassVar[int]
    INPUT_DTYPE_FIELD_NUMBER: _ClassVar[int]
    CUTS_FIELD_NUMBER: _ClassVar[int]
    name: str
    fingerprint: str
    input_shape: _containers.RepeatedScalarFieldContainer[int]
    input_dtype: _tensor_pb2.DType
    cuts: _containers.RepeatedCompositeFieldContainer[CutInfo]
    def __init__(self, name: _Optional[str] = ..., fingerprint: _Optional[str] = ..., input_shape: _Optional[_Iterable[int]] = ..., input_dtype: _Optional[_Union[_tensor_pb2.DType, str]] = ..., cuts: _Optional[_Iterable[_Union[CutInfo, _Mapping]]] = ...) -> None: ...

class GetInfoRequest(_message.Message):
    __slots__ = ("model", "include_cuts", "include_pools")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    INCLUDE_CUTS_FIELD_NUMBER: _ClassVar[int]
    INCLUDE_POOLS_FIELD_NUMBER: _ClassVar[int]
    model: str
    include_cuts: bool
    include_pools: bool
    def __init__(self, model: _Optional[str] = ..., include_cuts: _Optional[bool] = ..., include_pools: _Optional[bool] = ...) -> None: ...

class ScalingDecision(_message.Message):
    __slots__ = ("unix_time", "from_replicas", "to_replicas", "status", "trigger")
    UNIX_TIME_FIELD_NUMBER: _ClassVar[int]
    FROM_REPLICAS_FIELD_NUMBER: _ClassVar[int]
    TO_REPLICAS_FIELD_NUMBER: _ClassVar[int]
    STATUS_FIELD_NUMBER: _ClassVar[int]
    TRIGGER_FIELD_NUMBER: _ClassVar[int]
    unix_time: float
    from_replicas: int
    to_replicas: int
    status: str
    trigger: str
    def __init__(self, unix_time: _Optional[float] = ..., from_replicas: _Optional[int] = ..., to_replicas: _Optional[int] = ..., status: _Optional[str] = ..., trigger: _Optional[str] = ...) -> None: ...

class TailPool(_message.Message):
    __slots__ = ("model", "status", "replicas", "running", "queue_depth", "requests", "retries", "failures", "message", "decisions")
    class ReplicasEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: int
        def __init__(self, key: _Optional[str] = ..., value: _Optional[int] = ...) -> None: ...
    MODEL_FIELD_NUMBER: _ClassVar[int]
    STATUS_FIELD_NUMBER: _ClassVar[int]
    REPLICAS_FIELD_NUMBER: _ClassVar[int]
    RUNNING_FIELD_NUMBER: _ClassVar[int]
    QUEUE_DEPTH_FIELD_NUMBER: _ClassVar[int]
    REQUESTS_FIELD_NUMBER: _ClassVar[int]
    RETRIES_FIELD_NUMBER: _ClassVar[int]
    FAILURES_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    DECISIONS_FIELD_NUMBER: _ClassVar[int]
    model: str
    status: str
    replicas: _containers.ScalarMap[str, int]
    running: int
    queue_depth: int
    requests: int
    retries: int
    failures: int
    message: str
    decisions: _containers.RepeatedCompositeFieldContainer[ScalingDecision]
    def __init__(self, model: _Optional[str] = ..., status: _Optional[str] = ..., replicas: _Optional[_Mapping[str, int]] = ..., running: _Optional[int] = ..., queue_depth: _Optional[int] = ..., requests: _Optional[int] = ..., retries: _Optional[int] = ..., failures: _Optional[int] = ..., message: _Optional[str] = ..., decisions: _Optional[_Iterable[_Union[ScalingDecision, _Mapping]]] = ...) -> None: ...

class GetInfoResponse(_message.Message):
    __slots__ = ("models", "version", "host", "backend", "pools")
    MODELS_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    HOST_FIELD_NUMBER: _ClassVar[int]
    BACKEND_FIELD_NUMBER: _ClassVar[int]
    POOLS_FIELD_NUMBER: _ClassVar[int]
    models: _containers.RepeatedCompositeFieldContainer[ModelInfo]
    version: str
    host: str
    backend: str
    pools: _containers.RepeatedCompositeFieldContainer[TailPool]
    def __init__(self, models: _Optional[_Iterable[_Union[ModelInfo, _Mapping]]] = ..., version: _Optional[str] = ..., host: _Optional[str] = ..., backend: _Optional[str] = ..., pools: _Optional[_Iterable[_Union[TailPool, _Mapping]]] = ...) -> None: ...

class ProfileRequest(_message.Message):
    __slots__ = ("model", "repeats", "warmup", "batch", "refresh", "input_shape")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    REPEATS_FIELD_NUMBER: _ClassVar[int]
    WARMUP_FIELD_NUMBER: _ClassVar[int]
    BATCH_FIELD_NUMBER: _ClassVar[int]
    REFRESH_FIELD_NUMBER: _ClassVar[int]
    INPUT_SHAPE_FIELD_NUMBER: _ClassVar[int]
    model: str
    repeats: int
    warmup: int
    batch: int
    refresh: bool
    input_shape: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, model: _Optional[str] = ..., repeats: _Optional[int] = ..., warmup: _Optional[int] = ..., batch: _Optional[int] = ..., refresh: _Optional[bool] = ..., input_shape: _Optional[_Iterable[int]] = ...) -> None: ...

class NodeTiming(_message.Message):
    __slots__ = ("name", "ms", "output_bytes")
    NAME_FIELD_NUMBER: _ClassVar[int]
    MS_FIELD_NUMBER: _ClassVar[int]
    OUTPUT_BYTES_FIELD_NUMBER: _ClassVar[int]
    name: str
    ms: float
    output_bytes: int
    def __init__(self, name: _Optional[str] = ..., ms: _Optional[float] = ..., output_bytes: _Optional[int] = ...) -> None: ...

class CodecCost(_message.Message):
    __slots__ = ("encoding", "encode_ms_per_mb", "decode_ms_per_mb")
    ENCODING_FIELD_NUMBER: _ClassVar[int]
    ENCODE_MS_PER_MB_FIELD_NUMBER: _ClassVar[int]
    DECODE_MS_PER_MB_FIELD_NUMBER: _ClassVar[int]
    encoding: str
    encode_ms_per_mb: float
    decode_ms_per_mb: float
    def __init__(self, encoding: _Optional[str] = ..., encode_ms_per_mb: _Optional[float] = ..., decode_ms_per_mb: _Optional[float] = ...) -> None: ...

class ProfileResponse(_message.Message):
    __slots__ = ("model", "fingerprint", "nodes", "total_ms", "host", "head_ms", "codecs", "threads", "torch_version", "batch", "input_shape")
    class HeadMsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: int
        value: float
        def __init__(self, key: _Optional[int] = ..., value: _Optional[float] = ...) -> None: ...
    MODEL_FIELD_NUMBER: _ClassVar[int]
    FINGERPRINT_FIELD_NUMBER: _ClassVar[int]
    NODES_FIELD_NUMBER: _ClassVar[int]
    TOTAL_MS_FIELD_NUMBER: _ClassVar[int]
    HOST_FIELD_NUMBER: _ClassVar[int]
    HEAD_MS_FIELD_NUMBER: _ClassVar[int]
    CODECS_FIELD_NUMBER: _ClassVar[int]
    THREADS_FIELD_NUMBER: _ClassVar[int]
    TORCH_VERSION_FIELD_NUMBER: _ClassVar[int]
    BATCH_FIELD_NUMBER: _ClassVar[int]
    INPUT_SHAPE_FIELD_NUMBER: _ClassVar[int]
    model: str
    fingerprint: str
    nodes: _containers.RepeatedCompositeFieldContainer[NodeTiming]
    total_ms: float
    host: str
    head_ms: _containers.ScalarMap[int, float]
    codecs: _containers.RepeatedCompositeFieldContainer[CodecCost]
    threads: int
    torch_version: str
    batch: int
    input_shape: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, model: _Optional[str] = ..., fingerprint: _Optional[str] = ..., nodes: _Optional[_Iterable[_Union[NodeTiming, _Mapping]]] = ..., total_ms: _Optional[float] = ..., host: _Optional[str] = ..., head_ms: _Optional[_Mapping[int, float]] = ..., codecs: _Optional[_Iterable[_Union[CodecCost, _Mapping]]] = ..., threads: _Optional[int] = ..., torch_version: _Optional[str] = ..., batch: _Optional[int] = ..., input_shape: _Optional[_Iterable[int]] = ...) -> None: ...

class ProbeMessage(_message.Message):
    __slots__ = ("seq", "data", "echo", "received_bytes", "server_time", "reply_bytes")
    SEQ_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    ECHO_FIELD_NUMBER: _ClassVar[int]
    RECEIVED_BYTES_FIELD_NUMBER: _ClassVar[int]
    SERVER_TIME_FIELD_NUMBER: _ClassVar[int]
    REPLY_BYTES_FIELD_NUMBER: _ClassVar[int]
    seq: int
    data: bytes
    echo: bool
    received_bytes: int
    server_time: float
    reply_bytes: int
    def __init__(self, seq: _Optional[int] = ..., data: _Optional[bytes] = ..., echo: _Optional[bool] = ..., received_bytes: _Optional[int] = ..., server_time: _Optional[float] = ..., reply_bytes: _Optional[int] = ...) -> None: ...

class OpenSessionRequest(_message.Message):
    __slots__ = ("model", "fingerprint", "cut", "result_encoding", "client", "plan")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    FINGERPRINT_FIELD_NUMBER: _ClassVar[int]
    CUT_FIELD_NUMBER: _ClassVar[int]
    RESULT_ENCODING_FIELD_NUMBER: _ClassVar[int]
    CLIENT_FIELD_NUMBER: _ClassVar[int]
    PLAN_FIELD_NUMBER: _ClassVar[int]
    model: str
    fingerprint: str
    cut: str
    result_encoding: _tensor_pb2.TensorEncoding
    client: str
    plan: PlanPrediction
    def __init__(self, model: _Optional[str] = ..., fingerprint: _Optional[str] = ..., cut: _Optional[str] = ..., result_encoding: _Optional[_Union[_tensor_pb2.TensorEncoding, _Mapping]] = ..., client: _Optional[str] = ..., plan: _Optional[_Union[PlanPrediction, _Mapping]] = ...) -> None: ...

class PlanPrediction(_message.Message):
    __slots__ = ("label", "objective", "total_ms", "edge_ms", "encode_ms", "upload_ms", "rtt_ms", "decode_ms", "cloud_ms", "download_ms")
    LABEL_FIELD_NUMBER: _ClassVar[int]
    OBJECTIVE_FIELD_NUMBER: _ClassVar[int]
    TOTAL_MS_FIELD_NUMBER: _ClassVar[int]
    EDGE_MS_FIELD_NUMBER: _ClassVar[int]
    ENCODE_MS_FIELD_NUMBER: _ClassVar[int]
    UPLOAD_MS_FIELD_NUMBER: _ClassVar[int]
    RTT_MS_FIELD_NUMBER: _ClassVar[int]
    DECODE_MS_FIELD_NUMBER: _ClassVar[int]
    CLOUD_MS_FIELD_NUMBER: _ClassVar[int]
    DOWNLOAD_MS_FIELD_NUMBER: _ClassVar[int]
    label: str
    objective: str
    total_ms: float
    edge_ms: float
    encode_ms: float
    upload_ms: float
    rtt_ms: float
    decode_ms: float
    cloud_ms: float
    download_ms: float
    def __init__(self, label: _Optional[str] = ..., objective: _Optional[str] = ..., total_ms: _Optional[float] = ..., edge_ms: _Optional[float] = ..., encode_ms: _Optional[float] = ..., upload_ms: _Optional[float] = ..., rtt_ms: _Optional[float] = ..., decode_ms: _Optional[float] = ..., cloud_ms: _Optional[float] = ..., download_ms: _Optional[float] = ...) -> None: ...

class OpenSessionResponse(_message.Message):
    __slots__ = ("session_id", "cut", "output_shape")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    CUT_FIELD_NUMBER: _ClassVar[int]
    OUTPUT_SHAPE_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    cut: CutInfo
    output_shape: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, session_id: _Optional[str] = ..., cut: _Optional[_Union[CutInfo, _Mapping]] = ..., output_shape: _Optional[_Iterable[int]] = ...) -> None: ...

class InferFrame(_message.Message):
    __slots__ = ("session_id", "request_id", "chunks", "last")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    CHUNKS_FIELD_NUMBER: _ClassVar[int]
    LAST_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    request_id: int
    chunks: _containers.RepeatedCompositeFieldContainer[_tensor_pb2.TensorChunk]
    last: bool
    def __init__(self, session_id: _Optional[str] = ..., request_id: _Optional[int] = ..., chunks: _Optional[_Iterable[_Union[_tensor_pb2.TensorChunk, _Mapping]]] = ..., last: _Optional[bool] = ...) -> None: ...

class RequestError(_message.Message):
    __slots__ = ("code", "message")
    CODE_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    code: int
    message: str
    def __init__(self, code: _Optional[int] = ..., message: _Optional[str] = ...) -> None: ...

class CloudTiming(_message.Message):
    __slots__ = ("queue_ms", "decode_ms", "compute_ms", "encode_ms")
    QUEUE_MS_FIELD_NUMBER: _ClassVar[int]
    DECODE_MS_FIELD_NUMBER: _ClassVar[int]
    COMPUTE_MS_FIELD_NUMBER: _ClassVar[int]
    ENCODE_MS_FIELD_NUMBER: _ClassVar[int]
    queue_ms: float
    decode_ms: float
    compute_ms: float
    encode_ms: float
    def __init__(self, queue_ms: _Optional[float] = ..., decode_ms: _Optional[float] = ..., compute_ms: _Optional[float] = ..., encode_ms: _Optional[float] = ...) -> None: ...

class InferResult(_message.Message):
    __slots__ = ("request_id", "chunks", "last", "timing", "error")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    CHUNKS_FIELD_NUMBER: _ClassVar[int]
    LAST_FIELD_NUMBER: _ClassVar[int]
    TIMING_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    request_id: int
    chunks: _containers.RepeatedCompositeFieldContainer[_tensor_pb2.TensorChunk]
    last: bool
    timing: CloudTiming
    error: RequestError
    def __init__(self, request_id: _Optional[int] = ..., chunks: _Optional[_Iterable[_Union[_tensor_pb2.TensorChunk, _Mapping]]] = ..., last: _Optional[bool] = ..., timing: _Optional[_Union[CloudTiming, _Mapping]] = ..., error: _Optional[_Union[RequestError, _Mapping]] = ...) -> None: ...

class CloseSessionRequest(_message.Message):
    __slots__ = ("session_id",)
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    def __init__(self, session_id: _Optional[str] = ...) -> None: ...

class CloseSessionResponse(_message.Message):
    __slots__ = ("requests",)
    REQUESTS_FIELD_NUMBER: _ClassVar[int]
    requests: int
    def __init__(self, requests: _Optional[int] = ...) -> None: ...
