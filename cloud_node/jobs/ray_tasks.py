"""Compression jobs as Ray tasks, so a cluster's nodes share the work (docs/ray-cluster.md).

With Ray jobs on, the manager still owns the job table (SQLite, crash-safe as always), but a
job's engine runs in a Ray task declared with ``num_cpus`` and ``memory`` instead of a sandboxed
process on this machine, and a sweep's grid points run as Ray tasks of their own
(:class:`RayTasks`), which Ray places on whichever nodes have those resources free.

Files travel through a directory every node mounts (``artifact_dir``): the manager links the
job's inputs into ``<dir>/<store>/work/<job>/in``, the task writes its artifacts to ``.../out`` and its
progress to ``.../progress.json``, and the manager publishes the artifacts into
``<dir>/<store>/artifacts/<job>`` and records them (``<store>``: the job store's id, so that
several daemons can share one directory). Cancelling, the time limit and a daemon shutdown
are ``ray.cancel(force=True)`` of the task and the points it started.

Isolation: a Ray task is a process of the cluster's own user with the cluster's network, not the
local sandbox (no namespaces, no rlimits). So models that are code (TorchScript, ``.pt2``) are
refused on this path; every other upload still loads only through the safe loaders
(safetensors, ``weights_only`` tensors, ONNX), as in the sandbox.

Nothing here imports Ray at module level: the daemon imports this module only when configured
for Ray jobs, and a machine without Ray runs jobs exactly as before.
"""

from __future__ import annotations

import json
import os
import threading
import time
from collections.abc import Callable, Generator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..ray_backend import before_ray_import

before_ray_import()  # the daemon keeps SIGTERM (drains) when a job is what loads Ray

if TYPE_CHECKING:
    from ..config import RaySettings

PROGRESS_FILE = "progress.json"


@dataclass(frozen=True)
class RayResources:
    """What each job task and each evaluation task declares to Ray's scheduler."""

    num_cpus: float = 1.0
    memory_bytes: int = 0  # 0: nothing declared (Ray then schedules on CPUs alone)

    def remote_options(self) -> dict[str, Any]:
        # max_calls=1: a fresh worker process per task, so nothing a job loaded stays behind
        # in a worker that Ray would hand to the next job (perhaps another client's).
        options: dict[str, Any] = {"num_cpus": self.num_cpus, "max_calls": 1}
        if self.memory_bytes > 0:
            options["memory"] = self.memory_bytes
        return options


def _remote(fn: Callable[..., Any], resources: RayResources, **extra: Any) -> Any:
    import ray

    return ray.remote(**resources.remote_options(), **extra)(fn)


class RayTasks:
    """A sweep's evaluations as Ray tasks, one per point, all submitted at once: the cluster's
    free resources, not a pool size, bound how many run together. Implements
    :class:`.executor.Evaluations`."""

    name = "ray"

    def __init__(self, resources: RayResources) -> None:
        self.resources = resources

    def map(self, fn: Callable[..., Any], calls: Sequence[tuple]) -> Generator[Any, None, None]:
        import ray

        task = _remote(fn, self.resources)
        refs = [task.remote(*args) for args in calls]
        try:
            for ref in refs:
                yield ray.get(ref)
        finally:
            for ref in refs:  # a no-op for the finished ones
                ray.cancel(ref, force=True)


def _write_progress(workdir: Path, fraction: float, stage: str) -> None:
    tmp = workdir / (PROGRESS_FILE + ".tmp")
    tmp.write_text(json.dumps([fraction, stage]))
    os.replace(tmp, workdir / PROGRESS_FILE)


def run_job_task(payload: dict[str, Any]) -> str:
    """The Ray task: one job's engine, its sweep points as further Ray tasks. Returns the outcome
    as JSON, ``["done", artifacts, report]`` or ``["error", message, traceback]``, like the
    sandboxed process's last message."""
    import traceback

    from .worker import execute

    workdir = Path(payload["workdir"])
    try:
        if payload.get("code"):
            raise PermissionError(
                "jobs.allow_code_uploads: this model is code (TorchScript/.pt2) and Ray tasks are not "
                "sandboxed; run such jobs with Ray jobs off"
            )
        resources = RayResources(**payload["ray_resources"])
        artifacts, report = execute(
            payload,
            workdir,
            lambda f, s: _write_progress(workdir, f, s),
            evaluations=RayTasks(resources),
            confinement=["ray task", f"num_cpus={resources.num_cpus}", f"memory={resources.memory_bytes}"],
        )
        return json.dumps(["done", artifacts, report])
    except Exception as exc:  # noqa: BLE001 - every failure becomes the job's message
        first = str(exc).splitlines()[0] if str(exc) else ""
        return json.dumps(["error", f"{type(exc).__name__}: {first}", traceback.format_exc()])


