"""``edge.yaml``: the model, the cloud, the plan and the limits of the edge daemon."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from compressor.bitpack import BIT_WIDTHS
from compressor.errors import CodecError
from compressor.spec import EncodingSpec
from partitioner.placement import AUTO, parse_pin
from partitioner.spec import IMAGE_SUFFIXES, PHOTOS, SYNTHETIC, ModelSpec, image_files
from runtime.admission import ServingLimits
from runtime.metrics import MetricsConfig
from runtime.security import ClientAuth, ClientTLS, ServerAuth, ServerTLS
from runtime.serving import Keepalive
from runtime.settings import (
    LOG_LEVELS,
    Settings,
    SettingsError,
    from_mapping,
    host_port,
    load_yaml,
    non_negative,
    one_of,
    positive,
    require,
    within,
)

#: ``autoplan.objective`` and ``autoplan.baseline`` values: partitioner.planner's OBJECTIVES and
#: BASELINES, repeated here because the planner imports torch and a config must load without it
#: (tests/test_settings.py checks that the two agree).
OBJECTIVES = ("latency", "throughput")
BASELINES = ("neurosurgeon", "edge-only", "cloud-raw", "cloud-jpeg", "cloud-webp")
#: ``head.weight_bits``: 32 is the float head, 8 runs int8 kernels, the rest are packed and run in float.
HEAD_BITS = (32, *sorted(BIT_WIDTHS, reverse=True))


@dataclass
class PlanSettings(Settings):
    cut: str = "auto"  # "auto" (the planner decides), "cloud", "edge", or a cut name / index
    encoding: str = "int8"  # feature encoding for a fixed cut, compressor.EncodingSpec grammar

    def validate(self) -> None:
        require(bool(self.cut.strip()), "cut", '"auto", "cloud", "edge", a cut name or an index', self.cut)
        if self.cut != AUTO:
            parse_pin(self.cut)  # raises "cut: ..." for a spelling no model could have
        try:
            EncodingSpec.parse(self.encoding)
        except CodecError as exc:
            raise ValueError(f"encoding: {exc}") from None


@dataclass
class AutoPlanSettings(Settings):
    """How ``cut: auto`` plans and re-plans."""

    objective: str = "latency"  # or "throughput" (pipelined stages, for streams)
    memory_budget_mb: float | None = None  # edge: head weights + peak activations
    max_rel_error: float | None = 0.05  # output distortion budget on calibration inputs
    min_top1: float | None = 0.99  # top-1 agreement with the float model on calibration inputs
    # Calibration images: a directory of image files (relative to edge.yaml), "photos" (bundled real
    # photos) or "synthetic"; unset: photos for a pretrained model, synthetic otherwise.
    calibration: str | None = None
    calibration_inputs: int = 8
    byte_samples: int = 3  # calibration inputs whose encoded features predict bytes on the wire (median)
    input_is_8bit: bool = True  # inputs are 8-bit images: sending them as 8-bit codes costs no accuracy
    baseline: str | None = None  # plan as a baseline would: neurosurgeon, edge-only, cloud-raw, cloud-jpeg, cloud-webp
    check_interval_s: float = 1.0  # how often the plan is re-evaluated against the link estimate
    probe_interval_s: float = 5.0  # active probe when no traffic has measured the link lately
    min_gain: float = 0.10  # hysteresis: switch only for a clearly faster plan ...
    min_gain_ms: float = 2.0  # ... by at least this much ...
    confirmations: int = 2  # ... on this many consecutive checks
    # A re-plan check measures candidates' accuracy (the model on every calibration input, seconds each on a
    # slow device) for at most this long; the best plan known to fit is used meanwhile, the rest measured later.
    measure_budget_s: float = 5.0
    # The share of this device's time the re-plan checks may take: after a check that kept the planning thread
    # busy (running, or ready and waiting for a CPU) for t seconds, the next comes no sooner than t / this.
    # On a throttled device a check's few ms of CPU take hundreds of ms of its quota, which requests need.
    max_check_share: float = 0.05

    def validate(self) -> None:
        one_of("objective", self.objective, OBJECTIVES)
        if self.baseline is not None:
            one_of("baseline", self.baseline, BASELINES)
        for key in ("memory_budget_mb", "max_rel_error"):
            value = getattr(self, key)
            require(value is None or value > 0, key, "> 0 or unset", value)
        require(self.min_top1 is None or 0 <= self.min_top1 <= 1, "min_top1", "in [0, 1] or unset", self.min_top1)
        positive(
            self,
            "calibration_inputs",
            "byte_samples",
            "check_interval_s",
            "probe_interval_s",
            "confirmations",
            "measure_budget_s",
            "max_check_share",
        )
        require(self.max_check_share <= 1, "max_check_share", "in (0, 1]", self.max_check_share)
        non_negative(self, "min_gain", "min_gain_ms")


@dataclass
class HeadSettings(Settings):
    """How the edge runs the head of a split."""

    weight_bits: int = 32  # 32: float (exact); 8: int8 kernels (ONNX Runtime); 2-6: packed, run in float
    allocate: bool = False  # with cut auto: choose per-layer bits (Auto-Split) under the autoplan budgets

    def validate(self) -> None:
        one_of("weight_bits", self.weight_bits, HEAD_BITS)


@dataclass
class Reconnect(Settings):
    initial_s: float = 0.2
    max_s: float = 5.0
    connect_timeout_s: float = 3.0

    def validate(self) -> None:
        positive(self, "initial_s", "max_s", "connect_timeout_s")
        require(self.max_s >= self.initial_s, "max_s", f">= initial_s ({self.initial_s})", self.max_s)


@dataclass
class FetchBundle(Settings):
    """``fetch_bundle:``: at start, fetch ``model``'s bundle from the cloud into ``bundle:`` (edge_node.bundle_fetch).

    Off while ``model`` is empty. A valid bundle already in ``bundle:`` with the cloud's fingerprint
    (or any valid one while the cloud is unreachable) is used without fetching.
    """

    model: str = ""  # the model name the cloud serves
    max_bytes: int = 4 << 30  # a manifest declaring more file bytes than this is refused
    max_files: int = 256  # ... or more files
    timeout_s: float = 600.0  # waiting for a cloud not up yet (with no bundle here), then the whole transfer

    @property
    def enabled(self) -> bool:
        return bool(self.model)

    def validate(self) -> None:
        positive(self, "max_bytes", "max_files", "timeout_s")


@dataclass
class EdgeLimits(ServingLimits):
    """What the edge's local clients may take (the ``ServingLimits`` fields too)."""

    max_message_bytes: int = 64 << 20
    max_inflight: int = 64  # requests being served at once; more answer RESOURCE_EXHAUSTED
    stream_window: int = 8  # requests of one InferStream served concurrently
    max_batch: int = 8  # rows per Infer request, checked from the input's header before it is decoded

    def validate(self) -> None:
        super().validate()
        positive(self, "max_message_bytes", "max_inflight", "stream_window", "max_batch")


