"""``cleave``: talk to the daemons from the command line.

cleave wait --cloud 127.0.0.1:50051                 # until the daemon reports SERVING
cleave infer --edge 127.0.0.1:50052 --random 4      # or image files
cleave status --edge 127.0.0.1:50052
cleave info --cloud 127.0.0.1:50051                 # models and every cut

Start-up is part of the interface: this module and the parsers import nothing heavy (no torch, no
gRPC), and each command imports what it needs when it runs, so ``--help`` answers at once and the
client commands pay only for what they use.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import sys

from . import argtypes
from .errors import explain
from .security_args import add_security_args, channel_security

STAGES = [
    ("edge_compute_ms", "edge"),
    ("encode_ms", "enc"),
    ("transfer_ms", "xfer"),
    ("cloud_decode_ms", "c.dec"),
    ("cloud_compute_ms", "cloud"),
    ("cloud_encode_ms", "c.enc"),
    ("decode_ms", "dec"),
    ("total_ms", "total"),
]


class HelpFormatter(argparse.HelpFormatter):
    """Shows each option's default after its description, unless the description already names it."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        default = action.default
        if (
            "default" in text
            or default is None
            or default is False
            or default is argparse.SUPPRESS
            or default == []
            or not action.option_strings
        ):
            return text
        return f"{text} (default: %(default)s)"


class Parser(argparse.ArgumentParser):
    """Every ``cleave`` parser: the defaults in ``--help``."""

    def __init__(self, *args, **kwargs) -> None:
        kwargs.setdefault("formatter_class", HelpFormatter)
        super().__init__(*args, **kwargs)


def cmd_infer(args: argparse.Namespace) -> int:
    # Image files need no torch (numpy preprocessing and codec): the command answers in well under 2 s.
    import numpy as np

    from compressor import decode_array
    from partitioner.imagefiles import load_array
    from protos.cleave.v1 import edge_pb2

    from .client import EdgeClient
    from .labels import load_labels, name_of
    from .output import infer_table

    labels = load_labels(args.labels) if args.labels else None  # a wrong --labels fails before any work
    client = EdgeClient(args.edge, **channel_security(args))
    status = client.status(timeout=args.timeout)
    shape = tuple(status.input_shape)
    # --random's inputs are made as they are sent: one at a time in memory, whatever N.
    if args.random:
        try:
            from .images import iter_synthetic_images  # torch
        except ImportError:  # a torch-free edge's environment: uniform noise in [0, 1) instead of image-like inputs
            rng = np.random.default_rng(args.seed)
            inputs = ((f"random[{i}]", rng.random((1, *shape[1:]), dtype=np.float32)) for i in range(args.random))
        else:
            images = iter_synthetic_images(args.random, shape, args.seed)
            inputs = ((f"random[{i}]", x.numpy()) for i, x in enumerate(images))
    elif args.images:
        inputs = [(path, load_array(path, shape)) for path in args.images]
    else:
        print("cleave infer: give image files or --random N", file=sys.stderr)
        return 2
    records = []
    for name, x in inputs:
        reply = client.infer(x, timeout=args.timeout)
        logits = decode_array(reply.outputs[0]).reshape(-1)
        if (
            labels is not None and len(labels) != logits.size
        ):  # off by one (a "background" first) names every class wrong
            raise ValueError(
                f"--labels: {args.labels} names {len(labels)} classes; the model has {logits.size} outputs "
                "(line i must name class i)"
            )
        order = np.argsort(-logits, kind="stable")[: min(args.top, logits.size)]
        top = [(float(logits[i]), int(i)) for i in order]
        records.append(
            {
                "input": name,
                "placement": edge_pb2.Placement.Name(reply.placement),
                "cut": reply.plan.cut_name,
                "top": [
                    {"class": int(i), "score": float(v), **({"label": name_of(labels, int(i))} if labels else {})}
                    for v, i in top
                ],
                "timing_ms": {key: round(getattr(reply.timing, key), 3) for key, _ in STAGES},
                "bytes_up": reply.bytes_up,
                "bytes_down": reply.bytes_down,
                "note": reply.note,
            }
        )
    if args.json:
        print(json.dumps(records, indent=2))
        return 0
    print(infer_table(records, STAGES))
    return 0


