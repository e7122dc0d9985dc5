"""Immutable adapter versions: blobs on the local filesystem, "which versions exist" in an `AdapterIndex`.

    <data_dir>/<tenant>/<name>/v<n>/{adapter_config.json, adapter_model.safetensors, meta.json}
    <data_dir>/<tenant>/<name>/latest     "<n>": the version the bare name serves (the newest promoted one)
    <data_dir>/<tenant>/<name>/newest     "<n>": the highest published version, promoted or not
    <data_dir>/<tenant>/<name>/{adapter_config.json, adapter_model.safetensors}   legacy flat = version 1
    <data_dir>/.staging/ .trash/ .locks/   dot-dirs, never a tenant (id parts start with [a-z0-9])

A put is built in `.staging/`, fsynced, renamed into place, then published by the index, then marked
published on disk (`newest`, `latest`): a version dir above `newest` that the index does not know is what a
killed put left; it is never served and the next put of that adapter (or the next start) removes it, so
its number is handed out again and nothing unacknowledged ever becomes servable. A publish whose answer
was lost (Redis stalled) is resolved by reading back and publishing again (idempotent), never by deleting
files the index may already point at. The disk pointers make the index rebuildable (`index_repair`). A put with `promote=False` (a fine-tuned
adapter that did not beat the base model) is served as `name@n` only; the bare name keeps its version. A delete renames the whole adapter dir into
`.trash/` (404 from that instant), then removes it. Writers to one tenant hold one lock (thread lock +
flock, so several workers agree) because the quota is per tenant; readers hold none: a version never
changes and every switch is a rename.
"""
from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import os
import re
import shutil
import tempfile
import threading
import time
import uuid
from collections.abc import Collection, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, Protocol

from loraplex.engine.model import LORA_MODULES
from loraplex.failpoints import failpoint
from loraplex.engine.types import LoraRequest
from loraplex.registry.adapter_config import CONFIG_FILE, WEIGHTS_FILE
from loraplex.registry.adapter_kinds import DORA, LORA
from loraplex.registry.errors import (
    AdapterNotFound, InvalidAdapter, InvalidAdapterFile, QuotaExceeded, RegistryUnavailable, storage_error,
)
from loraplex.registry.local_store import ID_PART, LocalAdapterStore
from loraplex.registry.validation import ValidatedAdapter, adapter_digest

log = logging.getLogger(__name__)

META_FILE = "meta.json"
LATEST_FILE = "latest"
NEWEST_FILE = "newest"
MAX_LIST_LIMIT = 1000
_VERSION_TEXT = re.compile(r"^[1-9][0-9]{0,8}$")  # [0-9], not \d: no other scripts' digits
_VERSION_DIR = re.compile(r"^v([1-9][0-9]{0,8})$")


@dataclass(frozen=True)
class AdapterVersion:
    id: str  # "<tenant>/<name>"
    tenant: str
    name: str
    version: int  # 1, 2, ...; never reused while the adapter exists
    sha256: str  # content digest of both files (validation.adapter_digest)
    rank: int
    alpha: float
    target_modules: tuple[str, ...]
    size_bytes: int  # config + weights
    created_at: int  # unix seconds
    shared: bool  # usable by every tenant; the latest version's flag applies to it and all older versions
    path: Path  # directory holding the two adapter files
    kind: str = LORA  # adapter_kinds.ALL_KINDS: lora | dora | prompt_tuning | prefix_tuning
    num_virtual_tokens: int = 0  # prompt/prefix tuning only

    @property
    def versioned_id(self) -> str:
        return f"{self.id}@{self.version}"

    @property
    def lora_key(self) -> str:
        return f"{self.tenant}/{self.name}@{self.version}:{self.sha256[:12]}"

    def lora_request(self) -> LoraRequest:
        return LoraRequest(key=self.lora_key, path=str(self.path))

    def to_meta(self) -> dict[str, Any]:
        """What meta.json holds: everything but `path`, so a data dir can be moved."""
        meta = asdict(self)
        del meta["path"]
        return {**meta, "target_modules": list(self.target_modules)}

    @classmethod
    def from_meta(cls, meta: Mapping[str, Any], path: Path) -> AdapterVersion:
        """A record written before kinds existed (no `kind`) takes its kind from its stored config."""
        kind = {} if "kind" in meta else _kind_fields(_read_config(path / CONFIG_FILE))
        return cls(**{**meta, **kind, "target_modules": tuple(meta["target_modules"]), "path": path})


