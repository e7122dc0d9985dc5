"""GET /v1/me: who the bearer key is (its tenant, whether it is the admin); nothing about anyone else."""
from __future__ import annotations

from fastapi import APIRouter
from pydantic import BaseModel

from loraplex.api.deps import PrincipalDep

router = APIRouter(tags=["account"])


class Me(BaseModel):
    object: str = "principal"
    tenant: str | None  # None: the admin key, acting for no tenant in particular
    is_admin: bool


@router.get("/v1/me", response_model=Me)
async def who_am_i(principal: PrincipalDep) -> Me:
    return Me(tenant=principal.tenant, is_admin=principal.is_admin)
