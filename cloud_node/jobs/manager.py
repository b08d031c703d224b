"""The job manager: queue limits, a pool of worker threads each driving one job process,
cancellation, crash recovery, change notification for WatchJob, per-client quotas, and retention.

Policy lives here; persistence in :mod:`.store`; the engines run in a spawned process per job
(:mod:`.worker`), sandboxed (:mod:`.sandbox`) and killed at ``jobs.sandbox.timeout_s``, so
cancelling is killing that process and a crashing (or hostile) engine cannot take the daemon with
it. With Ray jobs configured (``ray=``, :mod:`.ray_tasks`), a job runs as a Ray task on the cluster
instead, its files in a directory every node mounts; the job table stays here. A client is a bearer
token (by its hash) or, without one, the peer's address; each has quotas of queued + running jobs
and of stored uploads. Finished jobs and unused uploads are deleted by the
manager's own ``job-retention`` thread (``jobs.retention``).
"""

from __future__ import annotations

import json
import logging
import multiprocessing
import os
import shutil
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from protos.cleave.v1 import compression_pb2 as pb
from protos.errors import FailedPrecondition, InvalidArgument, NotFound, ResourceExhausted

from ..config import JobsConfig
from . import engines, models, uploads
from .datasets import DatasetLimits
from .sandbox import Limits
from .store import (
    CANCELLED,
    FAILED,
    QUEUED,
    RUNNING,
    SUCCEEDED,
    TERMINAL,
    ArtifactRecord,
    JobRecord,
    JobStore,
    UploadRecord,
    publish,
    sha256_file,
)
from .worker import inspect_model, receive, run_job

if TYPE_CHECKING:
    from .ray_tasks import RayJobs

log = logging.getLogger(__name__)


def store_id(root: str | Path) -> str:
    """The job store's id (made once, kept in ``<jobs.dir>/store-id``): its folder in a shared directory."""
    path = Path(root) / "store-id"
    if not path.is_file():
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        with open(tmp, "w") as f:
            f.write(uuid.uuid4().hex[:16])
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    return path.read_text().strip()