@dataclass(frozen=True)
class TenantQuota:
    max_adapters: int = 100
    max_bytes: int = 10 << 30  # every version counts


def parse_adapter_id(adapter_id: str) -> tuple[str, str, int | None]:
    """`<tenant>/<name>` or `<tenant>/<name>@<n>` -> (tenant, name, n or None); AdapterNotFound otherwise,
    before any path is built. `%`, `/`, `\\` and `..` can never reach a path."""
    base, has_version, version_text = adapter_id.partition("@")
    parts = base.split("/")
    if len(parts) != 2 or not all(map(is_id_part, parts)):
        raise AdapterNotFound(adapter_id)
    if has_version and not _VERSION_TEXT.fullmatch(version_text):
        raise AdapterNotFound(adapter_id)
    return parts[0], parts[1], int(version_text) if has_version else None


def is_id_part(part: str) -> bool:
    return ID_PART.fullmatch(part) is not None and ".." not in part


class AdapterIndex(Protocol):
    """Which versions are published and their records. Blobs stay on the filesystem whatever the index;
    a Redis implementation keeps these four verbs (records as JSON, one latest pointer per adapter)."""

    def get(self, tenant: str, name: str, version: int | None) -> AdapterVersion | None:
        """The record of `version` (None: the latest), or None if it is not published."""

    def publish(self, record: AdapterVersion, promote: bool = True) -> None:
        """Make `record` (already on disk) servable as `name@version`, and (promote) the latest of its adapter."""

    def remove(self, tenant: str, name: str) -> None:
        """Forget every version of the adapter (its blobs are removed right after)."""

    def latest_records(self, tenant: str | None) -> list[AdapterVersion]:
        """The latest version of every adapter of `tenant` (None: all tenants), sorted by id."""


