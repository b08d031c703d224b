"""The front door's side of the Ray backend: connect, deploy one Serve deployment per model, call it.

:class:`RayTails` is what a :class:`~cloud_node.sessions.Session` (and the KServe face) hands a
request to when ``ray.address`` is set. A call goes to the model's deployment handle; Serve routes it
to a replica (power of two choices on queue length) and autoscales the replicas on ongoing requests.

Faults: a replica that dies under a request (``ray.kill``, a lost node) makes the call fail with an
actor error; the request is sent again, to another replica, until it succeeds, ``max_attempts`` run
out or ``request_timeout_s`` passes, and only then answers UNAVAILABLE (the edge then runs the request
itself). A tail is a pure function of its input, so a retry cannot produce a duplicate answer: the
front door answers each request once, with the first reply it gets.

Every piece of mutable state here is under ``self._lock``; the status poller thread owns the
snapshot it publishes (replaced whole, read without copying).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import threading
import time
from collections import deque
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from compressor import RAW_UNCOMPRESSED, CodecLimits, EncodingSpec, decode, encode
from protos.cleave.v1 import split_inference_pb2 as si_pb2
from protos.cleave.v1 import tensor_pb2
from protos.errors import (
    DeadlineExceeded,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    ResourceExhausted,
    Unavailable,
    WireError,
)

from ..config import RaySettings
from . import autoscale, before_ray_import
from .lane import KV_PREFIX, LaneLost, Lanes
from .messages import WHOLE_MODEL, TailReply, TailRequest

log = logging.getLogger(__name__)

before_ray_import()  # the daemon keeps SIGTERM (drains), whichever Ray path loads Ray first

_ERRORS: dict[str, type[WireError]] = {
    cls.__name__: cls
    for cls in (InvalidArgument, NotFound, FailedPrecondition, ResourceExhausted, Unavailable, DeadlineExceeded)
}


def app_name(settings: RaySettings, model: str) -> str:
    """The Serve application that holds ``model``'s deployment (one application per model)."""
    return f"{settings.app_name}-{model}"


class LocalRay:
    """A Ray instance this process started (``ray.address: local``), owned by a thread of its own.

    Ray starts its processes (GCS, raylet, workers) so that they die with the *thread* that started
    them (``PR_SET_PDEATHSIG``). The daemon loads its models on a thread that ends once loading is
    done, so Ray is started here on a thread that lives until :meth:`stop`.
    """

    def __init__(self, settings: RaySettings, timeout_s: float = 300.0) -> None:
        self._settings = settings
        self._started = threading.Event()
        self._release = threading.Event()
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._own, name="ray-owner", daemon=True)
        self._thread.start()
        if not self._started.wait(timeout_s):
            raise RuntimeError(f"ray.address local: Ray did not start within {timeout_s:.0f}s")
        if self._error is not None:
            raise self._error

    def _own(self) -> None:
        import ray

        try:
            ray.init(
                num_cpus=self._settings.local_num_cpus or None,
                object_store_memory=(self._settings.local_object_store_mb << 20) or None,
                include_dashboard=False,
                log_to_driver=False,
            )
        except BaseException as exc:  # noqa: BLE001 - handed to the constructor, which raises it
            self._error = exc
        finally:
            self._started.set()
        self._release.wait()

    def stop(self) -> None:
        """Shut Serve and Ray down, then let the owner thread end."""
        import ray
        from ray import serve

        try:
            serve.shutdown()
            ray.shutdown()
        finally:
            self._release.set()
            self._thread.join(timeout=10)


def connect(settings: RaySettings) -> LocalRay | None:
    """Join (``auto``, ``ray://``) or start (``local``) Ray and make sure Serve runs; the instance if this started it.

    Serve's own HTTP and gRPC proxies stay off: Cleave's gRPC server is the front door.
    """
    import ray
    from ray import serve

    local = None
    if not ray.is_initialized():
        if settings.address == "local":
            local = LocalRay(settings)
        else:
            ray.init(address=settings.address, log_to_driver=False)
    serve.start(proxy_location="Disabled")
    return local


