"""Runs LLMEngine on its own thread and exposes async generators to the event loop."""
from __future__ import annotations

import asyncio
import logging
import queue
import threading
from collections.abc import AsyncIterator, Callable
from concurrent.futures import Future
from dataclasses import dataclass

from loraplex.engine.errors import EngineNotRunningError
from loraplex.engine.llm_engine import AdapterState, LLMEngine
from loraplex.engine.merge_policy import MergeMode
from loraplex.engine.quantized_layers import weight_bytes
from loraplex.engine.types import LoraRequest, RequestOutput, SamplingParams
from loraplex.engine.waiting_room import WaitingRoom

log = logging.getLogger(__name__)

_IDLE_WAIT_S = 0.05


# --- commands: what the event loop sends the engine thread ------------------------------------
@dataclass(frozen=True)
class AddRequest:
    request_id: str
    prompt_ids: list[int]
    params: SamplingParams
    lora: LoraRequest | None
    tenant: str


@dataclass(frozen=True)
class AbortRequest:
    request_id: str


@dataclass(frozen=True)
class EngineCall:
    """Run fn(engine) between steps and resolve the future with its result."""

    fn: Callable[[LLMEngine], object]
    future: Future


@dataclass(frozen=True)
class Wake:
    """Nothing to do but look again (an adapter load finished, or shutdown)."""


