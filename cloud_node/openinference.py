"""Whole-model inference under the KServe v2 Open Inference Protocol, independent of gRPC.

:class:`OpenInference` holds the protocol's logic for every model the cloud daemon serves: model
lookup by name and version, metadata, and the validation and conversion of inference requests. The
servicer in :mod:`cloud_node.kserve` only translates protobuf messages to and from the plain
dataclasses here, so this module imports no generated stubs (see :mod:`protos.kserve.v2` for why).

Protocol choices, as Triton's and KServe's clients expect them:

- Each model has one version, ``"1"``; an empty version means the latest. An unknown model or
  version is NOT_FOUND.
- One input named ``input`` and outputs named ``output`` (``output_0``, ``output_1`` ... when the
  model returns several). Shapes are the model's, batch dimension ``-1``: any batch up to ``limits.max_batch``
  (RESOURCE_EXHAUSTED past it).
- Inputs may be FP32, FP16, FP64, UINT8, INT32 or INT64, as typed contents (FP16 has no typed
  field) or as little-endian ``raw_input_contents``; values are converted to the model's float input
  as they are (UINT8 pixels are not rescaled). Outputs are FP32.
- Outputs come back as ``raw_output_contents`` when the request sent raw inputs (tritonclient
  reads only those) and as typed contents otherwise; a requested output's ``binary_data``
  parameter overrides that.
- Triton's read-only extensions come as the plain JSON objects of Triton's HTTP API (model
  configuration, repository index, statistics); the gRPC face parses the same objects into its
  messages, so both faces answer alike.
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from compressor import CodecLimits
from partitioner.loaded import LoadedModel, as_tensor_list
from protos.errors import InvalidArgument, NotFound, ResourceExhausted

from .batching import WHOLE_MODEL, Batchers
from .config import BatchSettings, CloudLimits

VERSION = "1"
PLATFORM = "pytorch"
INPUT_NAME = "input"
OUTPUT_DATATYPE = "FP32"


@dataclass(frozen=True)
class Datatype:
    """How one protocol datatype travels: its little-endian numpy dtype and its typed contents field."""

    name: str
    dtype: np.dtype
    contents: str | None  # the InferTensorContents field for typed data; None: raw only
    bounds: tuple[int, int] | None = None  # values a wider typed field must fit in


DATATYPES: dict[str, Datatype] = {
    d.name: d
    for d in (
        Datatype("FP32", np.dtype("<f4"), "fp32_contents"),
        Datatype("FP16", np.dtype("<f2"), None),
        Datatype("FP64", np.dtype("<f8"), "fp64_contents"),
        Datatype("UINT8", np.dtype("u1"), "uint_contents", (0, 255)),
        Datatype("INT32", np.dtype("<i4"), "int_contents"),
        Datatype("INT64", np.dtype("<i8"), "int64_contents"),
    )
}


@dataclass(frozen=True)
class TensorMetadata:
    name: str
    datatype: str
    shape: tuple[int, ...]  # -1 where the dimension varies


@dataclass(frozen=True)
class ModelMetadata:
    name: str
    versions: tuple[str, ...]
    platform: str
    inputs: tuple[TensorMetadata, ...]
    outputs: tuple[TensorMetadata, ...]


@dataclass
class InputTensor:
    """One request input: ``contents`` maps each typed contents field that is set to its values."""

    name: str
    datatype: str
    shape: tuple[int, ...]
    contents: Mapping[str, Sequence] = field(default_factory=dict)


@dataclass
class RequestedOutput:
    name: str
    binary_data: bool | None = None  # the output's ``binary_data`` parameter, when given


@dataclass
class InferRequest:
    """A ModelInferRequest as plain data; ``raw_inputs`` is ``raw_input_contents``."""

    model_name: str
    inputs: list[InputTensor]
    model_version: str = ""
    id: str = ""
    outputs: list[RequestedOutput] = field(default_factory=list)
    raw_inputs: list[bytes] = field(default_factory=list)


@dataclass
class OutputTensor:
    name: str
    datatype: str
    shape: tuple[int, ...]
    data: np.ndarray  # contiguous, little-endian, of ``DATATYPES[datatype].dtype``


@dataclass
class InferResult:
    model_name: str
    model_version: str
    id: str
    outputs: list[OutputTensor]
    raw: bool  # send the outputs as raw_output_contents (else typed contents)


class Statistics:
    """Per-model inference counts and durations, as Triton's statistics extension reports them.

    Every field is guarded by ``_lock``: handler threads of both faces record concurrently.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._models: dict[str, dict[str, int]] = {}

    def record(self, model: str, ok: bool, total_ns: int, infer_ns: int = 0, rows: int = 0) -> None:
        with self._lock:
            m = self._models.setdefault(model, dict.fromkeys(_STAT_KEYS, 0))
            if ok:
                m["success_count"] += 1
                m["success_ns"] += total_ns
                m["infer_ns"] += infer_ns
                m["input_ns"] += max(total_ns - infer_ns, 0)
                m["rows"] += rows
                m["last_inference"] = int(time.time() * 1000)
            else:
                m["fail_count"] += 1
                m["fail_ns"] += total_ns

    def of(self, model: str) -> dict:
        """Triton's ``ModelStatistics`` JSON for ``model``."""
        with self._lock:
            m = dict(self._models.get(model) or dict.fromkeys(_STAT_KEYS, 0))
        runs = m["success_count"]
        return {
            "name": model,
            "version": VERSION,
            "last_inference": m["last_inference"],
            "inference_count": m["rows"],
            "execution_count": runs,
            "inference_stats": {
                "success": {"count": runs, "ns": m["success_ns"]},
                "fail": {"count": m["fail_count"], "ns": m["fail_ns"]},
                "queue": {"count": 0, "ns": 0},
                "compute_input": {"count": runs, "ns": m["input_ns"]},
                "compute_infer": {"count": runs, "ns": m["infer_ns"]},
                "compute_output": {"count": 0, "ns": 0},
            },
        }