#: Serve settings of every replica process (``ray.env`` overrides them). Serve runs a replica's
#: methods on an event loop of their own, in a thread beside the loop that receives requests; a
#: tail replica's ``__call__`` only hands the request to a worker thread, so it runs on the receiving
#: loop instead, one thread hand-off less each way (one of the settings RAY_SERVE_THROUGHPUT_OPTIMIZED
#: makes). Measured in docs/ray.md.
REPLICA_ENV = {"RAY_SERVE_RUN_USER_CODE_IN_SEPARATE_THREAD": "0"}


def deployment_options(settings: RaySettings, model: str) -> dict[str, Any]:
    """``Deployment.options`` for ``model``: replicas or autoscaling bounds, resources, drain time."""
    options: dict[str, Any] = {
        "name": model,
        "ray_actor_options": {
            "num_cpus": settings.num_cpus,
            "num_gpus": settings.num_gpus,
            "runtime_env": {"env_vars": {**REPLICA_ENV, **settings.env}},
        },
        "max_ongoing_requests": settings.max_ongoing_requests,
        "graceful_shutdown_timeout_s": settings.graceful_shutdown_timeout_s,
        "graceful_shutdown_wait_loop_s": 0.5,
        "health_check_period_s": 2.0,
        "logging_config": {"enable_access_log": settings.access_log},
    }
    if settings.max_replicas > settings.min_replicas:
        options["autoscaling_config"] = {
            "min_replicas": settings.min_replicas,
            "initial_replicas": settings.replicas,
            "max_replicas": settings.max_replicas,
            "target_ongoing_requests": settings.target_ongoing_requests,
            "upscale_delay_s": settings.upscale_delay_s,
            "downscale_delay_s": settings.downscale_delay_s,
            "look_back_period_s": settings.look_back_period_s,
            # How often handles push their queue lengths to the controller. Serve's default (10 s)
            # dwarfs a short look-back window; half the window keeps at least two samples in it.
            "metrics_interval_s": min(10.0, settings.look_back_period_s / 2),
        }
        if uses_lanes(settings):
            # Lane requests bypass the handles whose counts Serve's default policy reads: the replicas
            # report them, and this policy (Serve's own rule otherwise) counts them in.
            options["autoscaling_config"]["policy"] = {"policy_function": f"{autoscale.__name__}:ongoing_requests"}
    else:
        options["num_replicas"] = settings.replicas
    return options


def uses_lanes(settings: RaySettings) -> bool:
    """Whether requests go over the direct lane (``transport: direct``).

    Not through Ray Client (``ray://``: the replicas' ports are inside the cluster), and not with
    batching (``max_batch_size`` > 1): Serve's ``@serve.batch`` queue lives on the replica's event
    loop, which lane requests do not pass; those deployments use Serve's gRPC transport.
    """
    return settings.transport == "direct" and not settings.address.startswith("ray://") and settings.max_batch_size <= 1


def calls_on_own_loop(settings: RaySettings) -> bool:
    """Whether the front door runs its handles' routers on an event loop of its own (not through Ray Client).

    Called from a gRPC thread, a handle hands the request to Serve's router loop, waits for the
    routing, hands the wait for the reply to that loop again and waits once more: two round trips
    between threads per call. With the router on a loop the front door holds (``RayCalls``), the
    thread hands the whole call over once and waits once. Through Ray Client (``ray://``) handles
    keep Serve's own arrangement.
    """
    return not settings.address.startswith("ray://")


