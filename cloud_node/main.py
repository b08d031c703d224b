"""``cleave-cloud``: run the cloud daemon from ``cloud.yaml`` or quick-start flags."""

from __future__ import annotations

import argparse
import logging
import sys
from typing import TYPE_CHECKING

import grpc
from google.protobuf.descriptor import ServiceDescriptor
from prometheus_client import CollectorRegistry

from partitioner.spec import ModelSpec
from protos.cleave.v1 import compression_pb2
from protos.cleave.v1 import split_inference_pb2 as si_pb2
from runtime import logsafe, memory
from runtime.cpus import model_threads
from runtime.metrics import MetricsConfig, RpcMetrics, new_registry, serve_metrics
from runtime.serving import Daemon, Service, ServiceOff
from runtime.settings import SettingsError, parse_shape, revalidate

from .config import CloudConfig, HttpConfig
from .web.server import start_http

# Torch and the models come in with load_services, after the daemon listens (health NOT_SERVING).
if TYPE_CHECKING:
    from .batching import Batchers
    from .ray_backend.serving import RayTails
    from .sessions import ModelRegistry

SPLIT_INFERENCE = si_pb2.DESCRIPTOR.services_by_name["SplitInference"]
COMPRESSION = compression_pb2.DESCRIPTOR.services_by_name["Compression"]
#: Answered from the handler threads kept free of streams and long calls (see runtime.admission).
CONTROL_METHODS = (
    f"/{SPLIT_INFERENCE.full_name}/GetInfo",
    "/inference.GRPCInferenceService/ServerLive",
    "/inference.GRPCInferenceService/ServerReady",
)
COMPRESSION_OFF = (
    "the Compression service is off on this cloud: start cleave-cloud with --jobs-dir DIR "
    "(or a jobs: section with dir: in cloud.yaml) to enable it"
)


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
    p.add_argument("--jobs-dir", help="host the Compression service with its job store here")
    p.add_argument("--metrics", metavar="[HOST:]PORT", help="serve Prometheus /metrics here (a port: on 127.0.0.1)")
    p.add_argument("--http-port", type=int, help="serve KServe v2 over HTTP, the jobs REST API and the console here")
    p.add_argument("--max-batch-size", type=int, help="batch concurrent requests up to this many rows (1: off)")
    p.add_argument("--max-queue-delay-ms", type=float, help="how long a request may wait for a batch to fill")
    p.add_argument(
        "--ray-address",
        metavar="local|auto|ray://HOST:PORT",
        help="run the tails on Ray Serve: local starts Ray here, auto joins this node's cluster (cloud.yaml ray:)",
    )
    args = p.parse_args(argv)
    if args.max_batch_size is not None and args.max_batch_size < 1:
        p.error(f"argument --max-batch-size: {args.max_batch_size} is not an integer >= 1 (1: batching off)")
    return args


def build_config(args: argparse.Namespace) -> CloudConfig:
    config = CloudConfig.from_yaml(args.config) if args.config else CloudConfig()
    if args.listen:
        config.listen = args.listen
    if args.port:
        config.listen = f"127.0.0.1:{args.port}"
    shape = tuple(parse_shape(args.input_shape)) if args.input_shape else None
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
    if args.jobs_dir:
        config.jobs.dir = args.jobs_dir
    if args.metrics is not None:
        config.metrics = MetricsConfig(args.metrics)
    if args.http_port:
        config.http = HttpConfig(f"127.0.0.1:{args.http_port}")
    if args.max_batch_size is not None:
        config.batching.enabled = args.max_batch_size > 1
        config.batching.max_batch_size = args.max_batch_size
    if args.max_queue_delay_ms is not None:
        config.batching.max_queue_delay_ms = args.max_queue_delay_ms
    if args.ray_address is not None:
        config.ray.address = args.ray_address
    if not config.models and not config.jobs.dir:
        raise SettingsError("models: nothing to serve (give --model, --jobs-dir or a config with either)")
    revalidate(config)  # the flags may have changed it since it loaded
    return config


def build_daemon(config: CloudConfig, registry: CollectorRegistry | None = None) -> Daemon:
    """Load every model and assemble the server (not started); with ``registry``, record metrics in it."""
    return new_daemon(config, load_services(config, registry), registry)


def hosted(config: CloudConfig) -> list[ServiceDescriptor]:
    """The services ``config`` hosts, known before any model is loaded."""
    from protos.kserve.v2 import grpc_predict_v2_pb2 as kserve_pb  # what .kserve serves, without torch

    kserve = kserve_pb.DESCRIPTOR.services_by_name["GRPCInferenceService"]
    return [SPLIT_INFERENCE, kserve, *([COMPRESSION] if config.jobs.dir else [])]


