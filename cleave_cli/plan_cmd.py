"""``cleave profile`` and ``cleave plan``: look at what the planner sees and what it would choose.

cleave profile --model resnet18                       # per-node table on this host
cleave plan --model resnet18 --cloud 127.0.0.1:50051  # cloud profile over the wire, link probed
cleave plan --model resnet18 --bandwidth 5 --rtt 20 --cloud-speedup 4 --png plan.png   # offline
cleave plan --model resnet50 --bandwidth 1,5,20,100 --json plans.json   # one plan per bandwidth
cleave plan --model lite0=efficientnet_lite0_pretrained --bandwidth 20 --calibration photos/   # real images
"""

from __future__ import annotations

import argparse
import json
import os
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING

from . import argtypes
from .progress import Progress
from .security_args import add_security_args, channel_security

# The planner (and so torch) is imported inside the functions that use it: ``cleave --help`` must not pay for it.
if TYPE_CHECKING:
    from partitioner.costmodel import Candidate, Link
    from partitioner.loaded import LoadedModel
    from partitioner.planner import Distortion, Planner, Scored
    from partitioner.profile import Profile
    from protos.cleave.v1 import split_inference_pb2_grpc as si_grpc

# The rank column holds a baseline's whole name: the longest of partitioner.planner.BASELINES.
BASELINE_WIDTH = len("neurosurgeon")


BANDWIDTHS = (0.5, 1, 2, 5, 10, 20, 50, 100, 200, 500, 1000)

#: glibc's malloc thresholds while ``cleave profile`` and ``cleave plan`` run (:func:`keep_pages`): blocks up to
#: 32 MB (glibc's largest mmap threshold) come from the heaps, and up to 1 GB of freed memory stays there.
PLAN_MMAP_THRESHOLD = 32 << 20
PLAN_TRIM_THRESHOLD = 1 << 30


def keep_pages() -> bool:
    """Keep the pages of the model's freed activations for its next run (glibc; :mod:`runtime.memory`).

    Planning runs the model dozens of times (the profile, the sizes, accuracy on 8 inputs at once). With
    glibc's default thresholds each run faulted its activations in afresh: resnet50 on 8 inputs, 50,000 to
    70,000 page faults a run, 10-20% of its CPU time on one thread; with these, none once warm. The
    results are the same (only where the allocator's memory comes from changes); a command that exits
    when done may keep that much. False when glibc is absent or the environment sets its own thresholds.
    """
    from runtime.memory import keep_freed_memory

    return keep_freed_memory(mmap_threshold=PLAN_MMAP_THRESHOLD, trim_threshold=PLAN_TRIM_THRESHOLD)


def add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="torchvision name, NAME=SOURCE, or a file")
    p.add_argument("--weights", help="local state-dict file")
    p.add_argument("--input-shape", default="1,3,224,224", help="input batch shape, comma-separated")
    p.add_argument(
        "--bottleneck", help="a bottleneck job's artifacts directory: rank its latent (cut bottleneck_latent) too"
    )


def load(args: argparse.Namespace) -> LoadedModel:
    from partitioner.loaded import LoadedModel
    from partitioner.models import ModelSpec
    from runtime.settings import parse_shape

    name, _, source = args.model.partition("=")
    spec = {"name": name, "source": source or name, "input_shape": parse_shape(args.input_shape)}
    if args.weights:
        spec["weights"] = args.weights
    if getattr(args, "bottleneck", None):
        spec["bottleneck"] = args.bottleneck
    return LoadedModel.load(ModelSpec.from_dict(spec))


def cloud_profile(
    model: LoadedModel, target: str, security: dict | None = None
) -> tuple[Profile, si_grpc.SplitInferenceStub]:
    """The cloud's profile of ``model``; ``security``: ``open_channel``'s ``tls`` / ``token`` arguments."""
    from partitioner.profile import from_proto
    from protos.cleave.v1 import split_inference_pb2 as si_pb2
    from protos.cleave.v1 import split_inference_pb2_grpc as si_grpc
    from runtime.serving import open_channel

    stub = si_grpc.SplitInferenceStub(open_channel(target, **(security or {})))
    reply = stub.Profile(si_pb2.ProfileRequest(model=model.name), timeout=300)
    if reply.fingerprint != model.fingerprint:
        raise ValueError(f"the cloud's {model.name!r} has another fingerprint: it is not the same model")
    return from_proto(reply), stub