class RayCalls:
    """An event loop on a thread of its own that the front door's handles route and wait on.

    A gRPC thread submits a call with :meth:`submit` and blocks on the returned future; the loop
    routes it (Serve's router runs on this loop, ``_run_router_in_separate_loop=False``), sends it
    and awaits the reply. The loop and the handles' routers belong to the loop's thread.
    """

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name="ray-calls", daemon=True)
        self._thread.start()

    def handle(self, name: str, app: str, settings: RaySettings) -> Any:
        """A handle to ``name`` in ``app`` whose router runs on this loop, as :func:`request_handle` sets it."""

        async def attach() -> Any:
            from ray import serve

            handle = serve.get_deployment_handle(name, app_name=app)
            handle._init(_run_router_in_separate_loop=False)
            return request_handle(handle, settings)

        return asyncio.run_coroutine_threadsafe(attach(), self.loop).result()

    def submit(self, handle: Any, request: TailRequest) -> concurrent.futures.Future:
        """Send ``request`` through ``handle``; the future holds the reply (cancel it to cancel the call)."""

        async def call() -> TailReply:
            return await handle.remote(request)

        return asyncio.run_coroutine_threadsafe(call(), self.loop)

    def close(self, handles: Sequence[Any]) -> None:
        """Shut the handles' routers down on the loop, then stop it."""

        async def shutdown() -> None:
            for handle in handles:
                await handle.shutdown_async()

        try:
            asyncio.run_coroutine_threadsafe(shutdown(), self.loop).result(timeout=10)
        except Exception as exc:  # noqa: BLE001 - closing: a router that will not stop is logged, not raised
            log.warning("ray: shutting the front door's handles down: %s", exc)
        finally:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self._thread.join(timeout=5)


def request_handle(handle: Any, settings: RaySettings) -> Any:
    """``handle`` as the front door calls it, per ``ray.transport``.

    ``grpc``: Serve's direct gRPC data plane, one unary call that says "accepted" in its headers and
    carries the result in its body, instead of an actor call whose first streamed reply only says
    "accepted" (Serve's default, ``actor``). Its payloads are pickled with the standard library's
    pickler, not cloudpickle: what crosses is plain dataclasses of bytes and numbers
    (:mod:`.messages`). A replica lost under a call still raises an actor error (retried). Through
    Ray Client (``ray://``) every call goes through the client server, and the replicas' own ports
    are not reachable from outside the cluster: actor calls there, whatever ``transport`` says.
    """
    if settings.transport == "actor" or settings.address.startswith("ray://"):
        return handle
    return handle.options(_by_reference=False, request_serialization="pickle", response_serialization="pickle")


@dataclass
class PoolStatus:
    """One model's replicas as the Serve controller last reported them, and this front door's view."""

    model: str
    status: str = "UNKNOWN"  # Serve's deployment status: HEALTHY, UPSCALING, DOWNSCALING, ...
    replicas: dict[str, int] = field(default_factory=dict)  # replica state -> count (RUNNING, STARTING, ...)
    message: str = ""
    in_flight: int = 0  # this front door's requests now at the deployment (its queue depth)
    requests: int = 0
    retries: int = 0  # calls sent again after a replica died under them
    failures: int = 0  # requests that ran out of attempts or time
    lane_requests: int = 0  # requests answered over the direct lane (transport: direct), not Serve's handle
    decisions: list[dict] = field(default_factory=list)  # recent replica-count changes, oldest first

    @property
    def running(self) -> int:
        return self.replicas.get("RUNNING", 0)

    def to_json(self) -> dict:
        return {
            "model": self.model,
            "status": self.status,
            "replicas": dict(self.replicas),
            "running": self.running,
            "message": self.message,
            "in_flight": self.in_flight,
            "requests": self.requests,
            "retries": self.retries,
            "failures": self.failures,
            "lane_requests": self.lane_requests,
            "decisions": list(self.decisions),
        }


