"""What one generation request needs from the app, gathered once by a dependency (see api/deps.py)."""
from __future__ import annotations

import asyncio
import uuid
from collections.abc import Callable
from concurrent.futures import Executor
from dataclasses import dataclass
from functools import partial
from typing import TypeVar

from fastapi import Request

from loraplex.config import Settings
from loraplex.engine.async_engine import AsyncEngine
from loraplex.api.rate_limit import TenantRateLimiter
from loraplex.registry.auth import Principal
from loraplex.registry.service import AdapterRegistry

T = TypeVar("T")


@dataclass(frozen=True)
class GenerationContext:
    engine: AsyncEngine
    registry: AdapterRegistry
    principal: Principal
    rate_limiter: TenantRateLimiter
    settings: Settings
    request: Request  # the HTTP request, watched for client disconnects
    request_id: str  # X-Request-ID
    tokenizer_pool: Executor  # one thread: tokenizing never blocks the event loop

    @property
    def tenant(self) -> str:
        """Who is charged for this request (fairness, rate limits): the caller's tenant."""
        return self.principal.tenant or "admin"

    def new_engine_request_id(self) -> str:
        # Clients may reuse X-Request-ID; the engine needs ids unique among in-flight requests.
        return f"{self.request_id}-{uuid.uuid4().hex[:8]}"

    async def tokenize(self, fn: Callable[..., T], *args) -> T:
        return await asyncio.get_running_loop().run_in_executor(self.tokenizer_pool, partial(fn, *args))
