"""``cleave-edge``: run the edge daemon from ``edge.yaml`` or quick-start flags."""

from __future__ import annotations

import argparse
import importlib.util
import logging
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from partitioner.placement import AUTO, parse_pin
from protos.cleave.v1 import edge_pb2
from protos.errors import WireError
from runtime import logsafe, memory
from runtime.cpus import model_threads
from runtime.metrics import MetricsConfig, RpcMetrics, new_registry, serve_metrics
from runtime.serving import Daemon, Service
from runtime.settings import SettingsError, parse_shape, revalidate

from .config import EdgeConfig

log = logging.getLogger(__name__)

# Torch, the model and the rest of the edge come in with EdgeDaemon.load, after the daemon listens.
if TYPE_CHECKING:
    from .autoplan import AutoPlanner
    from .backend import Backend
    from .cloud_link import CloudLink

BIT_WIDTHS = (2, 3, 4, 5, 6, 8, 16, 32)  # --bits: affine 2-6 and 8 (compressor.bitpack.BIT_WIDTHS), fp16, fp32

EDGE = edge_pb2.DESCRIPTOR.services_by_name["Edge"]
#: Answered from the handler threads kept free of streams and long calls (see runtime.admission).
CONTROL_METHODS = (f"/{EDGE.full_name}/GetStatus", f"/{EDGE.full_name}/GetPlan")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="cleave-edge", description="Cleave edge daemon: local API, head here, tail in the cloud."
    )
    p.add_argument("--config", help="edge.yaml; flags below override it")
    p.add_argument("--listen", help="host:port to bind (default 127.0.0.1:50052)")
    p.add_argument("--port", type=int, help="bind 127.0.0.1:PORT")
    p.add_argument("--cloud", help="cloud daemon host:port")
    p.add_argument("--model", help="model source: torchvision name, NAME=SOURCE, or a file")
    p.add_argument("--weights", help="local state-dict file for --model")
    p.add_argument("--bundle", help="an edge bundle directory (cleave bundle): run it on ONNX Runtime, without torch")
    p.add_argument(
        "--fetch-bundle",
        metavar="MODEL",
        help="at start, fetch MODEL's bundle from the cloud into --bundle (unless it already holds it)",
    )
    p.add_argument("--input-shape", help="e.g. 1,3,224,224")
    p.add_argument(
        "--cut", help='"auto" (default: the planner decides), "cloud" (send the input), "edge", or a cut name or index'
    )
    p.add_argument(
        "--bits",
        type=int,
        choices=BIT_WIDTHS,
        metavar="{2,3,4,5,6,8,16,32}",
        help="feature bits: 2, 3, 4, 5, 6 or 8 (affine int), 16 (fp16) or 32 (fp32)",
    )
    p.add_argument("--encoding", help="feature encoding, e.g. int8, int4c, fp16, fp32+none")
    p.add_argument("--timeout", type=float, help="per-request deadline for the cloud, seconds")
    p.add_argument("--threads", type=int, help="intra-op threads (torch, or ONNX Runtime with a bundle)")
    p.add_argument("--metrics", metavar="[HOST:]PORT", help="serve Prometheus /metrics here (a port: on 127.0.0.1)")
    p.add_argument("--log-level", help="DEBUG, INFO, WARNING")
    return p.parse_args(argv)


def encoding_for_bits(bits: int) -> str:
    if bits == 32:
        return "fp32"
    if bits == 16:
        return "fp16"
    return f"int{bits}"