@dataclass
class EdgeConfig(Settings):
    # What runs here: a model spec (the torch edge loads and traces it), or an edge bundle (a
    # directory from `cleave bundle`: the torch-free edge runs its ONNX heads on ONNX Runtime).
    model: ModelSpec | None = None
    bundle: str | None = None
    fetch_bundle: FetchBundle = field(default_factory=FetchBundle)  # fill `bundle` from the cloud at start
    preload: bool = False  # with a bundle: open the whole model at start, not at its first use (fallback, edge-only)
    listen: str = "127.0.0.1:50052"
    cloud: str = "127.0.0.1:50051"
    cloud_tls: ClientTLS = field(default_factory=ClientTLS)  # how the edge checks the cloud (and shows itself)
    cloud_auth: ClientAuth = field(default_factory=ClientAuth)  # the bearer token sent on every call to the cloud
    plan: PlanSettings = field(default_factory=PlanSettings)
    autoplan: AutoPlanSettings = field(default_factory=AutoPlanSettings)
    head: HeadSettings = field(default_factory=HeadSettings)
    reconnect: Reconnect = field(default_factory=Reconnect)
    # Pings on the channel to the cloud and accepted by the edge's server: the same as the cloud's.
    keepalive: Keepalive = field(default_factory=Keepalive)
    limits: EdgeLimits = field(default_factory=EdgeLimits)
    request_timeout_s: float = 10.0  # past this the cloud's answer is abandoned and the tail runs here
    chunk_bytes: int = 1 << 20
    torch_threads: int = 0  # model threads (torch or ONNX Runtime); 0: its default, within CPU limits (runtime.cpus)
    max_workers: int = 32
    allow_insecure_public: bool = False
    tls: ServerTLS = field(default_factory=ServerTLS)  # the edge's own server (its local API)
    auth: ServerAuth = field(default_factory=ServerAuth)  # tokens local apps must send
    log_level: str = "INFO"
    metrics: MetricsConfig = field(default_factory=MetricsConfig)  # Prometheus /metrics; off by default

    def validate(self) -> None:
        if self.model is None and self.bundle is None:
            raise SettingsError("model: required (a model spec), unless bundle names an edge bundle directory")
        if self.fetch_bundle.enabled:
            require(self.bundle is not None, "bundle", "the directory fetch_bundle fills", None)
            if self.model is not None and self.model.name != self.fetch_bundle.model:
                raise SettingsError(
                    f"fetch_bundle.model: {self.fetch_bundle.model!r} is not model.name {self.model.name!r}"
                )
        if self.bundle is not None:
            require(bool(self.bundle.strip()), "bundle", "an edge bundle directory", self.bundle)
            require(not self.head.allocate, "head.allocate", "false with a bundle (its heads are float or int8)", True)
            require(
                self.head.weight_bits in (8, 32), "head.weight_bits", "8 or 32 with a bundle", self.head.weight_bits
            )
        host_port("listen", self.listen)
        host_port("cloud", self.cloud)  # without a port gRPC dials 443, and the edge served edge-only
        positive(self, "request_timeout_s", "chunk_bytes", "max_workers")
        non_negative(self, "torch_threads")
        one_of("log_level", self.log_level.upper(), LOG_LEVELS)
        within("limits", lambda: self.limits.check(self.max_workers))

    @classmethod
    def from_yaml(cls, path: str) -> EdgeConfig:
        config = cls.from_dict(load_yaml(path))
        config.resolve_paths(Path(path).parent)
        return config

    def resolve_paths(self, base: Path) -> None:
        """Take the relative paths of the TLS and token settings relative to ``base`` (the YAML file's folder)."""
        self.tls = self.tls.resolved(base)
        self.auth = self.auth.resolved(base)
        self.cloud_tls = self.cloud_tls.resolved(base)
        self.cloud_auth = self.cloud_auth.resolved(base)
        if self.bundle is not None and not Path(self.bundle).expanduser().is_absolute():
            self.bundle = str(base / Path(self.bundle).expanduser())
        calibration = self.autoplan.calibration
        if calibration is not None and calibration not in (PHOTOS, SYNTHETIC):
            folder = Path(calibration).expanduser()
            folder = folder if folder.is_absolute() else base / folder
            if not folder.is_dir():
                raise SettingsError(
                    f"autoplan.calibration: {calibration!r} is neither {PHOTOS!r}, {SYNTHETIC!r} nor a directory"
                )
            if not image_files(folder):
                # Found only by the planner, the edge served edge-only and re-profiled the model at every retry.
                raise SettingsError(
                    f"autoplan.calibration: {str(folder)!r} holds no image file ({', '.join(IMAGE_SUFFIXES)})"
                )
            self.autoplan.calibration = str(folder)

    @classmethod
    def from_dict(cls, data: dict) -> EdgeConfig:
        if "model" not in data and "bundle" not in data:
            raise SettingsError("model: required (a model spec), unless bundle names an edge bundle directory")
        return from_mapping(cls, data)