class AsyncEngine:
    def __init__(self, engine: LLMEngine, model_name: str):
        self.engine = engine
        self.tokenizer = engine.tokenizer
        self.model_name = model_name
        self.max_model_len = engine.config.max_model_len
        quant = getattr(engine.model, "quantization", None)
        self.quantization = quant.method if quant is not None else "none"  # int8 | nf4 | fp4 | none
        self.weight_bytes = weight_bytes(engine.model)  # resident base weights (quantized or not)
        self.max_lora_rank = engine.config.max_lora_rank
        self.num_layers = engine.model.config.num_hidden_layers
        self.max_queue = engine.config.max_queue
        self.grammars = engine.grammars  # thread-safe: the API compiles guides off the event loop
        self._waiting_room = WaitingRoom(self.max_queue, engine.config.max_num_seqs)  # guarded by _lock
        self._inbox: queue.SimpleQueue = queue.SimpleQueue()
        self._streams: dict[str, tuple[asyncio.AbstractEventLoop, asyncio.Queue]] = {}
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._is_stopping = threading.Event()
        self._last_stats: dict = engine.stats()
        engine.residency_control.on_wake = lambda: self._inbox.put(Wake())
        # Observers (metrics) called on the engine thread: keep them cheap and non-blocking.
        self.finish_listeners: list = []  # fn(RequestOutput) for every finished request
        engine.residency_control.on_loaded = self._adapter_loaded
        self.load_listeners: list = []  # fn(adapter key, seconds)

    @property
    def is_ready(self) -> bool:
        return self._thread is not None and self._thread.is_alive() and not self._is_stopping.is_set()

    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run_loop, name="engine-loop", daemon=True)
            self._thread.start()

    def shutdown(self) -> None:
        self._is_stopping.set()
        self._inbox.put(Wake())
        if self._thread is not None:
            self._thread.join(timeout=10)
        self.engine.shutdown()

    def stats(self) -> dict:
        return dict(self._last_stats, num_pending=len(self._streams))

    async def generate(
        self, request_id: str, prompt_token_ids: list[int], params: SamplingParams,
        lora: LoraRequest | None = None, tenant: str = "",
    ) -> AsyncIterator[RequestOutput]:
        if not self.is_ready:
            raise EngineNotRunningError("the engine is not running")
        self.engine.validate(prompt_token_ids, params)
        stream = self._open_stream(request_id, tenant)
        self._inbox.put(AddRequest(request_id, prompt_token_ids, params, lora, tenant))
        is_finished = False
        try:
            while True:
                item = await stream.get()
                if isinstance(item, Exception):
                    is_finished = True
                    raise item
                is_finished = item.is_finished
                yield item
                if is_finished:
                    return
        finally:
            if not is_finished:
                self.abort(request_id)
            with self._lock:
                self._streams.pop(request_id, None)
                self._waiting_room.leave(tenant)

    def abort(self, request_id: str) -> None:
        self._inbox.put(AbortRequest(request_id))

    # --- adapters (admin): typed, each runs on the engine thread between steps ----------------
    async def adapter_state(self, key: str) -> AdapterState:
        return await self._call(lambda e: e.adapter_state(key))

    async def set_pinned(self, lora: LoraRequest, is_pinned: bool) -> bool:
        return await self._call(lambda e: e.set_pinned(lora, is_pinned))

    async def load_adapter(self, lora: LoraRequest) -> bool:
        return await self._call(lambda e: e.ensure_resident(lora))

    async def evict_adapter(self, key: str) -> bool:
        return await self._call(lambda e: e.evict(key))

    async def set_merge_mode(self, lora: LoraRequest, mode: MergeMode) -> bool:
        return await self._call(lambda e: e.set_merge_mode(lora, mode))

    def forget_adapter(self, adapter_id: str) -> Future:
        """Thread-safe, non-blocking (the registry's change feed calls it): after a delete, drop idle
        cached versions of `<tenant>/<name>` and their prefix-cache blocks."""
        return self._submit(lambda e: e.evict_versions_of(adapter_id))

    async def _call(self, fn: Callable[[LLMEngine], object]):
        if not self.is_ready:
            raise EngineNotRunningError("the engine is not running")
        return await asyncio.wrap_future(self._submit(fn))

    def _submit(self, fn: Callable[[LLMEngine], object]) -> Future:
        future: Future = Future()
        self._inbox.put(EngineCall(fn, future))
        return future

    def _open_stream(self, request_id: str, tenant: str) -> asyncio.Queue:
        stream: asyncio.Queue = asyncio.Queue()
        with self._lock:
            if request_id in self._streams:
                raise ValueError(f"duplicate request id {request_id}")
            num_waiting = len(self._streams) - self._last_stats["num_running"]
            self._waiting_room.enter(tenant, num_waiting)  # QueueFullError: the room is full and so is the tenant's share
            self._streams[request_id] = (asyncio.get_running_loop(), stream)
        return stream

    # --- engine thread --------------------------------------------------------------------
    def _run_loop(self) -> None:
        log.info("engine loop started")
        is_idle = True
        while not self._is_stopping.is_set():
            self._drain_inbox(block=is_idle)
            try:
                results = self.engine.step()
            except Exception as exc:  # a bug in a step must not kill the server silently
                log.exception("engine step failed")
                results = self._fail_all(exc)
            self._last_stats = self.engine.stats()
            self._deliver(results)
            is_idle = not results and not self.engine.scheduler.num_running
        self._deliver(self._fail_all(EngineNotRunningError("the engine is shutting down")))
        log.info("engine loop stopped")

    def _drain_inbox(self, block: bool) -> None:
        try:
            command = self._inbox.get(timeout=_IDLE_WAIT_S) if block else self._inbox.get_nowait()
        except queue.Empty:
            return
        while True:
            self._apply(command)
            try:
                command = self._inbox.get_nowait()
            except queue.Empty:
                return

    def _apply(self, command: AddRequest | AbortRequest | EngineCall | Wake) -> None:
        if isinstance(command, AddRequest):
            if command.request_id in self._streams:  # skip requests whose caller already left
                self.engine.add_request(command.request_id, command.prompt_ids, command.params, command.lora, command.tenant)
        elif isinstance(command, EngineCall):
            try:
                command.future.set_result(command.fn(self.engine))
            except Exception as exc:
                command.future.set_exception(exc)
        elif isinstance(command, AbortRequest):
            output = self.engine.abort(command.request_id)
            if output is not None:
                self._deliver([(command.request_id, output)])

    def _fail_all(self, exc: Exception) -> list:
        failed = []
        for request_id in self.engine.unfinished_request_ids():
            self.engine.abort(request_id)
            failed.append((request_id, exc))
        return failed

    def _adapter_loaded(self, key: str, seconds: float) -> None:
        for listener in self.load_listeners:
            listener(key, seconds)

    def _notify_finished(self, results: list) -> None:
        for _, item in results:
            if isinstance(item, RequestOutput) and item.is_finished:
                for listener in self.finish_listeners:
                    listener(item)

    def _deliver(self, results: list) -> None:
        self._notify_finished(results)
        by_loop: dict[asyncio.AbstractEventLoop, list] = {}
        with self._lock:
            for request_id, item in results:
                target = self._streams.get(request_id)
                if target is not None:
                    by_loop.setdefault(target[0], []).append((target[1], item))
        for loop, items in by_loop.items():
            try:
                loop.call_soon_threadsafe(_put_all, items)
            except RuntimeError:  # the loop closed under us
                pass


def _put_all(items) -> None:
    for stream, item in items:
        stream.put_nowait(item)
