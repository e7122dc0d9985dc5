"""The model list: the base model, then one card per adapter the caller may use."""
from __future__ import annotations

import time

from loraplex.api.errors import ModelNotFound
from loraplex.api.schemas.openai import ModelCard, ModelList
from loraplex.engine.async_engine import AsyncEngine
from loraplex.registry import AdapterNotFound
from loraplex.registry.auth import Principal
from loraplex.registry.service import AdapterRegistry
from loraplex.registry.versioned_store import AdapterVersion

BASE_OWNER = "loraplex"
_STARTED_AT = int(time.time())


def list_models(engine: AsyncEngine, registry: AdapterRegistry, principal: Principal) -> ModelList:
    records = registry.list(principal, limit=1000)
    return ModelList(data=[base_card(engine), *(adapter_card(r, engine) for r in records)])


def get_model(model_id: str, engine: AsyncEngine, registry: AdapterRegistry, principal: Principal) -> ModelCard:
    if model_id == engine.model_name:
        return base_card(engine)
    try:
        return adapter_card(registry.resolve(principal, model_id), engine)
    except AdapterNotFound:
        raise ModelNotFound(f"The model `{model_id}` does not exist.", param="model") from None


def base_card(engine: AsyncEngine) -> ModelCard:
    return ModelCard(id=engine.model_name, created=_STARTED_AT, owned_by=BASE_OWNER, max_model_len=engine.max_model_len,
                     quantization=engine.quantization, weight_bytes=engine.weight_bytes)


def adapter_card(record: AdapterVersion, engine: AsyncEngine) -> ModelCard:
    return ModelCard(
        id=record.id, created=record.created_at, owned_by=record.tenant, parent=engine.model_name,
        max_model_len=engine.max_model_len,
    )