class RayJobs:
    """Runs the manager's jobs as Ray tasks (see the module's doc).

    Args:
        artifact_dir: the directory every node of the cluster mounts at the same path.
        resources: what each job task and each sweep point declares.
        address: for ``ray.init`` when this process has not joined Ray yet (``None``/``""``:
            Ray's own default, ``RAY_ADDRESS`` or a new local instance; ``local``; ``auto``;
            ``ray://...``).
        init_options: more keyword arguments for that ``ray.init`` (a local instance's bounds).
    """

    name = "ray"

    def __init__(
        self,
        artifact_dir: str | Path,
        resources: RayResources,
        address: str | None = None,
        init_options: dict[str, Any] | None = None,
    ) -> None:
        if not str(artifact_dir):
            raise ValueError("ray.artifact_dir: Ray jobs need a directory every node can reach")
        if resources.num_cpus <= 0:
            raise ValueError(f"ray.job_num_cpus: {resources.num_cpus} is not positive")
        if resources.memory_bytes < 0:
            raise ValueError(f"ray.job_memory_mb: {resources.memory_bytes >> 20} is negative")
        self.artifact_dir = Path(artifact_dir).absolute()
        self.resources = resources
        self.address = address or None
        self.init_options = dict(init_options or {})
        self._lock = threading.Lock()
        self._task: Any = None

    def root(self, store_id: str) -> Path:
        """This job store's part of the shared directory: ``<artifact_dir>/<store id>``, so that
        several daemons may share one ``artifact_dir`` without touching each other's files."""
        return self.artifact_dir / store_id

    def _job_task(self) -> Any:
        import ray

        with self._lock:
            if not ray.is_initialized():
                ray.init(address=self.address, ignore_reinit_error=True, log_to_driver=False, **self.init_options)
            if self._task is None:
                # No Ray-level retries: the manager's own policy (jobs.max_attempts) decides.
                self._task = _remote(run_job_task, self.resources, max_retries=0)
            return self._task

    def supervise(
        self,
        payload: dict[str, Any],
        cancel: threading.Event | None,
        timeout_s: float,
        on_message: Callable[[tuple], None],
        still_wanted: Callable[[], bool],
        stopping: threading.Event,
    ) -> tuple | None:
        """Run the job as a Ray task until it answers, fails, times out (an ``("error", ...)``), or
        ``cancel``/``stopping`` is set or ``still_wanted()`` turns false (None); the same contract
        as the manager's local supervisor, plus ``("lost", why)`` when the task's worker or node
        died (the manager re-queues the job, as after a crash of its own). The task and its
        evaluations are cancelled on the way out unless the task finished."""
        import ray

        payload = {
            **payload,
            "ray_resources": {"num_cpus": self.resources.num_cpus, "memory_bytes": self.resources.memory_bytes},
        }
        ref = self._job_task().remote(payload)
        progress = Path(payload["workdir"]) / PROGRESS_FILE
        deadline = time.monotonic() + timeout_s if timeout_s > 0 else float("inf")
        seen: Any = None
        finished = False
        try:
            while True:
                if (cancel is not None and cancel.is_set()) or stopping.is_set():
                    return None
                if time.monotonic() > deadline:
                    return ("error", f"timed out after {timeout_s:g} s (jobs.sandbox.timeout_s)")
                ready, _ = ray.wait([ref], timeout=0.2)
                seen = self._progress(progress, seen, on_message)
                if ready:
                    finished = True
                    return self._outcome(ref)
                if not still_wanted():
                    return None
        finally:
            if not finished:
                ray.cancel(ref, force=True, recursive=True)

    @staticmethod
    def _progress(path: Path, seen: Any, on_message: Callable[[tuple], None]) -> Any:
        try:
            now = json.loads(path.read_text())
        except (OSError, ValueError):
            return seen  # not written yet, or being replaced
        if now != seen and isinstance(now, list) and len(now) == 2:
            on_message(("progress", float(now[0]), str(now[1])))
        return now

    @staticmethod
    def _outcome(ref: Any) -> tuple:
        import ray

        lost = (ray.exceptions.WorkerCrashedError, ray.exceptions.NodeDiedError, ray.exceptions.LocalRayletDiedError)
        try:
            answer = ray.get(ref)
        except lost as exc:  # not the job's doing, as far as anyone can tell: the manager re-queues it
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
            return ("lost", f"the Ray task's worker or node died ({type(exc).__name__}: {first[:200]})")
        except ray.exceptions.RayError as exc:  # the worker or its node died, out of memory, ...
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
            return ("error", f"the Ray task failed: {type(exc).__name__}: {first[:300]}")
        try:
            msg = tuple(json.loads(answer))
        except (TypeError, ValueError):
            return ("error", "the Ray task sent a malformed answer")
        if not msg or msg[0] not in ("done", "error"):
            return ("error", "the Ray task sent a malformed answer")
        return msg


def ray_jobs_for(settings: RaySettings, jobs_dir: str) -> RayJobs | None:
    """The :class:`RayJobs` that ``cloud.yaml``'s ``ray:`` section asks for (``ray.jobs.jobs_enabled``),
    or None: jobs then run in local sandboxed processes and Ray is never imported.

    Raises:
        SettingsError: Ray jobs are on but ``ray.address`` is not set.
    """
    from runtime.settings import SettingsError

    jobs = settings.jobs
    if not jobs.jobs_enabled:
        return None
    if not settings.address:
        raise SettingsError("ray.jobs.jobs_enabled: Ray jobs need ray.address (local, auto or ray://HOST:PORT)")
    init: dict[str, Any] = {}
    if settings.address == "local":  # a Ray instance on this machine, within the operator's bounds
        init["include_dashboard"] = False
        if settings.local_num_cpus:
            init["num_cpus"] = settings.local_num_cpus
        if settings.local_object_store_mb:
            init["object_store_memory"] = settings.local_object_store_mb << 20
    return RayJobs(
        jobs.artifact_dir or jobs_dir,  # empty: the job store's own directory (one machine)
        RayResources(num_cpus=jobs.job_num_cpus, memory_bytes=jobs.job_memory_mb << 20),
        address=settings.address,
        init_options=init,
    )
