"""The adapter registry as the API sees it: every call is authorized for a principal first.

Routes stay thin: they turn HTTP into these calls; this module holds the rules (who may use,
list, upload, delete what) and hides the store and the validation pipeline behind them.
"""
from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass

from loraplex.engine.types import LoraRequest
from loraplex.registry.archive import extract_adapter_archive
from loraplex.registry.auth import Principal, can_use, require_manage, require_use
from loraplex.registry.errors import Forbidden, InvalidAdapterFile, RegistryUnavailable
from loraplex.registry.adapter_kinds import SERVED_KINDS
from loraplex.registry.validation import ModelDims, ValidatedAdapter, validate_adapter_files
from loraplex.registry.local_store import AdapterNotFound
from loraplex.registry.versioned_store import AdapterVersion, VersionedAdapterStore, is_id_part, parse_adapter_id

log = logging.getLogger(__name__)

CONFIG_FILE = "adapter_config.json"
MAX_LAST_KNOWN = 4096
FRESH_FOR_S = 2.0  # a resolved id is reused this long; the change feed drops it sooner on put/delete
SHARED_FRESH_FOR_S = 1.0  # the set of shared adapter names is re-read this often (sooner on a change)
WEIGHTS_FILE = "adapter_model.safetensors"


@dataclass(frozen=True)
class UploadLimits:
    max_lora_rank: int
    max_adapter_bytes: int
    max_archive_members: int = 16


