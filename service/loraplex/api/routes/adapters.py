"""/v1/adapters: upload (new immutable version), list, get, delete; admin residency actions."""
from __future__ import annotations

import asyncio
from typing import Annotated, Literal

from fastapi import APIRouter, File, Form, Query, UploadFile

from loraplex.api.deps import EngineDep, PrincipalDep, RegistryDep, SettingsDep
from loraplex.api.schemas.adapters import AdapterDeleted, AdapterPublic, AdaptersPublic, MergeModeUpdate
from loraplex.api.serving import adapters

router = APIRouter(tags=["adapters"])


@router.post("/v1/adapters", response_model=AdapterPublic, status_code=201)
async def upload_adapter(
    engine: EngineDep, registry: RegistryDep, principal: PrincipalDep, settings: SettingsDep,
    name: Annotated[str, Form(max_length=63)],
    files: Annotated[list[UploadFile], File(description="adapter_config.json + adapter_model.safetensors, or one archive")],
    tenant: Annotated[str | None, Form(max_length=63)] = None,
    shared: Annotated[bool, Form()] = False,
) -> AdapterPublic:
    named, archive = await adapters.read_upload(files, settings.max_adapter_bytes)
    record = await asyncio.to_thread(registry.upload, principal, name, named, archive, tenant, shared)
    return await adapters.to_public(engine, record)


@router.get("/v1/adapters", response_model=AdaptersPublic)
async def list_adapters(
    engine: EngineDep, registry: RegistryDep, principal: PrincipalDep,
    after: Annotated[str | None, Query(max_length=200)] = None,
    limit: Annotated[int, Query(ge=1, le=100)] = 20,
) -> AdaptersPublic:
    return await adapters.list_public(engine, registry, principal, after, limit)


@router.post("/v1/adapters/{adapter_id:path}/mode", response_model=AdapterPublic)
async def set_merge_mode(
    adapter_id: str, update: MergeModeUpdate, engine: EngineDep, registry: RegistryDep, principal: PrincipalDep,
) -> AdapterPublic:
    """Admin: serve this adapter `merged` into the base weights, `unmerged`, or `auto` (by traffic)."""
    return await adapters.admin_action(engine, registry, principal, adapter_id, update.mode)


@router.post("/v1/adapters/{adapter_id:path}/{action}", response_model=AdapterPublic)
async def adapter_action(
    adapter_id: str, action: Literal["pin", "unpin", "load", "evict"],
    engine: EngineDep, registry: RegistryDep, principal: PrincipalDep,
) -> AdapterPublic:
    return await adapters.admin_action(engine, registry, principal, adapter_id, action)


@router.get("/v1/adapters/{adapter_id:path}", response_model=AdapterPublic)
async def get_adapter(adapter_id: str, engine: EngineDep, registry: RegistryDep, principal: PrincipalDep) -> AdapterPublic:
    record = await asyncio.to_thread(registry.resolve, principal, adapter_id)
    return await adapters.to_public(engine, record)


@router.delete("/v1/adapters/{adapter_id:path}", response_model=AdapterDeleted)
async def delete_adapter(adapter_id: str, engine: EngineDep, registry: RegistryDep, principal: PrincipalDep) -> AdapterDeleted:
    record = await asyncio.to_thread(registry.delete, principal, adapter_id)
    engine.forget_adapter(record.id)  # idle copies and cached blocks go now; running requests finish
    return AdapterDeleted(id=record.id)
