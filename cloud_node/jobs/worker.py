"""The job's own process (multiprocessing spawn): runs one engine and reports through a pipe.

Messages to the manager: ``("progress", fraction, stage)``, then ``("done", artifacts, report_json)``
or ``("error", message)``. Killing this process is how a running job is cancelled.
"""

from __future__ import annotations

import json
import traceback
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

from .engines import JobContext, die_with_parent, get_engine


def run_job(payload: dict[str, Any], conn: Connection) -> None:
    die_with_parent()
    import torch

    from protos.cleave.v1 import compression_pb2 as pb

    if payload.get("threads"):
        torch.set_num_threads(payload["threads"])
    try:
        ctx = JobContext(
            spec=pb.JobSpec.FromString(payload["spec"]),
            source=payload["source"],
            workdir=Path(payload["workdir"]),
            dataset_path=payload.get("dataset_path", ""),
            dataset_format=payload.get("dataset_format", ""),
            sweep_parallelism=payload.get("sweep_parallelism", 2),
            on_progress=lambda f, s: conn.send(("progress", f, s)),
        )
        engine = get_engine(payload["engine"])
        engine.run(ctx)
        report = json.dumps(ctx.report, default=str, indent=1)
        ctx.write_artifact("report.json", report, "application/json")
        conn.send(("done", ctx.artifacts, report))
    except Exception as exc:  # noqa: BLE001 - every failure becomes the job's message
        first = str(exc).splitlines()[0] if str(exc) else ""
        conn.send(("error", f"{type(exc).__name__}: {first}", traceback.format_exc()))
    finally:
        conn.close()
