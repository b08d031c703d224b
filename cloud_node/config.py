"""``cloud.yaml``: what the cloud daemon serves and its limits."""

from __future__ import annotations

from dataclasses import dataclass, field

from partitioner.models import ModelSpec
from partitioner.settings import SettingsError, from_mapping, load_yaml
from protos.metrics import MetricsConfig


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
class CloudConfig:
    listen: str = "127.0.0.1:50051"
    models: list[ModelSpec] = field(default_factory=list)
    limits: CloudLimits = field(default_factory=CloudLimits)
    jobs: JobsConfig = field(default_factory=JobsConfig)
    torch_threads: int = 0  # 0: torch's default
    max_workers: int = 32  # gRPC handler threads
    chunk_bytes: int = 1 << 20  # payload bytes per result frame
    allow_insecure_public: bool = False  # bind a non-loopback address without TLS
    log_level: str = "INFO"
    metrics: MetricsConfig = field(default_factory=MetricsConfig)  # Prometheus /metrics; off by default

    @classmethod
    def from_yaml(cls, path: str) -> CloudConfig:
        return cls.from_dict(load_yaml(path))

    @classmethod
    def from_dict(cls, data: dict) -> CloudConfig:
        config = from_mapping(cls, data)
        names = [m.name for m in config.models]
        if len(set(names)) != len(names):
            raise SettingsError(f"models: duplicate names in {names}")
        return config