def load_services(config: CloudConfig, registry: CollectorRegistry | None = None) -> list[Service]:
    """Load every model and build the servicers of :func:`hosted`'s services (the slow part of a start)."""
    import torch

    from .bundles import BundleStore
    from .metrics import CloudMetrics
    from .servicer import SplitInferenceServicer
    from .sessions import ModelRegistry, SessionManager
    from .streams import PARSERS as STREAM_PARSERS

    threads = model_threads(config.torch_threads)
    if threads:
        torch.set_num_threads(threads)
    models = ModelRegistry(config.models)
    tails = ray_tails(config, models)
    sessions = SessionManager(models, config.limits, batchers_for(config), tails)
    metrics = CloudMetrics(registry, sessions) if registry is not None else None
    if tails is not None and registry is not None:
        from .ray_backend.serving import TailsCollector

        registry.register(TailsCollector(tails))
    bundles = BundleStore(config.bundles.dir or None, {n: m.fingerprint for n, m in models.models.items()})
    servicer = SplitInferenceServicer(sessions, config.chunk_bytes, metrics, bundles)
    split = Service(
        servicer, SPLIT_INFERENCE, metrics.wire_bytes() if metrics is not None else {}, parsers=STREAM_PARSERS
    )
    services = [split, kserve_service(models, config, sessions.batchers, tails)]
    if config.jobs.dir:
        from .jobs import CompressionServicer, JobManager
        from .jobs.ray_tasks import ray_jobs_for

        jobs = JobManager(config.jobs, ray=ray_jobs_for(config.ray, config.jobs.dir))  # Ray tasks when ray.jobs says
        jobs.start()
        if metrics is not None:
            metrics.watch_jobs(jobs.store)
        services.append(Service(CompressionServicer(jobs, config.jobs.chunk_bytes), COMPRESSION))
    return services


def new_daemon(config: CloudConfig, services: list[Service], registry: CollectorRegistry | None = None) -> Daemon:
    """The server for ``services`` (pending ones: ``Service(None, descriptor)``), not started."""
    revalidate(config)
    interceptors: list[grpc.ServerInterceptor] = [RpcMetrics(registry)] if registry is not None else []
    if not config.jobs.dir:
        interceptors.append(ServiceOff(COMPRESSION, COMPRESSION_OFF))
    return Daemon(
        config.listen,
        services,
        max_message_bytes=config.limits.max_message_bytes,
        max_workers=config.max_workers,
        allow_insecure_public=config.allow_insecure_public,
        interceptors=interceptors,
        tls=config.tls,
        auth=config.auth,
        keepalive=config.keepalive,
        limits=config.limits,
        control_methods=CONTROL_METHODS,
    )


def batchers_for(config: CloudConfig) -> Batchers:
    """Dynamic batchers for tails and whole models, as ``batching:`` in cloud.yaml sets them."""
    from .batching import Batchers

    revalidate(config)
    return Batchers(config.batching.for_model)


def ray_tails(config: CloudConfig, models: ModelRegistry) -> RayTails | None:
    """The Ray backend when ``ray.address`` is set (Ray is imported only then), else None: tails run here."""
    if not config.ray.enabled or not models.models:
        return None
    try:
        from .ray_backend.serving import RayTails
    except ImportError as exc:
        raise SettingsError(
            f"ray.address: {config.ray.address!r} needs Ray Serve (pip install 'cleave[ray]'): {exc}"
        ) from exc
    return RayTails(config.ray, models.models)


def kserve_service(
    registry: ModelRegistry, config: CloudConfig, batchers: Batchers | None = None, remote: RayTails | None = None
) -> Service:
    """The KServe v2 Open Inference Protocol over every served model (whole-model inference)."""
    # Imported here: its `inference.*` stubs must stay out of processes that import this module
    # beside Triton's or KServe's client, which register the same names.
    from .kserve import SERVICE, KServeServicer
    from .openinference import OpenInference

    backend = OpenInference(registry.get, list(registry.models), config.limits, batchers, remote)
    return Service(KServeServicer(backend), SERVICE)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        config = build_config(args)
    except (SettingsError, ValueError) as exc:
        print(f"cleave-cloud: {exc}", file=sys.stderr)
        return 2
    logging.basicConfig(level=config.log_level.upper(), format="%(asctime)s cloud %(levelname)s %(message)s")
    logsafe.install()  # client-supplied text cannot forge a log line
    memory.keep_freed_memory()  # requests reuse their buffers' pages (docs/overhead.md)
    registry = new_registry() if config.metrics.enabled else None
    endpoint = None  # a metrics port in use fails before it is bound: the message, not an UnboundLocalError
    try:
        # The endpoint first: a port clash fails at once, not after loading every model.
        endpoint = serve_metrics(config.metrics.listen, registry, allow_insecure_public=config.allow_insecure_public)
        # Listen first (health NOT_SERVING), then load the models: a client can wait for SERVING.
        daemon = new_daemon(config, [Service(None, d) for d in hosted(config)], registry)
        http = start_http(config)  # its own thread and event loop; see cloud_node/web
    except (OSError, ValueError) as exc:
        print(f"cleave-cloud: {exc}", file=sys.stderr)
        if endpoint is not None:
            endpoint.stop()
        return 1

    def load() -> None:
        for service in load_services(config, registry):
            daemon.attach(service)
            if http is not None:
                http[1].attach(service.servicer)

    def on_stop() -> None:
        if http is not None:
            http[0].stop()
        close_services(daemon)
        if endpoint is not None:
            endpoint.stop()

    try:
        daemon.run_until_signal(on_stop=on_stop, load=load)
    except (OSError, ValueError) as exc:
        print(f"cleave-cloud: {exc}", file=sys.stderr)
        if http is not None:
            http[0].stop()
        if endpoint is not None:
            endpoint.stop()
        return 1
    return 0


def close_services(daemon: Daemon) -> None:
    """After the drain: stop what services run in the background (the job workers)."""
    for service in daemon.services:
        close = getattr(service.servicer, "close", None)  # None too for a service never loaded
        if close is not None:
            close()


if __name__ == "__main__":
    sys.exit(main())
