"""``cloud.yaml``: what the cloud daemon serves and its limits."""

from __future__ import annotations

import copy
from dataclasses import dataclass, field, fields, replace
from pathlib import Path

from partitioner.spec import ModelSpec
from runtime.admission import ServingLimits
from runtime.metrics import MetricsConfig
from runtime.security import ServerAuth, ServerTLS
from runtime.serving import Keepalive
from runtime.settings import (
    LOG_LEVELS,
    Settings,
    from_mapping,
    host_port,
    load_yaml,
    non_negative,
    one_of,
    positive,
    within,
)


@dataclass
class BatchSettings(Settings):
    """How one model is batched (Triton's ``dynamic_batching`` block)."""

    enabled: bool = False
    max_batch_size: int = 8  # rows per batch; 1 turns batching off
    preferred_batch_sizes: list[int] = field(default_factory=list)  # dispatch at once on reaching one of these
    max_queue_delay_ms: float = 0.0  # how long the oldest request may wait for company; 0: never wait
    max_queue_size: int = 128  # queued requests per key beyond which submit answers RESOURCE_EXHAUSTED

    @property
    def active(self) -> bool:
        return self.enabled and self.max_batch_size > 1

    def validate(self) -> None:
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
class CloudLimits(ServingLimits):
    """What one client, one request and the whole daemon may take (the ``ServingLimits`` fields too).

    Every request is checked against these from its headers, before its payload is decoded.
    """

    max_message_bytes: int = 64 << 20  # per gRPC message, both directions
    max_request_bytes: int = 64 << 20  # one request's features as sent, summed over its frames
    max_stream_bytes: int = 256 << 20  # features held for the unfinished requests of one Infer stream
    max_buffered_bytes: int = 1 << 30  # features held for unfinished requests, all streams together
    max_sessions: int = 256
    max_sessions_per_client: int = 32  # per bearer token, or per peer address when there are no tokens
    max_pending_requests: int = 64  # requests being assembled on one Infer stream
    max_elements: int = 1 << 28  # per decoded tensor
    max_batch: int = 8  # rows per request (Infer and KServe), for every model without an override
    max_batch_per_model: dict[str, int] = field(default_factory=dict)  # model name -> its max batch
    session_idle_s: float = 900.0
    max_profile_batch: int = 64  # Profile's batch
    max_profile_repeats: int = 100  # Profile's timed runs
    max_profile_warmup: int = 20  # Profile's untimed runs

    def batch_limit(self, model: str) -> int:
        """The most rows one request for ``model`` may carry."""
        return self.max_batch_per_model.get(model, self.max_batch)

    def validate(self) -> None:
        super().validate()
        positive(self, "max_message_bytes", "max_sessions", "max_sessions_per_client", "max_pending_requests")
        positive(self, "max_elements", "session_idle_s", "max_profile_batch", "max_profile_repeats")
        non_negative(self, "max_profile_warmup")
        for name in ("max_request_bytes", "max_stream_bytes", "max_buffered_bytes", "max_batch"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}: {getattr(self, name)} is not positive")
        if not self.max_request_bytes <= self.max_stream_bytes <= self.max_buffered_bytes:
            raise ValueError("need max_request_bytes <= max_stream_bytes <= max_buffered_bytes")
        if not isinstance(self.max_batch_per_model, dict):
            raise ValueError("max_batch_per_model: expected a mapping of model name to max batch")
        for model, limit in self.max_batch_per_model.items():
            if not isinstance(limit, int) or isinstance(limit, bool) or limit < 1:
                raise ValueError(f"max_batch_per_model.{model}: {limit!r} is not a positive int")

    def check_models(self, model_names: list[str]) -> None:
        """Raise ValueError naming a ``max_batch_per_model`` entry for a model that is not served."""
        for model in self.max_batch_per_model:
            if model not in model_names:
                raise ValueError(f"max_batch_per_model: {model!r} is not served")


@dataclass
class Retention(Settings):
    """How long finished jobs and uploads stay; the job manager's own thread deletes the rest."""

    max_age_s: float = 7 * 86400.0  # finished jobs and unused uploads older than this go (0: no age limit)
    max_jobs: int = 1000  # finished jobs kept, newest first (0: no count limit)
    max_uploads: int = 200  # uploads kept, newest first; one a queued or running job uses is kept
    interval_s: float = 60.0  # how often the manager sweeps

    def validate(self) -> None:
        non_negative(self, "max_age_s", "max_jobs", "max_uploads")
        positive(self, "interval_s")


