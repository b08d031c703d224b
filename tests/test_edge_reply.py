"""A split request's way back on the edge, without daemons: the answer its thread waits on, and what
its reply carries (the cloud link is a stand-in that answers each request at once)."""

from __future__ import annotations

import threading
import time
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout

import pytest
import torch

from cleave_cli.images import synthetic_images
from compressor import RAW_UNCOMPRESSED, EncodingSpec, decode, encode
from edge_node.cloud_link import Answer, CloudReply
from edge_node.link import LinkMonitor
from edge_node.runtime import EdgeRuntime
from edge_node.servicer import EdgeServicer
from partitioner.loaded import LoadedModel
from partitioner.placement import Placement
from protos.cleave.v1 import split_inference_pb2 as si_pb2
from protos.cleave.v1 import tensor_pb2


class _Stream:
    """A cloud stream that answers every request with ``outputs`` (wire tensors)."""

    def __init__(self, outputs: list[tensor_pb2.Tensor]) -> None:
        self.outputs = outputs

    def submit(self, request_id: int, features: list, payloads: list | None = None) -> Future:
        future: Future = Future()
        future.set_result(CloudReply(self.outputs, si_pb2.CloudTiming(compute_ms=1.0), 100, 200))
        return future


class _Link:
    refusal = last_error = ""

    def __init__(self, stream: _Stream) -> None:
        self.stream = stream
        self.monitor = LinkMonitor()

    def stream_for(self, cut_index: int, reply: str = "") -> _Stream:
        return self.stream

    def next_request_id(self) -> int:
        return 1

    def want(self, *args, **kwargs) -> None:
        pass


@pytest.mark.parametrize("sent", ["raw+none", "fp16", "raw+zstd1"])
def test_a_reply_carries_the_cloud_outputs_as_encoding_them_raw_gives(local_model: LoadedModel, sent: str) -> None:
    """RAW outputs from the cloud go into the reply as they came (the same bytes as decoding and encoding
    them again); others are decoded and encoded RAW, uncompressed, for the app."""
    logits = torch.randn(1, 1000)
    wire = encode(logits, EncodingSpec.parse(sent))
    runtime = EdgeRuntime(local_model, _Link(_Stream([wire])), request_timeout_s=5.0)
    runtime.pin(Placement.SPLIT, "layer3_0_relu", EncodingSpec.parse("int8"))
    outcome = runtime.infer([synthetic_images(1, local_model.input_shape, seed=1)])
    assert outcome.placement == Placement.SPLIT and outcome.note == ""
    assert (outcome.raw_outputs is not None) == (sent == "raw+none")
    reply = EdgeServicer(runtime, "127.0.0.1:1", stream_window=1)._response(7, outcome)
    expected = [encode(o, RAW_UNCOMPRESSED) for o in outcome.outputs]
    assert [t.SerializeToString() for t in reply.outputs] == [t.SerializeToString() for t in expected]
    assert torch.equal(decode(reply.outputs[0]), outcome.outputs[0])
    assert reply.request_id == 7 and reply.bytes_up == 100 and reply.bytes_down == 200


def test_an_answer_gives_its_result_or_error_once_in_and_times_out_before() -> None:
    answer = Answer()
    started = time.perf_counter()
    with pytest.raises(FutureTimeout):
        answer.result(timeout=0.05)
    assert time.perf_counter() - started >= 0.04
    reply = CloudReply([], si_pb2.CloudTiming(), 1, 2)
    threading.Timer(0.05, answer.set_result, (reply,)).start()  # set from another thread, as the receiver does
    assert answer.result(timeout=5) is reply
    assert answer.result(timeout=0) is reply  # done for good: asking again answers at once
    failed = Answer()
    failed.set_exception(RuntimeError("stream broke"))
    for _ in range(2):
        with pytest.raises(RuntimeError, match="stream broke"):
            failed.result()
