"""``inference.GRPCInferenceService``: the KServe v2 Open Inference Protocol over gRPC.

A thin servicer: it turns protobuf messages into :mod:`cloud_node.openinference` dataclasses and
back; the logic lives in :class:`~cloud_node.openinference.OpenInference`. This is the only module
that imports the generated ``inference`` stubs, and only the cloud daemon imports it (lazily, from
``build_daemon``): Triton's and KServe's client libraries register the same message names, so one
process cannot hold two of them.
"""

from __future__ import annotations

from typing import Any

import grpc
from google.protobuf import json_format

from protos.errors import maps_errors
from protos.kserve.v2 import grpc_predict_v2_pb2 as pb

from . import __version__
from .openinference import (
    InferRequest,
    InferResult,
    InputTensor,
    ModelMetadata,
    OpenInference,
    RequestedOutput,
)

SERVICE = pb.DESCRIPTOR.services_by_name["GRPCInferenceService"]
SERVER_NAME = "cleave"


def _parameter(value: pb.InferParameter) -> Any:
    choice = value.WhichOneof("parameter_choice")
    return getattr(value, choice) if choice else None


def to_request(msg: pb.ModelInferRequest) -> InferRequest:
    """The plain request a ModelInferRequest carries (no validation: OpenInference does that)."""
    inputs = [
        InputTensor(
            name=t.name,
            datatype=t.datatype,
            shape=tuple(t.shape),
            contents={f.name: values for f, values in t.contents.ListFields()},
        )
        for t in msg.inputs
    ]
    outputs = []
    for o in msg.outputs:
        binary = _parameter(o.parameters["binary_data"]) if "binary_data" in o.parameters else None
        outputs.append(RequestedOutput(o.name, binary if isinstance(binary, bool) else None))
    return InferRequest(
        model_name=msg.model_name,
        model_version=msg.model_version,
        id=msg.id,
        inputs=inputs,
        outputs=outputs,
        raw_inputs=list(msg.raw_input_contents),
    )


def to_response(result: InferResult) -> pb.ModelInferResponse:
    reply = pb.ModelInferResponse(model_name=result.model_name, model_version=result.model_version, id=result.id)
    for output in result.outputs:
        tensor = reply.outputs.add(name=output.name, datatype=output.datatype, shape=list(output.shape))
        if result.raw:
            reply.raw_output_contents.append(output.data.tobytes())
        else:
            tensor.contents.fp32_contents.extend(output.data.ravel().tolist())
    return reply


def to_metadata(meta: ModelMetadata) -> pb.ModelMetadataResponse:
    def tensors(items: Any) -> list[pb.ModelMetadataResponse.TensorMetadata]:
        return [pb.ModelMetadataResponse.TensorMetadata(name=t.name, datatype=t.datatype, shape=t.shape) for t in items]

    return pb.ModelMetadataResponse(
        name=meta.name,
        versions=list(meta.versions),
        platform=meta.platform,
        inputs=tensors(meta.inputs),
        outputs=tensors(meta.outputs),
    )


class KServeServicer:
    """Serves every model of the cloud daemon through the Open Inference Protocol."""

    def __init__(self, backend: OpenInference) -> None:
        self.backend = backend

    @maps_errors
    def ServerLive(self, request: pb.ServerLiveRequest, context: grpc.ServicerContext) -> pb.ServerLiveResponse:
        return pb.ServerLiveResponse(live=True)

    @maps_errors
    def ServerReady(self, request: pb.ServerReadyRequest, context: grpc.ServicerContext) -> pb.ServerReadyResponse:
        # Every model is loaded before the server starts; a draining server refuses new calls itself.
        return pb.ServerReadyResponse(ready=True)

    @maps_errors
    def ModelReady(self, request: pb.ModelReadyRequest, context: grpc.ServicerContext) -> pb.ModelReadyResponse:
        self.backend.model(request.name, request.version)
        return pb.ModelReadyResponse(ready=True)

    @maps_errors
    def ServerMetadata(
        self, request: pb.ServerMetadataRequest, context: grpc.ServicerContext
    ) -> pb.ServerMetadataResponse:
        return pb.ServerMetadataResponse(name=SERVER_NAME, version=__version__, extensions=[])

    @maps_errors
    def ModelMetadata(
        self, request: pb.ModelMetadataRequest, context: grpc.ServicerContext
    ) -> pb.ModelMetadataResponse:
        return to_metadata(self.backend.metadata(request.name, request.version))

    @maps_errors
    def ModelInfer(self, request: pb.ModelInferRequest, context: grpc.ServicerContext) -> pb.ModelInferResponse:
        return to_response(self.backend.infer(to_request(request)))

    # Triton's read-only extensions: the same JSON objects the HTTP face sends, parsed into messages.

    @maps_errors
    def ModelConfig(self, request: pb.ModelConfigRequest, context: grpc.ServicerContext) -> pb.ModelConfigResponse:
        config = self.backend.config(request.name, request.version)
        return pb.ModelConfigResponse(config=json_format.ParseDict(config, pb.ModelConfig()))

    @maps_errors
    def RepositoryIndex(
        self, request: pb.RepositoryIndexRequest, context: grpc.ServicerContext
    ) -> pb.RepositoryIndexResponse:
        return json_format.ParseDict({"models": self.backend.repository_index()}, pb.RepositoryIndexResponse())

    @maps_errors
    def ModelStatistics(
        self, request: pb.ModelStatisticsRequest, context: grpc.ServicerContext
    ) -> pb.ModelStatisticsResponse:
        stats = self.backend.model_statistics(request.name, request.version)
        return json_format.ParseDict(stats, pb.ModelStatisticsResponse())