def cmd_info(args: argparse.Namespace) -> int:
    if args.cuts:
        from .plan_cmd import cmd_cuts

        return cmd_cuts(args)

    from protos.cleave.v1 import split_inference_pb2 as si_pb2
    from protos.cleave.v1 import split_inference_pb2_grpc as si_grpc
    from runtime.serving import open_channel

    from .output import message_dict

    with open_channel(args.cloud, **channel_security(args)) as channel:
        stub = si_grpc.SplitInferenceStub(channel)
        info = stub.GetInfo(si_pb2.GetInfoRequest(model=args.model or "", include_cuts=True), timeout=args.timeout)
    if args.json:
        print(json.dumps(message_dict(info), indent=2))
        return 0
    for model in info.models:
        shape = "x".join(map(str, model.input_shape))
        print(f"{model.name}  input {shape}  fingerprint {model.fingerprint[:16]}  {len(model.cuts)} cuts")
        print(f"  {'index':>5}  {'cut':<28} {'live':>4} {'fp32 bytes':>11}")
        for cut in model.cuts:
            print(f"  {cut.index:>5}  {cut.name:<28} {len(cut.live):>4} {cut.nbytes:>11}")
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    from protos.cleave.v1 import edge_pb2, edge_pb2_grpc
    from runtime.serving import open_channel

    from .output import message_dict, pools_table, status_table

    if args.cloud:
        from protos.cleave.v1 import split_inference_pb2 as si_pb2
        from protos.cleave.v1 import split_inference_pb2_grpc as si_grpc

        with open_channel(args.cloud, **channel_security(args)) as channel:
            info = si_grpc.SplitInferenceStub(channel).GetInfo(
                si_pb2.GetInfoRequest(include_pools=True), timeout=args.timeout
            )
        print(json.dumps(message_dict(info), indent=2) if args.json else pools_table(info, args.cloud))
        return 0
    with open_channel(args.edge, **channel_security(args)) as channel:
        status = edge_pb2_grpc.EdgeStub(channel).GetStatus(edge_pb2.GetStatusRequest(), timeout=args.timeout)
    print(json.dumps(message_dict(status), indent=2) if args.json else status_table(status, args.edge))
    return 0


def cmd_wait(args: argparse.Namespace) -> int:
    from .wait import NotServing, wait_serving

    # The daemon's own service, so `--edge` pointed at a cloud (or the reverse) fails at once instead of passing.
    target, service = (args.cloud, "cleave.v1.SplitInference") if args.cloud else (args.edge, "cleave.v1.Edge")
    try:
        seconds = wait_serving(target, args.timeout, service=service, **channel_security(args))
    except NotServing as exc:
        print(f"cleave wait: {exc}", file=sys.stderr)
        return 1
    if not args.quiet:
        print(f"{target} SERVING after {seconds:.1f} s", file=sys.stderr)
    return 0


