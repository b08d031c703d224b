"""The compression jobs as a REST API (``/api/v1/...``), over the same :class:`JobManager` as gRPC.

- ``POST /api/v1/uploads?format=SAFETENSORS&architecture=resnet18&...``: the file is the request
  body, streamed (``Content-Length`` or chunked). The query is the gRPC ``UploadHeader``; it is
  checked, and the quotas applied, before a byte of the body is read (``Content-Length`` is the
  announced ``total_bytes``), then the bytes stream into the same :func:`cloud_node.jobs.uploads.receive`.
- ``POST /api/v1/jobs``: a ``JobSpec`` in protobuf's JSON mapping; ``GET /api/v1/jobs[?state=...]``,
  ``GET /api/v1/jobs/{id}``, ``POST /api/v1/jobs/{id}/cancel``.
- ``GET /api/v1/jobs/{id}/events``: server-sent events, one ``job`` event per change until it ends.
- ``GET /api/v1/jobs/{id}/artifacts/{name}``: the file, with ``Range`` (resume), ``ETag`` and
  ``X-Content-SHA256`` (the whole file's sha256, hex).
"""

from __future__ import annotations

import json
import threading
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Annotated, Any

import anyio
from fastapi import APIRouter, Query, Request
from fastapi.responses import FileResponse, StreamingResponse
from google.protobuf import json_format

from protos.cleave.v1 import compression_pb2 as pb
from protos.errors import InvalidArgument

from .app import Backends, client_of, read_body

if TYPE_CHECKING:
    from ..jobs.store import JobRecord

MAX_SPEC_BYTES = 1 << 20


def job_json(job: JobRecord) -> dict[str, Any]:
    """A job as the REST API and the console show it (the gRPC ``Job``'s fields, report parsed)."""
    try:
        report = json.loads(job.report) if job.report else None
    except json.JSONDecodeError:
        report = job.report
    return {
        "id": job.id,
        "state": job.state,
        "progress": job.progress,
        "stage": job.stage,
        "message": job.message,
        "engine": job.engine,
        "spec": json_format.MessageToDict(pb.JobSpec.FromString(job.spec), preserving_proto_field_name=True),
        "artifacts": [
            {"name": a.name, "size_bytes": a.size, "sha256": a.sha256, "media_type": a.media_type}
            for a in job.artifacts
        ],
        "report": report,
        "created_at": job.created_at,
        "started_at": job.started_at,
        "finished_at": job.finished_at,
        "attempts": job.attempts,
    }