@dataclass
class Sandbox(Settings):
    """Limits of every job process (and of the process that inspects a code upload)."""

    timeout_s: float = 3600.0  # wall clock per job; then it is killed and FAILED
    cpu_seconds: int = 7200  # RLIMIT_CPU per process
    memory_bytes: int = 16 << 30  # RLIMIT_AS per process (address space, not RSS)
    file_bytes: int = 4 << 30  # RLIMIT_FSIZE: the largest file a job may write
    open_files: int = 1024  # RLIMIT_NOFILE
    isolate: bool = True  # as root: own mount + network namespace, read-only view, runs as nobody
    user: str = "nobody"  # the unprivileged user jobs run as (when the daemon is root)
    inspect_timeout_s: float = 120.0  # loading a code upload to check it (allow_code_uploads only)

    def validate(self) -> None:
        positive(self, "timeout_s", "cpu_seconds", "memory_bytes", "file_bytes", "open_files", "inspect_timeout_s")


@dataclass
class JobsConfig(Settings):
    """The Compression service: hosted when ``dir`` is set (its SQLite store and artifacts live there)."""

    dir: str = ""
    concurrency: int = 1  # jobs running at once, each in its own process
    queue_limit: int = 32  # QUEUED jobs beyond this answer RESOURCE_EXHAUSTED
    max_upload_bytes: int = 1 << 30  # per uploaded model or dataset
    max_attempts: int = 2  # a job running at a crash is re-queued until it has started this many times
    job_threads: int = 0  # torch threads in each job process; 0: torch's default
    sweep_parallelism: int = 2  # processes per sweep job when the spec does not say
    chunk_bytes: int = 1 << 20  # Download chunk size
    # Untrusted input (README "Security").
    allow_code_uploads: bool = False  # TorchScript / .pt2 uploads: trusts EVERY uploader with code execution
    max_sweep_parallelism: int = 0  # a spec asking for more is clamped; 0: the machine's CPU count
    max_sweep_points: int = 64  # ratios x bits beyond this answer RESOURCE_EXHAUSTED
    max_jobs_per_client: int = 8  # queued + running jobs of one client (token, else peer address)
    max_uploads_per_client: int = 32  # stored uploads of one client
    max_upload_bytes_per_client: int = 4 << 30  # their bytes
    max_uploads: int = 256  # stored uploads, all clients together
    max_upload_store_bytes: int = 16 << 30  # their bytes
    max_dataset_bytes: int = 2 << 30  # a dataset's arrays once decompressed (npz members are deflated)
    max_dataset_samples: int = 1 << 20  # rows of a dataset
    max_num_classes: int = 100_000  # an upload header's num_classes
    max_model_parameters: int = 2_000_000_000  # elements a safetensors model declares
    max_header_bytes: int = 16 << 20  # a safetensors JSON header, an npy header, a .pt2 JSON member
    retention: Retention = field(default_factory=Retention)
    sandbox: Sandbox = field(default_factory=Sandbox)

    def validate(self) -> None:
        positive(self, "concurrency", "queue_limit", "max_upload_bytes", "max_attempts", "sweep_parallelism")
        positive(self, "chunk_bytes", "max_sweep_points", "max_jobs_per_client", "max_uploads_per_client")
        positive(self, "max_upload_bytes_per_client", "max_uploads", "max_upload_store_bytes", "max_dataset_bytes")
        positive(self, "max_dataset_samples", "max_num_classes", "max_model_parameters", "max_header_bytes")
        non_negative(self, "job_threads", "max_sweep_parallelism")


@dataclass
class BatchOverride(Settings):
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

    def validate(self) -> None:
        super().validate()
        for i, override in enumerate(self.models):
            within(f"models[{i}]", lambda override=override: self.for_model(override.model))  # validates on build

    def check_models(self, model_names: list[str]) -> None:
        """Raise ValueError naming an override for a model that is not served."""
        for i, override in enumerate(self.models):
            if override.model not in model_names:
                raise ValueError(f"models[{i}].model: {override.model!r} is not served")


@dataclass
class HttpConfig(Settings):
    """``http:`` in ``cloud.yaml``: the HTTP face (KServe v2, the jobs REST API, the console).

    ``listen``: ``host:port``, or a bare port (bound on 127.0.0.1). Empty: off (the default). It
    uses the daemon's ``tls:`` and ``auth:`` settings, like the gRPC port; a non-loopback address
    without TLS needs ``allow_insecure_public: true``.
    """

    listen: str = ""

    def validate(self) -> None:
        self.address()  # a typo fails at load, naming the key

    @property
    def enabled(self) -> bool:
        return self.address() is not None

    def address(self) -> tuple[str, int] | None:
        text = str(self.listen or "").strip()
        if not text:
            return None
        host, sep, port_text = text.rpartition(":")
        if not sep:
            host, port_text = "127.0.0.1", text
        host = host.strip("[]")
        if not host or not port_text.isdigit() or not 0 < int(port_text) <= 65535:
            raise ValueError(f"listen: {text!r} is not host:port or a port in 1..65535")
        return host, int(port_text)