def cmd_profile(args: argparse.Namespace) -> int:
    from partitioner.costmodel import CostModel
    from partitioner.profile import cached_profile

    keep_pages()
    model = load(args)
    if args.cloud:
        profile, _ = cloud_profile(model, args.cloud, channel_security(args))
    else:
        profile = cached_profile(model, refresh=args.refresh, role="edge")
    if args.json:
        Path(args.json).write_text(json.dumps(asdict(profile), indent=2))
    print(
        f"{model.name} on {profile.host}: {profile.total_ms:.2f} ms whole model, torch {profile.torch_version}, "
        f"{profile.threads} threads, batch {profile.batch}"
    )
    # With calibration images: what a cut at each node sends (int8 features; the input as 8-bit codes).
    sent = {}
    if args.calibration is not None:
        calib = calibration(args, model)
        measured = CostModel.measure(
            model, profile, profile, calib, feature_encodings=("int8",), input_encodings=("int8c",)
        )
        sent = {c.index: c.feature_bytes.get("int8c" if c.index == 0 else "int8", 0) for c in measured.cuts}
        print(f"bytes sent: median over {len(calib)} calibration images ({args.calibration})")
    print(f"{'node':>5}  {'name':<30} {'ms':>8} {'output bytes':>13}" + (f" {'bytes sent':>11}" if sent else ""))
    for i, (name, ms, size) in enumerate(zip(profile.node_names, profile.node_ms, profile.output_bytes, strict=True)):
        column = (f" {sent[i]:>11}" if i in sent else f" {'-':>11}") if sent else ""
        print(f"{i:>5}  {name:<30} {ms:8.3f} {size:>13}{column}")
    print(
        f"sum of nodes {sum(profile.node_ms):.2f} ms; measured heads (cut: ms): "
        + ", ".join(f"{k}: {v:.2f}" for k, v in sorted(profile.head_ms.items()))
    )
    return 0


def cmd_cuts(args: argparse.Namespace) -> int:
    """``cleave info --cuts --model SPEC``: every node of the traced model, a cut or why it is not."""
    if not args.model:
        raise ValueError("--cuts needs --model (a torchvision name, NAME=SOURCE, or a file)")
    model = load(args)
    graph = model.graph
    cuts = {c.index: c for c in graph.cuts}
    refused = {n.index: n for n in graph.not_cuts()}
    rows = []
    for index in sorted({*cuts, *refused}):
        if index in cuts:
            c = cuts[index]
            rows.append(
                {"index": index, "name": c.name, "cut": True, "live": list(c.live), "nbytes": c.nbytes}
                | ({"recomputed": list(c.recomputed)} if c.recomputed else {})
            )
        else:
            n = refused[index]
            rows.append({"index": index, "name": n.name, "cut": False, "reason": n.reason})
    if args.json:
        print(json.dumps({"model": model.name, "cuts": len(cuts), "nodes": len(rows), "rows": rows}, indent=2))
        return 0
    print(f"{model.name}: {len(cuts)} cuts of {len(rows)} nodes")
    width = max([36, *(len(r["name"]) for r in rows)])  # Lite0's padding nodes run to 40 characters
    for r in rows:
        if r["cut"]:
            extra = f"  (recomputes {', '.join(r['recomputed'])})" if "recomputed" in r else ""
            print(f"  {r['index']:>5}  {r['name']:<{width}} cut  {len(r['live']):>2} live {r['nbytes']:>10} B{extra}")
        else:
            print(f"  {r['index']:>5}  {r['name']:<{width}} no   {r['reason']}")
    return 0