# Commands that live in their own modules: each module has ``add_commands(subparsers)`` and keeps its
# heavy imports inside the functions that run a command.
COMMAND_MODULES: tuple[str, ...] = ("cleave_cli.plan_cmd", "cleave_cli.compress_cmd", "cleave_cli.bundle_cmd")


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="cleave", description="Cleave command-line client")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=Parser, metavar="COMMAND")
    for name in COMMAND_MODULES:
        importlib.import_module(name).add_commands(sub)

    infer = sub.add_parser("infer", help="send inputs to an edge daemon; print results and stage timing")
    infer.add_argument("images", nargs="*", help="image files (decoded, resized to the model's input)")
    infer.add_argument("--edge", default="127.0.0.1:50052", help="edge daemon host:port")
    infer.add_argument("--random", type=argtypes.count, default=0, metavar="N", help="send N synthetic inputs instead")
    infer.add_argument("--seed", type=int, default=0, help="seed of the synthetic inputs")
    infer.add_argument(
        "--top",
        type=argtypes.positive_int,
        default=5,
        help="classes to report per input in --json (the table shows the top-1)",
    )
    infer.add_argument("--json", action="store_true", help="machine-readable output")
    infer.add_argument(
        "--labels", metavar="imagenet|FILE", help="class names: ImageNet's, or one per line in FILE (default: none)"
    )
    infer.add_argument("--timeout", type=argtypes.positive, default=60.0, help="per-request deadline, seconds")
    add_security_args(infer)
    infer.set_defaults(func=cmd_infer)

    info = sub.add_parser("info", help="models a cloud daemon serves, with every cut and its size")
    info.add_argument("--cloud", default="127.0.0.1:50051", help="cloud daemon host:port")
    info.add_argument("--model", help="only this model (with --cuts: the model to load here, as in cleave plan)")
    info.add_argument("--cuts", action="store_true", help="load --model here and list every node: a cut, or why not")
    info.add_argument("--weights", help="with --cuts: local state-dict file (default: none)")
    info.add_argument("--input-shape", default="1,3,224,224", help="with --cuts: input shape")
    info.add_argument("--json", action="store_true", help="machine-readable output")
    info.add_argument("--timeout", type=argtypes.positive, default=10.0, help="deadline, seconds")
    add_security_args(info)
    info.set_defaults(func=cmd_info)

    status = sub.add_parser(
        "status", help="an edge daemon's link, plan, reachability and counters; --cloud: a cloud's tail replicas"
    )
    status.add_argument("--edge", default="127.0.0.1:50052", help="edge daemon host:port")
    status.add_argument(
        "--cloud",
        metavar="HOST:PORT",
        help="a cloud daemon instead: replicas per model, queue depth, scaling decisions",
    )
    status.add_argument("--json", action="store_true", help="machine-readable output (numbers as numbers)")
    status.add_argument("--timeout", type=argtypes.positive, default=10.0, help="deadline, seconds")
    add_security_args(status)
    status.set_defaults(func=cmd_status)

    wait = sub.add_parser(
        "wait",
        help="wait until a daemon reports SERVING (models loaded); exit 1 on timeout",
        description="Wait until a daemon's gRPC health reports SERVING: a daemon listens at once and loads "
        "its models after, so a script starts it with & and runs `cleave wait` before calling it.",
    )
    which = wait.add_mutually_exclusive_group(required=True)
    which.add_argument("--cloud", metavar="HOST:PORT", help="a cloud daemon")
    which.add_argument("--edge", metavar="HOST:PORT", help="an edge daemon")
    wait.add_argument("--timeout", type=argtypes.positive, default=120.0, help="give up after this many seconds")
    wait.add_argument("--quiet", action="store_true", help="print nothing on success")
    add_security_args(wait)
    wait.set_defaults(func=cmd_wait)
    return parser


def _silence_stdout() -> None:
    """After a closed pipe: point stdout at /dev/null so the interpreter's final flush stays quiet."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError):
        pass


def main(argv: list[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)  # --help prints here
        return _run(args)
    except BrokenPipeError:
        # `cleave info | head`: the reader has what it wanted. Exit as a tool killed by SIGPIPE would.
        _silence_stdout()
        return 141


def _run(args: argparse.Namespace) -> int:
    try:
        code = args.func(args)
        sys.stdout.flush()  # a closed pipe shows here, not in the interpreter's exit
        return code
    except BrokenPipeError:
        raise
    except KeyboardInterrupt:
        print(f"\ncleave {args.command}: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # noqa: BLE001 - every known failure becomes one line, not a traceback
        message = explain(exc, args)
        if message is None:
            raise
        print(f"cleave {args.command}: {message}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
