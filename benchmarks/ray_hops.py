"""Where the Ray path's hop goes: one tail request crossing into another process, each way Ray offers.

One local Ray instance (2 CPUs, a 200 MB object store, no dashboard), resnet18 at 64x64 cut after
``layer2`` with 8-bit features (as ``benchmarks.scale``), one request at a time from a worker
thread (as a front door's gRPC thread calls). Each way runs the same decode + tail + encode
(``TailReplica.run_many``); ``hop`` is the call's time minus that work, ``out``/``back`` split it at
the moment the replica's method starts and returns (``perf_counter`` is one monotonic clock for
every process of a machine). The ways, interleaved round by round so they share the machine's load:

- ``in-process``: the call without crossing (the floor);
- ``actor``: a plain Ray actor method (``ray.get(actor.run.remote(req))``);
- ``actor+thread``: an async method that hands the work to a thread, as Serve replicas do;
- ``compiled``: a Ray Compiled Graph over the same actor (``experimental_compile``: shared-memory
  channels, no RPC per call);
- ``serve-grpc``: Cleave's ``RayTails`` with ``transport: grpc`` (Serve's handle and router, its gRPC
  data plane, the replica's Serve code);
- ``direct``: Cleave's ``RayTails`` with ``transport: direct`` (the lane: a socket of the replica's own).

    python -m benchmarks.ray_hops [--calls 200]     # about a minute; prints medians, writes nothing

Compiled graphs are measured, not used: they bind an actor's methods into a DAG that runs on the
actor until torn down, while Serve adds, replaces and drains replicas under it and exposes no user
method on its replica actors to bind (docs/ray.md).
"""

from __future__ import annotations

import argparse
import asyncio
import concurrent.futures
import statistics
import sys
import time

import torch

from compressor import CodecLimits, EncodingSpec, decode
from partitioner.loaded import LoadedModel
from partitioner.models import ModelSpec

from .batching import prepare

MODEL = {"name": "resnet18", "source": "resnet18", "input_shape": [1, 3, 64, 64]}
CUT = "layer2_1_relu_1"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.ray_hops", description=__doc__.split("\n\n")[0])
    p.add_argument("--calls", type=int, default=200, help="measured calls per way (after 20 warm-up rounds)")
    args = p.parse_args(argv)

    import ray
    from ray import serve
    from ray.dag import InputNode

    from cloud_node.config import RaySettings
    from cloud_node.ray_backend.messages import TailRequest
    from cloud_node.ray_backend.replica import TailReplica
    from cloud_node.ray_backend.serving import RayTails

    torch.set_num_threads(1)
    model = LoadedModel.load(ModelSpec.from_dict(MODEL))
    cut = model.parts(CUT)[0]
    features = prepare(model, CUT, EncodingSpec(encoding="affine", bits=8))
    limits = CodecLimits()
    requests = [
        TailRequest(
            cut.index,
            tuple(m.SerializeToString() for m in e),
            EncodingSpec(),
            limits.max_elements,
            limits.max_payload_bytes,
        )
        for e in features.encoded
    ]

    class Timed(TailReplica):
        """The replica's work, with when the method started and returned."""

        def run(self, request: TailRequest) -> tuple:
            entered = time.perf_counter()
            reply = self.run_many([(request, entered)])[0]
            return reply, entered, time.perf_counter()

        async def run_in_thread(self, request: TailRequest) -> tuple:
            entered = time.perf_counter()
            reply = (await asyncio.to_thread(self.run_many, [(request, entered)]))[0]
            return reply, entered, time.perf_counter()

    ray.init(num_cpus=2, object_store_memory=200 << 20, include_dashboard=False, log_to_driver=False)
    tails: dict[str, RayTails] = {}
    try:
        local = Timed(model.spec, model.fingerprint, 1)
        actor = ray.remote(num_cpus=1)(Timed).remote(model.spec, model.fingerprint, 1)
        ray.get(actor.run.remote(requests[0]))
        with InputNode() as inp:
            dag = actor.run.bind(inp)
        compiled = dag.experimental_compile()
        for transport in ("grpc", "direct"):
            settings = RaySettings(
                address="auto", num_cpus=0.5, torch_threads=1, transport=transport, app_name=f"hops-{transport}"
            )
            tails[transport] = RayTails(settings, {model.name: model})

        def via_tails(name: str):
            def call(request: TailRequest) -> tuple:
                reply = tails[name].call(model.name, request)
                return reply, None, None

            return call

        ways = {
            "in-process": local.run,
            "actor": lambda r: ray.get(actor.run.remote(r)),
            "actor+thread": lambda r: ray.get(actor.run_in_thread.remote(r)),
            "compiled": lambda r: ray.get(compiled.execute(r)),
            "serve-grpc": via_tails("grpc"),
            "direct": via_tails("direct"),
        }
        rows: dict[str, list[tuple[float, float, float]]] = {name: [] for name in ways}
        worker = concurrent.futures.ThreadPoolExecutor(1)
        names = list(ways)

        def one(name: str, k: int) -> tuple[float, float, float]:
            started = time.perf_counter()
            reply, entered, returned = ways[name](requests[k % len(requests)])
            done = time.perf_counter()
            if reply.error is not None:
                raise RuntimeError(f"{name}: {reply.error}")
            got = decode(_tensor(reply.outputs[0]))
            if not torch.equal(got, features.expected[k % len(requests)]):
                raise RuntimeError(f"{name}: reply {k} is not bit-exact")
            work = (reply.decode_ms + reply.compute_ms + reply.encode_ms) / 1e3
            out = entered - started if entered is not None else float("nan")
            back = done - returned if returned is not None else float("nan")
            return (done - started - work) * 1e3, out * 1e3, back * 1e3

        for k in range(args.calls + 20):
            for name in names[k % len(names) :] + names[: k % len(names)]:
                row = worker.submit(one, name, k).result()
                if k >= 20:
                    rows[name].append(row)
        compiled.teardown()
    finally:
        for t in tails.values():
            t.close()
        serve.shutdown()
        ray.shutdown()
    print(f"median ms over {args.calls} calls each (hop = call minus the replica's decode + tail + encode)")
    print(f"{'way':14s} {'hop':>6s} {'out':>6s} {'back':>6s}")
    for name, values in rows.items():
        hop, out, back = (statistics.median(col) for col in zip(*values, strict=True))
        print(f"{name:14s} {hop:6.2f} {out:6.2f} {back:6.2f}")
    return 0


def _tensor(data: bytes):
    from protos.cleave.v1 import tensor_pb2

    msg = tensor_pb2.Tensor()
    msg.ParseFromString(data)
    return msg


if __name__ == "__main__":
    sys.exit(main())
