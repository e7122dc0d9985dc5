"""Builds the registry for the app from Settings: local index, or Redis index + change feed."""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

from loraplex.config import Settings
from loraplex.registry.change_feed import ChangeFeed, LocalChangeFeed, NotifyingIndex
from loraplex.registry.index_repair import IndexGuard
from loraplex.registry.adapter_kinds import SERVED_KINDS, ModelDims
from loraplex.registry.service import AdapterRegistry, UploadLimits
from loraplex.registry.versioned_store import LocalJsonIndex, TenantQuota, VersionedAdapterStore

log = logging.getLogger(__name__)


@dataclass
class RegistryRuntime:
    registry: AdapterRegistry
    feed: Any  # ChangeFeed | LocalChangeFeed
    index: Any
    guard: IndexGuard | None = None  # a Redis index, rebuilt from the volume when it lost its data

    @property
    def is_index_consistent(self) -> bool:
        return self.guard is None or self.guard.is_consistent

    def close(self) -> None:
        if self.guard is not None:
            self.guard.stop()
        self.feed.stop()
        if hasattr(self.index, "close"):
            self.index.close()


def build_registry(settings: Settings, module_shapes: dict, dims: ModelDims | None = None,
                   kinds: frozenset[str] = SERVED_KINDS) -> RegistryRuntime:
    data_dir = settings.data_dir
    if settings.redis_url:
        from loraplex.registry.redis_index import RedisAdapterIndex

        index = RedisAdapterIndex(settings.redis_url, settings.redis_namespace, data_dir=data_dir)
        feed = ChangeFeed(settings.redis_url, settings.redis_namespace)
        log.info("adapter registry: Redis index at %s", _redacted(settings.redis_url))
    else:
        feed = LocalChangeFeed()
        index = NotifyingIndex(LocalJsonIndex(data_dir, settings.max_lora_rank, settings.lora_target_module_list), feed)
        log.info("adapter registry: local index under %s", data_dir)
    quota = TenantQuota(settings.max_adapters_per_tenant, settings.max_adapter_bytes_per_tenant)
    store = VersionedAdapterStore(data_dir, quota, index=index, max_lora_rank=settings.max_lora_rank,
                                  allowed_target_modules=settings.lora_target_module_list)
    limits = UploadLimits(settings.max_lora_rank, settings.max_adapter_bytes)
    guard = IndexGuard(store) if settings.redis_url else None  # started by the server, not by workers
    return RegistryRuntime(AdapterRegistry(store, module_shapes, limits, dims, kinds), feed, index, guard)


def _redacted(url: str) -> str:
    return url.split("@")[-1] if "@" in url else url