class LocalJsonIndex:
    """The filesystem is the index: `latest` pointers and per-version `meta.json`; legacy flat adapters
    are read through the read-only `LocalAdapterStore` (which caches their hashes)."""

    def __init__(self, data_dir: Path, max_lora_rank: int, allowed_target_modules: Collection[str]):
        self.data_dir = Path(data_dir)
        self._legacy = LocalAdapterStore(data_dir, max_lora_rank, allowed_target_modules)

    def get(self, tenant: str, name: str, version: int | None) -> AdapterVersion | None:
        adapter_dir = self.data_dir / tenant / name
        if version is None:
            version = self._latest_version(adapter_dir)
        elif version > (self._newest_version(adapter_dir) or 0):
            version = None
        if version is None:
            return None
        meta_path = adapter_dir / f"v{version}" / META_FILE
        if meta_path.is_file():
            return _read_meta(meta_path)
        return self._legacy_record(tenant, name) if version == 1 else None

    def publish(self, record: AdapterVersion, promote: bool = True) -> None:
        write_published_mark(record.path.parent, record.version, promote)  # the marks are this index

    def remove(self, tenant: str, name: str) -> None:
        pass  # the pointer lives in the adapter dir, which the store moves away next

    def latest_records(self, tenant: str | None) -> list[AdapterVersion]:
        tenants = [tenant] if tenant is not None else _id_subdirs(self.data_dir)
        records = []
        for owner in tenants:
            for name in _id_subdirs(self.data_dir / owner):
                try:
                    record = self.get(owner, name, None)
                except (AdapterNotFound, InvalidAdapter):  # legacy adapter removed meanwhile, or unservable
                    continue
                if record is not None:
                    records.append(record)
        return sorted(records, key=lambda record: record.id)

    def _newest_version(self, adapter_dir: Path) -> int | None:
        try:
            return int((adapter_dir / NEWEST_FILE).read_text().strip())
        except FileNotFoundError:
            return self._latest_version(adapter_dir)  # written before `newest` existed
        except (OSError, ValueError):
            log.warning("unreadable %s in %s", NEWEST_FILE, adapter_dir)
            return None

    def _latest_version(self, adapter_dir: Path) -> int | None:
        try:
            return int((adapter_dir / LATEST_FILE).read_text().strip())
        except FileNotFoundError:
            return 1 if (adapter_dir / CONFIG_FILE).is_file() else None  # legacy flat layout
        except (OSError, ValueError):
            log.warning("unreadable %s in %s", LATEST_FILE, adapter_dir)
            return None

    def _legacy_record(self, tenant: str, name: str) -> AdapterVersion:
        legacy = self._legacy.get(f"{tenant}/{name}")
        try:
            config_bytes = (legacy.path / CONFIG_FILE).read_bytes()
        except OSError:  # removed since the read-only store looked
            raise AdapterNotFound(legacy.id) from None
        return AdapterVersion(
            id=legacy.id, tenant=tenant, name=name, version=1, sha256=adapter_digest(config_bytes, legacy.sha256),
            rank=legacy.rank, alpha=legacy.alpha, target_modules=legacy.target_modules,
            size_bytes=len(config_bytes) + legacy.size_bytes, created_at=legacy.created, shared=False, path=legacy.path,
            **_kind_fields(_parse_config(config_bytes)),
        )