@dataclass
class BundlesConfig(Settings):
    """``bundles:`` in ``cloud.yaml``: edge bundles (``cleave bundle``) the edges may fetch (``GetBundle``).

    ``dir``: one subdirectory per served model, named after it (relative to the YAML file). Each is
    verified at start (every sha256) and must carry the served model's fingerprint. Empty: off.
    """

    dir: str = ""

    @property
    def enabled(self) -> bool:
        return bool(self.dir)


RAY_ADDRESS_FORMS = "'' (off), local, auto, or ray://HOST:PORT"
RAY_TRANSPORTS = ("grpc", "actor", "direct")


@dataclass
class RayJobsSettings(Settings):
    """``ray.jobs``: compression jobs as Ray tasks (read by :mod:`cloud_node.jobs`).

    ``artifact_dir``: where job artifacts go, a path every node of the cluster can reach (a shared
    mount); empty: the ``jobs.dir`` artifact directory (fine on one machine).
    """

    jobs_enabled: bool = False  # run compression jobs as Ray tasks (needs ray.address)
    job_num_cpus: float = 1.0  # CPUs each job task declares
    job_memory_mb: int = 0  # memory each job task declares (MB); 0: none declared
    artifact_dir: str = ""

    def validate(self) -> None:
        positive(self, "job_num_cpus")
        non_negative(self, "job_memory_mb")


@dataclass
class RaySettings(Settings):
    """``ray:`` in ``cloud.yaml``: run the tails on Ray Serve (and jobs as Ray tasks); off by default.

    ``address``: empty (off: tails run in this process, Ray is never imported), ``local`` (start a
    Ray instance on this machine), ``auto`` (join the cluster this node belongs to) or
    ``ray://HOST:PORT`` (Ray Client). One Serve deployment per served model, autoscaled between
    ``min_replicas`` and ``max_replicas`` on ongoing requests per replica.
    """

    address: str = ""
    replicas: int = 1  # replicas each model's deployment starts with
    min_replicas: int = 1
    max_replicas: int = 1  # > min_replicas turns autoscaling on
    target_ongoing_requests: float = 2.0  # per replica, what the autoscaler aims for
    max_ongoing_requests: int = 8  # per replica, beyond which the router queues (Serve's backpressure)
    upscale_delay_s: float = 30.0  # how long load must stay high before adding a replica
    downscale_delay_s: float = 600.0  # how long load must stay low before removing one
    look_back_period_s: float = 30.0  # the window the autoscaler averages ongoing requests over
    num_cpus: float = 1.0  # per replica
    num_gpus: float = 0.0  # per replica
    torch_threads: int = 0  # torch threads in each replica; 0: num_cpus rounded up
    max_batch_size: int = 1  # rows per batch inside a replica (Serve's @serve.batch); 1: no batching
    batch_wait_timeout_s: float = 0.0  # how long a replica's batch waits to fill
    request_timeout_s: float = 30.0  # one request's deadline, retries on other replicas included
    max_attempts: int = 3  # tries per request when a replica dies under it
    graceful_shutdown_timeout_s: float = 20.0  # a replica scaled down finishes its in-flight requests first
    app_name: str = "cleave"  # prefix of each model's Serve application (several front doors share them)
    # How a request reaches a replica: ``direct`` (default), a socket of each replica's own, Serve still
    # owning the replicas (lane.py); ``grpc``, Serve's direct gRPC data plane (the transport
    # RAY_SERVE_THROUGHPUT_OPTIMIZED turns on), or ``actor``, Serve's default (a Ray actor call whose
    # first reply only says "accepted"; always so through Ray Client, ray://). See docs/ray.md.
    transport: str = "direct"
    access_log: bool = False  # Serve's per-request access log line in each replica (off: one write less per request)
    env: dict[str, str] = field(default_factory=dict)  # environment variables of every replica process
    local_num_cpus: int = 0  # `local`: CPUs the Ray instance may use; 0: the machine's
    local_object_store_mb: int = 0  # `local`: its object store (MB); 0: Ray's default
    jobs: RayJobsSettings = field(default_factory=RayJobsSettings)

    @property
    def enabled(self) -> bool:
        return bool(self.address)

    def validate(self) -> None:
        address = str(self.address or "")
        if address and address not in ("local", "auto") and not address.startswith("ray://"):
            raise ValueError(f"address: must be {RAY_ADDRESS_FORMS}; got {address!r}")
        positive(self, "replicas", "min_replicas", "max_replicas", "target_ongoing_requests", "max_ongoing_requests")
        positive(self, "max_batch_size", "request_timeout_s", "max_attempts")
        positive(self, "look_back_period_s")
        non_negative(self, "upscale_delay_s", "downscale_delay_s", "num_cpus", "num_gpus", "torch_threads")
        non_negative(self, "batch_wait_timeout_s", "graceful_shutdown_timeout_s", "local_num_cpus")
        non_negative(self, "local_object_store_mb")
        if self.min_replicas > self.max_replicas:
            raise ValueError(f"min_replicas: {self.min_replicas} is above max_replicas {self.max_replicas}")
        if not self.min_replicas <= self.replicas <= self.max_replicas:
            raise ValueError(f"replicas: {self.replicas} is not in [min_replicas, max_replicas]")
        if not self.app_name:
            raise ValueError("app_name: required")
        if self.transport not in RAY_TRANSPORTS:
            raise ValueError(f"transport: must be one of {', '.join(RAY_TRANSPORTS)}; got {self.transport!r}")
        if self.jobs.jobs_enabled and not address:
            raise ValueError("jobs.jobs_enabled: Ray jobs need ray.address (local, auto or ray://HOST:PORT)")
        if not isinstance(self.env, dict) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in self.env.items()
        ):
            raise ValueError("env: expected a mapping of variable name to string value")


