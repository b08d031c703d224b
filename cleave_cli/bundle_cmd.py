"""``cleave bundle``: build an edge bundle for a torch-free edge, or verify one.

cleave bundle --model resnet18 --input-shape 1,3,224,224 --out bundles/resnet18
cleave bundle --verify bundles/resnet18          # needs no torch: every file's size and sha256
"""

from __future__ import annotations

import argparse
import json
import sys


def cmd_bundle(args: argparse.Namespace) -> int:
    if args.verify:
        from partitioner.bundle import BundleError, EdgeBundle

        try:
            bundle = EdgeBundle.open(args.verify, expect_fingerprint=args.fingerprint)
        except BundleError as exc:
            print(f"cleave bundle: {exc}", file=sys.stderr)
            return 1
        m = bundle.manifest
        print(
            f"{bundle.root}: {m.name} {m.fingerprint[:12]}, {len(m.cuts)} cuts, "
            f"{len(m.files)} files, {bundle.size_bytes / 1e6:.1f} MB: every sha256 matches"
        )
        return 0
    if not args.model or not args.out:
        print("cleave bundle: --model and --out are required (or --verify DIR)", file=sys.stderr)
        return 2
    from partitioner.bundler import build_bundle, describe

    from .plan_cmd import load

    model = load(args)
    cuts = [int(c) if c.lstrip("-").isdigit() else c for c in args.cuts.split(",")] if args.cuts else None
    bundle = build_bundle(
        model,
        args.out,
        cuts,
        max_cuts=args.max_cuts,
        calibration=args.calibration,
        calibration_inputs_n=args.calibration_inputs,
        progress=lambda msg: print(f"bundle: {msg}", file=sys.stderr),
    )
    summary = describe(bundle)
    if args.json:
        print(json.dumps(summary, indent=2))
    else:
        cuts_text = ", ".join(f"{c['name']} (#{c['index']})" for c in summary["cuts"])
        print(f"{summary['path']}: {summary['model']} {summary['fingerprint'][:12]}, {summary['bytes'] / 1e6:.1f} MB")
        print(f"cuts: {cuts_text}")
    return 0


def add_commands(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "bundle",
        help="build an edge bundle (ONNX heads, whole model, planning tables) for a torch-free edge",
        description="Build an edge bundle from a model (needs torch), or --verify one (needs no torch).",
    )
    p.add_argument("--model", help="torchvision name, NAME=SOURCE, or a file (as the daemons' configs take it)")
    p.add_argument("--weights", help="local state-dict file")
    p.add_argument("--input-shape", default="1,3,224,224", help="input batch shape, comma-separated")
    p.add_argument("--out", help="directory to write (absent or empty)")
    p.add_argument("--cuts", help="candidate cuts, names or indices, comma-separated (default: chosen, see --max-cuts)")
    p.add_argument("--max-cuts", type=int, default=6, help="candidate cuts when --cuts is not given")
    p.add_argument(
        "--calibration",
        metavar="DIR|photos|synthetic",
        help="images that bytes and accuracy are measured on (default: photos for a pretrained model)",
    )
    p.add_argument("--calibration-inputs", type=int, default=8, metavar="N", help="how many")
    p.add_argument("--verify", metavar="DIR", help="verify this bundle instead of building one")
    p.add_argument("--fingerprint", help="with --verify: the model fingerprint the bundle must have")
    p.add_argument("--json", action="store_true", help="machine-readable summary")
    p.set_defaults(func=cmd_bundle)
