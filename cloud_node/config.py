"""``cloud.yaml``: what the cloud daemon serves and its limits."""

from __future__ import annotations

import copy
from dataclasses import dataclass, field, fields, replace
from pathlib import Path

from partitioner.settings import SettingsError, from_mapping, load_yaml
from partitioner.spec import ModelSpec
from protos.metrics import MetricsConfig
from protos.security import ServerAuth, ServerTLS


@dataclass
class BatchSettings:
    """How one model is batched (Triton's ``dynamic_batching`` block)."""

    enabled: bool = False
    max_batch_size: int = 8  # rows per batch; <= 1 turns batching off
    preferred_batch_sizes: list[int] = field(default_factory=list)  # dispatch at once on reaching one of these
    max_queue_delay_ms: float = 0.0  # how long the oldest request may wait for company; 0: never wait
    max_queue_size: int = 128  # queued requests per key beyond which submit answers RESOURCE_EXHAUSTED

    @property
    def active(self) -> bool:
        return self.enabled and self.max_batch_size > 1

    def check(self) -> None:
        """Raise ValueError naming the first field out of range."""
        if self.max_batch_size < 1:
            raise ValueError(f"max_batch_size: {self.max_batch_size} must be >= 1")
        for size in self.preferred_batch_sizes:
            if not 1 <= size <= self.max_batch_size:
                raise ValueError(f"preferred_batch_sizes: {size} is not in [1, max_batch_size={self.max_batch_size}]")
        if self.max_queue_delay_ms < 0:
            raise ValueError(f"max_queue_delay_ms: {self.max_queue_delay_ms} must be >= 0")
        if self.max_queue_size < 1:
            raise ValueError(f"max_queue_size: {self.max_queue_size} must be >= 1")


@dataclass
class CloudLimits:
    max_message_bytes: int = 64 << 20  # per gRPC message, both directions
    max_request_bytes: int = 512 << 20  # one request's features, summed over its frames
    max_sessions: int = 256
    max_pending_requests: int = 64  # requests being assembled on one Infer stream
    max_elements: int = 1 << 28  # per decoded tensor
    session_idle_s: float = 900.0


@dataclass
class JobsConfig:
    """The Compression service: hosted when ``dir`` is set (its SQLite store and artifacts live there)."""

    dir: str = ""
    concurrency: int = 1  # jobs running at once, each in its own process
    queue_limit: int = 32  # QUEUED jobs beyond this answer RESOURCE_EXHAUSTED
    max_upload_bytes: int = 1 << 30  # per uploaded model or dataset
    max_attempts: int = 2  # a job running at a crash is re-queued until it has started this many times
    job_threads: int = 0  # torch threads in each job process; 0: torch's default
    sweep_parallelism: int = 2  # processes per sweep job
    chunk_bytes: int = 1 << 20  # Download chunk size


@dataclass
class BatchOverride:
    """Settings for one model, by name; a field left out keeps the ``batching:`` default."""

    model: str
    enabled: bool | None = None
    max_batch_size: int | None = None
    preferred_batch_sizes: list[int] | None = None
    max_queue_delay_ms: float | None = None
    max_queue_size: int | None = None


@dataclass
class BatchingConfig(BatchSettings):
    """Dynamic batching of tails (and whole models): defaults for every model, then ``models:`` overrides.

    Off by default: a lone edge gains nothing from it, a request may wait ``max_queue_delay_ms`` for
    company, and batched float32 results can differ from unbatched ones in the last bits.
    """

    models: list[BatchOverride] = field(default_factory=list)

    def for_model(self, name: str) -> BatchSettings:
        """The settings ``name`` runs with."""
        base = BatchSettings(**{f.name: copy.copy(getattr(self, f.name)) for f in fields(BatchSettings)})
        for override in self.models:
            if override.model == name:
                changes = {k: v for k, v in vars(override).items() if k != "model" and v is not None}
                return replace(base, **changes)
        return base

    def check(self, model_names: list[str]) -> None:
        """Raise SettingsError naming the first field out of range (``batching.max_batch_size: ...``)."""
        try:
            BatchSettings.check(self)
        except ValueError as exc:
            raise SettingsError(f"batching.{exc}") from None
        for i, override in enumerate(self.models):
            if override.model not in model_names:
                raise SettingsError(f"batching.models[{i}].model: {override.model!r} is not served")
            try:
                self.for_model(override.model).check()
            except ValueError as exc:
                raise SettingsError(f"batching.models[{i}].{exc}") from None


@dataclass
class CloudConfig:
    listen: str = "127.0.0.1:50051"
    models: list[ModelSpec] = field(default_factory=list)
    limits: CloudLimits = field(default_factory=CloudLimits)
    jobs: JobsConfig = field(default_factory=JobsConfig)
    batching: BatchingConfig = field(default_factory=BatchingConfig)
    torch_threads: int = 0  # 0: torch's default
    max_workers: int = 32  # gRPC handler threads
    chunk_bytes: int = 1 << 20  # payload bytes per result frame
    allow_insecure_public: bool = False  # bind a non-loopback address without TLS
    tls: ServerTLS = field(default_factory=ServerTLS)  # cert + key: TLS; ca + require_client_cert: mutual TLS
    auth: ServerAuth = field(default_factory=ServerAuth)  # bearer tokens every RPC but health needs
    log_level: str = "INFO"
    metrics: MetricsConfig = field(default_factory=MetricsConfig)  # Prometheus /metrics; off by default

    @classmethod
    def from_yaml(cls, path: str) -> CloudConfig:
        config = cls.from_dict(load_yaml(path))
        config.resolve_paths(Path(path).parent)
        return config

    def resolve_paths(self, base: Path) -> None:
        """Take the relative paths of ``tls`` and ``auth`` relative to ``base`` (the YAML file's folder)."""
        self.tls = self.tls.resolved(base)
        self.auth = self.auth.resolved(base)

    @classmethod
    def from_dict(cls, data: dict) -> CloudConfig:
        config = from_mapping(cls, data)
        names = [m.name for m in config.models]
        if len(set(names)) != len(names):
            raise SettingsError(f"models: duplicate names in {names}")
        return config