_STAT_KEYS = ("success_count", "success_ns", "fail_count", "fail_ns", "infer_ns", "input_ns", "rows", "last_inference")


class OpenInference:
    """The Open Inference Protocol over ``models``, within ``limits``.

    Args:
        models: looks a served model up by name, raising :class:`NotFound` (``ModelRegistry.get``).
        names: the names of every served model, for messages.
        limits: the daemon's limits (elements per tensor, request and message bytes).
        batchers: the daemon's dynamic batchers; whole-model requests of concurrent clients share
            batches where the model's ``batching:`` settings turn it on (None: never batched).
        remote: the Ray backend (:class:`~cloud_node.ray_backend.serving.RayTails`): set, the whole
            model runs in a replica of its deployment instead of in this process.
    """

    def __init__(
        self,
        models: Callable[[str], LoadedModel],
        names: Sequence[str],
        limits: CloudLimits,
        batchers: Batchers | None = None,
        remote: Any = None,
    ) -> None:
        self._models = models
        self.names = list(names)
        self.limits = limits
        self.batchers = batchers
        self.remote = remote  # the Ray backend (RayTails): whole models run in its replicas
        self.statistics = Statistics()

    def model(self, name: str, version: str = "") -> LoadedModel:
        """The served model ``name`` at ``version`` (empty: the latest); NotFound otherwise."""
        if not name:
            raise InvalidArgument("name: required (a served model: " + ", ".join(self.names) + ")")
        model = self._models(name)
        if version not in ("", VERSION):
            raise NotFound(f"model {name!r} has no version {version!r} (versions: {VERSION})")
        return model

    def metadata(self, name: str, version: str = "") -> ModelMetadata:
        """Versions, platform, inputs and outputs of a served model."""
        return _describe(self.model(name, version))

    def infer(self, request: InferRequest) -> InferResult:
        """Validate ``request``, run the model on its input and select the outputs asked for.

        Raises:
            NotFound: unknown model or version.
            InvalidArgument: naming the field at fault.
            ResourceExhausted: a tensor or reply over the daemon's limits.
        """
        if not request.model_name:
            raise InvalidArgument("model_name: required")
        model = self.model(request.model_name, request.model_version)
        started = time.perf_counter_ns()
        try:
            result, infer_ns, rows = self._infer(model, request)
        except Exception:
            self.statistics.record(model.name, False, time.perf_counter_ns() - started)
            raise
        self.statistics.record(model.name, True, time.perf_counter_ns() - started, infer_ns, rows)
        return result

    def _infer(self, model: LoadedModel, request: InferRequest) -> tuple[InferResult, int, int]:
        meta = _describe(model)
        tensor = self._input(model, request)
        selected = self._select_outputs(meta, request.outputs)
        self._check_reply_size(meta, tensor.shape[0])
        ran = time.perf_counter_ns()
        produced = self.run(model, tensor)
        infer_ns = time.perf_counter_ns() - ran
        if len(produced) != len(meta.outputs):
            raise RuntimeError(f"model {model.name!r} returned {len(produced)} tensors, expected {len(meta.outputs)}")
        outputs = []
        for index in selected:
            data = produced[index].detach().to(torch.float32).contiguous().numpy()
            outputs.append(OutputTensor(meta.outputs[index].name, OUTPUT_DATATYPE, tuple(data.shape), data))
        result = InferResult(
            model_name=model.name,
            model_version=VERSION,
            id=request.id,
            outputs=outputs,
            raw=_reply_raw(request),
        )
        return result, infer_ns, int(tensor.shape[0])

    # Triton's read-only extensions, as Triton's HTTP API writes them.

    def config(self, name: str, version: str = "") -> dict:
        """Triton's ``ModelConfig`` JSON: dims without the batch dimension, ``max_batch_size`` the limit."""
        model = self.model(name, version)
        meta = _describe(model)
        config: dict = {
            "name": model.name,
            "platform": PLATFORM,
            "backend": PLATFORM,
            "max_batch_size": self.limits.batch_limit(model.name),
            "input": [_config_tensor(t) for t in meta.inputs],
            "output": [_config_tensor(t) for t in meta.outputs],
        }
        settings = self.batchers.settings(model.name) if self.batchers is not None else BatchSettings()
        if settings.active:
            config["dynamic_batching"] = {
                "preferred_batch_size": list(settings.preferred_batch_sizes),
                "max_queue_delay_microseconds": int(settings.max_queue_delay_ms * 1000),
            }
        return config

    def repository_index(self) -> list[dict]:
        """Triton's repository index: every served model, READY (all are loaded before serving)."""
        return [{"name": name, "version": VERSION, "state": "READY", "reason": ""} for name in self.names]

    def model_statistics(self, name: str = "", version: str = "") -> dict:
        """Triton's statistics JSON for ``name`` (empty: every served model)."""
        names = [self.model(name, version).name] if name else self.names
        return {"model_stats": [self.statistics.of(n) for n in names]}

    def run(self, model: LoadedModel, tensor: torch.Tensor) -> list[torch.Tensor]:
        """The one place the model runs: the whole model on one input batch, batched with others' when on."""
        if self.remote is not None:
            limits = CodecLimits(max_elements=self.limits.max_elements, max_payload_bytes=self.limits.max_request_bytes)
            return self.remote.run_whole(model.name, tensor, limits)
        if self.batchers is not None:
            return self.batchers.run(model.name, WHOLE_MODEL, model.module, [tensor]).outputs
        with torch.inference_mode():
            return as_tensor_list(model.module(tensor))

    def _input(self, model: LoadedModel, request: InferRequest) -> torch.Tensor:
        """The request's single input, validated and converted to the model's input dtype."""
        if len(request.inputs) != 1:
            raise InvalidArgument(
                f"inputs: model {model.name!r} takes 1 input ({INPUT_NAME!r}), got {len(request.inputs)}"
            )
        if request.raw_inputs and len(request.raw_inputs) != len(request.inputs):
            raise InvalidArgument(
                f"raw_input_contents: {len(request.raw_inputs)} entries for {len(request.inputs)} inputs "
                "(one per input, or none)"
            )
        spec = request.inputs[0]
        where = "inputs[0]"
        if spec.name != INPUT_NAME:
            raise InvalidArgument(
                f"{where}.name: {spec.name!r} is not an input of model {model.name!r} (inputs: {INPUT_NAME})"
            )
        datatype = DATATYPES.get(spec.datatype)
        if datatype is None:
            raise InvalidArgument(
                f"{where}.datatype: {spec.datatype!r} is not supported (supported: {', '.join(DATATYPES)})"
            )
        shape = tuple(spec.shape)
        expected = (-1, *model.input_shape[1:])
        if len(shape) != len(expected) or shape[1:] != expected[1:] or shape[0] < 1:
            raise InvalidArgument(f"{where}.shape: {list(shape)} does not fit {list(expected)} (batch >= 1)")
        max_batch = self.limits.batch_limit(model.name)
        if shape[0] > max_batch:
            raise ResourceExhausted(
                f"{where}.shape[0]: batch {shape[0]} exceeds the limit of {max_batch} (limits.max_batch)"
            )
        count = math.prod(shape)
        if count > self.limits.max_elements:
            raise ResourceExhausted(
                f"{where}.shape: {count} elements exceed the limit of {self.limits.max_elements} (limits.max_elements)"
            )
        if request.raw_inputs:
            array = self._raw(where, spec, datatype, count, request.raw_inputs[0])
        else:
            array = self._typed(where, spec, datatype, count)
        target = torch.empty((), dtype=model.graph.example_input.dtype).numpy().dtype
        return torch.from_numpy(array.astype(target).reshape(shape))

    def _raw(self, where: str, spec: InputTensor, datatype: Datatype, count: int, raw: bytes) -> np.ndarray:
        if any(len(values) for values in spec.contents.values()):
            raise InvalidArgument(f"{where}.contents: must be empty when raw_input_contents carries the data")
        if len(raw) > self.limits.max_request_bytes:
            raise ResourceExhausted(
                f"raw_input_contents[0]: {len(raw)} bytes exceed the limit of {self.limits.max_request_bytes} "
                "(limits.max_request_bytes)"
            )
        expected = count * datatype.dtype.itemsize
        if len(raw) != expected:
            raise InvalidArgument(
                f"raw_input_contents[0]: {len(raw)} bytes, expected {expected} "
                f"({count} {datatype.name} values of {datatype.dtype.itemsize} bytes for shape {list(spec.shape)})"
            )
        return np.frombuffer(raw, dtype=datatype.dtype)

    def _typed(self, where: str, spec: InputTensor, datatype: Datatype, count: int) -> np.ndarray:
        if datatype.contents is None:
            raise InvalidArgument(
                f"{where}.contents: {datatype.name} has no typed contents field; send it in raw_input_contents"
            )
        for name, values in spec.contents.items():
            if name != datatype.contents and len(values):
                raise InvalidArgument(
                    f"{where}.contents.{name}: not used for {datatype.name} (its values go in {datatype.contents})"
                )
        values = spec.contents.get(datatype.contents, ())
        if len(values) != count:
            raise InvalidArgument(
                f"{where}.contents.{datatype.contents}: {len(values)} values, expected {count} "
                f"for shape {list(spec.shape)} (or send raw_input_contents)"
            )
        if datatype.bounds is not None:
            wide = np.asarray(values, dtype=np.int64)
            low, high = datatype.bounds
            if wide.size and (wide.min() < low or wide.max() > high):
                raise InvalidArgument(
                    f"{where}.contents.{datatype.contents}: values must be in [{low}, {high}] for {datatype.name}"
                )
            return wide.astype(datatype.dtype)
        return np.asarray(values, dtype=datatype.dtype)

    def _select_outputs(self, meta: ModelMetadata, requested: list[RequestedOutput]) -> list[int]:
        """Indices of the outputs to return, in the order asked (all of them when none are)."""
        index = {o.name: i for i, o in enumerate(meta.outputs)}
        if not requested:
            return list(range(len(meta.outputs)))
        selected = []
        for i, output in enumerate(requested):
            if output.name not in index:
                raise InvalidArgument(
                    f"outputs[{i}].name: {output.name!r} is not an output of model {meta.name!r} "
                    f"(outputs: {', '.join(index)})"
                )
            if index[output.name] in selected:
                raise InvalidArgument(f"outputs[{i}].name: {output.name!r} is requested twice")
            selected.append(index[output.name])
        return selected

    def _check_reply_size(self, meta: ModelMetadata, batch: int) -> None:
        """Refuse before running a batch whose outputs could not be sent back in one message."""
        elements = sum(math.prod(batch if d == -1 else d for d in o.shape) for o in meta.outputs)
        nbytes = elements * DATATYPES[OUTPUT_DATATYPE].dtype.itemsize
        if nbytes > self.limits.max_message_bytes:
            raise ResourceExhausted(
                f"inputs[0].shape: batch {batch} gives {nbytes} output bytes, over the reply limit of "
                f"{self.limits.max_message_bytes} (limits.max_message_bytes)"
            )