class VersionedAdapterStore:
    def __init__(
        self, data_dir: Path, quota: TenantQuota = TenantQuota(), index: AdapterIndex | None = None,
        max_lora_rank: int = 256, allowed_target_modules: Collection[str] = LORA_MODULES,
    ):
        self.data_dir = Path(data_dir)
        self.quota = quota
        self.index = index or LocalJsonIndex(self.data_dir, max_lora_rank, allowed_target_modules)
        self._locks: dict[str, threading.Lock] = {}
        self._locks_guard = threading.Lock()
        for hidden in (".staging", ".trash", ".locks"):
            (self.data_dir / hidden).mkdir(parents=True, exist_ok=True)
        _sweep_leftovers(self.data_dir)
        self.settle_all()

    def put(self, tenant: str, name: str, files: Mapping[str, bytes], validated: ValidatedAdapter, shared: bool = False,
            promote: bool = True) -> AdapterVersion:
        """Store a new immutable version (the next number); all or nothing. Not `promote`d: `name@n` only."""
        _require_id_part(tenant, "tenant")
        _require_id_part(name, "name")
        config_bytes, weights_bytes = _checked_files(files, validated)
        try:
            staging = Path(tempfile.mkdtemp(prefix="put-", dir=self.data_dir / ".staging"))
            try:
                _stage(staging, config_bytes, weights_bytes)
                with self._tenant_lock(tenant):
                    self._check_quota(tenant, name, validated.num_bytes)
                    return self._commit(staging, tenant, name, validated, shared, promote)
            finally:
                shutil.rmtree(staging, ignore_errors=True)  # already renamed away unless the put failed
        except OSError as exc:  # 507 when the volume is full, 503 when it cannot be written or read
            action = f"store adapter {tenant}/{name}"
            raise storage_error(exc, action) or RegistryUnavailable(f"cannot {action}: {exc.strerror or exc}") from exc

    def get(self, tenant: str, name: str, version: int | None = None) -> AdapterVersion:
        """The record (latest unless `version`); AdapterNotFound if absent, whatever the reason."""
        requested = f"{tenant}/{name}" + (f"@{version}" if version is not None else "")
        if not (is_id_part(tenant) and is_id_part(name)) or (version is not None and version < 1):
            raise AdapterNotFound(requested)
        record = self.index.get(tenant, name, version)
        if record is None:
            raise AdapterNotFound(requested)
        latest = record if version is None else self.index.get(tenant, name, None)
        if latest is None or record.version > latest.version:
            return record  # unpromoted: only its own flag, never the latest's (a fine-tune is not shared by inheritance)
        return replace(record, shared=latest.shared)  # sharing is per adapter: unsharing covers old versions

    def get_by_id(self, adapter_id: str) -> AdapterVersion:
        return self.get(*parse_adapter_id(adapter_id))

    def list(self, tenant: str | None, include_shared: bool = True, after: str | None = None, limit: int = 50) -> list[AdapterVersion]:
        """Latest versions visible to `tenant` (its own, plus shared ones; None: all), by id, after `after`."""
        limit = max(1, min(limit, MAX_LIST_LIMIT))
        records = self.index.latest_records(None if tenant is None or include_shared else tenant)
        visible = [r for r in records if tenant is None or r.tenant == tenant or (include_shared and r.shared)]
        return [r for r in visible if after is None or r.id > after][:limit]

    def delete(self, tenant: str, name: str) -> None:
        """Remove every version; the adapter is not found from the moment this returns (or raises)."""
        if not (is_id_part(tenant) and is_id_part(name)):
            raise AdapterNotFound(f"{tenant}/{name}")
        adapter_dir = self.data_dir / tenant / name
        trash = self.data_dir / ".trash" / f"{tenant}.{name}.{uuid.uuid4().hex}"
        try:
            with self._tenant_lock(tenant):  # opening the lock file fails too on a read-only volume
                if adapter_dir.is_symlink() or not adapter_dir.is_dir():
                    raise AdapterNotFound(f"{tenant}/{name}")
                self.index.remove(tenant, name)  # first: an index elsewhere (Redis) must not point at gone blobs
                os.rename(adapter_dir, trash)  # atomic: readers see all versions or none
                _remove_if_empty(adapter_dir.parent)
        except OSError as exc:
            action = f"delete adapter {tenant}/{name}"
            raise storage_error(exc, action) or RegistryUnavailable(f"cannot {action}: {exc.strerror or exc}") from exc
        shutil.rmtree(trash, ignore_errors=True)

    def usage(self, tenant: str) -> tuple[int, int]:
        """(number of adapters, bytes on disk over all their versions) of one tenant."""
        tenant_dir = self.data_dir / tenant
        names = _id_subdirs(tenant_dir)
        return len(names), sum(_tree_bytes(tenant_dir / name) for name in names)

    def _check_quota(self, tenant: str, name: str, num_new_bytes: int) -> None:
        num_adapters, num_bytes = self.usage(tenant)
        is_new_adapter = not (self.data_dir / tenant / name).is_dir()
        if is_new_adapter and num_adapters + 1 > self.quota.max_adapters:
            raise QuotaExceeded(f"tenant {tenant!r} already has {num_adapters} adapters (quota {self.quota.max_adapters})")
        if num_bytes + num_new_bytes > self.quota.max_bytes:
            raise QuotaExceeded(f"tenant {tenant!r} would store {num_bytes + num_new_bytes} bytes (quota {self.quota.max_bytes})")

    def _commit(self, staging: Path, tenant: str, name: str, validated: ValidatedAdapter, shared: bool,
                promote: bool) -> AdapterVersion:
        adapter_dir = self.data_dir / tenant / name
        self.settle(tenant, name)  # under the tenant lock: what a killed put left goes before a number is drawn
        record = _new_record(tenant, name, self._allocate_version(tenant, name), validated, shared, adapter_dir)
        _write_synced(staging / META_FILE, json.dumps(record.to_meta(), indent=2).encode())
        _fsync_dir(staging)
        new_dirs = [d for d in (adapter_dir.parent, adapter_dir) if not d.exists()]
        adapter_dir.mkdir(parents=True, exist_ok=True)
        try:
            if adapter_dir in new_dirs:
                _write_atomically(adapter_dir / NEWEST_FILE, b"0\n")  # a new adapter: every later dir is judged
            self._move_and_publish(staging, record, promote)
        except BaseException:
            for directory in reversed(new_dirs):
                (directory / NEWEST_FILE).unlink(missing_ok=True)  # the mark of a new adapter that never was
                _remove_if_empty(directory)
            raise
        return record

    def _allocate_version(self, tenant: str, name: str) -> int:
        """From the index: Redis hands out numbers atomically (any replica; above what is on disk, so a lost
        Redis never reuses one); the local index is the disk, where leftovers were just removed."""
        floor = _next_version(self.data_dir / tenant / name) - 1
        next_version = getattr(self.index, "next_version", None)
        return next_version(tenant, name, floor) if next_version is not None else floor + 1

    def _move_and_publish(self, staging: Path, record: AdapterVersion, promote: bool) -> None:
        os.rename(staging, record.path)  # the version dir appears whole or not at all
        failpoint("versioned_store.after_rename")
        try:
            _fsync_dir(record.path.parent)
            failpoint("versioned_store.before_publish")
            self.index.publish(record, promote)
        except RegistryUnavailable:  # ambiguous: the publish may have been applied (or still be on its way)
            self._resolve_publish(record, promote)
        except BaseException:
            shutil.rmtree(record.path, ignore_errors=True)  # never published, so never served meanwhile
            raise
        failpoint("versioned_store.after_publish")
        try:
            write_published_mark(record.path.parent, record.version, promote)
        except OSError as exc:  # published and served; the next settle repairs the mark from the index
            log.warning("%s published but not marked on disk: %s", record.versioned_id, exc)

    def _resolve_publish(self, record: AdapterVersion, promote: bool) -> None:
        """Read back; publish again if absent (idempotent: same record, the latest pointer only moves
        forward). Still no answer: 503, and the files stay, since the index may point at them already."""
        for attempt in range(PUBLISH_RESOLVE_ATTEMPTS):
            time.sleep(PUBLISH_RESOLVE_PAUSE_S * attempt)
            try:
                if self.index.get(record.tenant, record.name, record.version) is None:
                    self.index.publish(record, promote)
                log.warning("publish of %s resolved after its answer was lost", record.versioned_id)
                return
            except RegistryUnavailable as exc:
                last_error = exc
        log.error("publish of %s unresolved (index unreachable); its files are kept", record.versioned_id)
        raise last_error

    def settle(self, tenant: str, name: str) -> None:
        """Call under the tenant lock. A version dir above the `newest` mark is an unfinished put: if the
        index knows it (its publish answer was lost), mark it published; else it was never acknowledged
        and goes to the trash. Without a mark (data from before marks) nothing is judged."""
        adapter_dir = self.data_dir / tenant / name
        mark = published_mark(adapter_dir)
        for version in _version_dirs(adapter_dir):
            if mark is not None and version <= mark:
                continue
            record = self.index.get(tenant, name, version)
            if record is not None:
                latest = self.index.get(tenant, name, None)
                write_published_mark(adapter_dir, version, latest is not None and latest.version == version)
                mark = version
            elif mark is not None:
                log.warning("removing %s/%s v%d: a put that was never published (a crash or kill)", tenant, name, version)
                trash = self.data_dir / ".trash" / f"{tenant}.{name}.v{version}.{uuid.uuid4().hex}"
                os.rename(adapter_dir / f"v{version}", trash)
                shutil.rmtree(trash, ignore_errors=True)

    def settle_all(self) -> None:
        """At start: settle every adapter (skipped while the index is unreachable)."""
        for tenant in _id_subdirs(self.data_dir):
            try:
                with self._tenant_lock(tenant):
                    for name in _id_subdirs(self.data_dir / tenant):
                        self.settle(tenant, name)
            except (RegistryUnavailable, OSError) as exc:
                log.warning("cannot check tenant %s for unfinished puts now: %s", tenant, exc)

    @contextmanager
    def _tenant_lock(self, tenant: str) -> Iterator[None]:
        with self._locks_guard:
            lock = self._locks.setdefault(tenant, threading.Lock())
        with lock, open(self.data_dir / ".locks" / f"{tenant}.lock", "a") as handle:
            fcntl.flock(handle, fcntl.LOCK_EX)  # released when the handle closes
            yield


