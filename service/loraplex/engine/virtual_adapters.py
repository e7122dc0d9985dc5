"""What LLMEngine asks about virtual-token adapters (prompt and prefix tuning), in one place.

A request naming an adapter is resolved when it is added (on the engine thread): a LoRA version goes
on to the slot machinery unchanged; a virtual-token version is loaded here (small: n embeddings or n
per-layer K/V rows, read synchronously) and rides on the sequence instead, in slot 0. A request that
cannot run (unreadable adapter, prompt filling the context) is not queued: its error comes back from
the next step, as a failed LoRA load's does.
"""
from __future__ import annotations

from loraplex.engine.block_manager import BlockManager
from loraplex.engine.composition import ComposedLora
from loraplex.engine.errors import AdapterError, EngineError, InvalidRequestError, PromptTooLongError
from loraplex.engine.kv_cache import KVCache
from loraplex.engine.prefix_kv import PrefixBlocks
from loraplex.engine.types import LoraRequest
from loraplex.engine.virtual_tokens import ModelDims, VirtualTokens, VirtualTokenStore


class VirtualAdapters:
    def __init__(self, model, kv_cache: KVCache, blocks: BlockManager, capacity: int, dtype, device):
        mc = model.config
        dims = ModelDims(mc.hidden_size, mc.num_hidden_layers, kv_cache.num_kv_heads, model.head_dim)
        self.prefix_blocks = PrefixBlocks(blocks, kv_cache)
        self.store = VirtualTokenStore(dims, dtype, device, capacity,
                                       on_load=self.prefix_blocks.own, on_drop=self.prefix_blocks.release)
        self._failures: list[tuple[str, EngineError]] = []

    def resolve(self, request_id: str, lora: LoraRequest | None, num_prompt_tokens: int,
                max_model_len: int) -> tuple[LoraRequest | None, VirtualTokens | None] | None:
        """(lora, None) for base/LoRA requests, (None, adapter) for virtual-token ones; None when the
        request failed (its error is returned by `take_failures`)."""
        if lora is None:
            return None, None
        if isinstance(lora, ComposedLora):
            return lora, None  # LoRA adapters composed (engine/composition.py): no files of its own to probe
        try:
            entry = self.store.lookup(lora.key, lora.path)
        except AdapterError as exc:
            self._failures.append((request_id, AdapterError(f"adapter {lora.key!r}: {exc}")))
            return None
        if entry is None:
            return lora, None
        if entry.num_tokens + num_prompt_tokens >= max_model_len:
            self._failures.append((request_id, PromptTooLongError(
                f"the adapter's {entry.num_tokens} virtual tokens + the prompt ({num_prompt_tokens} tokens) "
                f"leave no room in the context length {max_model_len}")))
            return None
        return None, entry

    def take_failures(self) -> list[tuple[str, EngineError]]:
        failures, self._failures = self._failures, []
        return failures

    def ensure_loaded(self, lora: LoraRequest) -> bool | None:
        """Admin load: True once a virtual-token version is loaded, None for a LoRA one (not ours)."""
        return None if self.store.lookup(lora.key, lora.path) is None else True

    def set_pinned(self, lora: LoraRequest, is_pinned: bool) -> bool | None:
        """Admin pin: a pinned virtual-token version stays loaded (its prefix blocks owned) past the LRU
        bound. None for a LoRA adapter (not ours)."""
        if self.store.lookup(lora.key, lora.path) is None:
            return None
        self.store.pin(lora.key, is_pinned)
        return True

    def is_pinned(self, key: str) -> bool:
        return key in self.store.pinned

    def refuse_merge(self, lora: LoraRequest, mode: str) -> None:
        if mode == "merged" and lora.path and self.store.lookup(lora.key, lora.path) is not None:
            raise InvalidRequestError("a prompt/prefix-tuning adapter has no weight delta to merge: it is always "
                                      "served unmerged, batched with everyone", param="mode")

    def __contains__(self, key: str) -> bool:
        return key in self.store

    def evict(self, key: str) -> bool:
        return self.store.drop(key)

    def drop_versions(self, prefix: str) -> None:
        self.store.drop_versions(prefix)

    def stats(self) -> dict:
        return {"virtual_token_adapters": self.store.keys(), "num_virtual_token_loads": self.store.num_loads}
