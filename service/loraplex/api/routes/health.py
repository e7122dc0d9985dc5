"""Kubernetes probes: /healthz (process alive), /readyz (engine serving), /startupz (model loaded)."""
from __future__ import annotations

from fastapi import APIRouter, Request

from loraplex.api.errors import ServiceUnavailable

router = APIRouter(tags=["health"])


@router.get("/healthz")
async def healthz() -> dict[str, str]:
    return {"status": "ok"}


@router.get("/readyz")
async def readyz(request: Request) -> dict[str, str]:
    engine = request.app.state.engine
    if engine is None or not engine.is_ready:
        raise ServiceUnavailable("The engine is not ready.")
    return {"status": "ready"}


@router.get("/startupz")
async def startupz(request: Request) -> dict[str, str]:
    if request.app.state.engine is None:
        raise ServiceUnavailable("The model is still loading.")
    return {"status": "started"}
