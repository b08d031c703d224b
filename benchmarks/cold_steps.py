"""Steps of a request's path timed with the caches cold, as they are after a model's compute.

A split request's Python work on either side of the model runs right after tens of milliseconds of
compute that filled the caches with weights and activations: a step that takes 5 us in a loop takes
tens of microseconds there. Each sample here is taken right after writing a 48 MB buffer (more than
the 32 MB L3 of the 2-core machine the docs' numbers come from), for each step and the step it
replaced, interleaved; medians in microseconds.

    python -m benchmarks.cold_steps [--samples 200]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from concurrent.futures import Future

import numpy as np
import torch

from cloud_node.streams import parse_infer_frame
from compressor import RAW_UNCOMPRESSED, Assembler, EncodingSpec, decode, encode, encode_apart
from compressor.framing import _HEADER_FIELDS, _PRESENCE, add_chunks, chunks_wire, header_of, to_pieces
from edge_node.cloud_link import Answer
from edge_node.link import LinkMonitor
from edge_node.servicer import parse_infer_request
from edge_node.torch_backend import TorchBackend
from protos.cleave.v1 import edge_pb2, tensor_pb2
from protos.cleave.v1 import split_inference_pb2 as si_pb2
from runtime.memory import keep_freed_memory


def _listed_header(tensor: tensor_pb2.Tensor) -> tensor_pb2.Tensor:
    """header_of before: every field but the payload listed in Python."""
    return tensor_pb2.Tensor(
        **{name: getattr(tensor, name) for name in _HEADER_FIELDS if name not in _PRESENCE or tensor.HasField(name)}
    )


def _future_round() -> None:
    future: Future = Future()
    future.set_result(1)
    future.result(timeout=5)


def _answer_round() -> None:
    answer = Answer()
    answer.set_result(1)  # type: ignore[arg-type]
    answer.result(timeout=5)


def _request_whole(data: bytes, backend: TorchBackend) -> object:
    """Item 7 before: the app's request parsed whole, its input decoded from the parsed payload."""
    return backend.decode(edge_pb2.EdgeInferRequest.FromString(data).inputs[0])


def _request_apart(data: bytes, backend: TorchBackend) -> object:
    parsed = parse_infer_request(data)
    return backend.decode(parsed.message.inputs[0], parsed.payloads[0])  # type: ignore[union-attr]


def _frame_whole(data: bytes) -> object:
    """Item 7 before: a feature frame parsed whole and assembled into whole tensors."""
    assembler = Assembler()
    assembler.add(si_pb2.InferFrame.FromString(data).chunks)
    return assembler.finish()


def _frame_apart(data: bytes) -> object:
    parsed = parse_infer_frame(data)
    assembler = Assembler()
    assembler.add(parsed.message.chunks, parsed.payloads)  # type: ignore[union-attr]
    return assembler.finish_apart()


def _frames(features: list, payloads: list | None) -> list[bytes]:
    """The edge's frames of one request (InferStream.submit), from whole tensors (before) or apart."""
    return [b"".join(chunks_wire(3, group)) for group in to_pieces(features, 1 << 20, payloads)]


def _transfer_statistics(monitor: LinkMonitor) -> None:
    """Item 7 before: the RTT's median taken with statistics.median on every request."""
    statistics.median(monitor._rtt)
    monitor.record_transfer(20_000, 4_000, 3.0)


def steps() -> dict[str, tuple[Callable[[], object], Callable[[], object]]]:
    """Per step: (before, now)."""
    logits = torch.randn(1, 1000)
    result = encode(logits, RAW_UNCOMPRESSED)
    codes = encode(torch.rand(1, 256, 14, 14), EncodingSpec.parse("int8"))
    request = edge_pb2.EdgeInferRequest(inputs=[encode(torch.rand(1, 3, 224, 224), RAW_UNCOMPRESSED)])
    image = edge_pb2.EdgeInferRequest.FromString(request.SerializeToString()).inputs[0]
    backend = TorchBackend(None)  # type: ignore[arg-type]  # decode needs no model
    app_request = request.SerializeToString()
    frame = si_pb2.InferFrame(session_id="0" * 32, request_id=7, last=True)
    for group in to_pieces([encode(torch.rand(1, 64, 56, 56), EncodingSpec.parse("fp16"))]):
        add_chunks(frame.chunks, group)  # 401 KB of features, as the edge sends at layer1 in fp16
    frame_bytes = frame.SerializeToString()
    x = torch.rand(1, 128, 28, 28)  # 100 KB of int8 codes
    whole, (header, payload) = encode(x, EncodingSpec.parse("int8")), encode_apart(x, EncodingSpec.parse("int8"))
    monitor = LinkMonitor()
    monitor.record_probe(0.5, 1000.0, 1000.0)
    for rtt in (0.4, 0.6, 0.5):
        monitor.record_rtt(rtt)
    return {
        "header of a 4 KB result": (lambda: _listed_header(result), lambda: header_of(result)),
        "header of 50 KB of int8 codes": (lambda: _listed_header(codes), lambda: header_of(codes)),
        "reply outputs (encode again / as sent)": (lambda: [encode(logits, RAW_UNCOMPRESSED)], lambda: [result]),
        "wait for a result (Future / Answer)": (_future_round, _answer_round),
        "decode a 602 KB input (copy / in place)": (lambda: decode(image), lambda: backend.decode(image)),
        "parse + decode the app's request (whole / apart)": (
            lambda: _request_whole(app_request, backend),
            lambda: _request_apart(app_request, backend),
        ),
        "parse + assemble a 401 KB frame (whole / apart)": (
            lambda: _frame_whole(frame_bytes),
            lambda: _frame_apart(frame_bytes),
        ),
        "frame 100 KB of int8 codes (whole / apart)": (
            lambda: _frames([whole], None),
            lambda: _frames([header], [payload]),
        ),
        "record_transfer (+median / kept median)": (
            lambda: _transfer_statistics(monitor),
            lambda: monitor.record_transfer(20_000, 4_000, 3.0),
        ),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=200)
    args = parser.parse_args(argv)
    keep_freed_memory()
    torch.set_num_threads(1)
    flush = np.ones(48 << 20, np.uint8)
    print(f"{'step':<50} {'before us':>9} {'now us':>7}")
    for name, pair in steps().items():
        times: tuple[list[float], list[float]] = ([], [])
        for _ in range(args.samples):
            for run, into in zip(pair, times, strict=True):
                flush += 1  # the caches full of other data, as after a model's compute
                started = time.perf_counter()
                run()
                into.append((time.perf_counter() - started) * 1e6)
        before, now = (statistics.median(t) for t in times)
        print(f"{name:<50} {before:>9.1f} {now:>7.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
