"""The FastAPI application: settings, engine and adapter store on `app.state`, routers, error handlers.

`create_app(settings, engine=None)`: the lifespan builds the engine from settings when none is given
(loading the model in a worker thread) and starts it. Whoever creates the engine shuts it down: the
app for one it built, the caller for one it passed in (tests share one engine between apps). A failed
load fails the startup, so the server never runs without a model.
"""
from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager

from fastapi import FastAPI

from loraplex import __version__
from loraplex.api.errors import install_error_handlers
from loraplex.api.drain import DrainState
from loraplex.api.metrics import ServiceMetrics
from loraplex.api.middleware import BodySizeLimitMiddleware, ObservabilityMiddleware, RequestIdMiddleware
from loraplex.api.routes import ROUTERS
from loraplex.config import Settings
from loraplex.engine.async_engine import AsyncEngine
from loraplex.registry import LocalAdapterStore

log = logging.getLogger(__name__)


def create_app(settings: Settings, engine: AsyncEngine | None = None) -> FastAPI:
    app = FastAPI(title="loraplex", version=__version__, lifespan=_lifespan(engine))
    app.state.settings = settings
    app.state.engine = None  # set once the model is loaded and the engine loop runs
    app.state.adapter_store = LocalAdapterStore(
        settings.data_dir, settings.max_lora_rank, settings.lora_target_module_list
    )
    app.state.metrics = ServiceMetrics()
    app.state.drain = DrainState()
    install_error_handlers(app)
    app.add_middleware(BodySizeLimitMiddleware, max_bytes=settings.max_request_bytes)
    app.add_middleware(ObservabilityMiddleware, metrics=app.state.metrics, drain=app.state.drain)
    app.add_middleware(RequestIdMiddleware)  # outermost: every response carries the id, 413s included
    for router in ROUTERS:
        app.include_router(router)
    return app


def _lifespan(given_engine: AsyncEngine | None):
    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        engine = given_engine or await asyncio.to_thread(_build_engine, app.state.settings)
        app.state.tokenizer_pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="tokenize")
        engine.start()  # idempotent
        app.state.metrics.watch_engine(engine, app.state.drain)
        app.state.loop = asyncio.get_running_loop()
        app.state.engine = engine
        log.info("serving %s (max_model_len=%d)", engine.model_name, engine.max_model_len)
        try:
            yield
        finally:
            app.state.engine = None
            if given_engine is None:
                await asyncio.to_thread(engine.shutdown)
            app.state.tokenizer_pool.shutdown(wait=False, cancel_futures=True)

    return lifespan


def _build_engine(settings: Settings) -> AsyncEngine:
    from loraplex.engine_factory import build_engine  # loads torch and the model: only when serving

    return build_engine(settings)