def build_planner(
    args: argparse.Namespace, model: LoadedModel, progress: Progress | None = None
) -> tuple[Planner, list[Link], str]:
    """The planner for ``args`` and the links to plan for (one per ``--bandwidth``, or the probed one).

    Byte sizes are measured on all cores and cached on disk (the model's fingerprint and the
    calibration inputs are the key), as profiles are; ``progress`` shows the phases.
    """
    from partitioner.costmodel import CostModel, Link
    from partitioner.planner import Budgets, Planner, cached_distortion, distortion_meter
    from partitioner.profile import cached_profile, scaled

    progress = progress or Progress(enabled=False)
    # The arguments and the calibration images first: a mistake in them fails at once, not after the profile.
    if not args.cloud and not args.bandwidth:
        raise ValueError("give --cloud HOST:PORT, or --bandwidth (Mbit/s) and --rtt (ms) to plan offline")
    calib = calibration(args, model)
    progress.start("profile")
    edge = cached_profile(model, role="edge")
    if args.cloud:
        cloud, stub = cloud_profile(model, args.cloud, channel_security(args))
        if args.bandwidth:
            links = [Link(bw, args.down or bw, args.rtt) for bw in args.bandwidth]
        else:
            from edge_node.probe import probe_link  # the edge's own prober

            progress.start("link probe")
            r = probe_link(stub)
            links = [Link(r.up_mbps, r.down_mbps, r.rtt_ms)]
        source = f"cloud {args.cloud} ({cloud.host})"
    else:
        cloud = scaled(edge, 1 / args.cloud_speedup, host="cloud (estimated)")
        links = [Link(bw, args.down or bw, args.rtt) for bw in args.bandwidth]
        source = f"offline, cloud assumed {args.cloud_speedup:g}x faster than this host"
    progress.start("encodings")
    meter = distortion_meter(model, calib, record=True)
    # The model's values on the calibration inputs, for each build below: the accuracy checks' recording of
    # the whole batch, so that sizes and accuracy share one run of the model (``DistortionMeter.values``).
    memo: dict = {"recorded": getattr(meter, "values", None)}
    sized = calib[:3]  # sizes are the median over 3 inputs

    def measure_sizes(cuts: dict[int, frozenset[str]] | None) -> CostModel:
        return CostModel.measure(
            model, edge, cloud, sized, workers=_cores(), cache=True, progress=progress.update, cuts=cuts, memo=memo
        )

    # The plot ranks every cut at every bandwidth; a plan, the candidates its walks reach (measure_on_demand).
    cost = measure_sizes(None if args.png else {})
    progress.start("accuracy")
    measure = cached_distortion(meter, model, calib)
    checked = 0  # candidates whose accuracy was looked at: screened on one input, or measured on all

    def counted(candidate: Candidate) -> Distortion:
        nonlocal checked
        checked += 1
        progress.update(checked)
        return measure(candidate)

    def screened(candidate: Candidate) -> Distortion | None:
        nonlocal checked
        checked += 1
        progress.update(checked)
        return measure.screen(candidate)

    def screened_many(candidates: list[Candidate]) -> list[Distortion | None]:
        nonlocal checked
        checked += len(candidates)
        progress.update(checked)
        return measure.screen_many(candidates)

    budgets = Budgets(
        memory_bytes=int(args.memory_mb * 1e6) if args.memory_mb else None,
        max_rel_error=args.max_rel_error,
        min_top1=args.min_top1,
    )
    planner = Planner(
        cost,
        budgets,
        counted,
        args.objective,
        input_is_8bit=not args.float_input,
        screen=screened,
        screen_many=screened_many,
    )
    if not args.png:

        def more_sizes(asked: dict[int, frozenset[str]]) -> CostModel:
            progress.start("encodings")  # sizes of more candidates, then accuracy again
            cost = measure_sizes(asked)
            progress.start("accuracy")
            progress.update(checked)
            return cost

        planner.measure_on_demand(more_sizes)
    return planner, links, source


def _cores() -> int:
    """The cores this process may run on (at most 8: encoding more cuts at once gains nothing)."""
    try:
        return max(1, min(8, len(os.sched_getaffinity(0))))
    except AttributeError:  # not on Linux
        return max(1, min(8, os.cpu_count() or 1))


def bandwidths(text: str) -> tuple[float, ...]:
    """``--bandwidth``'s value: one or more Mbit/s, comma-separated (``5`` or ``1,5,20,100``)."""
    try:
        values = tuple(float(part) for part in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of Mbit/s") from None
    if any(not v > 0 or v == float("inf") for v in values):
        raise argparse.ArgumentTypeError(f"{text!r}: every bandwidth must be a finite number > 0 Mbit/s")
    return values


def calibration(args: argparse.Namespace, model: LoadedModel):
    """The calibration batch ``--calibration`` and ``--calibration-inputs`` ask for.

    ``--calibration N`` (a number) is the older form of ``--calibration synthetic --calibration-inputs N``.
    """
    from partitioner.photos import calibration_inputs

    source, n = args.calibration, args.calibration_inputs
    if source is not None and source.isdigit():
        source, n = "synthetic", int(source)
    return calibration_inputs(model.spec, source, n)


def add_calibration_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--calibration",
        metavar="DIR|photos|synthetic",
        help="calibration images for bytes and accuracy: a directory of image files, 'photos' (real photos "
        "from scikit-image and scikit-learn) or 'synthetic' (default: photos for a pretrained model)",
    )
    p.add_argument(
        "--calibration-inputs", type=argtypes.positive_int, default=8, metavar="N", help="how many (default 8)"
    )


