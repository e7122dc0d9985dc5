"""Dependencies: the shared objects on `app.state`, as `Annotated` aliases for route signatures.

Auth is a later issue: a `TenantDep` added to `get_generation_context` reaches every generation route.
"""
from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Request

from loraplex.api.errors import ServiceUnavailable
from loraplex.api.middleware import request_id_of
from loraplex.api.serving.context import GenerationContext
from loraplex.config import Settings
from loraplex.engine.async_engine import AsyncEngine
from loraplex.registry import LocalAdapterStore


def get_settings(request: Request) -> Settings:
    return request.app.state.settings


def get_engine(request: Request) -> AsyncEngine:
    engine = request.app.state.engine
    if engine is None:
        raise ServiceUnavailable("The model is still loading.")
    return engine


def get_store(request: Request) -> LocalAdapterStore:
    return request.app.state.adapter_store


def get_request_id(request: Request) -> str:
    return request_id_of(request.scope)


SettingsDep = Annotated[Settings, Depends(get_settings)]
EngineDep = Annotated[AsyncEngine, Depends(get_engine)]
StoreDep = Annotated[LocalAdapterStore, Depends(get_store)]
RequestIdDep = Annotated[str, Depends(get_request_id)]


def get_generation_context(
    request: Request, engine: EngineDep, store: StoreDep, settings: SettingsDep, request_id: RequestIdDep
) -> GenerationContext:
    return GenerationContext(
        engine=engine,
        store=store,
        settings=settings,
        request=request,
        request_id=request_id,
        tokenizer_pool=request.app.state.tokenizer_pool,
    )


GenerationContextDep = Annotated[GenerationContext, Depends(get_generation_context)]
