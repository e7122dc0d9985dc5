"""/v1/fine_tuning/jobs: create (enqueue), list, get, cancel, events, checkpoints, report. Only enqueues: workers train."""
from __future__ import annotations

import asyncio
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Depends, Query, Request, Response

from loraplex.api.deps import EngineDep, PrincipalDep, RegistryDep, SettingsDep
from loraplex.api.routes.files import FileStoreDep
from loraplex.api.schemas.fine_tuning import (
    CheckpointsPublic, FineTuningJobCreate, FineTuningJobPublic, FineTuningJobsPublic, JobEventsPublic,
)
from loraplex.api.serving import fine_tuning
from loraplex.training.jobs import JobStore
from loraplex.training.report import render_png

router = APIRouter(tags=["fine-tuning"])


def get_job_store(request: Request) -> JobStore:
    return request.app.state.job_store


JobStoreDep = Annotated[JobStore, Depends(get_job_store)]
AfterQuery = Annotated[str | None, Query(max_length=64)]
LimitQuery = Annotated[int, Query(ge=1, le=1000)]


@router.post("/v1/fine_tuning/jobs", response_model=FineTuningJobPublic)
async def create_job(
    request: Request, body: FineTuningJobCreate, store: JobStoreDep, files: FileStoreDep, settings: SettingsDep,
    principal: PrincipalDep, engine: EngineDep, registry: RegistryDep,
) -> FineTuningJobPublic:
    served = fine_tuning.ServedModel(engine.model_name, engine.num_layers, bool(getattr(engine.tokenizer, "chat_template", None)))
    job = await asyncio.to_thread(fine_tuning.create, store, files, registry, settings, principal, served, body)
    if request.app.state.local_worker is not None:  # the embedded worker starts with the first job
        await asyncio.to_thread(request.app.state.local_worker.ensure_running)
    return job


@router.get("/v1/fine_tuning/jobs", response_model=FineTuningJobsPublic)
async def list_jobs(store: JobStoreDep, principal: PrincipalDep, after: AfterQuery = None, limit: LimitQuery = 20) -> FineTuningJobsPublic:
    return await asyncio.to_thread(fine_tuning.list_public, store, principal, after, limit)


@router.get("/v1/fine_tuning/jobs/{job_id}", response_model=FineTuningJobPublic)
async def get_job(job_id: str, store: JobStoreDep, principal: PrincipalDep) -> FineTuningJobPublic:
    return fine_tuning.to_public(await asyncio.to_thread(fine_tuning.get, store, principal, job_id))


@router.post("/v1/fine_tuning/jobs/{job_id}/cancel", response_model=FineTuningJobPublic)
async def cancel_job(job_id: str, store: JobStoreDep, principal: PrincipalDep) -> FineTuningJobPublic:
    return await asyncio.to_thread(fine_tuning.cancel, store, principal, job_id)


@router.get("/v1/fine_tuning/jobs/{job_id}/events", response_model=JobEventsPublic)
async def list_events(job_id: str, store: JobStoreDep, principal: PrincipalDep, after: AfterQuery = None,
                      limit: LimitQuery = 20) -> JobEventsPublic:
    return await asyncio.to_thread(fine_tuning.events_public, store, principal, job_id, after, limit)


@router.get("/v1/fine_tuning/jobs/{job_id}/checkpoints", response_model=CheckpointsPublic)
async def list_checkpoints(job_id: str, store: JobStoreDep, principal: PrincipalDep, after: AfterQuery = None,
                           limit: LimitQuery = 10) -> CheckpointsPublic:
    return await asyncio.to_thread(fine_tuning.checkpoints_public, store, principal, job_id, after, limit)


@router.get("/v1/fine_tuning/jobs/{job_id}/report", response_model=None,
            responses={200: {"content": {"application/json": {}, "image/png": {}}}})
async def get_report(job_id: str, store: JobStoreDep, principal: PrincipalDep,
                     format: Literal["json", "png"] = "json") -> dict[str, Any] | Response:
    """Loss curves and the base-vs-adapter comparison: JSON (built from the job's events) or a PNG of it."""
    report = await asyncio.to_thread(fine_tuning.report, store, principal, job_id)
    if format == "json":
        return report
    return Response(await asyncio.to_thread(render_png, report), media_type="image/png")