def build_config(args: argparse.Namespace) -> EdgeConfig:
    """The config file, then the flags over it; validated (nothing here imports torch)."""
    data = {}
    if args.config:
        from runtime.settings import load_yaml

        data = load_yaml(args.config)
    if args.model:
        name, _, source = args.model.partition("=")
        model = {"name": name, "source": source or name}
        if args.weights:
            model["weights"] = args.weights
        if args.input_shape:
            model["input_shape"] = parse_shape(args.input_shape)
        data["model"] = model
    if args.bundle:
        data["bundle"] = str(Path(args.bundle).resolve())
    if args.fetch_bundle:
        data["fetch_bundle"] = {**(data.get("fetch_bundle") or {}), "model": args.fetch_bundle}
    config = EdgeConfig.from_dict(data)
    if args.config:
        config.resolve_paths(Path(args.config).parent)
    if args.listen:
        config.listen = args.listen
    if args.port:
        config.listen = f"127.0.0.1:{args.port}"
    if args.cloud:
        config.cloud = args.cloud
    if args.cut is not None:
        config.plan.cut = args.cut
    if args.bits is not None:
        config.plan.encoding = encoding_for_bits(args.bits)
    if args.encoding:
        config.plan.encoding = args.encoding
    if args.timeout is not None:
        config.request_timeout_s = args.timeout
    if args.threads is not None:
        config.torch_threads = args.threads
    if args.metrics is not None:
        config.metrics = MetricsConfig(args.metrics)
    if args.log_level:
        config.log_level = args.log_level
    revalidate(config)  # the flags may have changed it since it loaded
    if config.bundle is None and importlib.util.find_spec("torch") is None:  # found, not imported
        raise SettingsError(
            f"model: {config.model.source!r} runs on the torch edge, and torch is not installed here: "
            "run an edge bundle instead (--bundle DIR from `cleave bundle`, or --fetch-bundle MODEL with --bundle), "
            "or pip install 'cleave[cloud]'"
        )
    return config


class EdgeDaemon:
    """The edge's parts wired together: model, link, runtime and server.

    The server listens first (health NOT_SERVING); :meth:`load` loads the model and wires the rest.
    """

    def __init__(self, config: EdgeConfig) -> None:
        self.config = config
        # The metrics endpoint first: a port clash fails at once, not after loading the model.
        self.registry = new_registry() if config.metrics.enabled else None
        self.metrics_endpoint = serve_metrics(
            config.metrics.listen, self.registry, allow_insecure_public=config.allow_insecure_public
        )
        self.link: CloudLink | None = None
        self.autoplanner: AutoPlanner | None = None
        self.unfinished = ""  # after close: what is still running (the interpreter must not finalize under it)
        self.server = Daemon(
            config.listen,
            [Service(None, EDGE)],
            max_message_bytes=config.limits.max_message_bytes,
            max_workers=config.max_workers,
            allow_insecure_public=config.allow_insecure_public,
            interceptors=[RpcMetrics(self.registry)] if self.registry is not None else [],
            tls=config.tls,
            auth=config.auth,
            keepalive=config.keepalive,
            limits=config.limits,
            control_methods=CONTROL_METHODS,
        )

    def load(self) -> None:
        """Load the model, connect to the cloud, plan; then serve the Edge service."""
        from compressor import EncodingSpec

        from .autoplan import AutoPlanner
        from .cloud_link import CloudLink
        from .link import LinkMonitor
        from .metrics import EdgeMetrics
        from .runtime import EdgeRuntime, Inflight
        from .servicer import PARSERS, EdgeServicer

        config = self.config
        self.model = load_backend(config)
        if config.head.allocate:  # a bundle refuses it at load: this is the torch edge
            self.model.check_allocatable()
        log.info("model %s (%s) runs on %s", self.model.name, self.model.fingerprint[:12], self.model.describe())
        # Running requests: the runtime counts them, the link drains a replaced stream until its cut has none.
        inflight = Inflight(config.limits.max_inflight)
        self.link = CloudLink(
            config.cloud,
            self.model,
            LinkMonitor(),
            config.reconnect,
            config.chunk_bytes,
            config.limits.max_message_bytes,
            tls=config.cloud_tls,
            token=config.cloud_auth.load(),
            drain_s=max(config.request_timeout_s, 1.0),  # a request that chose the old cut may still be in flight
            keepalive=config.keepalive,
            in_use=inflight.in_use,
        ).start()
        self.runtime = EdgeRuntime(
            self.model,
            self.link,
            config.request_timeout_s,
            inflight,
            config.head.weight_bits,
            input_is_8bit=config.autoplan.input_is_8bit,
        )
        if self.registry is not None:
            EdgeMetrics(self.registry, self.runtime)
        if config.plan.cut == AUTO:
            # Until the first plan is made, requests run on the edge.
            self.autoplanner = AutoPlanner(
                self.model, self.runtime, self.link.stub, self.link.monitor, config.autoplan, config.head.allocate
            )
        else:
            placement, cut = parse_pin(config.plan.cut)
            self.runtime.pin(placement, cut, EncodingSpec.parse(config.plan.encoding), reason="from config")
        servicer = EdgeServicer(
            self.runtime, config.cloud, config.limits.stream_window, self.autoplanner, config.limits.max_batch
        )
        self.server.attach(Service(servicer, EDGE, parsers=PARSERS))
        if self.autoplanner is not None:
            self.autoplanner.start()

    def run(self) -> None:
        self.server.run_until_signal(on_stop=self.close, load=self.load)

    def close(self) -> None:
        if self.autoplanner is not None and not self.autoplanner.close():
            self.unfinished = "the planner (in the middle of a measurement)"
        if self.link is not None:
            self.link.close()
        if self.metrics_endpoint is not None:
            self.metrics_endpoint.stop()


