"""The FastAPI application: settings, engine and adapter registry on `app.state`, routers, error handlers.

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
from loraplex.api.metrics_access import MetricsPortMiddleware
from loraplex.api.middleware import (
    BodySizeLimitMiddleware, ControlCharacterPathMiddleware, ObservabilityMiddleware, RequestIdMiddleware,
)
from loraplex.api.routes import CONSOLE_ROUTER, ROUTERS
from loraplex.config import Settings
from loraplex.engine.async_engine import AsyncEngine
from loraplex.api.rate_limit import TenantRateLimiter
from loraplex.registry.auth import load_api_keys
from loraplex.registry.factory import build_registry
from loraplex.registry.adapter_kinds import DORA, SERVED_KINDS
from loraplex.registry.validation import model_dims_from_hf_config
from loraplex.training.example_tokens import token_counter
from loraplex.training.files import FileQuota, FileStore
from loraplex.training.job_store import build_job_store
from loraplex.training.jobs import has_pending_jobs, reap_stale
from loraplex.training.supervisor import LocalWorkerProcess

log = logging.getLogger(__name__)

MULTIPART_SLACK = 1 << 20  # multipart framing and form fields around an upload


def create_app(settings: Settings, engine: AsyncEngine | None = None) -> FastAPI:
    app = FastAPI(title="loraplex", version=__version__, lifespan=_lifespan(engine))
    app.state.settings = settings
    app.state.engine = None  # set once the model is loaded and the engine loop runs
    app.state.registry = None  # needs the model's module shapes: built with the engine
    app.state.registry_runtime = None  # the registry's index guard (readiness), with the registry
    app.state.file_store = FileStore(settings.data_dir, settings.max_file_bytes, settings.max_file_lines,
                                     FileQuota(settings.max_files_per_tenant, settings.max_file_bytes_per_tenant),
                                     settings.max_example_tokens)
    app.state.job_store = None  # opened by the lifespan (Redis or the local job files)
    app.state.local_worker = None  # the embedded worker process, when settings.start_local_worker
    app.state.api_keys = load_api_keys(settings.api_keys, settings.api_keys_file)
    app.state.rate_limiter = TenantRateLimiter(settings.tenant_requests_per_minute, settings.tenant_tokens_per_minute)
    if not app.state.api_keys and not settings.admin_key:
        log.warning("no API keys configured: single-tenant dev mode, every caller is the admin of tenant 'default'")
    app.state.metrics = ServiceMetrics()
    app.state.metrics.watch_jobs(lambda: app.state.job_store)  # read at scrape time; None until the lifespan opens it
    app.state.drain = DrainState()
    install_error_handlers(app)
    if settings.metrics_port is not None:
        app.add_middleware(MetricsPortMiddleware, metrics_port=settings.metrics_port)  # only /metrics there
    app.add_middleware(ControlCharacterPathMiddleware)  # innermost: counted, logged and given a request id
    app.add_middleware(BodySizeLimitMiddleware, max_bytes=settings.max_request_bytes,
                       max_bytes_by_path={"/v1/adapters": settings.max_adapter_bytes + MULTIPART_SLACK,
                                          "/v1/files": settings.max_file_bytes + MULTIPART_SLACK})
    app.add_middleware(ObservabilityMiddleware, metrics=app.state.metrics, drain=app.state.drain)
    app.add_middleware(RequestIdMiddleware)  # outermost: every response carries the id, 413s included
    for router in ROUTERS:
        app.include_router(router)
    if settings.console:
        app.include_router(CONSOLE_ROUTER)
    return app


def _lifespan(given_engine: AsyncEngine | None):
    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        engine = given_engine or await asyncio.to_thread(_build_engine, app.state.settings)
        app.state.tokenizer_pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="tokenize")
        app.state.file_store.count_tokens = token_counter(engine.engine.tokenizer)  # before any upload is served
        engine.start()  # idempotent
        app.state.metrics.watch_engine(engine, app.state.drain)
        app.state.loop = asyncio.get_running_loop()
        dims = model_dims_from_hf_config(engine.engine.model.config.to_dict())
        kinds = SERVED_KINDS if engine.engine.lora_pool.serves_dora else SERVED_KINDS - {DORA}  # quantized base: no DoRA
        runtime = build_registry(app.state.settings, engine.engine.lora_pool.module_shapes, dims, kinds)
        runtime.feed.start(lambda event: _on_registry_change(engine, runtime.registry, event))
        if runtime.guard is not None:
            await asyncio.to_thread(runtime.guard.start)  # a lost index is rebuilt before the first request
        app.state.registry = runtime.registry
        app.state.registry_runtime = runtime
        await _merge_at_start(app.state.settings, engine, runtime.registry)
        app.state.engine = engine
        log.info("serving %s (max_model_len=%d)", engine.model_name, engine.max_model_len)
        fine_tuning = await _start_fine_tuning(app)
        try:
            yield
        finally:
            await _stop_fine_tuning(app, fine_tuning)
            app.state.engine = None
            runtime.close()
            if given_engine is None:
                await asyncio.to_thread(engine.shutdown)
            app.state.tokenizer_pool.shutdown(wait=False, cancel_futures=True)

    return lifespan


async def _merge_at_start(settings: Settings, engine: AsyncEngine, registry) -> None:
    """LORAPLEX_MERGED_ADAPTER: the dedicated low-latency deployment serves one adapter merged."""
    if settings.merged_adapter:
        from loraplex.registry.auth import Principal

        lora = await asyncio.to_thread(registry.lora_request, Principal(tenant=None, is_admin=True), settings.merged_adapter)
        if not await engine.set_merge_mode(lora, "merged"):
            raise RuntimeError(f"cannot merge {settings.merged_adapter}: no adapter slot")
        log.info("serving %s merged", settings.merged_adapter)


def _on_registry_change(engine: AsyncEngine, registry, event) -> None:
    """Any change on any replica drops this replica's cached resolution of that id (so new requests
    get the new version); a delete also frees idle cached versions (running requests keep theirs).
    Engine caches are keyed by version + content hash, so they never serve the wrong weights."""
    if event.get("op") == "resync":
        registry.forget_all()
    elif event.get("tenant") and event.get("name"):
        registry.forget(event["tenant"], event["name"])  # a new version or a delete: re-resolve
        if event.get("op") == "delete":
            adapter_id = f"{event['tenant']}/{event['name']}"
            engine.forget_adapter(adapter_id)


async def _start_fine_tuning(app: FastAPI) -> asyncio.Task:
    """The job store, the reaper of jobs whose worker died and, in the embedded default, one local worker
    process (started now if jobs are pending, else with the first job). The API process only enqueues."""
    settings = app.state.settings
    app.state.job_store = await asyncio.to_thread(build_job_store, settings)
    app.state.local_worker = None
    if settings.start_local_worker:
        app.state.local_worker = LocalWorkerProcess(settings)
        if await asyncio.to_thread(has_pending_jobs, app.state.job_store):
            app.state.local_worker.ensure_running()
    return asyncio.create_task(_reap_forever(app.state.job_store, settings.job_stale_after_s, app.state.local_worker))


async def _stop_fine_tuning(app: FastAPI, reaper: asyncio.Task) -> None:
    reaper.cancel()
    if app.state.local_worker is not None:
        await asyncio.to_thread(app.state.local_worker.stop)
    app.state.job_store.close()


async def _reap_forever(store, stale_after_s: float, local_worker) -> None:
    """Fail jobs whose worker died; restart the local worker if it died with jobs still to run."""
    while True:
        await asyncio.sleep(max(0.5, stale_after_s / 4))
        try:
            for job in await asyncio.to_thread(reap_stale, store, stale_after_s):
                log.warning("job %s failed: its worker %s stopped sending heartbeats", job.id, job.worker_id)
            if local_worker is not None and local_worker.has_died() and await asyncio.to_thread(has_pending_jobs, store):
                local_worker.ensure_running()
        except Exception:
            log.exception("reaping stale fine-tuning jobs failed")


def _build_engine(settings: Settings) -> AsyncEngine:
    from loraplex.engine_factory import build_engine  # loads torch and the model: only when serving

    return build_engine(settings)
