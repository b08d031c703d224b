"""A thin client for the edge daemon's ``Edge`` service, as an app would use it."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import TYPE_CHECKING

import numpy as np

from compressor import RAW_UNCOMPRESSED, EncodingSpec, decode, encode
from partitioner.placement import Placement, parse_pin
from protos.cleave.v1 import edge_pb2, edge_pb2_grpc
from runtime.security import ClientTLS
from runtime.serving import DEFAULT_MAX_MESSAGE_BYTES, open_channel

if TYPE_CHECKING:
    import torch


class EdgeClient:
    """Call a local edge daemon: ``EdgeClient("127.0.0.1:50052").infer(x)``."""

    def __init__(
        self,
        target: str,
        max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
        *,
        tls: ClientTLS | None = None,
        token: str | None = None,
    ) -> None:
        self.target = target
        self.channel = open_channel(target, max_message_bytes, tls=tls, token=token)
        self.stub = edge_pb2_grpc.EdgeStub(self.channel)

    def wait_ready(self, timeout: float = 30.0) -> None:
        """Block until the daemon reports SERVING: it listens before its model is loaded.

        Raises:
            cleave_cli.wait.NotServing: (a TimeoutError) with the daemon's last answer.
        """
        from .wait import wait_channel_serving

        wait_channel_serving(self.channel, timeout, self.target)

    def infer(
        self, x: torch.Tensor | np.ndarray, request_id: int = 0, timeout: float | None = 60.0
    ) -> edge_pb2.EdgeInferResponse:
        """One request: ``x`` is a torch tensor or a numpy array (the codec takes both)."""
        x = x.contiguous() if hasattr(x, "contiguous") else np.ascontiguousarray(x)
        request = edge_pb2.EdgeInferRequest(request_id=request_id, inputs=[encode(x, RAW_UNCOMPRESSED)])
        return self.stub.Infer(request, timeout=timeout)

    def infer_stream(
        self, xs: Iterable[torch.Tensor], timeout: float | None = 300.0
    ) -> Iterator[edge_pb2.EdgeInferResponse]:
        requests = (
            edge_pb2.EdgeInferRequest(request_id=i + 1, inputs=[encode(x.contiguous(), RAW_UNCOMPRESSED)])
            for i, x in enumerate(xs)
        )
        return self.stub.InferStream(requests, timeout=timeout)

    def status(self, timeout: float = 10.0) -> edge_pb2.EdgeStatus:
        return self.stub.GetStatus(edge_pb2.GetStatusRequest(), timeout=timeout)

    def pin(self, cut: str | int, encoding: str, timeout: float = 30.0) -> edge_pb2.Plan:
        """Pin a cut ("edge", "cloud", a name or an index) and a feature encoding."""
        placement, key = parse_pin(cut)  # ValueError for "auto" or a negative cut
        plan = edge_pb2.Plan(encoding=EncodingSpec.parse(encoding).to_proto(), reason="pinned by client")
        plan.placement = {
            Placement.EDGE_ONLY: edge_pb2.EDGE_ONLY,
            Placement.CLOUD_ONLY: edge_pb2.CLOUD_ONLY,
            Placement.SPLIT: edge_pb2.SPLIT,
        }[placement]
        if isinstance(key, int):
            plan.cut_index = key
        elif key is not None:
            plan.cut_name = key
        return self.stub.Replan(edge_pb2.ReplanRequest(plan=plan), timeout=timeout)

    def close(self) -> None:
        self.channel.close()


def outputs_of(response: edge_pb2.EdgeInferResponse) -> list[torch.Tensor]:
    return [decode(t) for t in response.outputs]