@dataclass
class CloudConfig(Settings):
    listen: str = "127.0.0.1:50051"
    models: list[ModelSpec] = field(default_factory=list)
    limits: CloudLimits = field(default_factory=CloudLimits)
    jobs: JobsConfig = field(default_factory=JobsConfig)
    batching: BatchingConfig = field(default_factory=BatchingConfig)
    torch_threads: int = 0  # 0: torch's default, within the CPUs this process may use (runtime.cpus)
    max_workers: int = 32  # gRPC handler threads
    chunk_bytes: int = 1 << 20  # payload bytes per result frame
    allow_insecure_public: bool = False  # bind a non-loopback address without TLS
    tls: ServerTLS = field(default_factory=ServerTLS)  # cert + key: TLS; ca + require_client_cert: mutual TLS
    auth: ServerAuth = field(default_factory=ServerAuth)  # bearer tokens every RPC but health needs
    log_level: str = "INFO"
    metrics: MetricsConfig = field(default_factory=MetricsConfig)  # Prometheus /metrics; off by default
    http: HttpConfig = field(default_factory=HttpConfig)  # KServe v2 over HTTP, jobs REST API, console; off by default
    # Client pings the server accepts (and the cloud's own channels send): the same on every edge.
    keepalive: Keepalive = field(default_factory=Keepalive)
    ray: RaySettings = field(default_factory=RaySettings)  # tails on Ray Serve, jobs as Ray tasks; off by default
    bundles: BundlesConfig = field(default_factory=BundlesConfig)  # edge bundles edges fetch; off by default

    def validate(self) -> None:
        names = [m.name for m in self.models]
        if len(set(names)) != len(names):
            raise ValueError(f"models: duplicate names in {names}")
        host_port("listen", self.listen)
        positive(self, "max_workers", "chunk_bytes")
        non_negative(self, "torch_threads")
        one_of("log_level", self.log_level.upper(), LOG_LEVELS)
        within("limits", lambda: self.limits.check(self.max_workers))
        within("limits", lambda: self.limits.check_models(names))
        within("batching", lambda: self.batching.check_models(names))

    @classmethod
    def from_yaml(cls, path: str) -> CloudConfig:
        config = cls.from_dict(load_yaml(path))
        config.resolve_paths(Path(path).parent)
        return config

    def resolve_paths(self, base: Path) -> None:
        """Take the relative paths of ``tls`` and ``auth`` relative to ``base`` (the YAML file's folder)."""
        self.tls = self.tls.resolved(base)
        self.auth = self.auth.resolved(base)
        if self.bundles.dir and not Path(self.bundles.dir).expanduser().is_absolute():
            self.bundles.dir = str(base / Path(self.bundles.dir).expanduser())

    @classmethod
    def from_dict(cls, data: dict) -> CloudConfig:
        return from_mapping(cls, data)