def _describe(model: LoadedModel) -> ModelMetadata:
    """The Open Inference metadata of ``model``: one FP32 input, its outputs, any batch size."""
    example_batch = model.input_shape[0]
    shapes = model.graph.output_shapes
    outputs = tuple(
        TensorMetadata(
            _output_name(i, len(shapes)),
            OUTPUT_DATATYPE,
            (-1, *s[1:]) if s and s[0] == example_batch else tuple(s),
        )
        for i, s in enumerate(shapes)
    )
    return ModelMetadata(
        name=model.name,
        versions=(VERSION,),
        platform=PLATFORM,
        inputs=(TensorMetadata(INPUT_NAME, "FP32", (-1, *model.input_shape[1:])),),
        outputs=outputs,
    )


def _config_tensor(t: TensorMetadata) -> dict:
    """A tensor as Triton's model configuration lists it: no batch dimension (max_batch_size has it)."""
    return {"name": t.name, "data_type": "TYPE_" + t.datatype, "dims": list(t.shape[1:])}


def _output_name(index: int, count: int) -> str:
    return "output" if count == 1 else f"output_{index}"


def _reply_raw(request: InferRequest) -> bool:
    """Raw outputs when the client sent raw inputs, unless its requested outputs say otherwise."""
    asked = [o.binary_data for o in request.outputs if o.binary_data is not None]
    if asked:
        return any(asked)
    return bool(request.raw_inputs)