def row(rank: str, s: Scored) -> str:
    p = s.predicted
    d = s.distortion
    acc = f"{d.top1 * 100:.1f}%/{d.rel_error:.1e}" if d else "-"
    return (
        f"{rank:<{BASELINE_WIDTH}} {s.candidate.label:<36} {s.cost_ms:9.2f} {p.edge_ms:8.2f} {p.encode_ms:6.2f} "
        f"{p.upload_ms + p.rtt_ms + p.download_ms:9.2f} {p.decode_ms:6.2f} {p.cloud_ms:8.2f} "
        f"{s.candidate.bytes_up:>10} {acc:>14}  {s.rejected}"
    )


def cmd_plan(args: argparse.Namespace) -> int:
    keep_pages()
    model = load(args)
    progress = Progress(enabled=not args.quiet)
    try:
        planner, links, source = build_planner(args, model, progress)
        plans = [_plan(planner, link, args.top) for link in links]  # distortions measured here
    finally:
        progress.close()
    if len(plans) == 1:  # one line to say what was planned, then the table
        print(f"{model.name}: {source}; {_link_text(plans[0]['link'])}; objective {planner.objective}")
        _print_plan(planner, plans[0])
    else:
        print(f"{model.name}: {source}; objective {planner.objective}")
        for plan in plans:
            print(f"{_link_text(plan['link'])}: {plan['best'].candidate.label}")
            _print_plan(planner, plan)
    if args.json:
        records = [_plan_record(planner, plan) for plan in plans]
        # One link: the plan itself (as before); several: one entry per bandwidth, in the order given.
        report = records[0] if len(records) == 1 else {"plans": records}
        Path(args.json).write_text(json.dumps({"model": model.name, "objective": planner.objective} | report, indent=2))
    if args.png:
        plan = plans[0]
        plot(planner, plan["link"], plan["best"], model.name, Path(args.png))
        print(f"wrote {args.png}")
    return 0


def _plan(planner: Planner, link: Link, top: int) -> dict:
    """The best plan on ``link``, the ranking shown, a few rejected candidates and the baselines."""
    from partitioner.planner import BASELINES

    ranked = planner.rank(link, limit=top)
    best = planner.best(link)
    # Every candidate shown carries its top-1 agreement (lossless ones too: 100%).
    shown = [planner.with_distortion(s) for s in [s for s in ranked if not s.rejected][:top]]
    baselines: dict[str, Scored | str] = {}
    for name in BASELINES:
        try:
            baselines[name] = planner.with_distortion(planner.baseline(name, link))
        except ValueError as exc:
            baselines[name] = str(exc)
    # Rejected rows show their measured accuracy, not the bound of the screen that rejected them.
    rejected = [planner.measured(s) for s in [s for s in ranked if s.rejected][:3]]
    return {"link": link, "best": best, "shown": shown, "rejected": rejected, "baselines": baselines}


def _print_plan(planner: Planner, plan: dict) -> None:
    from partitioner.planner import Scored

    best = plan["best"]
    print(
        f"{'':<{BASELINE_WIDTH}} {'placement':<36} {'cost ms':>9} {'edge':>8} {'enc':>6} {'link':>9} {'dec':>6} "
        f"{'cloud':>8} {'bytes up':>10} {'top-1/rel.err':>14}"
    )
    for i, s in enumerate(plan["shown"], 1):
        print(row(f"{i}." if s.candidate != best.candidate else "*", s))
    for s in plan["rejected"]:
        print(row("x", s))
    print("baselines:")
    for name, s in plan["baselines"].items():
        print(row(name, s) if isinstance(s, Scored) else f"{name:<{BASELINE_WIDTH}} {s}")


def _link_text(link: Link) -> str:
    return f"link up {link.up_mbps:.2f} Mbit/s, down {link.down_mbps:.2f} Mbit/s, RTT {link.rtt_ms:.2f} ms"


def _plan_record(planner: Planner, plan: dict) -> dict:
    from partitioner.planner import Scored

    return {
        "link": asdict(plan["link"]),
        "best": _record(plan["best"]),
        "ranked": [_record(s) for s in plan["shown"]],
        "baselines": {n: _record(s) for n, s in plan["baselines"].items() if isinstance(s, Scored)},
    }


def _record(s: Scored) -> dict:
    return {
        "placement": s.candidate.label,
        "cost_ms": s.cost_ms,
        "predicted": asdict(s.predicted),
        "bytes_up": s.candidate.bytes_up,
        "rejected": s.rejected,
        "distortion": asdict(s.distortion) if s.distortion else None,
    }