class JobManager:
    """Args: config: the ``jobs:`` section. ray: run jobs as Ray tasks (None: in local sandboxed processes)."""

    def __init__(self, config: JobsConfig, ray: RayJobs | None = None) -> None:
        if not config.dir:
            raise ValueError("jobs.dir: the job store needs a directory")
        if config.concurrency < 1:
            raise ValueError(f"jobs.concurrency: {config.concurrency} is not positive")
        self.config = config
        self.ray = ray
        shared = ray.root(store_id(config.dir)) if ray is not None else None
        self._work_dir = shared / "work" if shared is not None else None  # the jobs' scratch, on Ray
        self.store = JobStore(config.dir, shared / "artifacts" if shared is not None else None)
        self._changed = threading.Condition()
        self._version = 0
        self._cancel: dict[str, threading.Event] = {}  # running job -> its cancel event, under _cancel_lock
        self._cancel_lock = threading.Lock()
        self._stopping = threading.Event()
        self._threads: list[threading.Thread] = []
        self._mp = multiprocessing.get_context("spawn")
        box = config.sandbox
        self.limits = Limits(box.cpu_seconds, box.memory_bytes, box.file_bytes, box.open_files, box.isolate, box.user)
        self.dataset_limits = DatasetLimits(
            config.max_header_bytes, config.max_dataset_bytes, config.max_dataset_samples
        )
        self.policy = uploads.UploadPolicy(
            max_bytes=config.max_upload_bytes,
            allow_code=config.allow_code_uploads,
            max_header=config.max_header_bytes,
            max_num_classes=config.max_num_classes,
            max_parameters=config.max_model_parameters,
            dataset=self.dataset_limits,
        )
        self.recover()

    # Life cycle.

    def recover(self) -> None:
        """After a crash: re-queue (or fail) what was running; check every finished job's artifacts."""
        for job in self.store.list_jobs([RUNNING], limit=1 << 30):
            shutil.rmtree(self.store.artifacts_dir / job.id, ignore_errors=True)
            if self._work_dir is not None:
                shutil.rmtree(self._work_dir / job.id, ignore_errors=True)
            self._requeue_or_fail(job, "the daemon stopped while the job was running")
        for job in self.store.list_jobs([SUCCEEDED], limit=1 << 30):
            for a in job.artifacts:
                if not a.path.is_file() or a.path.stat().st_size != a.size or sha256_file(a.path) != a.sha256:
                    self.store.update(job.id, state=FAILED, message=f"artifact {a.name}: missing or corrupt on disk")
                    break
        for what in self.store.reconcile():
            log.warning("job store: removed %s", what)

    def start(self) -> None:
        """Start the job workers (``jobs.concurrency``) and the retention thread; :meth:`close` stops them."""
        for i in range(self.config.concurrency):
            t = threading.Thread(target=self._worker, name=f"job-worker-{i}", daemon=True)
            t.start()
            self._threads.append(t)
        t = threading.Thread(target=self._retention_loop, name="job-retention", daemon=True)
        t.start()
        self._threads.append(t)

    def close(self) -> None:
        """Stop taking jobs; kill running job processes; they are re-queued for the next start."""
        self._stopping.set()
        with self._cancel_lock:
            events = list(self._cancel.values())
        for event in events:
            event.set()
        self._notify()
        for t in self._threads:
            t.join(timeout=10)
        self.store.close()

    # Uploads and submissions.

    def upload(self, chunks, client: str = "") -> UploadRecord:
        """Receive, check and store an upload for ``client`` (see :func:`.uploads.receive`)."""
        inspect = self._inspect_code if self.config.allow_code_uploads else None
        return uploads.receive(
            self.store,
            chunks,
            self.policy,
            client=client,
            admit=lambda n: self._admit_upload(client, n),
            inspect_code=inspect,
        )

    def _admit_upload(self, client: str, size: int) -> None:
        """Raise ResourceExhausted when ``size`` more bytes would break an upload quota."""
        c = self.config
        count, used = self.store.upload_usage()
        if count + 1 > c.max_uploads or used + size > c.max_upload_store_bytes:
            raise ResourceExhausted(
                f"uploads: the store holds {count} uploads, {used} bytes "
                f"(jobs.max_uploads {c.max_uploads}, jobs.max_upload_store_bytes {c.max_upload_store_bytes})"
            )
        count, used = self.store.upload_usage(client)
        if count + 1 > c.max_uploads_per_client or used + size > c.max_upload_bytes_per_client:
            raise ResourceExhausted(
                f"uploads: this client has {count} uploads, {used} bytes (jobs.max_uploads_per_client "
                f"{c.max_uploads_per_client}, jobs.max_upload_bytes_per_client {c.max_upload_bytes_per_client})"
            )

    def submit(self, spec: pb.JobSpec, client: str = "") -> JobRecord:
        """Validate the spec, pick the engine, queue the job.

        Raises:
            InvalidArgument: a field of the spec is wrong. NotFound: an unknown upload.
            ResourceExhausted: the queue is full, the client has its quota of jobs, or a sweep's
                grid is over ``jobs.max_sweep_points``.
        """
        kind = self._model_kind(spec.model)
        if spec.dataset_id:
            data = self.store.get_upload(spec.dataset_id)
            if data is None or data.kind != "dataset":
                raise NotFound(f"spec.dataset_id: no dataset {spec.dataset_id!r}")
        try:
            engine = engines.dispatch(spec.engine, kind)
        except ValueError as exc:
            raise InvalidArgument(f"spec.{exc}") from None
        p = spec.prune
        if engine in ("prune_cnn", "sweep") and not 0.0 <= p.ratio < 1.0:
            raise InvalidArgument(f"spec.prune.ratio: {p.ratio} is not in [0, 1)")
        if engine == "prune_transformer":
            for name in ("head_ratio", "ffn_ratio"):
                if not 0.0 <= getattr(p, name) < 1.0:
                    raise InvalidArgument(f"spec.prune.{name}: {getattr(p, name)} is not in [0, 1)")
        if engine == "quantize" and spec.quantize.bits not in (0, 2, 3, 4, 5, 6, 8):
            raise InvalidArgument(f"spec.quantize.bits: {spec.quantize.bits} is not one of 2,3,4,5,6,8")
        clip = spec.quantize.clip
        if engine in ("quantize", "sweep") and clip and clip != "lapq":  # a typo failed the job once it ran
            from compressor.clipping import clipper_names

            if clip not in clipper_names():
                known = ", ".join(["lapq", *clipper_names()])
                raise InvalidArgument(f"spec.quantize.clip: {clip!r} is not one of {known}")
        if engine == "sweep":
            self._check_sweep(spec.sweep)
        if engine == "bottleneck":
            from .bottleneck_engine import check_options

            try:
                check_options(spec.bottleneck)
            except ValueError as exc:
                raise InvalidArgument(f"spec.{exc}") from None
        # Check and insert under one lock so two submitters cannot both take the last slot.
        with self._changed:
            if self.store.count([QUEUED]) >= self.config.queue_limit:
                raise ResourceExhausted(f"queue: {self.config.queue_limit} jobs already queued (jobs.queue_limit)")
            mine = self.store.count([QUEUED, RUNNING], client)
            if mine >= self.config.max_jobs_per_client:
                raise ResourceExhausted(
                    f"queue: this client has {mine} jobs queued or running (jobs.max_jobs_per_client)"
                )
            job = self.store.insert_job(spec.SerializeToString(), engine, client)
        self._notify()
        return job

    def _check_sweep(self, sweep: pb.SweepOptions) -> None:
        points = (len(sweep.ratios) or 3) * (len(sweep.bits) or 2)
        if points > self.config.max_sweep_points:
            raise ResourceExhausted(
                f"spec.sweep: {points} grid points (ratios x bits) is over jobs.max_sweep_points "
                f"({self.config.max_sweep_points})"
            )

    def sweep_parallelism(self, spec: pb.JobSpec) -> int:
        """The processes a sweep gets: what it asks (or jobs.sweep_parallelism), at most the cap."""
        cap = self.config.max_sweep_parallelism or os.cpu_count() or 1
        return max(1, min(spec.sweep.parallelism or self.config.sweep_parallelism, cap))

    def _model_kind(self, ref: pb.ModelRef) -> str:
        if ref.num_classes > self.config.max_num_classes:
            raise InvalidArgument(
                f"spec.model.num_classes: {ref.num_classes} is over {self.config.max_num_classes} "
                "(jobs.max_num_classes)"
            )
        if len(ref.input_shape) > 8 or any(not 0 < d <= 1 << 16 for d in ref.input_shape):
            raise InvalidArgument(
                f"spec.model.input_shape: {list(ref.input_shape)[:10]} is not up to 8 sizes in 1..65536"
            )
        which = ref.WhichOneof("source")
        if which is None:
            raise InvalidArgument("spec.model: give model_id, torchvision or transformer")
        if which == "model_id":
            up = self.store.get_upload(ref.model_id)
            if up is None or up.kind == "dataset":
                raise NotFound(f"spec.model.model_id: no model {ref.model_id!r}")
            return up.kind
        if which == "transformer":
            if ref.transformer not in ("bert", "roberta", "distilbert", "gpt2"):
                raise InvalidArgument(
                    f"spec.model.transformer: {ref.transformer!r} is not bert, roberta, distilbert or gpt2"
                )
            if ref.config_json:
                if len(ref.config_json) > 64 << 10:
                    raise InvalidArgument("spec.model.config_json: over 64 KiB")
                try:
                    models.check_config(json.loads(ref.config_json), "spec.model.config_json")
                except json.JSONDecodeError as exc:
                    raise InvalidArgument(f"spec.model.config_json: not JSON ({exc})") from None
                except ValueError as exc:
                    raise InvalidArgument(str(exc)) from None
            return "transformer"
        import torchvision

        from partitioner.spec import PRETRAINED_SOURCES

        if ref.torchvision in PRETRAINED_SOURCES:  # built from an installed package, never downloaded
            return "cnn"
        if ref.torchvision not in torchvision.models.list_models():
            raise InvalidArgument(f"spec.model.torchvision: unknown torchvision model {ref.torchvision!r}")
        return "cnn"

    # Queries.

    def get(self, job_id: str) -> JobRecord:
        job = self.store.get_job(job_id)
        if job is None:
            raise NotFound(f"job_id: no job {job_id!r}")
        return job

    def list(self, states: list[str], limit: int) -> list[JobRecord]:
        return self.store.list_jobs(states, limit or 100)

    def cancel(self, job_id: str) -> JobRecord:
        job = self.get(job_id)
        if job.state in TERMINAL:
            raise FailedPrecondition(f"job_id: job {job_id} is already {job.state}")
        now = time.time()
        if self.store.update(job_id, only_if=[QUEUED, RUNNING], state=CANCELLED, stage="cancelled", finished_at=now):
            with self._cancel_lock:
                event = self._cancel.get(job_id)
            if event is not None:
                event.set()
        self._notify()
        return self.get(job_id)

    def watch(self, job_id: str, active: Callable[[], bool] = lambda: True) -> Iterator[JobRecord]:
        """Yield the job now and on every change, until it is finished or the caller goes away."""
        last = None
        while active() and not self._stopping.is_set():
            with self._changed:
                version = self._version
            job = self.get(job_id)
            key = (job.state, round(job.progress, 4), job.stage, job.message)
            if key != last:
                last = key
                yield job
            if job.state in TERMINAL:
                return
            with self._changed:
                if self._version == version:
                    self._changed.wait(timeout=0.5)

    def artifact(self, job_id: str, name: str) -> ArtifactRecord:
        job = self.get(job_id)
        if job.state != SUCCEEDED:
            raise FailedPrecondition(f"job_id: job {job_id} is {job.state}, not SUCCEEDED")
        for a in job.artifacts:
            if a.name == name or not name:
                return a
        raise NotFound(
            f"artifact: job {job_id} has no artifact {name!r} (it has {', '.join(a.name for a in job.artifacts)})"
        )

    # Running.

    def _notify(self) -> None:
        with self._changed:
            self._version += 1
            self._changed.notify_all()

    def _worker(self) -> None:
        while not self._stopping.is_set():
            job = self.store.claim_next()
            if job is None:
                with self._changed:
                    self._changed.wait(timeout=0.5)
                continue
            self._notify()
            try:
                self._run(job)
            except Exception as exc:  # noqa: BLE001 - the job fails, the worker goes on
                log.exception("job %s", job.id)
                self._fail(job.id, f"internal error: {type(exc).__name__}: {exc}")
            self._notify()

    @staticmethod
    def _link_input(src: Path, inputs: Path, name: str) -> str:
        """A hard link (a copy across file systems) of an upload in the job's ``in/``; its relative path."""
        inputs.mkdir(exist_ok=True)
        dest = inputs / name
        try:
            os.link(src, dest)
        except OSError:
            shutil.copyfile(src, dest)
        return f"in/{name}"

    def _payload(self, job: JobRecord, workdir: Path) -> dict:
        spec = pb.JobSpec.FromString(job.spec)
        ref = spec.model
        source = models.ModelSource(
            torchvision=ref.torchvision,
            transformer=ref.transformer,
            config=json.loads(ref.config_json) if ref.config_json else None,
            input_shape=tuple(ref.input_shape),
            num_classes=ref.num_classes,
            seed=ref.seed,
        )
        code = False
        if ref.WhichOneof("source") == "model_id":
            up = self.store.get_upload(ref.model_id)
            if up is None:
                raise NotFound(f"spec.model.model_id: upload {ref.model_id} is gone")
            if up.format in uploads.CODE_FORMATS and not self.config.allow_code_uploads:
                raise FailedPrecondition(f"spec.model.model_id: {up.format} models need jobs.allow_code_uploads")
            code = up.format in uploads.CODE_FORMATS
            rel = self._link_input(up.path, workdir / "in", "model" + up.path.suffix)
            source.upload_path, source.upload_format, source.upload_meta = rel, up.format, up.meta
        payload = {
            "spec": job.spec,
            "engine": job.engine,
            "workdir": str(workdir),
            "source": source,
            "code": code,
            "limits": self.limits,
            "threads": self.config.job_threads,
            "sweep_parallelism": self.sweep_parallelism(spec),
            "dataset_limits": self.dataset_limits,
        }
        if spec.dataset_id:
            data = self.store.get_upload(spec.dataset_id)
            if data is not None:
                payload["dataset_path"] = self._link_input(data.path, workdir / "in", "dataset" + data.path.suffix)
                payload["dataset_format"] = "npz" if data.format == "DATASET_NPZ" else "safetensors"
        return payload

    def _inspect_code(self, path: Path, fmt: str, meta: dict[str, Any]) -> str:
        """Open a code upload in a sandboxed process; its kind, or InvalidArgument."""
        workdir = self.store.temp_path()
        workdir.mkdir()
        try:
            rel = self._link_input(path, workdir / "in", "model" + path.suffix)
            source = models.ModelSource(upload_path=rel, upload_format=fmt, upload_meta=meta)
            payload = {"workdir": str(workdir), "source": source, "code": True, "limits": self.limits}
            outcome = self._supervise(inspect_model, payload, None, self.config.sandbox.inspect_timeout_s)
        finally:
            shutil.rmtree(workdir, ignore_errors=True)
        if outcome is None or outcome[0] != "done":
            why = str(outcome[1])[:300] if outcome and len(outcome) > 1 else "cancelled"
            raise InvalidArgument(f"data: not a loadable {fmt} archive ({why})")
        if len(outcome) < 2 or outcome[1] not in ("cnn", "transformer", "model"):
            raise InvalidArgument(f"data: not a loadable {fmt} archive (no kind)")
        return outcome[1]

    def _supervise(
        self,
        target: Callable,
        payload: dict,
        cancel: threading.Event | None,
        timeout_s: float,
        on_message: Callable[[tuple], None] = lambda _m: None,
        still_wanted: Callable[[], bool] = lambda: True,
    ) -> tuple | None:
        """Run ``target(payload, conn)`` in a spawned process until it answers ("done"/"error"),
        exits, times out (an "error"), or ``cancel`` is set / ``still_wanted()`` turns false (None).
        The process is killed on the way out whatever happened."""
        parent, child = self._mp.Pipe(duplex=False)
        proc = self._mp.Process(target=target, args=(payload, child), daemon=False)
        deadline = time.monotonic() + timeout_s if timeout_s > 0 else float("inf")
        answered = False  # the process sent its outcome and is expected to exit by itself
        try:
            proc.start()
            child.close()
            while True:
                if (cancel is not None and cancel.is_set()) or self._stopping.is_set():
                    return None
                if time.monotonic() > deadline:
                    return ("error", f"timed out after {timeout_s:g} s (jobs.sandbox.timeout_s)")
                if parent.poll(0.2):
                    try:
                        msg = receive(parent)
                    except EOFError:
                        return ("error", f"the engine process exited with code {proc.exitcode}")
                    except (OSError, ValueError):
                        return ("error", "the engine process sent a malformed message")
                    if not msg or msg[0] not in ("progress", "done", "error"):
                        return ("error", "the engine process sent a malformed message")
                    if msg[0] == "progress":
                        on_message(msg)
                    else:
                        answered = True
                        return msg
                elif not proc.is_alive() and not parent.poll(0):
                    return ("error", f"the engine process exited with code {proc.exitcode}")
                elif not still_wanted():
                    return None
        finally:
            if answered:
                proc.join(timeout=10)
            if proc.is_alive():
                proc.kill()
            proc.join()
            parent.close()

    def _run(self, job: JobRecord) -> None:
        if self._work_dir is None:
            workdir = self.store.temp_path()
        else:  # where every node sees it; a crashed attempt's leftovers go first
            workdir = self._work_dir / job.id
            shutil.rmtree(workdir, ignore_errors=True)
            workdir.parent.mkdir(parents=True, exist_ok=True)
        workdir.mkdir()
        with self._cancel_lock:
            cancel = self._cancel.setdefault(job.id, threading.Event())

        def progress(msg: tuple) -> None:
            self.store.update(job.id, only_if=[RUNNING], progress=float(msg[1]), stage=str(msg[2])[:200])
            self._notify()

        still_wanted = lambda: self.store.get_job(job.id).state == RUNNING  # noqa: E731 - cancelled before the event existed
        try:
            payload = self._payload(job, workdir)
            timeout_s = self.config.sandbox.timeout_s
            if self.ray is not None:
                outcome = self.ray.supervise(payload, cancel, timeout_s, progress, still_wanted, self._stopping)
            else:
                outcome = self._supervise(run_job, payload, cancel, timeout_s, progress, still_wanted)
            if outcome is None:  # cancelled (or the daemon is stopping)
                if self._stopping.is_set() and self.store.get_job(job.id).state == RUNNING:
                    self.store.update(
                        job.id,
                        only_if=[RUNNING],
                        state=QUEUED,
                        progress=0.0,
                        stage="queued",
                        message="re-queued: the daemon shut down",
                        attempts=job.attempts - 1,  # a clean shutdown is not the job's fault
                    )
                return
            if outcome[0] == "lost":  # a Ray job's worker or node died under it: like a daemon crash
                self._requeue_or_fail(job, str(outcome[1]))
                return
            if outcome[0] == "error":
                if len(outcome) > 2:
                    log.warning("job %s failed:\n%s", job.id, outcome[2])
                self._fail(job.id, str(outcome[1])[:1000] if len(outcome) > 1 else "failed")
                return
            _, produced, report = outcome
            records = []
            for name, media_type in produced:
                # The job process is not trusted with paths: a plain name of a regular file in out/.
                if not isinstance(name, str) or name in ("", ".", "..") or "/" in name or "\0" in name:
                    raise RuntimeError(f"artifact name {str(name)[:100]!r} is not a plain file name")
                src = workdir / "out" / name
                if src.is_symlink() or not src.is_file():
                    raise RuntimeError(f"artifact {name!r} is not a regular file")
                dest = self.store.artifacts_dir / job.id / name
                size = src.stat().st_size
                records.append(ArtifactRecord(name, dest, size, publish(src, dest), media_type))
            if not self.store.finish(job.id, records, report):
                shutil.rmtree(self.store.artifacts_dir / job.id, ignore_errors=True)
        finally:
            with self._cancel_lock:
                self._cancel.pop(job.id, None)
            shutil.rmtree(workdir, ignore_errors=True)

    # Retention.

    def _retention_loop(self) -> None:
        while not self._stopping.wait(self.config.retention.interval_s):
            try:
                self.enforce_retention()
            except Exception:  # noqa: BLE001 - retention must not die; it tries again next round
                log.exception("job retention")

    def enforce_retention(self, now: float | None = None) -> list[str]:
        """Delete finished jobs (rows and artifacts) and unused uploads past ``jobs.retention``;
        returns what was deleted. Uploads a queued or running job names are kept."""
        r = self.config.retention
        now = time.time() if now is None else now
        deleted = []
        for i, (job_id, finished_at) in enumerate(self.store.finished_jobs()):
            too_old = r.max_age_s > 0 and now - finished_at > r.max_age_s
            if too_old or (r.max_jobs > 0 and i >= r.max_jobs):
                self.store.delete_job(job_id)
                deleted.append(job_id)
        in_use = set()
        for job in self.store.list_jobs([QUEUED, RUNNING], limit=1 << 30):
            spec = pb.JobSpec.FromString(job.spec)
            in_use.update({spec.model.model_id, spec.dataset_id})
        for i, up in enumerate(self.store.uploads()):
            too_old = r.max_age_s > 0 and now - up.created_at > r.max_age_s
            if up.id not in in_use and (too_old or (r.max_uploads > 0 and i >= r.max_uploads)):
                self.store.delete_upload(up.id)
                deleted.append(up.id)
        if deleted:
            log.info("retention: deleted %d finished jobs and uploads", len(deleted))
        return deleted

    def _requeue_or_fail(self, job: JobRecord, why: str) -> None:
        """A running job lost through no fault of its engine: queued again, or failed after jobs.max_attempts."""
        if job.attempts < self.config.max_attempts:
            note = f"re-queued: {why} (attempt {job.attempts})"
            self.store.update(job.id, only_if=[RUNNING], state=QUEUED, progress=0.0, stage="queued", message=note)
        else:
            note = f"{why}, {job.attempts} times (jobs.max_attempts is {self.config.max_attempts})"
            self.store.update(job.id, only_if=[RUNNING], state=FAILED, message=note, finished_at=time.time())
        log.warning("job %s: %s", job.id, note)

    def _fail(self, job_id: str, message: str) -> None:
        self.store.update(job_id, only_if=[RUNNING], state=FAILED, message=message, finished_at=time.time())