class AdapterRegistry:
    def __init__(self, store: VersionedAdapterStore, module_shapes: Mapping[tuple[int, str], tuple[int, int]], limits: UploadLimits,
                 dims: ModelDims | None = None, kinds: frozenset[str] = SERVED_KINDS):
        self.store, self.module_shapes, self.limits = store, dict(module_shapes), limits
        self.dims = dims  # the model's sizes, for prompt/prefix tuning uploads
        self.kinds = kinds  # the adapter kinds this server's engine serves (no DoRA on a quantized base)
        # Inference lookups that succeeded, so adapters keep serving while a shared index (Redis) is down.
        # id -> (record, when it was read from the index); resolver threads, the change-feed thread and
        # the event loop all touch it, hence the lock.
        self._last_known: OrderedDict[str, tuple[AdapterVersion, float]] = OrderedDict()
        self._last_known_lock = threading.Lock()
        self._shared: tuple[frozenset[str], float] = (frozenset(), float("-inf"))  # (names, when read)
        self._shared_lock = threading.Lock()

    # --- reads ----------------------------------------------------------------------------
    def resolve(self, principal: Principal, adapter_id: str) -> AdapterVersion:
        """The version a request for `adapter_id` (`t/n` = latest, `t/n@v`) runs with; 404 if not usable.
        Authorized on the id before anything about the adapter is read: another tenant's id is looked
        up only if a shared adapter has that name, so a private one costs what a missing one costs
        (reading its record first answered its 404 ~0.15 ms later: an existence oracle)."""
        tenant, name, version = parse_adapter_id(adapter_id)  # AdapterNotFound for a malformed id
        if not (principal.is_admin or tenant == principal.tenant or f"{tenant}/{name}" in self._shared_names()):
            raise AdapterNotFound(adapter_id)
        record = self.store.get(tenant, name, version)
        require_use(principal, record, adapter_id)  # the record decides: unsharing applies at once
        return record

    def _shared_names(self) -> frozenset[str]:
        """`tenant/name` of every shared adapter, read at most every SHARED_FRESH_FOR_S whatever is asked."""
        with self._shared_lock:
            names, read_at = self._shared
            if time.monotonic() - read_at > SHARED_FRESH_FOR_S:
                names = frozenset(f"{r.tenant}/{r.name}" for r in self.store.index.latest_records(None) if r.shared)
                self._shared = (names, time.monotonic())
            return names

    def cached_lora_request(self, principal: Principal, adapter_id: str) -> LoraRequest | None:
        """The hot path: an id resolved less than FRESH_FOR_S ago (and not changed since), else None.
        Cheap enough for the event loop, so a burst of requests reaches the engine together."""
        with self._last_known_lock:
            record, resolved_at = self._last_known.get(adapter_id, (None, 0.0))
        if record is None or time.monotonic() - resolved_at > FRESH_FOR_S or not can_use(principal, record):
            return None  # another tenant's adapter takes the slow path, exactly like a missing one
        return record.lora_request()

    def lora_request(self, principal: Principal, adapter_id: str) -> LoraRequest:
        """For inference: falls back to the last version seen for this id while the index is unavailable."""
        try:
            record = self.store.get_by_id(adapter_id)
        except RegistryUnavailable:
            with self._last_known_lock:
                record, _ = self._last_known.get(adapter_id, (None, 0.0))
            if record is None or not can_use(principal, record):
                raise  # 503 for another tenant's adapter too: a 404 would tell it exists
            log.warning("registry unavailable: serving %s from the last known version", adapter_id)
        else:
            require_use(principal, record, adapter_id)
            self._remember(adapter_id, record)  # only what the caller may use: no cache warmed by probes
        return record.lora_request()

    def forget(self, tenant: str, name: str) -> None:
        """Drop last-known entries of a deleted adapter (all its version ids)."""
        prefix = f"{tenant}/{name}"
        self._expire_shared()
        with self._last_known_lock:
            for key in [k for k in self._last_known if k == prefix or k.startswith(prefix + "@")]:
                del self._last_known[key]

    def forget_all(self) -> None:
        """After a resync (messages may have been missed): nothing cached is fresh any more (the records
        stay as the outage fallback)."""
        self._expire_shared()
        with self._last_known_lock:
            for key, (record, _) in list(self._last_known.items()):
                self._last_known[key] = (record, 0.0)

    def _expire_shared(self) -> None:
        with self._shared_lock:
            self._shared = (self._shared[0], float("-inf"))

    def _remember(self, adapter_id: str, record: AdapterVersion) -> None:
        with self._last_known_lock:
            self._last_known[adapter_id] = (record, time.monotonic())
            self._last_known.move_to_end(adapter_id)
            while len(self._last_known) > MAX_LAST_KNOWN:
                self._last_known.popitem(last=False)

    def list(self, principal: Principal, after: str | None = None, limit: int = 50) -> list[AdapterVersion]:
        tenant = None if principal.is_admin else principal.tenant  # the admin (and dev mode) sees all
        records = self.store.list(tenant, include_shared=True, after=after, limit=limit)
        return [r for r in records if can_use(principal, r)]

    # --- writes ---------------------------------------------------------------------------
    def upload(self, principal: Principal, name: str, files: Mapping[str, bytes] | None = None,
               archive: bytes | None = None, tenant: str | None = None, shared: bool = False,
               promote: bool = True) -> AdapterVersion:
        """A new version of `<owner>/<name>`; `promote=False` keeps the bare name on its current version."""
        owner = self._owner_for_upload(principal, tenant)
        if shared and not principal.is_admin:
            raise Forbidden("only an admin can publish a shared adapter")
        if not is_id_part(name):
            raise InvalidAdapterFile("name must match [a-z0-9][a-z0-9_.-]{0,62}", "name", name)
        if archive is not None:
            files = extract_adapter_archive(archive, self.limits.max_adapter_bytes, self.limits.max_archive_members)
        validated = self._validate(files or {}, f"{owner}/{name}")
        return self.store.put(owner, name, files, validated, shared=shared, promote=promote)

    def delete(self, principal: Principal, adapter_id: str) -> AdapterVersion:
        record = self.manageable(principal, adapter_id)
        self.store.delete(record.tenant, record.name)
        self.forget(record.tenant, record.name)
        return record

    def manageable(self, principal: Principal, adapter_id: str) -> AdapterVersion:
        record = self.resolve(principal, adapter_id)
        require_manage(principal, record, adapter_id)
        return record

    def set_shared(self, principal: Principal, adapter_id: str, shared: bool) -> AdapterVersion:
        if not principal.is_admin:
            raise Forbidden("only an admin can share or unshare adapters")
        record = self.resolve(principal, adapter_id)
        files = {CONFIG_FILE: (record.path / CONFIG_FILE).read_bytes(), WEIGHTS_FILE: (record.path / WEIGHTS_FILE).read_bytes()}
        updated = self.store.put(record.tenant, record.name, files, self._validate(files, record.id), shared=shared)
        self._expire_shared()
        return updated

    def _owner_for_upload(self, principal: Principal, tenant: str | None) -> str:
        if tenant and tenant != principal.tenant and not principal.is_admin:
            raise Forbidden("a tenant can only upload adapters of its own")
        owner = tenant or principal.tenant
        if not owner or not is_id_part(owner):
            raise InvalidAdapterFile("give the owning tenant (admin uploads need `tenant`)", "tenant", "upload")
        return owner

    def _validate(self, files: Mapping[str, bytes], adapter_id: str) -> ValidatedAdapter:
        for required in (CONFIG_FILE, WEIGHTS_FILE):
            if required not in files:
                raise InvalidAdapterFile(f"missing {required}", required, adapter_id)
        return validate_adapter_files(
            files[CONFIG_FILE], files[WEIGHTS_FILE], self.module_shapes,
            self.limits.max_lora_rank, self.limits.max_adapter_bytes, adapter_id=adapter_id, dims=self.dims,
            kinds=self.kinds,
        )
