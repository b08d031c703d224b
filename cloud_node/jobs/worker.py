"""The job's own process (multiprocessing spawn): runs one engine and reports through a pipe.

The first thing it does is enter its sandbox (:mod:`.sandbox`); only then is any upload opened. Its
inputs (the model and dataset uploads) are hard links in its scratch directory, named relative to
it, because inside the sandbox the scratch directory is ``/tmp/job`` and nothing else is writable.

Messages to the manager: ``("progress", fraction, stage)``, then ``("done", artifacts, report_json)``
or ``("error", message)``, sent as JSON (:func:`send`), never pickled: the daemon does not unpickle
anything a sandboxed process says. Killing this process is how a running job is cancelled.
"""

from __future__ import annotations

import dataclasses
import json
import traceback
from collections.abc import Callable
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

from . import sandbox
from .engines import JobContext, die_with_parent, get_engine
from .executor import Evaluations

MAX_MESSAGE = 64 << 20


def send(conn: Connection, *msg: Any) -> None:
    """One message to the manager, as JSON."""
    conn.send_bytes(json.dumps(msg, default=str).encode())


def receive(conn: Connection) -> tuple:
    """The manager's side of :func:`send`; raises EOFError, OSError or ValueError on garbage."""
    return tuple(json.loads(conn.recv_bytes(MAX_MESSAGE)))


def _enter(payload: dict[str, Any]) -> sandbox.Entered:
    entered = sandbox.enter(Path(payload["workdir"]), payload["limits"])
    die_with_parent()  # a change of user clears the parent-death signal
    if payload.get("code") and not entered.isolated:
        raise sandbox.SandboxError(
            "jobs.allow_code_uploads: this model is code and the job sandbox cannot isolate it "
            "(the daemon is not root, or jobs.sandbox.isolate is off)"
        )
    return entered


def _source(payload: dict[str, Any], workdir: Path) -> Any:
    source = payload["source"]
    if source.upload_path:
        source = dataclasses.replace(source, upload_path=str(workdir / source.upload_path))
    return source


def execute(
    payload: dict[str, Any],
    workdir: Path,
    on_progress: Callable[[float, str], None],
    evaluations: Evaluations | None = None,
    confinement: list[str] | None = None,
) -> tuple[list[tuple[str, str]], str]:
    """Run the payload's engine with ``workdir`` as its scratch directory (inputs in ``in/``,
    artifacts written to ``out/``); returns the artifacts (name, media type) and the report JSON.
    Shared by the sandboxed job process (:func:`run_job`) and the Ray task (:mod:`.ray_tasks`)."""
    import torch

    from protos.cleave.v1 import compression_pb2 as pb

    if payload.get("threads"):
        torch.set_num_threads(payload["threads"])
    (workdir / "out").mkdir()
    ctx = JobContext(
        spec=pb.JobSpec.FromString(payload["spec"]),
        source=_source(payload, workdir),
        workdir=workdir / "out",
        dataset_path=str(workdir / payload["dataset_path"]) if payload.get("dataset_path") else "",
        dataset_format=payload.get("dataset_format", ""),
        dataset_limits=payload.get("dataset_limits"),
        sweep_parallelism=payload.get("sweep_parallelism", 2),
        evaluations=evaluations,
        on_progress=on_progress,
    )
    engine = get_engine(payload["engine"])
    engine.run(ctx)
    ctx.report["sandbox"] = confinement or []
    report = json.dumps(ctx.report, default=str, indent=1)
    ctx.write_artifact("report.json", report, "application/json")
    return ctx.artifacts, report


def run_job(payload: dict[str, Any], conn: Connection) -> None:
    die_with_parent()
    try:
        entered = _enter(payload)
        progress = lambda f, s: send(conn, "progress", f, s)  # noqa: E731
        artifacts, report = execute(payload, entered.workdir, progress, confinement=entered.applied)
        send(conn, "done", artifacts, report)
    except Exception as exc:  # noqa: BLE001 - every failure becomes the job's message
        first = str(exc).splitlines()[0] if str(exc) else ""
        send(conn, "error", f"{type(exc).__name__}: {first}", traceback.format_exc())
    finally:
        conn.close()


def inspect_model(payload: dict[str, Any], conn: Connection) -> None:
    """Open a code upload (TorchScript, .pt2) in the sandbox and report its kind; nothing else."""
    die_with_parent()
    try:
        entered = _enter(payload)
        from . import models

        model, _ = models.load(_source(payload, entered.workdir))
        send(conn, "done", models.kind_of(model))
    except Exception as exc:  # noqa: BLE001 - any loader failure is the upload's fault
        send(conn, "error", f"{type(exc).__name__}: {str(exc).splitlines()[0][:300] if str(exc) else ''}")
    finally:
        conn.close()
