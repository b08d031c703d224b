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

from compressor import RAW_UNCOMPRESSED, EncodingSpec, decode, encode
from compressor.framing import _HEADER_FIELDS, _PRESENCE, header_of
from edge_node.cloud_link import Answer
from edge_node.torch_backend import TorchBackend
from protos.cleave.v1 import edge_pb2, tensor_pb2
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


def steps() -> dict[str, tuple[Callable[[], object], Callable[[], object]]]:
    """Per step: (before, now)."""
    logits = torch.randn(1, 1000)
    result = encode(logits, RAW_UNCOMPRESSED)
    codes = encode(torch.rand(1, 256, 14, 14), EncodingSpec.parse("int8"))
    request = edge_pb2.EdgeInferRequest(inputs=[encode(torch.rand(1, 3, 224, 224), RAW_UNCOMPRESSED)])
    image = edge_pb2.EdgeInferRequest.FromString(request.SerializeToString()).inputs[0]
    backend = TorchBackend(None)  # type: ignore[arg-type]  # decode needs no model
    return {
        "header of a 4 KB result": (lambda: _listed_header(result), lambda: header_of(result)),
        "header of 50 KB of int8 codes": (lambda: _listed_header(codes), lambda: header_of(codes)),
        "reply outputs (encode again / as sent)": (lambda: [encode(logits, RAW_UNCOMPRESSED)], lambda: [result]),
        "wait for a result (Future / Answer)": (_future_round, _answer_round),
        "decode a 602 KB input (copy / in place)": (lambda: decode(image), lambda: backend.decode(image)),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=200)
    args = parser.parse_args(argv)
    keep_freed_memory()
    torch.set_num_threads(1)
    flush = np.ones(48 << 20, np.uint8)
    print(f"{'step':<42} {'before us':>9} {'now us':>7}")
    for name, pair in steps().items():
        times: tuple[list[float], list[float]] = ([], [])
        for _ in range(args.samples):
            for run, into in zip(pair, times, strict=True):
                flush += 1  # the caches full of other data, as after a model's compute
                started = time.perf_counter()
                run()
                into.append((time.perf_counter() - started) * 1e6)
        before, now = (statistics.median(t) for t in times)
        print(f"{name:<42} {before:>9.1f} {now:>7.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
