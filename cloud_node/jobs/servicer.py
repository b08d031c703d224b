"""gRPC adapter for ``Compression``: each method converts messages and delegates to the manager."""

from __future__ import annotations

import hashlib
from collections.abc import Iterator

import grpc

from protos.cleave.v1 import compression_pb2 as pb
from protos.cleave.v1 import compression_pb2_grpc as pb_grpc
from protos.errors import InvalidArgument, enum_name, maps_errors

from .manager import JobManager
from .store import JobRecord

MAX_CHUNK = 4 << 20


def job_message(job: JobRecord) -> pb.Job:
    return pb.Job(
        id=job.id,
        state=pb.JobState.Value(job.state),
        progress=job.progress,
        stage=job.stage,
        message=job.message,
        spec=pb.JobSpec.FromString(job.spec),
        engine=job.engine,
        artifacts=[
            pb.Artifact(name=a.name, size_bytes=a.size, sha256=a.sha256, media_type=a.media_type) for a in job.artifacts
        ],
        report_json=job.report,
        created_at=job.created_at,
        started_at=job.started_at,
        finished_at=job.finished_at,
        attempts=job.attempts,
    )


def client_of(context: grpc.ServicerContext) -> str:
    """Who is calling, for per-client quotas: a bearer token (by its hash), else the peer's address."""
    for key, value in context.invocation_metadata() or ():
        if key == "authorization" and value:
            return "token:" + hashlib.sha256(str(value).encode()).hexdigest()[:16]
    peer = context.peer() or ""
    host = peer.rsplit(":", 1)[0] if peer.startswith(("ipv4:", "ipv6:")) else peer
    return "peer:" + host


class CompressionServicer(pb_grpc.CompressionServicer):
    def __init__(self, manager: JobManager, chunk_bytes: int = 1 << 20) -> None:
        self.manager = manager
        self.chunk_bytes = chunk_bytes

    def close(self) -> None:
        """Stop the job workers (running jobs are re-queued for the next start)."""
        self.manager.close()

    @maps_errors
    def UploadModel(self, request_iterator: Iterator[pb.UploadChunk], context: grpc.ServicerContext):
        rec = self.manager.upload(request_iterator, client_of(context))
        return pb.UploadModelResponse(id=rec.id, size_bytes=rec.size, sha256=rec.sha256, kind=rec.kind)

    @maps_errors
    def SubmitJob(self, request: pb.SubmitJobRequest, context: grpc.ServicerContext) -> pb.Job:
        return job_message(self.manager.submit(request.spec, client_of(context)))

    @maps_errors
    def GetJob(self, request: pb.GetJobRequest, context: grpc.ServicerContext) -> pb.Job:
        return job_message(self.manager.get(request.job_id))

    @maps_errors
    def WatchJob(self, request: pb.WatchJobRequest, context: grpc.ServicerContext):
        for job in self.manager.watch(request.job_id, context.is_active):
            yield job_message(job)

    @maps_errors
    def CancelJob(self, request: pb.CancelJobRequest, context: grpc.ServicerContext) -> pb.Job:
        return job_message(self.manager.cancel(request.job_id))

    @maps_errors
    def ListJobs(self, request: pb.ListJobsRequest, context: grpc.ServicerContext) -> pb.ListJobsResponse:
        states = [enum_name(pb.JobState, s, "states") for s in request.states if s != pb.JOB_STATE_UNSPECIFIED]
        return pb.ListJobsResponse(jobs=[job_message(j) for j in self.manager.list(states, request.limit)])

    @maps_errors
    def Download(self, request: pb.DownloadRequest, context: grpc.ServicerContext):
        artifact = self.manager.artifact(request.job_id, request.artifact)
        if request.offset > artifact.size:
            raise InvalidArgument(f"offset: {request.offset} is past the end ({artifact.size} bytes)")
        if request.chunk_bytes > MAX_CHUNK:
            raise InvalidArgument(f"chunk_bytes: {request.chunk_bytes} is over {MAX_CHUNK}")
        step = request.chunk_bytes or self.chunk_bytes
        offset = request.offset
        with open(artifact.path, "rb") as f:
            f.seek(offset)
            while True:
                data = f.read(step)
                yield pb.DownloadChunk(
                    offset=offset, data=data, total_bytes=artifact.size, sha256=artifact.sha256, name=artifact.name
                )
                offset += len(data)
                if offset >= artifact.size or not data:
                    return