class RayTails:
    """Runs the tails of ``models`` (name -> LoadedModel) on Ray Serve, per ``settings``.

    Builds on construction: connects, deploys (or attaches to) each model's application and waits
    until its replicas are up. :meth:`close` stops the polling and, for a Ray instance this started
    (``local``), shuts it down; on a shared cluster the deployments stay for the other front doors.
    """

    def __init__(self, settings: RaySettings, models: dict[str, Any], poll_s: float = 1.0) -> None:
        from ray import serve

        self.settings = settings
        self.local_ray = connect(settings)
        self._lock = threading.Lock()
        self._handles: dict[str, Any] = {}
        self._pools: dict[str, PoolStatus] = {name: PoolStatus(name) for name in models}
        self._decisions: dict[str, deque] = {name: deque(maxlen=20) for name in models}
        self._calls = RayCalls() if calls_on_own_loop(settings) else None
        existing = serve.status().applications
        for name, model in models.items():
            app = app_name(settings, name)
            if app in existing and existing[app].status == "RUNNING":
                log.info("ray: model %s: attaching to the running application %s", name, app)
                handle = serve.get_deployment_handle(name, app_name=app)
            else:
                from .replica import TailReplica

                threads = settings.torch_threads or max(1, int(-(-settings.num_cpus // 1)))
                deployment = serve.deployment(TailReplica).options(**deployment_options(settings, name))
                app_graph = deployment.bind(
                    model.spec,
                    model.fingerprint,
                    threads,
                    settings.max_batch_size,
                    settings.batch_wait_timeout_s,
                    lane=uses_lanes(settings),
                    drain_s=max(0.0, settings.graceful_shutdown_timeout_s - 1.0),
                )
                started = time.perf_counter()
                handle = serve.run(app_graph, name=app, route_prefix=None)
                log.info("ray: model %s deployed as %s in %.1fs", name, app, time.perf_counter() - started)
            if self._calls is not None:
                self._handles[name] = self._calls.handle(name, app, settings)
            else:
                self._handles[name] = request_handle(handle, settings)
        self._lanes = None
        if uses_lanes(settings):
            self._lanes = Lanes(
                {name: f"SERVE_REPLICA::{app_name(settings, name)}#{name}#" for name in models}, RayDirectory()
            )
        self._stop = threading.Event()
        self._poll_s = poll_s
        self.refresh()
        self._poller = threading.Thread(target=self._poll, name="ray-status", daemon=True)
        self._poller.start()

    # Requests.

    def run(
        self,
        model: str,
        part: int | str,
        features: Sequence[tensor_pb2.Tensor],
        result_spec: EncodingSpec,
        limits: CodecLimits,
    ) -> tuple[list[tensor_pb2.Tensor], si_pb2.CloudTiming]:
        """Run ``part`` of ``model`` on its encoded ``features`` in a replica; the encoded outputs and timing.

        ``queue_ms`` holds the replica's batch wait plus the hop to the replica and back.
        """
        request = TailRequest(
            part=part,
            features=tuple(f.SerializeToString() for f in features),
            result_spec=result_spec,
            max_elements=limits.max_elements,
            max_payload_bytes=limits.max_payload_bytes,
        )
        started = time.perf_counter()
        reply = self.call(model, request)
        total_ms = (time.perf_counter() - started) * 1e3
        if reply.error is not None:
            kind, message = reply.error
            raise _ERRORS.get(kind, RuntimeError)(message)
        outputs = []
        for data in reply.outputs:
            msg = tensor_pb2.Tensor()
            msg.ParseFromString(data)
            outputs.append(msg)
        inside = reply.decode_ms + reply.compute_ms + reply.encode_ms
        timing = si_pb2.CloudTiming(
            queue_ms=max(total_ms - inside, reply.queue_ms),
            decode_ms=reply.decode_ms,
            compute_ms=reply.compute_ms,
            encode_ms=reply.encode_ms,
        )
        return outputs, timing

    def run_tensors(self, model: str, part: int | str, tensors: Sequence[Any], limits: CodecLimits) -> list[Any]:
        """:meth:`run` for tensors in hand (the KServe face): raw-encoded there, decoded back here."""
        features = [encode(t, RAW_UNCOMPRESSED) for t in tensors]
        outputs, _ = self.run(model, part, features, RAW_UNCOMPRESSED, limits)
        return [decode(o, limits) for o in outputs]

    def run_whole(self, model: str, tensor: Any, limits: CodecLimits) -> list[Any]:
        """The whole model on one input batch, in a replica (KServe's ``ModelInfer``)."""
        return self.run_tensors(model, WHOLE_MODEL, [tensor], limits)

    def call(self, model: str, request: TailRequest) -> TailReply:
        """Send ``request`` to ``model``'s deployment; again to another replica when one dies under it.

        Raises:
            NotFound: ``model`` has no deployment here.
            DeadlineExceeded: no reply within ``request_timeout_s``.
            Unavailable: every attempt met a dead replica.
        """
        import ray.exceptions
        from ray.serve.exceptions import ReplicaUnavailableError

        handle = self._handles.get(model)
        if handle is None:
            raise NotFound(f"model {model!r} has no Ray deployment here")
        settings = self.settings
        deadline = time.monotonic() + settings.request_timeout_s
        with self._lock:
            pool = self._pools[model]
            pool.in_flight += 1
            pool.requests += 1
        last: BaseException | None = None
        try:
            for attempt in range(settings.max_attempts):
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    break
                try:
                    reply = self._lanes.call(model, request, remaining) if self._lanes is not None else None
                    if reply is None:
                        return self._send(handle, request, remaining)
                    with self._lock:
                        pool.lane_requests += 1
                    return reply
                except TimeoutError as exc:
                    last = exc
                    break
                except (ray.exceptions.RayActorError, ReplicaUnavailableError, LaneLost) as exc:
                    last = exc
                    log.warning(
                        "ray: model %s: replica lost under a request (attempt %d of %d): %s",
                        model,
                        attempt + 1,
                        settings.max_attempts,
                        type(exc).__name__,
                    )
                    with self._lock:
                        pool.retries += 1
            with self._lock:
                pool.failures += 1
            if isinstance(last, TimeoutError) or deadline - time.monotonic() <= 0:
                raise DeadlineExceeded(
                    f"model {model!r}: no replica answered within {settings.request_timeout_s:g}s "
                    "(ray.request_timeout_s)"
                )
            raise Unavailable(f"model {model!r}: every attempt met a lost replica ({type(last).__name__})")
        finally:
            with self._lock:
                pool.in_flight -= 1

    def _send(self, handle: Any, request: TailRequest, timeout_s: float) -> TailReply:
        """One attempt: through the front door's own loop (:class:`RayCalls`), or Serve's (Ray Client)."""
        if self._calls is None:
            return handle.remote(request).result(timeout_s=timeout_s)
        future = self._calls.submit(handle, request)
        try:
            return future.result(timeout=timeout_s)
        except TimeoutError:
            future.cancel()  # cancels the routing or the call on the loop
            raise

    # Status.

    def status(self) -> list[PoolStatus]:
        """Every model's pool: replicas by state, deployment status, this front door's counters."""
        with self._lock:
            return [
                PoolStatus(**{**vars(p), "replicas": dict(p.replicas), "decisions": list(self._decisions[p.model])})
                for p in self._pools.values()
            ]

    def pools(self) -> list[si_pb2.TailPool]:
        """:meth:`status` as ``GetInfo`` sends it (``cleave status --cloud``)."""
        return [
            si_pb2.TailPool(
                model=p.model,
                status=p.status,
                replicas=p.replicas,
                running=p.running,
                queue_depth=p.in_flight,
                requests=p.requests,
                retries=p.retries,
                failures=p.failures,
                message=p.message,
                decisions=[
                    si_pb2.ScalingDecision(
                        unix_time=d["time"],
                        from_replicas=d["from"],
                        to_replicas=d["to"],
                        status=d["status"],
                        trigger=d["trigger"],
                    )
                    for d in p.decisions
                ],
            )
            for p in self.status()
        ]

    def refresh(self) -> None:
        """Read ``serve.status()`` once; a change in running replicas is recorded as a scaling decision."""
        from ray import serve

        if self._lanes is not None:
            self._lanes.refresh()
        apps = serve.status().applications
        now = time.time()
        for model in self._pools:
            app = apps.get(app_name(self.settings, model))
            deployment = app.deployments.get(model) if app is not None else None
            if deployment is None:
                continue
            replicas = {str(getattr(k, "value", k)): int(v) for k, v in deployment.replica_states.items()}
            status = str(getattr(deployment.status, "value", deployment.status))
            with self._lock:
                pool = self._pools[model]
                before, after = pool.running, replicas.get("RUNNING", 0)
                if before != after and pool.status != "UNKNOWN":
                    trigger = str(getattr(deployment.status_trigger, "value", deployment.status_trigger))
                    self._decisions[model].append(
                        {"time": now, "from": before, "to": after, "status": status, "trigger": trigger}
                    )
                    log.info("ray: model %s: %d -> %d running replicas (%s, %s)", model, before, after, status, trigger)
                pool.replicas, pool.status, pool.message = replicas, status, deployment.message

    def _poll(self) -> None:
        while not self._stop.wait(self._poll_s):
            try:
                self.refresh()
            except Exception as exc:  # noqa: BLE001 - a controller hiccup must not end the poller
                log.warning("ray: status poll failed: %s", exc)

    def close(self) -> None:
        """Stop polling; tear Ray down only if this process started it (``local``)."""
        self._stop.set()
        self._poller.join(timeout=5)
        if self._lanes is not None:
            self._lanes.close()
        if self._calls is not None:
            self._calls.close(list(self._handles.values()))
        if self.local_ray is not None:
            self.local_ray.stop()


class RayDirectory:
    """The replicas' lane entries in Ray's key-value store (``KV_PREFIX`` + replica id) and their actors.

    Ray's key-value store has no public Python API; ``ray.experimental.internal_kv`` is what Serve
    and Ray's own libraries use for the same purpose.
    """

    def replicas(self, prefix: str) -> list[str]:
        from ray.experimental import internal_kv

        return [key.decode()[len(KV_PREFIX) :] for key in internal_kv._internal_kv_list(KV_PREFIX + prefix)]

    def entry(self, replica: str) -> bytes | None:
        from ray.experimental import internal_kv

        return internal_kv._internal_kv_get(KV_PREFIX + replica)

    def forget(self, replica: str) -> None:
        from ray.experimental import internal_kv

        internal_kv._internal_kv_del(KV_PREFIX + replica)

    def alive(self) -> set[str]:
        """Serve replica ids whose actor is alive (a replica's id is its actor's name)."""
        import ray

        actors = ray.util.list_named_actors(all_namespaces=True)
        return {a["name"] for a in actors if a["name"].startswith("SERVE_REPLICA::")}


class TailsCollector(Collector):
    """Prometheus gauges read when scraped: replicas per model and state, in-flight requests, retries."""

    def __init__(self, tails: RayTails) -> None:
        self.tails = tails

    def collect(self) -> Iterator[GaugeMetricFamily]:
        pools = self.tails.status()
        replicas = GaugeMetricFamily(
            "cleave_ray_replicas", "Replicas of each model's Ray Serve deployment, by state.", labels=["model", "state"]
        )
        in_flight = GaugeMetricFamily(
            "cleave_ray_in_flight", "This front door's requests now at each model's deployment.", labels=["model"]
        )
        retries = GaugeMetricFamily(
            "cleave_ray_retries", "Requests sent again after a replica died under them.", labels=["model"]
        )
        for pool in pools:
            for state in sorted(set(pool.replicas) | {"RUNNING"}):
                replicas.add_metric([pool.model, state], pool.replicas.get(state, 0))
            in_flight.add_metric([pool.model], pool.in_flight)
            retries.add_metric([pool.model], pool.retries)
        yield from (replicas, in_flight, retries)
