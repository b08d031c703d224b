"""``cleave-cloud``: run the cloud daemon from ``cloud.yaml`` or quick-start flags."""

from __future__ import annotations

import argparse
import logging
import sys

import torch

from partitioner.models import ModelSpec
from partitioner.settings import SettingsError
from protos.cleave.v1 import split_inference_pb2 as si_pb2
from protos.serving import Daemon, Service

from .config import CloudConfig
from .servicer import SplitInferenceServicer
from .sessions import ModelRegistry, SessionManager

SPLIT_INFERENCE = si_pb2.DESCRIPTOR.services_by_name["SplitInference"]


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="cleave-cloud", description="Cleave cloud daemon: serves model tails.")
    p.add_argument("--config", help="cloud.yaml; flags below override it")
    p.add_argument("--listen", help="host:port to bind (default 127.0.0.1:50051)")
    p.add_argument("--port", type=int, help="bind 127.0.0.1:PORT")
    p.add_argument(
        "--model",
        action="append",
        default=[],
        metavar="SOURCE",
        help="serve a model: a torchvision name (weights=None, seeded), NAME=SOURCE, or a file; repeatable",
    )
    p.add_argument("--input-shape", help="input shape for --model entries, e.g. 1,3,224,224")
    p.add_argument("--threads", type=int, help="torch intra-op threads")
    p.add_argument("--log-level", help="DEBUG, INFO, WARNING")
    return p.parse_args(argv)


def build_config(args: argparse.Namespace) -> CloudConfig:
    config = CloudConfig.from_yaml(args.config) if args.config else CloudConfig()
    if args.listen:
        config.listen = args.listen
    if args.port:
        config.listen = f"127.0.0.1:{args.port}"
    shape = tuple(int(d) for d in args.input_shape.split(",")) if args.input_shape else None
    for entry in args.model:
        name, _, source = entry.partition("=")
        spec = {"name": name, "source": source or name}
        if shape:
            spec["input_shape"] = list(shape)
        config.models.append(ModelSpec.from_dict(spec))
    if args.threads is not None:
        config.torch_threads = args.threads
    if args.log_level:
        config.log_level = args.log_level
    if not config.models:
        raise SettingsError("models: nothing to serve (give --model or a config with models)")
    return config


def build_daemon(config: CloudConfig) -> Daemon:
    """Load every model and assemble the server (not started)."""
    if config.torch_threads:
        torch.set_num_threads(config.torch_threads)
    sessions = SessionManager(ModelRegistry(config.models), config.limits)
    servicer = SplitInferenceServicer(sessions, config.chunk_bytes)
    return Daemon(
        config.listen,
        [Service(servicer, SPLIT_INFERENCE)],
        max_message_bytes=config.limits.max_message_bytes,
        max_workers=config.max_workers,
        allow_insecure_public=config.allow_insecure_public,
    )


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        config = build_config(args)
    except (SettingsError, ValueError) as exc:
        print(f"cleave-cloud: {exc}", file=sys.stderr)
        return 2
    logging.basicConfig(level=config.log_level.upper(), format="%(asctime)s cloud %(levelname)s %(message)s")
    try:
        daemon = build_daemon(config)
    except (OSError, ValueError) as exc:
        print(f"cleave-cloud: {exc}", file=sys.stderr)
        return 1
    daemon.run_until_signal()
    return 0


if __name__ == "__main__":
    sys.exit(main())