def load_backend(config: EdgeConfig) -> Backend:
    """The backend ``config`` asks for: the bundle on ONNX Runtime (no torch), else the model on torch."""
    if config.bundle is not None:
        from partitioner.bundle import EdgeBundle

        from .onnx_backend import OnnxBackend

        if config.fetch_bundle.enabled:
            from .bundle_fetch import ensure_bundle

            ensure_bundle(config)  # a verified bundle in config.bundle, fetched or already there
        bundle = EdgeBundle.open(config.bundle)  # every file's sha256, before anything runs
        if config.model is not None and config.model.name != bundle.manifest.name:
            raise ValueError(
                f"bundle: {config.bundle} holds {bundle.manifest.name!r}, model.name is {config.model.name!r}"
            )
        return OnnxBackend(bundle, threads=model_threads(config.torch_threads) or 0, preload_whole=config.preload)
    import torch

    from partitioner.loaded import LoadedModel

    from .torch_backend import TorchBackend

    threads = model_threads(config.torch_threads)
    if threads:
        torch.set_num_threads(threads)
    return TorchBackend(LoadedModel.load(config.model), config.autoplan.calibration, config.autoplan.calibration_inputs)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        config = build_config(args)
    except (SettingsError, ValueError) as exc:
        print(f"cleave-edge: {exc}", file=sys.stderr)
        return 2
    logging.basicConfig(level=config.log_level.upper(), format="%(asctime)s edge %(levelname)s %(message)s")
    logsafe.install()  # client-supplied text cannot forge a log line
    memory.keep_freed_memory()  # requests reuse their buffers' pages (docs/overhead.md)
    try:
        daemon = EdgeDaemon(config)
    except (OSError, ValueError, WireError) as exc:
        print(f"cleave-edge: {exc}", file=sys.stderr)
        return 1
    try:
        daemon.run()  # listens, then loads the model
    except (OSError, ValueError, WireError) as exc:
        print(f"cleave-edge: {exc}", file=sys.stderr)
        daemon.close()
        return 1
    if daemon.unfinished:
        # Served and drained; a thread still inside torch would abort the interpreter's exit ("terminate
        # called without an active exception", status 134): a SIGTERM during the first plan did so.
        log.info("stopped; not waiting for %s", daemon.unfinished)
        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)
    return 0


if __name__ == "__main__":
    sys.exit(main())