PUBLISH_RESOLVE_ATTEMPTS = 2
PUBLISH_RESOLVE_PAUSE_S = 0.5
STAGING_LEFTOVER_AGE_S = 3600.0  # a put stages for seconds: an older staging dir was left by a crash


def _sweep_leftovers(data_dir: Path) -> None:
    """What a killed process left: half-written puts in `.staging/` (only old ones: on a shared volume a
    replica may be staging one right now) and unfinished deletes in `.trash/` (all: they are already gone)."""
    now = time.time()
    for hidden, min_age_s in ((".staging", STAGING_LEFTOVER_AGE_S), (".trash", 0.0)):
        try:
            entries = list(os.scandir(data_dir / hidden))
        except OSError:
            continue
        for entry in entries:
            try:
                if now - entry.stat(follow_symlinks=False).st_mtime >= min_age_s:
                    if entry.is_dir(follow_symlinks=False):
                        shutil.rmtree(entry.path, ignore_errors=True)
                    else:
                        os.unlink(entry.path)
            except OSError:
                continue  # removed meanwhile, or a read-only volume: nothing to do


def _new_record(tenant: str, name: str, version: int, validated: ValidatedAdapter, shared: bool, adapter_dir: Path) -> AdapterVersion:
    return AdapterVersion(
        id=f"{tenant}/{name}", tenant=tenant, name=name, version=version, sha256=validated.sha256,
        rank=validated.rank, alpha=validated.alpha, target_modules=validated.target_modules,
        size_bytes=validated.num_bytes, created_at=int(time.time()), shared=shared, path=adapter_dir / f"v{version}",
        kind=validated.kind, num_virtual_tokens=validated.num_virtual_tokens,
    )


