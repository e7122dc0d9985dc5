"""Builds the registry for the app from Settings: local index, or Redis index + change feed."""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

from loraplex.config import Settings
from loraplex.registry.change_feed import ChangeFeed, LocalChangeFeed, NotifyingIndex
from loraplex.registry.service import AdapterRegistry, UploadLimits
from loraplex.registry.versioned_store import LocalJsonIndex, TenantQuota, VersionedAdapterStore

log = logging.getLogger(__name__)


@dataclass
class RegistryRuntime:
    registry: AdapterRegistry
    feed: Any  # ChangeFeed | LocalChangeFeed
    index: Any

    def close(self) -> None:
        self.feed.stop()
        if hasattr(self.index, "close"):
            self.index.close()


def build_registry(settings: Settings, module_shapes: dict) -> RegistryRuntime:
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
    return RegistryRuntime(AdapterRegistry(store, module_shapes, limits), feed, index)


def _redacted(url: str) -> str:
    return url.split("@")[-1] if "@" in url else url
