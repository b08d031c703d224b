from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class JobState(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    JOB_STATE_UNSPECIFIED: _ClassVar[JobState]
    QUEUED: _ClassVar[JobState]
    RUNNING: _ClassVar[JobState]
    SUCCEEDED: _ClassVar[JobState]
    FAILED: _ClassVar[JobState]
    CANCELLED: _ClassVar[JobState]

class UploadFormat(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    UPLOAD_FORMAT_UNSPECIFIED: _ClassVar[UploadFormat]
    TORCHSCRIPT: _ClassVar[UploadFormat]
    EXPORTED_PROGRAM: _ClassVar[UploadFormat]
    SAFETENSORS: _ClassVar[UploadFormat]
    DATASET_NPZ: _ClassVar[UploadFormat]
    DATASET_SAFETENSORS: _ClassVar[UploadFormat]
JOB_STATE_UNSPECIFIED: JobState
QUEUED: JobState
RUNNING: JobState
SUCCEEDED: JobState
FAILED: JobState
CANCELLED: JobState
UPLOAD_FORMAT_UNSPECIFIED: UploadFormat
TORCHSCRIPT: UploadFormat
EXPORTED_PROGRAM: UploadFormat
SAFETENSORS: UploadFormat
DATASET_NPZ: UploadFormat
DATASET_SAFETENSORS: UploadFormat

class UploadHeader(_message.Message):
    __slots__ = ("name", "format", "architecture", "config_json", "num_classes", "input_shape", "total_bytes", "sha256")
    NAME_FIELD_NUMBER: _ClassVar[int]
    FORMAT_FIELD_NUMBER: _ClassVar[int]
    ARCHITECTURE_FIELD_NUMBER: _ClassVar[int]
    CONFIG_JSON_FIELD_NUMBER: _ClassVar[int]
    NUM_CLASSES_FIELD_NUMBER: _ClassVar[int]
    INPUT_SHAPE_FIELD_NUMBER: _ClassVar[int]
    TOTAL_BYTES_FIELD_NUMBER: _ClassVar[int]
    SHA256_FIELD_NUMBER: _ClassVar[int]
    name: str
    format: UploadFormat
    architecture: str
    config_json: str
    num_classes: int
    input_shape: _containers.RepeatedScalarFieldContainer[int]
    total_bytes: int
    sha256: str
    def __init__(self, name: _Optional[str] = ..., format: _Optional[_Union[UploadFormat, str]] = ..., architecture: _Optional[str] = ..., config_json: _Optional[str] = ..., num_classes: _Optional[int] = ..., input_shape: _Optional[_Iterable[int]] = ..., total_bytes: _Optional[int] = ..., sha256: _Optional[str] = ...) -> None: ...

class UploadChunk(_message.Message):
    __slots__ = ("header", "data")
    HEADER_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    header: UploadHeader
    data: bytes
    def __init__(self, header: _Optional[_Union[UploadHeader, _Mapping]] = ..., data: _Optional[bytes] = ...) -> None: ...

class UploadModelResponse(_message.Message):
    __slots__ = ("id", "size_bytes", "sha256", "kind")
    ID_FIELD_NUMBER: _ClassVar[int]
    SIZE_BYTES_FIELD_NUMBER: _ClassVar[int]
    SHA256_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    id: str
    size_bytes: int
    sha256: str
    kind: str
    def __init__(self, id: _Optional[str] = ..., size_bytes: _Optional[int] = ..., sha256: _Optional[str] = ..., kind: _Optional[str] = ...) -> None: ...

class ModelRef(_message.Message):
    __slots__ = ("model_id", "torchvision", "transformer", "config_json", "input_shape", "num_classes", "seed")
    MODEL_ID_FIELD_NUMBER: _ClassVar[int]
    TORCHVISION_FIELD_NUMBER: _ClassVar[int]
    TRANSFORMER_FIELD_NUMBER: _ClassVar[int]
    CONFIG_JSON_FIELD_NUMBER: _ClassVar[int]
    INPUT_SHAPE_FIELD_NUMBER: _ClassVar[int]
    NUM_CLASSES_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    model_id: str
    torchvision: str
    transformer: str
    config_json: str
    input_shape: _containers.RepeatedScalarFieldContainer[int]
    num_classes: int
    seed: int
    def __init__(self, model_id: _Optional[str] = ..., torchvision: _Optional[str] = ..., transformer: _Optional[str] = ..., config_json: _Optional[str] = ..., input_shape: _Optional[_Iterable[int]] = ..., num_classes: _Optional[int] = ..., seed: _Optional[int] = ...) -> None: ...

class PruneOptions(_message.Message):
    __slots__ = ("ratio", "global_pruning", "layer_ratios", "ignored_layers", "prune_classifier", "round_to", "importance", "head_ratio", "ffn_ratio")
    class LayerRatiosEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    RATIO_FIELD_NUMBER: _ClassVar[int]
    GLOBAL_PRUNING_FIELD_NUMBER: _ClassVar[int]
    LAYER_RATIOS_FIELD_NUMBER: _ClassVar[int]
    IGNORED_LAYERS_FIELD_NUMBER: _ClassVar[int]
    PRUNE_CLASSIFIER_FIELD_NUMBER: _ClassVar[int]
    ROUND_TO_FIELD_NUMBER: _ClassVar[int]
    IMPORTANCE_FIELD_NUMBER: _ClassVar[int]
    HEAD_RATIO_FIELD_NUMBER: _ClassVar[int]
    FFN_RATIO_FIELD_NUMBER: _ClassVar[int]
    ratio: float
    global_pruning: bool
    layer_ratios: _containers.ScalarMap[str, float]
    ignored_layers: _containers.RepeatedScalarFieldContainer[str]
    prune_classifier: bool
    round_to: int
    importance: str
    head_ratio: float
    ffn_ratio: float
    def __init__(self, ratio: _Optional[float] = ..., global_pruning: _Optional[bool] = ..., layer_ratios: _Optional[_Mapping[str, float]] = ..., ignored_layers: _Optional[_Iterable[str]] = ..., prune_classifier: _Optional[bool] = ..., round_to: _Optional[int] = ..., importance: _Optional[str] = ..., head_ratio: _Optional[float] = ..., ffn_ratio: _Optional[float] = ...) -> None: ...

class QuantizeOptions(_message.Message):
    __slots__ = ("bits", "clip", "per_tensor")
    BITS_FIELD_NUMBER: _ClassVar[int]
    CLIP_FIELD_NUMBER: _ClassVar[int]
    PER_TENSOR_FIELD_NUMBER: _ClassVar[int]
    bits: int
    clip: str
    per_tensor: bool
    def __init__(self, bits: _Optional[int] = ..., clip: _Optional[str] = ..., per_tensor: _Optional[bool] = ...) -> None: ...

class SweepOptions(_message.Message):
    __slots__ = ("ratios", "bits", "parallelism")
    RATIOS_FIELD_NUMBER: _ClassVar[int]
    BITS_FIELD_NUMBER: _ClassVar[int]
    PARALLELISM_FIELD_NUMBER: _ClassVar[int]
    ratios: _containers.RepeatedScalarFieldContainer[float]
    bits: _containers.RepeatedScalarFieldContainer[int]
    parallelism: int
    def __init__(self, ratios: _Optional[_Iterable[float]] = ..., bits: _Optional[_Iterable[int]] = ..., parallelism: _Optional[int] = ...) -> None: ...

class BottleneckOptions(_message.Message):
    __slots__ = ("cuts", "rate_weights", "target_bytes", "latent", "hidden", "stride", "budget_s", "holdout", "augment", "max_images", "kind", "temperature", "margin_weight", "mixup", "levels", "dead_zone")
    CUTS_FIELD_NUMBER: _ClassVar[int]
    RATE_WEIGHTS_FIELD_NUMBER: _ClassVar[int]
    TARGET_BYTES_FIELD_NUMBER: _ClassVar[int]
    LATENT_FIELD_NUMBER: _ClassVar[int]
    HIDDEN_FIELD_NUMBER: _ClassVar[int]
    STRIDE_FIELD_NUMBER: _ClassVar[int]
    BUDGET_S_FIELD_NUMBER: _ClassVar[int]
    HOLDOUT_FIELD_NUMBER: _ClassVar[int]
    AUGMENT_FIELD_NUMBER: _ClassVar[int]
    MAX_IMAGES_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    TEMPERATURE_FIELD_NUMBER: _ClassVar[int]
    MARGIN_WEIGHT_FIELD_NUMBER: _ClassVar[int]
    MIXUP_FIELD_NUMBER: _ClassVar[int]
    LEVELS_FIELD_NUMBER: _ClassVar[int]
    DEAD_ZONE_FIELD_NUMBER: _ClassVar[int]
    cuts: _containers.RepeatedScalarFieldContainer[str]
    rate_weights: _containers.RepeatedScalarFieldContainer[float]
    target_bytes: float
    latent: int
    hidden: int
    stride: int
    budget_s: float
    holdout: float
    augment: int
    max_images: int
    kind: str
    temperature: float
    margin_weight: float
    mixup: float
    levels: _containers.RepeatedScalarFieldContainer[float]
    dead_zone: float
    def __init__(self, cuts: _Optional[_Iterable[str]] = ..., rate_weights: _Optional[_Iterable[float]] = ..., target_bytes: _Optional[float] = ..., latent: _Optional[int] = ..., hidden: _Optional[int] = ..., stride: _Optional[int] = ..., budget_s: _Optional[float] = ..., holdout: _Optional[float] = ..., augment: _Optional[int] = ..., max_images: _Optional[int] = ..., kind: _Optional[str] = ..., temperature: _Optional[float] = ..., margin_weight: _Optional[float] = ..., mixup: _Optional[float] = ..., levels: _Optional[_Iterable[float]] = ..., dead_zone: _Optional[float] = ...) -> None: ...

class JobSpec(_message.Message):
    __slots__ = ("engine", "model", "prune", "quantize", "sweep", "dataset_id", "label", "params", "skip_evaluation", "bottleneck")
    class ParamsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    ENGINE_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    PRUNE_FIELD_NUMBER: _ClassVar[int]
    QUANTIZE_FIELD_NUMBER: _ClassVar[int]
    SWEEP_FIELD_NUMBER: _ClassVar[int]
    DATASET_ID_FIELD_NUMBER: _ClassVar[int]
    LABEL_FIELD_NUMBER: _ClassVar[int]
    PARAMS_FIELD_NUMBER: _ClassVar[int]
    SKIP_EVALUATION_FIELD_NUMBER: _ClassVar[int]
    BOTTLENECK_FIELD_NUMBER: _ClassVar[int]
    engine: str
    model: ModelRef
    prune: PruneOptions
    quantize: QuantizeOptions
    sweep: SweepOptions
    dataset_id: str
    label: str
    params: _containers.ScalarMap[str, str]
    skip_evaluation: bool
    bottleneck: BottleneckOptions
    def __init__(self, engine: _Optional[str] = ..., model: _Optional[_Union[ModelRef, _Mapping]] = ..., prune: _Optional[_Union[PruneOptions, _Mapping]] = ..., quantize: _Optional[_Union[QuantizeOptions, _Mapping]] = ..., sweep: _Optional[_Union[SweepOptions, _Mapping]] = ..., dataset_id: _Optional[str] = ..., label: _Optional[str] = ..., params: _Optional[_Mapping[str, str]] = ..., skip_evaluation: _Optional[bool] = ..., bottleneck: _Optional[_Union[BottleneckOptions, _Mapping]] = ...) -> None: ...

class Artifact(_message.Message):
    __slots__ = ("name", "size_bytes", "sha256", "media_type")
    NAME_FIELD_NUMBER: _ClassVar[int]
    SIZE_BYTES_FIELD_NUMBER: _ClassVar[int]
    SHA256_FIELD_NUMBER: _ClassVar[int]
    MEDIA_TYPE_FIELD_NUMBER: _ClassVar[int]
    name: str
    size_bytes: int
    sha256: str
    media_type: str
    def __init__(self, name: _Optional[str] = ..., size_bytes: _Optional[int] = ..., sha256: _Optional[str] = ..., media_type: _Optional[str] = ...) -> None: ...

class Job(_message.Message):
    __slots__ = ("id", "state", "progress", "stage", "message", "spec", "engine", "artifacts", "report_json", "created_at", "started_at", "finished_at", "attempts")
    ID_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    PROGRESS_FIELD_NUMBER: _ClassVar[int]
    STAGE_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    SPEC_FIELD_NUMBER: _ClassVar[int]
    ENGINE_FIELD_NUMBER: _ClassVar[int]
    ARTIFACTS_FIELD_NUMBER: _ClassVar[int]
    REPORT_JSON_FIELD_NUMBER: _ClassVar[int]
    CREATED_AT_FIELD_NUMBER: _ClassVar[int]
    STARTED_AT_FIELD_NUMBER: _ClassVar[int]
    FINISHED_AT_FIELD_NUMBER: _ClassVar[int]
    ATTEMPTS_FIELD_NUMBER: _ClassVar[int]
    id: str
    state: JobState
    progress: float
    stage: str
    message: str
    spec: JobSpec
    engine: str
    artifacts: _containers.RepeatedCompositeFieldContainer[Artifact]
    report_json: str
    created_at: float
    started_at: float
    finished_at: float
    attempts: int
    def __init__(self, id: _Optional[str] = ..., state: _Optional[_Union[JobState, str]] = ..., progress: _Optional[float] = ..., stage: _Optional[str] = ..., message: _Optional[str] = ..., spec: _Optional[_Union[JobSpec, _Mapping]] = ..., engine: _Optional[str] = ..., artifacts: _Optional[_Iterable[_Union[Artifact, _Mapping]]] = ..., report_json: _Optional[str] = ..., created_at: _Optional[float] = ..., started_at: _Optional[float] = ..., finished_at: _Optional[float] = ..., attempts: _Optional[int] = ...) -> None: ...

class SubmitJobRequest(_message.Message):
    __slots__ = ("spec",)
    SPEC_FIELD_NUMBER: _ClassVar[int]
    spec: JobSpec
    def __init__(self, spec: _Optional[_Union[JobSpec, _Mapping]] = ...) -> None: ...

class GetJobRequest(_message.Message):
    __slots__ = ("job_id",)
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    job_id: str
    def __init__(self, job_id: _Optional[str] = ...) -> None: ...

class WatchJobRequest(_message.Message):
    __slots__ = ("job_id",)
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    job_id: str
    def __init__(self, job_id: _Optional[str] = ...) -> None: ...

class CancelJobRequest(_message.Message):
    __slots__ = ("job_id",)
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    job_id: str
    def __init__(self, job_id: _Optional[str] = ...) -> None: ...

class ListJobsRequest(_message.Message):
    __slots__ = ("states", "limit")
    STATES_FIELD_NUMBER: _ClassVar[int]
    LIMIT_FIELD_NUMBER: _ClassVar[int]
    states: _containers.RepeatedScalarFieldContainer[JobState]
    limit: int
    def __init__(self, states: _Optional[_Iterable[_Union[JobState, str]]] = ..., limit: _Optional[int] = ...) -> None: ...

class ListJobsResponse(_message.Message):
    __slots__ = ("jobs",)
    JOBS_FIELD_NUMBER: _ClassVar[int]
    jobs: _containers.RepeatedCompositeFieldContainer[Job]
    def __init__(self, jobs: _Optional[_Iterable[_Union[Job, _Mapping]]] = ...) -> None: ...

class DownloadRequest(_message.Message):
    __slots__ = ("job_id", "artifact", "offset", "chunk_bytes")
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    ARTIFACT_FIELD_NUMBER: _ClassVar[int]
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    CHUNK_BYTES_FIELD_NUMBER: _ClassVar[int]
    job_id: str
    artifact: str
    offset: int
    chunk_bytes: int
    def __init__(self, job_id: _Optional[str] = ..., artifact: _Optional[str] = ..., offset: _Optional[int] = ..., chunk_bytes: _Optional[int] = ...) -> None: ...

class DownloadChunk(_message.Message):
    __slots__ = ("offset", "data", "total_bytes", "sha256", "name")
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    TOTAL_BYTES_FIELD_NUMBER: _ClassVar[int]
    SHA256_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    offset: int
    data: bytes
    total_bytes: int
    sha256: str
    name: str
    def __init__(self, offset: _Optional[int] = ..., data: _Optional[bytes] = ..., total_bytes: _Optional[int] = ..., sha256: _Optional[str] = ..., name: _Optional[str] = ...) -> None: ...
