"""The web console: one static page (``console.html``, plain JS, no build step) and the state it shows.

The page itself holds no data and needs no token; everything it shows comes from the JSON API
below and the jobs API, fetched with the token the user types (kept in the tab's
``sessionStorage``, sent as ``Authorization: Bearer``). It polls once a second.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any
from urllib.parse import quote

import anyio
from fastapi import APIRouter
from fastapi.responses import HTMLResponse

from .app import Backends

PAGE = Path(__file__).with_name("console.html")


def models_json(backends: Backends) -> list[dict[str, Any]]:
    """Served models, their cuts and their whole-model statistics."""
    sessions = backends.sessions
    if sessions is None:
        return []
    stats = backends.inference.statistics if backends.inference is not None else None
    out = []
    for name, model in sessions.registry.models.items():
        out.append(
            {
                "name": name,
                "fingerprint": model.fingerprint,
                "input_shape": list(model.input_shape),
                "cuts": [{"index": c.index, "name": c.name, "nbytes": c.nbytes} for c in model.graph.cuts],
                "statistics": stats.of(name) if stats is not None else None,
            }
        )
    return out


def sessions_json(backends: Backends) -> list[dict[str, Any]]:
    """Connected edges: their plan (model, cut, feature encoding), what the plan predicts (when the
    edge said, with ``OpenSession``) and the cloud's measured stages.

    ``cloud_predicted_ms`` and ``cloud_measured_ms`` compare like with like: the cloud's decode plus
    compute, as the edge's cost model predicted it and as the cloud measured it (mean of the recent
    requests). The edge's own stages and the link are only predicted here: the cloud cannot see them.
    """
    if backends.sessions is None:
        return []
    now = time.monotonic()
    out = []
    for s in backends.sessions.snapshot():
        requests, features, feature_bytes, timings = s.recent()
        stages = ("queue_ms", "decode_ms", "compute_ms", "encode_ms")
        mean = {k: sum(t[i + 1] for t in timings) / len(timings) for i, k in enumerate(stages)} if timings else {}
        plan = s.plan
        out.append(
            {
                "id": s.id[:8],
                "client": s.client,
                "model": s.model.name,
                "cut": {"index": s.cut.index, "name": s.cut.name, "nbytes": s.cut.nbytes},
                "features": features,
                "feature_bytes": feature_bytes,
                "requests": requests,
                "idle_s": round(now - s.last_used, 1),
                "cloud_ms_mean": mean,
                "cloud_ms_history": [[round(v, 3) for v in t] for t in timings[-60:]],
                "plan": plan.to_json() if plan is not None else None,
                "cloud_predicted_ms": round(plan.decode_ms + plan.cloud_ms, 3) if plan is not None else None,
                "cloud_measured_ms": round(mean["decode_ms"] + mean["compute_ms"], 3) if mean else None,
            }
        )
    return out


#: What a job's known plots show; any other PNG artifact is shown under its own name.
PLOT_TITLES = {
    "sweep.png": "Pareto front: the sweep's metric (accuracy, or latency without a dataset) against size",
    "curve.png": "Rate-agreement curve: top-1 agreement against bytes on the wire, per cut",
}
MAX_PLOT_JOBS = 50


def plots_json(backends: Backends, jobs_enabled: bool) -> list[dict[str, Any]]:
    """Every PNG artifact of the latest jobs (a sweep's Pareto front, a bottleneck's rate-agreement
    curve, ...), newest job first, with its download URL. Blocking (reads the job store)."""
    if not jobs_enabled or backends.jobs is None:
        return []
    out = []
    for job in backends.jobs.list([], MAX_PLOT_JOBS):
        for a in job.artifacts:
            if a.media_type == "image/png":
                out.append(
                    {
                        "job": job.id,
                        "engine": job.engine,
                        "name": a.name,
                        "title": PLOT_TITLES.get(a.name, a.name),
                        "url": f"/api/v1/jobs/{job.id}/artifacts/{quote(a.name)}",
                        "size_bytes": a.size,
                    }
                )
    return out


def router(backends: Backends, jobs_enabled: bool) -> APIRouter:
    r = APIRouter(tags=["Console"])

    @r.get("/", response_class=HTMLResponse, summary="The web console (asks for a token when auth is on)")
    async def page() -> HTMLResponse:
        return HTMLResponse(PAGE.read_text(), headers={"Cache-Control": "no-store"})

    @r.get(
        "/api/v1/console/state",
        summary="What the console shows: models and cuts, connected edges and their plans, the jobs' plots",
    )
    async def state() -> dict:
        plots = await anyio.to_thread.run_sync(plots_json, backends, jobs_enabled)
        return {
            "ready": backends.inference is not None,
            "jobs_enabled": jobs_enabled,
            "models": models_json(backends),
            "sessions": sessions_json(backends),
            "plots": plots,
        }

    return r
