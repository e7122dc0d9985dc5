"""Kubernetes probes: /healthz (process alive), /readyz (engine serving, not draining, adapter index whole),
/startupz (model loaded); and the Prometheus scrape endpoint /metrics."""
from __future__ import annotations

import asyncio

from fastapi import APIRouter, Request, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from loraplex.api.errors import ServiceUnavailable
from loraplex.api.metrics_access import METRICS_PATH, authorize_metrics

router = APIRouter(tags=["health"])


@router.get("/healthz")
async def healthz() -> dict[str, str]:
    return {"status": "ok"}


@router.get("/readyz")
async def readyz(request: Request) -> dict[str, str]:
    engine = request.app.state.engine
    if engine is None or not engine.is_ready:
        raise ServiceUnavailable("The engine is not ready.")
    if request.app.state.drain.is_draining:
        raise ServiceUnavailable("The server is draining.")
    runtime = request.app.state.registry_runtime
    if runtime is not None and not runtime.is_index_consistent:
        raise ServiceUnavailable("The adapter index is being rebuilt from the data volume.")
    return {"status": "ready"}


@router.get("/startupz")
async def startupz(request: Request) -> dict[str, str]:
    if request.app.state.engine is None:
        raise ServiceUnavailable("The model is still loading.")
    return {"status": "started"}


@router.get(METRICS_PATH, include_in_schema=False)
async def metrics(request: Request) -> Response:
    authorize_metrics(request)  # it names every tenant's running adapters: see metrics_access.py
    # Off the event loop: collectors read the job store (up to a bounded wait) and the engine's stats.
    body = await asyncio.to_thread(generate_latest, request.app.state.metrics.registry)
    return Response(body, media_type=CONTENT_TYPE_LATEST)