def plot(planner: Planner, link: Link, best: Scored, name: str, path: Path) -> None:
    import matplotlib

    from partitioner.costmodel import CLOUD_ONLY, EDGE_ONLY, Link
    from partitioner.planner import BASELINES

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(13, 4.5))
    per_cut: dict[int, float] = {}
    for c in planner.candidates:
        if c.kind not in (EDGE_ONLY, CLOUD_ONLY):
            per_cut[c.cut_index] = min(per_cut.get(c.cut_index, float("inf")), planner.score(c, link).cost_ms)
    xs = sorted(per_cut)
    left.plot(xs, [per_cut[x] for x in xs], ".-", label="split at cut (best encoding)")
    left.axhline(planner.baseline("edge-only", link).cost_ms, color="C2", ls="--", label="edge-only")
    left.axhline(planner.baseline("cloud-raw", link).cost_ms, color="C3", ls="--", label="cloud-only (8-bit input)")
    left.axhline(best.cost_ms, color="k", lw=0.8, label=f"chosen: {best.candidate.label}")
    left.set_xlabel("cut (node index)")
    left.set_ylabel(f"predicted {planner.objective} cost, ms")
    left.set_title(f"{name} at {link.up_mbps:.1f} Mbit/s, RTT {link.rtt_ms:.1f} ms")
    left.legend(fontsize=7)
    series = {"Cleave (re-planned)": [], "chosen plan, fixed": [], **{b: [] for b in BASELINES}}
    for bw in BANDWIDTHS:
        at = Link(bw, bw, link.rtt_ms)
        series["Cleave (re-planned)"].append(planner.best(at).cost_ms)
        series["chosen plan, fixed"].append(planner.score(best.candidate, at).cost_ms)
        for b in BASELINES:
            series[b].append(planner.baseline(b, at).cost_ms)
    for label, ys in series.items():
        right.plot(
            BANDWIDTHS,
            ys,
            "o-" if label.startswith("Cleave") else ".--",
            label=label,
            lw=2 if label.startswith("Cleave") else 1,
        )
    right.set_xscale("log")
    right.set_yscale("log")
    right.set_xlabel("bandwidth, Mbit/s (both directions)")
    right.set_ylabel("predicted latency, ms")
    right.set_title("across bandwidths")
    right.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def add_commands(sub: argparse._SubParsersAction) -> None:
    profile = sub.add_parser("profile", help="per-node latency of a model on this host (or on a cloud daemon)")
    add_model_args(profile)
    profile.add_argument("--cloud", help="show the cloud daemon's profile of the model instead")
    profile.add_argument("--refresh", action="store_true", help="measure again instead of using the cache")
    profile.add_argument("--json", help="also write the profile as JSON here")
    add_calibration_args(profile)
    add_security_args(profile)
    profile.set_defaults(func=cmd_profile)

    plan = sub.add_parser("plan", help="rank placements of a model for a link; the best first")
    add_model_args(plan)
    plan.add_argument("--cloud", help="cloud daemon host:port: its profile and a probe of the link")
    plan.add_argument(
        "--bandwidth",
        type=bandwidths,
        metavar="MBIT[,MBIT...]",
        help="uplink Mbit/s (offline, or to override the probe); several, comma-separated, give one plan "
        "each from the same measurements (--json then holds {'plans': [one per bandwidth]})",
    )
    plan.add_argument("--down", type=argtypes.positive, help="downlink Mbit/s (default: = each --bandwidth)")
    plan.add_argument("--rtt", type=argtypes.non_negative, default=10.0, help="round trip ms (default 10)")
    plan.add_argument(
        "--cloud-speedup", type=argtypes.positive, default=4.0, help="offline: how much faster the cloud is"
    )
    plan.add_argument(
        "--objective", choices=["latency", "throughput"], default="latency", help="what the ranking minimises"
    )
    plan.add_argument("--memory-mb", type=argtypes.positive, help="edge memory budget (head weights + activations)")
    plan.add_argument(
        "--max-rel-error",
        type=argtypes.non_negative,
        default=0.05,
        help="secondary guard: max |y - y_float| / max |y_float|",
    )
    plan.add_argument(
        "--min-top1",
        type=argtypes.fraction,
        default=0.99,
        help="accuracy budget: top-1 agreement with the float model on the calibration images (default 0.99)",
    )
    add_calibration_args(plan)
    plan.add_argument(
        "--float-input", action="store_true", help="inputs are not 8-bit images: charge 8-bit input codes to accuracy"
    )
    plan.add_argument(
        "--top",
        type=argtypes.positive_int,
        default=5,
        help="placements to list, each checked on every calibration input (more take longer: see docs/plan.md)",
    )
    plan.add_argument("--json", help="write the ranking as JSON here")
    plan.add_argument("--png", help="write the plot here (for the first bandwidth)")
    plan.add_argument("--quiet", action="store_true", help="no progress line on stderr")
    add_security_args(plan)
    plan.set_defaults(func=cmd_plan)
