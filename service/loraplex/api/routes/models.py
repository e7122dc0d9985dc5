"""GET /v1/models and /v1/models/{id}: the base model and every servable adapter."""
from __future__ import annotations

import asyncio

from fastapi import APIRouter

from loraplex.api.deps import EngineDep, PrincipalDep, RegistryDep
from loraplex.api.schemas.openai import ModelCard, ModelList
from loraplex.api.serving import models

router = APIRouter(tags=["openai"])


@router.get("/v1/models", response_model=ModelList)
async def list_models(engine: EngineDep, registry: RegistryDep, principal: PrincipalDep) -> ModelList:
    return await asyncio.to_thread(models.list_models, engine, registry, principal)


@router.get("/v1/models/{model_id:path}", response_model=ModelCard)
async def get_model(model_id: str, engine: EngineDep, registry: RegistryDep, principal: PrincipalDep) -> ModelCard:
    return await asyncio.to_thread(models.get_model, model_id, engine, registry, principal)
