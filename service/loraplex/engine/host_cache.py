"""The host-memory tier of adapters: an LRU of parsed adapter weights, keyed by version key."""
from __future__ import annotations

import threading
from collections import OrderedDict

from loraplex.engine.lora_weights import HostLora


class HostLoraCache:
    """Thread-safe (the loader thread fills it, the engine thread reads it)."""

    def __init__(self, max_entries: int):
        self.max_entries = max_entries
        self._entries: OrderedDict[str, HostLora] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, key: str) -> HostLora | None:
        with self._lock:
            host = self._entries.get(key)
            if host is not None:
                self._entries.move_to_end(key)
            return host

    def put(self, host: HostLora) -> None:
        if self.max_entries <= 0:
            return
        with self._lock:
            self._entries[host.key] = host
            self._entries.move_to_end(host.key)
            while len(self._entries) > self.max_entries:
                self._entries.popitem(last=False)

    def discard(self, key: str) -> None:
        with self._lock:
            self._entries.pop(key, None)

    def keys(self) -> list[str]:
        with self._lock:
            return list(self._entries)