def router(backends: Backends, enabled: bool) -> APIRouter:
    r = APIRouter(prefix="/api/v1", tags=["Compression jobs"])

    @r.post("/uploads", summary="Upload a model or dataset: the file is the body (streamed)")
    async def upload(
        request: Request,
        format: str = Query(description="SAFETENSORS, DATASET_NPZ, DATASET_SAFETENSORS, TORCHSCRIPT, EXPORTED_PROGRAM"),
        name: str = "",
        architecture: str = "",
        config_json: str = "",
        num_classes: int = 0,
        input_shape: str = Query("", description="one input batch's shape, e.g. 1,3,224,224"),
        sha256: str = "",
    ) -> dict:
        jobs = backends.need_jobs(enabled)
        try:
            shape = [int(d) for d in input_shape.split(",")] if input_shape else []
        except ValueError:
            raise InvalidArgument(f"input_shape: {input_shape!r} is not comma-separated integers") from None
        if format not in pb.UploadFormat.keys()[1:]:
            raise InvalidArgument(f"format: {format!r} is not one of {', '.join(pb.UploadFormat.keys()[1:])}")
        declared = request.headers.get("content-length", "")
        header = pb.UploadHeader(
            name=name,
            format=pb.UploadFormat.Value(format),
            architecture=architecture,
            config_json=config_json,
            num_classes=max(num_classes, 0),
            input_shape=shape,
            total_bytes=int(declared) if declared.isdigit() else 0,
            sha256=sha256,
        )
        stream = request.stream().__aiter__()

        async def next_chunk() -> bytes | None:
            try:
                return await stream.__anext__()
            except StopAsyncIteration:
                return None

        def chunks():  # runs in a worker thread; pulls the body from the loop one chunk at a time
            yield pb.UploadChunk(header=header)
            while (data := anyio.from_thread.run(next_chunk)) is not None:
                if data:
                    yield pb.UploadChunk(data=data)

        who = client_of(request)
        record = await anyio.to_thread.run_sync(lambda: jobs.upload(chunks(), who))
        return {"id": record.id, "size_bytes": record.size, "sha256": record.sha256, "kind": record.kind}

    @r.post("/jobs", summary="Submit a job: a JobSpec in protobuf's JSON mapping", status_code=201)
    async def submit(request: Request) -> dict:
        jobs = backends.need_jobs(enabled)
        body = await read_body(request, MAX_SPEC_BYTES, "a job spec")
        try:
            spec = json_format.Parse(body or b"{}", pb.JobSpec())
        except json_format.ParseError as exc:
            raise InvalidArgument(f"spec: {exc}") from None
        who = client_of(request)
        return job_json(await anyio.to_thread.run_sync(lambda: jobs.submit(spec, who)))

    @r.get("/jobs", summary="List jobs, newest first")
    async def list_jobs(
        state: Annotated[list[str] | None, Query()] = None, limit: Annotated[int, Query(ge=0, le=10000)] = 100
    ) -> dict:
        jobs = backends.need_jobs(enabled)
        state = state or []
        for s in state:
            if s not in pb.JobState.keys()[1:]:
                raise InvalidArgument(f"state: {s!r} is not one of {', '.join(pb.JobState.keys()[1:])}")
        states = list(state)
        records = await anyio.to_thread.run_sync(lambda: jobs.list(states, limit))
        return {"jobs": [job_json(j) for j in records]}

    @r.get("/jobs/{job_id}", summary="A job")
    async def get_job(job_id: str) -> dict:
        jobs = backends.need_jobs(enabled)
        return job_json(await anyio.to_thread.run_sync(jobs.get, job_id))

    @r.post("/jobs/{job_id}/cancel", summary="Cancel a queued or running job")
    async def cancel(job_id: str) -> dict:
        jobs = backends.need_jobs(enabled)
        return job_json(await anyio.to_thread.run_sync(jobs.cancel, job_id))

    @r.get("/jobs/{job_id}/events", summary="Progress as server-sent events (event: job), until the job ends")
    async def events(request: Request, job_id: str) -> StreamingResponse:
        jobs = backends.need_jobs(enabled)
        await anyio.to_thread.run_sync(jobs.get, job_id)  # NotFound before the stream starts
        gone = threading.Event()
        watch = jobs.watch(job_id, lambda: not gone.is_set())

        async def stream() -> AsyncIterator[bytes]:
            try:
                while True:
                    # Abandoned on cancel (the client went): the finally below then ends the watch.
                    job = await anyio.to_thread.run_sync(next, watch, None, abandon_on_cancel=True)
                    if job is None:
                        return
                    yield f"event: job\ndata: {json.dumps(job_json(job))}\n\n".encode()
            finally:
                gone.set()  # the watch loop ends within its 0.5 s wait

        return StreamingResponse(stream(), media_type="text/event-stream", headers={"Cache-Control": "no-store"})

    @r.get("/jobs/{job_id}/artifacts/{name}", summary="Download an artifact (Range: resumable; X-Content-SHA256)")
    async def download(job_id: str, name: str) -> FileResponse:
        jobs = backends.need_jobs(enabled)
        artifact = await anyio.to_thread.run_sync(jobs.artifact, job_id, name)
        return FileResponse(
            artifact.path,
            media_type=artifact.media_type or "application/octet-stream",
            filename=artifact.name,
            headers={"ETag": f'"{artifact.sha256}"', "X-Content-SHA256": artifact.sha256},
        )

    return r
