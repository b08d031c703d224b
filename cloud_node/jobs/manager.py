"""The job manager: queue limits, a pool of worker threads each driving one job process,
cancellation, crash recovery, and change notification for WatchJob.

Policy lives here; persistence in :mod:`.store`; the engines run in a spawned process per job
(:mod:`.worker`), so cancelling is killing that process and a crashing engine cannot take the
daemon with it.
"""

from __future__ import annotations

import json
import logging
import multiprocessing
import shutil
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

from protos.cleave.v1 import compression_pb2 as pb
from protos.errors import FailedPrecondition, InvalidArgument, NotFound, ResourceExhausted

from ..config import JobsConfig
from . import engines, models, uploads
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
from .worker import run_job

log = logging.getLogger(__name__)


class JobManager:
    def __init__(self, config: JobsConfig) -> None:
        if not config.dir:
            raise ValueError("jobs.dir: the job store needs a directory")
        if config.concurrency < 1:
            raise ValueError(f"jobs.concurrency: {config.concurrency} is not positive")
        self.config = config
        self.store = JobStore(config.dir)
        self._changed = threading.Condition()
        self._version = 0
        self._cancel: dict[str, threading.Event] = {}
        self._stopping = threading.Event()
        self._threads: list[threading.Thread] = []
        self._mp = multiprocessing.get_context("spawn")
        self.recover()

    # Life cycle.

    def recover(self) -> None:
        """After a crash: re-queue (or fail) what was running; check every finished job's artifacts."""
        for job in self.store.list_jobs([RUNNING], limit=1 << 30):
            shutil.rmtree(self.store.artifacts_dir / job.id, ignore_errors=True)
            if job.attempts < self.config.max_attempts:
                note = f"re-queued: the daemon stopped while the job was running (attempt {job.attempts})"
                self.store.update(job.id, state=QUEUED, progress=0.0, stage="queued", message=note)
            else:
                note = (
                    f"the daemon stopped while the job was running, {job.attempts} times "
                    f"(jobs.max_attempts is {self.config.max_attempts})"
                )
                self.store.update(job.id, state=FAILED, message=note, finished_at=time.time())
            log.warning("job %s: %s", job.id, note)
        for job in self.store.list_jobs([SUCCEEDED], limit=1 << 30):
            for a in job.artifacts:
                if not a.path.is_file() or a.path.stat().st_size != a.size or sha256_file(a.path) != a.sha256:
                    self.store.update(job.id, state=FAILED, message=f"artifact {a.name}: missing or corrupt on disk")
                    break

    def start(self) -> None:
        for i in range(self.config.concurrency):
            t = threading.Thread(target=self._worker, name=f"job-worker-{i}", daemon=True)
            t.start()
            self._threads.append(t)

    def stop(self) -> None:
        """Stop taking jobs; kill running job processes; they are re-queued for the next start."""
        self._stopping.set()
        for event in list(self._cancel.values()):
            event.set()
        self._notify()
        for t in self._threads:
            t.join(timeout=10)
        self.store.close()

    # Uploads and submissions.

    def upload(self, chunks) -> UploadRecord:
        return uploads.receive(self.store, chunks, self.config.max_upload_bytes)

    def submit(self, spec: pb.JobSpec) -> JobRecord:
        """Validate the spec, pick the engine, queue the job.

        Raises:
            InvalidArgument: a field of the spec is wrong. NotFound: an unknown upload.
            ResourceExhausted: the queue is full.
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
        # Check and insert under one lock so two submitters cannot both take the last slot.
        with self._changed:
            if self.store.count([QUEUED]) >= self.config.queue_limit:
                raise ResourceExhausted(f"queue: {self.config.queue_limit} jobs already queued (jobs.queue_limit)")
            job = self.store.insert_job(spec.SerializeToString(), engine)
        self._notify()
        return job

    def _model_kind(self, ref: pb.ModelRef) -> str:
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
                try:
                    json.loads(ref.config_json)
                except json.JSONDecodeError as exc:
                    raise InvalidArgument(f"spec.model.config_json: not JSON ({exc})") from None
            return "transformer"
        import torchvision

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
        if ref.WhichOneof("source") == "model_id":
            up = self.store.get_upload(ref.model_id)
            if up is None:
                raise NotFound(f"spec.model.model_id: upload {ref.model_id} is gone")
            source.upload_path, source.upload_format, source.upload_meta = str(up.path), up.format, up.meta
        payload = {
            "spec": job.spec,
            "engine": job.engine,
            "workdir": str(workdir),
            "source": source,
            "threads": self.config.job_threads,
            "sweep_parallelism": self.config.sweep_parallelism,
        }
        if spec.dataset_id:
            data = self.store.get_upload(spec.dataset_id)
            if data is not None:
                payload["dataset_path"] = str(data.path)
                payload["dataset_format"] = "npz" if data.format == "DATASET_NPZ" else "safetensors"
        return payload

    def _run(self, job: JobRecord) -> None:
        workdir = self.store.temp_path()
        workdir.mkdir()
        cancel = self._cancel.setdefault(job.id, threading.Event())
        parent, child = self._mp.Pipe(duplex=False)
        proc = self._mp.Process(target=run_job, args=(self._payload(job, workdir), child), daemon=False)
        try:
            proc.start()
            child.close()
            outcome = None
            while outcome is None:
                if cancel.is_set():
                    break
                if parent.poll(0.2):
                    try:
                        msg = parent.recv()
                    except EOFError:
                        outcome = ("error", f"the engine process exited with code {proc.exitcode}")
                        break
                    if msg[0] == "progress":
                        self.store.update(job.id, only_if=[RUNNING], progress=float(msg[1]), stage=str(msg[2]))
                        self._notify()
                    else:
                        outcome = msg
                elif not proc.is_alive() and not parent.poll(0):
                    outcome = ("error", f"the engine process exited with code {proc.exitcode}")
                elif self.store.get_job(job.id).state != RUNNING:
                    break  # cancelled between the claim and the cancel event's creation
            if outcome is None:  # cancelled (or the daemon is stopping)
                proc.kill()
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
            if outcome[0] == "error":
                if len(outcome) > 2:
                    log.warning("job %s failed:\n%s", job.id, outcome[2])
                self._fail(job.id, outcome[1])
                return
            _, produced, report = outcome
            records = []
            for name, media_type in produced:
                src = workdir / name
                dest = self.store.artifacts_dir / job.id / name
                size = src.stat().st_size
                records.append(ArtifactRecord(name, dest, size, publish(src, dest), media_type))
            if not self.store.finish(job.id, records, report):
                shutil.rmtree(self.store.artifacts_dir / job.id, ignore_errors=True)
        finally:
            proc.join(timeout=10)
            if proc.is_alive():
                proc.kill()
                proc.join()
            parent.close()
            self._cancel.pop(job.id, None)
            shutil.rmtree(workdir, ignore_errors=True)

    def _fail(self, job_id: str, message: str) -> None:
        self.store.update(job_id, only_if=[RUNNING], state=FAILED, message=message, finished_at=time.time())
