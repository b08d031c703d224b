"""``make demo``: both daemons on loopback, split inference at several cuts and encodings, one table.

Steps: build resnet18 (seeded random weights, BatchNorm statistics calibrated on synthetic images so
activations look like a trained network's) and save its weights; start ``cleave-cloud`` and
``cleave-edge`` on free loopback ports, both loading that file; pin each (cut, encoding) through
``Edge.Replan`` and send the same inputs; compare every answer with the whole model run here; then
stop the cloud and show the edge answering locally. Exits non-zero if anything failed.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
import yaml

from partitioner.loaded import LoadedModel
from partitioner.models import ModelSpec, calibrate_batchnorm, load_model
from protos.cleave.v1 import edge_pb2

from .client import EdgeClient, outputs_of
from .images import synthetic_images
from .launch import cloud_process, edge_process, free_port

ENCODINGS = ["fp32", "fp16", "int8", "int4"]


@dataclass
class Row:
    config: str
    placement: str
    stages: dict[str, float]
    bytes_up: int
    agreement: str
    ok: bool


def prepare(workdir: Path, model: str, size: int) -> ModelSpec:
    """Seeded weights with calibrated BatchNorm, saved where both daemons load them."""
    shape = [1, 3, size, size]
    spec = ModelSpec(name=model, source=model, input_shape=tuple(shape))
    module = calibrate_batchnorm(load_model(spec), tuple(shape))
    weights = workdir / f"{model}.pt"
    torch.save(module.state_dict(), weights)
    spec = ModelSpec(name=model, source=model, weights=str(weights), input_shape=tuple(shape))
    entry = {"name": model, "source": model, "weights": str(weights), "input_shape": shape}
    (workdir / "cloud.yaml").write_text(yaml.safe_dump({"models": [entry]}))
    # A fixed starting cut: the demo pins every configuration itself, so no planner runs meanwhile.
    edge = {"model": entry, "request_timeout_s": 30.0, "plan": {"cut": "cloud", "encoding": "fp32"}}
    (workdir / "edge.yaml").write_text(yaml.safe_dump(edge))
    return spec


def demo_cuts(model: LoadedModel) -> list[tuple[str, str]]:
    """(label, cut key): the input, and the end of each early stage where one tensor crosses."""
    cuts = [("cloud-only", "cloud")]
    for stage in ("layer1", "layer2", "layer3"):
        ends = [c for c in model.graph.cuts if c.target.startswith(stage) and len(c.live) == 1]
        if ends:
            cuts.append((f"after {stage}", ends[-1].name))
    return cuts


def agreement(out: torch.Tensor, ref: torch.Tensor, exact: bool) -> tuple[str, bool]:
    if exact:
        same = torch.equal(out, ref)
        return ("exact" if same else f"NOT EXACT (max diff {float((out - ref).abs().max()):.2e})"), same
    top1 = float((out.argmax(-1) == ref.argmax(-1)).float().mean())
    rel = float((out - ref).abs().max() / ref.abs().max().clamp_min(1e-12))
    return f"top-1 {top1 * 100:3.0f}%, max rel err {rel:.1e}", True


def run_config(client: EdgeClient, label: str, inputs: torch.Tensor, refs: torch.Tensor, exact: bool) -> Row:
    stages = {k: 0.0 for k in ("edge", "encode", "transfer", "cloud", "decode", "total")}
    outs, placement, up = [], "", 0
    for x in inputs:
        reply = client.infer(x.unsqueeze(0))
        t = reply.timing
        stages["edge"] += t.edge_compute_ms
        stages["encode"] += t.encode_ms
        stages["transfer"] += t.transfer_ms
        stages["cloud"] += t.cloud_compute_ms
        stages["decode"] += t.cloud_decode_ms + t.decode_ms
        stages["total"] += t.total_ms
        up += reply.bytes_up
        placement = edge_pb2.Placement.Name(reply.placement)
        outs.append(outputs_of(reply)[0])
    n = len(inputs)
    text, ok = agreement(torch.cat(outs), refs, exact)
    return Row(label, placement, {k: v / n for k, v in stages.items()}, up // n, text, ok)


def print_table(rows: list[Row]) -> None:
    head = (
        f"{'configuration':<26} {'ran as':<15} {'edge':>7} {'encode':>7} {'xfer':>7} {'cloud':>7} "
        f"{'decode':>7} {'total':>7} {'bytes up':>9}  agreement with local model"
    )
    print(head)
    print("-" * len(head))
    for r in rows:
        s = r.stages
        print(
            f"{r.config:<26} {r.placement:<15} {s['edge']:7.2f} {s['encode']:7.2f} {s['transfer']:7.2f} "
            f"{s['cloud']:7.2f} {s['decode']:7.2f} {s['total']:7.2f} {r.bytes_up:>9}  {r.agreement}"
        )
    print("(times in ms, mean per request; decode = cloud decode of features + edge decode of results)")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Cleave end-to-end demo on loopback")
    parser.add_argument("--model", default="resnet18")
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--requests", type=int, default=4, help="inputs per configuration")
    parser.add_argument("--workdir", help="where weights, configs and logs go (default: a temp dir)")
    args = parser.parse_args(argv)
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="cleave-demo-"))
    workdir.mkdir(parents=True, exist_ok=True)

    print(f"[demo] preparing {args.model} ({args.size}x{args.size}) in {workdir}")
    spec = prepare(workdir, args.model, args.size)
    local = LoadedModel.load(spec)
    inputs = synthetic_images(args.requests, spec.input_shape, seed=1)
    # One input at a time, as the daemons run them: kernels differ with batch size in the last bit.
    with torch.inference_mode():
        refs = torch.cat([local.module(x.unsqueeze(0)) for x in inputs])

    cloud_port, edge_port = free_port(), free_port()
    cloud = cloud_process(workdir / "cloud.yaml", cloud_port, workdir / "cloud.log")
    edge = edge_process(workdir / "edge.yaml", edge_port, cloud_port, workdir / "edge.log")
    rows: list[Row] = []
    failures: list[str] = []
    try:
        print(f"[demo] starting cleave-cloud on {cloud.address} and cleave-edge on {edge.address}")
        cloud.start()
        edge.start()
        client = EdgeClient(edge.address)
        status = client.status()
        if status.fingerprint != local.fingerprint:
            failures.append("edge fingerprint differs from the local model's")
        for label, cut in demo_cuts(local):
            for encoding in ENCODINGS:
                client.pin(cut, encoding)
                rows.append(run_config(client, f"{label}, {encoding}", inputs, refs, encoding == "fp32"))
        client.pin("edge", "fp32")
        rows.append(run_config(client, "edge-only", inputs, refs, exact=True))

        client.pin(demo_cuts(local)[1][1], "int8")
        print("[demo] stopping the cloud: the edge must answer locally")
        cloud.stop()
        rows.append(run_config(client, "after layer1, cloud down", inputs, refs, exact=True))
        status = client.status()
        print_table(rows)
        print(
            f"\n[demo] edge status: {status.counters.requests} requests, {status.counters.split} split, "
            f"{status.counters.cloud_only} cloud-only, {status.counters.edge_only} edge-only, "
            f"{status.counters.fallback} local fallback; cloud reachable: {status.cloud_reachable}"
        )
        for row in rows:
            if not row.ok:
                failures.append(f"{row.config}: {row.agreement}")
        if rows[-1].placement != "LOCAL_FALLBACK":
            failures.append(f"with the cloud down the edge answered as {rows[-1].placement}")
        client.close()
    except Exception as exc:  # noqa: BLE001 - the demo reports any failure and exits non-zero
        failures.append(f"{type(exc).__name__}: {exc}")
    finally:
        for proc in (edge, cloud):
            proc.stop()
    if failures:
        print("\n[demo] FAILED:\n  " + "\n  ".join(failures), file=sys.stderr)
        print(f"[demo] logs: {workdir}/cloud.log, {workdir}/edge.log", file=sys.stderr)
        return 1
    print("[demo] OK: fp32 splits are bit-exact; both daemons stopped cleanly")
    return 0


if __name__ == "__main__":
    sys.exit(main())