def _kind_fields(config: Mapping[str, Any]) -> dict[str, Any]:
    """`kind` and `num_virtual_tokens` of a validated config (an unreadable one: plain LoRA, as before kinds)."""
    peft_type = config.get("peft_type")
    if peft_type in ("PROMPT_TUNING", "PREFIX_TUNING"):
        tokens = config.get("num_virtual_tokens")
        return {"kind": peft_type.lower(), "num_virtual_tokens": tokens if isinstance(tokens, int) else 0}
    return {"kind": DORA if config.get("use_dora") is True else LORA, "num_virtual_tokens": 0}


def _read_config(path: Path) -> Mapping[str, Any]:
    try:
        return _parse_config(path.read_bytes())
    except OSError:
        return {}


def _parse_config(config_bytes: bytes) -> Mapping[str, Any]:
    try:
        config = json.loads(config_bytes)
    except ValueError:
        return {}
    return config if isinstance(config, dict) else {}


def _stage(staging: Path, config_bytes: bytes, weights_bytes: bytes) -> None:
    staging.chmod(0o755)  # mkdtemp's 0700 would hide the version from a server running as another user
    _write_synced(staging / CONFIG_FILE, config_bytes)
    _write_synced(staging / WEIGHTS_FILE, weights_bytes)


def _checked_files(files: Mapping[str, bytes], validated: ValidatedAdapter) -> tuple[bytes, bytes]:
    """The two files, and proof that they are the ones `validated` describes."""
    missing = [f for f in (CONFIG_FILE, WEIGHTS_FILE) if f not in files]
    if missing:
        raise InvalidAdapterFile(f"{missing[0]} is missing", missing[0])
    config_bytes, weights_bytes = files[CONFIG_FILE], files[WEIGHTS_FILE]
    weights_sha256 = hashlib.sha256(weights_bytes).hexdigest()
    if weights_sha256 != validated.weights_sha256 or adapter_digest(config_bytes, weights_sha256) != validated.sha256:
        raise InvalidAdapterFile("files differ from the ones that were validated", WEIGHTS_FILE)
    return config_bytes, weights_bytes


