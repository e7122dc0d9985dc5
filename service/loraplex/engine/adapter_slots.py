"""Pure bookkeeping of which adapter version occupies which device slot (no tensors).

Verbs pair like the KV bookkeeping: `can_load`/`load`/`mark_ready`, `acquire`/`release`.
A slot is evictable when it is ready, not pinned and no running sequence holds it; the
least recently used evictable slot is reused first. Slot 0 is the base model and never assigned.
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass


@dataclass
class SlotState:
    index: int
    key: str
    is_ready: bool = False
    num_refs: int = 0
    is_pinned: bool = False
    last_used: int = 0


class AdapterSlots:
    def __init__(self, max_loras: int):
        self.max_loras = max_loras
        self._free = list(range(max_loras, 0, -1))  # pop() yields 1 first
        self._by_key: dict[str, SlotState] = {}
        self._clock = itertools.count(1)
        self.num_evictions = 0

    def slot_of(self, key: str) -> SlotState | None:
        return self._by_key.get(key)

    def is_ready(self, key: str) -> bool:
        state = self._by_key.get(key)
        return state is not None and state.is_ready

    def can_load(self) -> bool:
        return bool(self._free) or self._lru_evictable() is not None

    def load(self, key: str) -> tuple[int, str | None]:
        """Reserve a slot for `key` (not ready until `mark_ready`). Returns (slot, evicted key or None)."""
        assert key not in self._by_key, f"{key} already has a slot"
        evicted = None
        if self._free:
            index = self._free.pop()
        else:
            victim = self._lru_evictable()
            assert victim is not None, "no slot can be freed"
            evicted = victim.key
            index = victim.index
            self.num_evictions += 1
            del self._by_key[victim.key]
        self._by_key[key] = SlotState(index, key, last_used=next(self._clock))
        return index, evicted

    def mark_ready(self, key: str) -> None:
        self._by_key[key].is_ready = True

    def drop(self, key: str) -> int | None:
        """Forget a slot whose load failed or whose adapter was deleted while idle."""
        state = self._by_key.get(key)
        if state is None or state.num_refs:
            return None
        del self._by_key[key]
        self._free.append(state.index)
        return state.index

    def acquire(self, key: str) -> int:
        state = self._by_key[key]
        assert state.is_ready
        state.num_refs += 1
        state.last_used = next(self._clock)
        return state.index

    def release(self, key: str) -> None:
        state = self._by_key[key]
        state.num_refs -= 1
        assert state.num_refs >= 0

    def pin(self, key: str, is_pinned: bool = True) -> None:
        self._by_key[key].is_pinned = is_pinned

    def num_loading(self) -> int:
        return sum(not s.is_ready for s in self._by_key.values())

    def resident_keys(self) -> list[str]:
        return [k for k, s in self._by_key.items() if s.is_ready]

    def _lru_evictable(self) -> SlotState | None:
        candidates = [s for s in self._by_key.values() if s.is_ready and not s.is_pinned and s.num_refs == 0]
        return min(candidates, key=lambda s: s.last_used, default=None)
