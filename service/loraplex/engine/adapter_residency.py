"""Where each adapter version lives: storage -> host tier -> a device slot, loaded on a loader thread
(compositions of adapters are built on a thread of their own).

Owns the slot bookkeeping (`AdapterSlots`), the device buffers (`LoraPool`), the host tier and the
loader thread. The engine thread calls every method here except `_read`, which runs on the loader (or
the composer).
"""
from __future__ import annotations

import logging
import queue
import time
from concurrent.futures import ThreadPoolExecutor

from loraplex.engine.adapter_slots import AdapterSlots
from loraplex.engine.composition import ComposedLora, compose, read_components
from loraplex.engine.errors import AdapterError
from loraplex.engine.host_cache import HostLoraCache
from loraplex.engine.lora_pool import LoraPool
from loraplex.engine.lora_weights import HostLora, read_adapter
from loraplex.engine.types import LoraRequest

log = logging.getLogger(__name__)


class AdapterResidency:
    def __init__(self, pool: LoraPool, slots: AdapterSlots, max_cpu_loras: int, max_lora_rank: int, dtype):
        self.pool, self.slots = pool, slots
        self.host_cache = HostLoraCache(max_cpu_loras)
        self.max_lora_rank, self.dtype = max_lora_rank, dtype
        self.pinned_keys: set[str] = set()
        self.num_loads = 0
        self._completed: queue.SimpleQueue = queue.SimpleQueue()
        self._loader = ThreadPoolExecutor(max_workers=1, thread_name_prefix="lora-loader")
        # Compositions build on their own thread: a ties merge of 8 7B-shaped adapters takes tens of
        # seconds on a CPU core, and plain adapters must not queue behind it.
        self._composer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="lora-composer")
        self.on_wake = lambda: None  # called from the loader thread when a load completes
        self.on_loaded = lambda key, seconds: None  # called on the engine thread

    # --- loading -------------------------------------------------------------------------------
    def start_load(self, lora: LoraRequest, slot: int) -> None:
        started = time.monotonic()
        future = (self._composer if isinstance(lora, ComposedLora) else self._loader).submit(self._read, lora)
        future.add_done_callback(lambda f: (self._completed.put((lora.key, slot, f, started)), self.on_wake()))

    def _read(self, lora: LoraRequest) -> HostLora:
        """Loader thread: the host tier if it has this version, else storage (then cached on the host).
        A composition is built from its components (each read the same way) and cached like them."""
        host = self.host_cache.get(lora.key)
        if host is None:
            if isinstance(lora, ComposedLora):
                host = compose(lora, read_components(lora, self._read), self.max_lora_rank, self.dtype)
            else:
                host = read_adapter(lora.key, lora.path, self.max_lora_rank, self.pool.module_shapes, self.dtype)
                if host.magnitudes and not self.pool.serves_dora:
                    raise AdapterError("DoRA adapters are not served on a quantized base (the norm needs its dense weight)")
            self.host_cache.put(host)
        return host

    def apply_completed_loads(self) -> list[tuple[str, AdapterError]]:
        """Copy finished loads into their slots. Returns (key, error) for each load that failed."""
        failed = []
        while not self._completed.empty():
            key, slot, future, started = self._completed.get()
            error = future.exception()
            if error is None:
                self.pool.write(slot, future.result())
                self.slots.mark_ready(key)
                self.num_loads += 1
                self.on_loaded(key, time.monotonic() - started)
                continue
            log.warning("adapter %s failed to load: %s", key, error)
            self.slots.drop(key)
            failed.append((key, error if isinstance(error, AdapterError) else AdapterError(f"adapter could not be loaded: {error}")))
        return failed

    # --- admin ---------------------------------------------------------------------------------
    def ensure_resident(self, lora: LoraRequest) -> bool:
        """Start loading `lora` into a device slot if it is not there. False if no slot can be freed."""
        if self.slots.slot_of(lora.key) is not None:
            return True
        if not self.slots.can_load():
            return False
        slot, _ = self.slots.load(lora.key)
        self.start_load(lora, slot)
        return True

    def set_pinned(self, lora: LoraRequest, is_pinned: bool) -> bool:
        """Pinned adapters are loaded now and never evicted. False if no slot can be freed for it."""
        if not is_pinned:
            self.pinned_keys.discard(lora.key)
            if self.slots.slot_of(lora.key) is not None:
                self.slots.pin(lora.key, False)
            return True
        if not self.ensure_resident(lora):
            return False
        self.pinned_keys.add(lora.key)
        self.slots.pin(lora.key, True)
        return True

    def evict(self, key: str) -> bool:
        """Drop an idle adapter from its device slot and the host tier. False while requests use it."""
        state = self.slots.slot_of(key)
        if state is not None and (state.num_refs or not state.is_ready):
            return False
        self.pinned_keys.discard(key)
        self.host_cache.discard(key)
        if state is not None:
            self.pool.clear(self.slots.drop(key))
        return True

    def cached_keys(self) -> set[str]:
        return set(self.slots.resident_keys()) | set(self.host_cache.keys())

    def residency(self, key: str) -> str:
        """device | loading | host | storage"""
        state = self.slots.slot_of(key)
        if state is not None:
            return "device" if state.is_ready else "loading"
        return "host" if self.host_cache.get(key) is not None else "storage"

    def shutdown(self) -> None:
        self._loader.shutdown(wait=False, cancel_futures=True)
        self._composer.shutdown(wait=False, cancel_futures=True)
