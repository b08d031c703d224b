"""``edge.yaml``: the model, the cloud, the plan and the limits of the edge daemon."""

from __future__ import annotations

from dataclasses import dataclass, field

from partitioner.models import ModelSpec
from partitioner.settings import SettingsError, from_mapping, load_yaml


@dataclass
class PlanSettings:
    cut: str = "cloud"  # "cloud" (send the input), "edge" (run here), or a cut name / index
    encoding: str = "int8"  # feature encoding, compressor.EncodingSpec grammar


@dataclass
class Reconnect:
    initial_s: float = 0.2
    max_s: float = 5.0
    connect_timeout_s: float = 3.0


@dataclass
class EdgeLimits:
    max_message_bytes: int = 64 << 20
    max_inflight: int = 64  # requests being served at once; more answer RESOURCE_EXHAUSTED
    stream_window: int = 8  # requests of one InferStream served concurrently


@dataclass
class EdgeConfig:
    model: ModelSpec
    listen: str = "127.0.0.1:50052"
    cloud: str = "127.0.0.1:50051"
    plan: PlanSettings = field(default_factory=PlanSettings)
    reconnect: Reconnect = field(default_factory=Reconnect)
    limits: EdgeLimits = field(default_factory=EdgeLimits)
    request_timeout_s: float = 10.0  # past this the cloud's answer is abandoned and the tail runs here
    chunk_bytes: int = 1 << 20
    torch_threads: int = 0
    max_workers: int = 32
    allow_insecure_public: bool = False
    log_level: str = "INFO"

    @classmethod
    def from_yaml(cls, path: str) -> EdgeConfig:
        return cls.from_dict(load_yaml(path))

    @classmethod
    def from_dict(cls, data: dict) -> EdgeConfig:
        if "model" not in data:
            raise SettingsError("model: required")
        return from_mapping(cls, data)