def _require_id_part(part: str, field: str) -> None:
    if not is_id_part(part):
        raise InvalidAdapterFile(f"{field} {part!r} must match {ID_PART.pattern} (no '..')", field)


def _next_version(adapter_dir: Path) -> int:
    """One above every version on disk (published or not, legacy flat = 1): numbers are never reused."""
    versions = [int(m[1]) for m in map(_VERSION_DIR.fullmatch, _entry_names(adapter_dir)) if m]
    if (adapter_dir / CONFIG_FILE).is_file():
        versions.append(1)
    return max(versions, default=0) + 1


def _version_dirs(adapter_dir: Path) -> list[int]:
    return sorted(int(m[1]) for m in map(_VERSION_DIR.fullmatch, _entry_names(adapter_dir)) if m)


def published_mark(adapter_dir: Path) -> int | None:
    """The highest version marked published on disk (`newest`, else `latest`); None: no mark at all."""
    for pointer in (NEWEST_FILE, LATEST_FILE):
        try:
            return int((adapter_dir / pointer).read_text().strip())
        except FileNotFoundError:
            continue
        except (OSError, ValueError):
            log.warning("unreadable %s in %s", pointer, adapter_dir)
            return None
    return None


def write_published_mark(adapter_dir: Path, version: int, promote: bool) -> None:
    """`newest` (only forward) and, if promoted, `latest`: what a rebuilt index publishes again."""
    if version > (published_mark(adapter_dir) or 0):
        _write_atomically(adapter_dir / NEWEST_FILE, f"{version}\n".encode())
    if promote and _read_version(adapter_dir / LATEST_FILE) != version:
        _write_atomically(adapter_dir / LATEST_FILE, f"{version}\n".encode())


def _read_version(path: Path) -> int | None:
    try:
        return int(path.read_text().strip())
    except (OSError, ValueError):
        return None


def _read_meta(path: Path) -> AdapterVersion | None:
    try:
        return AdapterVersion.from_meta(json.loads(path.read_bytes()), path.parent)
    except FileNotFoundError:  # deleted meanwhile
        return None
    except (OSError, ValueError, TypeError, KeyError):
        log.warning("unreadable %s", path)
        return None


def _entry_names(directory: Path) -> list[str]:
    try:
        return os.listdir(directory)
    except OSError:
        return []


def _id_subdirs(directory: Path) -> list[str]:
    """Names of real (not symlinked) subdirectories that are valid id parts."""
    try:
        entries = list(os.scandir(directory))
    except OSError:
        return []
    return sorted(e.name for e in entries if is_id_part(e.name) and e.is_dir(follow_symlinks=False))


def _tree_bytes(directory: Path) -> int:
    total = 0
    for root, _, names in os.walk(directory):
        for name in names:
            try:
                total += os.lstat(os.path.join(root, name)).st_size
            except OSError:
                continue
    return total


def _write_synced(path: Path, data: bytes) -> None:
    with open(path, "xb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())


def _write_atomically(path: Path, data: bytes) -> None:
    """Readers see the old file or the new one, never a partial one, even after a crash."""
    tmp = path.with_name(f".{path.name}.tmp-{uuid.uuid4().hex}")
    try:
        _write_synced(tmp, data)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    _fsync_dir(path.parent)


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _remove_if_empty(directory: Path) -> None:
    try:
        directory.rmdir()
    except OSError:
        pass  # not empty (or already gone): nothing to tidy
