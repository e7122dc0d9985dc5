"""Dependencies: the shared objects on `app.state`, as `Annotated` aliases for route signatures.

`PrincipalDep` authenticates the bearer key on every API route; generation routes get it through
`GenerationContextDep`, so no route can forget it.
"""
from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from loraplex.api.errors import ServiceUnavailable
from loraplex.api.middleware import request_id_of
from loraplex.api.serving.context import GenerationContext
from loraplex.config import Settings
from loraplex.engine.async_engine import AsyncEngine
from loraplex.registry.auth import Principal, authenticate
from loraplex.registry.service import AdapterRegistry


def get_settings(request: Request) -> Settings:
    return request.app.state.settings


def get_engine(request: Request) -> AsyncEngine:
    engine = request.app.state.engine
    if engine is None:
        raise ServiceUnavailable("The model is still loading.")
    return engine


def get_registry(request: Request) -> AdapterRegistry:
    registry = request.app.state.registry
    if registry is None:
        raise ServiceUnavailable("The model is still loading.")
    return registry


# Declares the bearer scheme in the OpenAPI schema (and on each route that authenticates); the raw header is
# still what `authenticate` reads, so a malformed one gets our 401, not FastAPI's.
_bearer_scheme = HTTPBearer(auto_error=False, description="`<key>` from LORAPLEX_API_KEYS, or the admin key.")


def get_principal(request: Request, _: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer_scheme)]) -> Principal:
    state = request.app.state
    return authenticate(request.headers.get("authorization"), state.api_keys, state.settings.admin_key)


def get_request_id(request: Request) -> str:
    return request_id_of(request.scope)


SettingsDep = Annotated[Settings, Depends(get_settings)]
EngineDep = Annotated[AsyncEngine, Depends(get_engine)]
RegistryDep = Annotated[AdapterRegistry, Depends(get_registry)]
PrincipalDep = Annotated[Principal, Depends(get_principal)]
RequestIdDep = Annotated[str, Depends(get_request_id)]


def get_generation_context(
    request: Request, principal: PrincipalDep, engine: EngineDep, registry: RegistryDep, settings: SettingsDep,
    request_id: RequestIdDep,
) -> GenerationContext:
    return GenerationContext(
        engine=engine,
        registry=registry,
        principal=principal,
        rate_limiter=request.app.state.rate_limiter,
        settings=settings,
        request=request,
        request_id=request_id,
        tokenizer_pool=request.app.state.tokenizer_pool,
    )


GenerationContextDep = Annotated[GenerationContext, Depends(get_generation_context)]
