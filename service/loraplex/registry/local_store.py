"""Adapters on local disk: `<data_dir>/<tenant>/<name>/{adapter_config.json, adapter_model.safetensors}`.

The directory tree is the source of truth and is scanned on demand, so an adapter copied in while the
server runs is served without a restart. Parsed records are cached per adapter, keyed by the two files'
(mtime, size): a listing costs a few `stat` calls, and the sha256 is recomputed only when a file changes.
"""
from __future__ import annotations

import hashlib
import logging
import os
import re
import stat
import threading
from collections.abc import Collection
from dataclasses import dataclass
from pathlib import Path

from loraplex.engine.types import LoraRequest
from loraplex.registry.adapter_config import (
    CONFIG_FILE,
    WEIGHTS_FILE,
    InvalidAdapter,
    LoraSpec,
    RegistryError,
    load_lora_spec,
)

log = logging.getLogger(__name__)

# Lower-case, starts with a letter or digit: so never "", ".", ".." nor a dot-dir such as `.models`.
ID_PART = re.compile(r"^[a-z0-9][a-z0-9_.-]{0,62}$")
_HASH_CHUNK_BYTES = 1 << 20

_Signature = tuple[int, int, int, int]  # config (mtime_ns, size), weights (mtime_ns, size)


class AdapterNotFound(RegistryError):
    """Carries only the id asked for: a missing adapter and another tenant's private one read the same."""

    status = 404
    code = "model_not_found"
    param = "model"

    def __init__(self, adapter_id: str):
        super().__init__(f"The model `{adapter_id}` does not exist.")
        self.adapter_id = adapter_id


def parse_adapter_id(adapter_id: str) -> tuple[str, str]:
    """`<tenant>/<name>` -> (tenant, name); anything else is AdapterNotFound, before any path is built."""
    parts = adapter_id.split("/")
    if len(parts) != 2 or not all(ID_PART.fullmatch(part) for part in parts):
        raise AdapterNotFound(adapter_id)
    return parts[0], parts[1]


@dataclass(frozen=True)
class AdapterRecord:
    id: str
    tenant: str
    name: str
    path: Path
    rank: int
    alpha: float
    target_modules: tuple[str, ...]
    use_rslora: bool
    size_bytes: int
    sha256: str
    created: int  # unix seconds: mtime of the weights file

    def lora_request(self) -> LoraRequest:
        # Keyed by content, so a replaced adapter never hits a stale engine cache entry.
        return LoraRequest(key=f"{self.id}@{self.sha256[:16]}", path=str(self.path))


class LocalAdapterStore:
    def __init__(self, data_dir: Path, max_lora_rank: int, allowed_target_modules: Collection[str]):
        self.data_dir = Path(data_dir)
        self.max_lora_rank = max_lora_rank
        self.allowed_target_modules = frozenset(allowed_target_modules)
        self._cache: dict[str, tuple[_Signature, AdapterRecord | InvalidAdapter]] = {}
        self._lock = threading.Lock()

    def get(self, adapter_id: str) -> AdapterRecord:
        """The servable adapter with this id; AdapterNotFound or InvalidAdapter otherwise."""
        tenant, name = parse_adapter_id(adapter_id)
        result = self._load(tenant, name)
        if isinstance(result, InvalidAdapter):
            raise result
        return result

    def list(self) -> list[AdapterRecord]:
        """Every servable adapter, sorted by id; invalid ones are logged (once per change) and skipped."""
        seen = set()
        records = []
        for tenant, name in self._scan():
            seen.add(f"{tenant}/{name}")
            try:
                result = self._load(tenant, name)
            except AdapterNotFound:  # incomplete (still being copied) or removed meanwhile
                continue
            if isinstance(result, AdapterRecord):
                records.append(result)
        with self._lock:
            for stale in self._cache.keys() - seen:
                del self._cache[stale]
        return sorted(records, key=lambda record: record.id)

    def _scan(self) -> list[tuple[str, str]]:
        found = []
        for tenant in _child_dirs(self.data_dir):
            found.extend((tenant, name) for name in _child_dirs(self.data_dir / tenant))
        return found

    def _load(self, tenant: str, name: str) -> AdapterRecord | InvalidAdapter:
        adapter_id = f"{tenant}/{name}"
        directory = self.data_dir / tenant / name
        signature = _signature(directory)
        if signature is None:
            raise AdapterNotFound(adapter_id)
        with self._lock:
            cached = self._cache.get(adapter_id)
        if cached is not None and cached[0] == signature:
            return cached[1]
        result = self._build(adapter_id, directory, signature)
        with self._lock:
            self._cache[adapter_id] = (signature, result)
        return result

    def _build(self, adapter_id: str, directory: Path, signature: _Signature) -> AdapterRecord | InvalidAdapter:
        try:
            spec = load_lora_spec(directory, adapter_id, self.max_lora_rank, self.allowed_target_modules)
        except InvalidAdapter as exc:
            log.warning("%s", exc)
            return exc
        tenant, name = adapter_id.split("/")
        try:
            return _record(adapter_id, tenant, name, directory, spec, signature)
        except OSError:  # removed while we read it
            raise AdapterNotFound(adapter_id) from None


def _record(
    adapter_id: str, tenant: str, name: str, directory: Path, spec: LoraSpec, signature: _Signature
) -> AdapterRecord:
    weights = directory / WEIGHTS_FILE
    return AdapterRecord(
        id=adapter_id,
        tenant=tenant,
        name=name,
        path=directory,
        rank=spec.rank,
        alpha=spec.alpha,
        target_modules=spec.target_modules,
        use_rslora=spec.use_rslora,
        size_bytes=signature[3],
        sha256=_sha256(weights),
        created=signature[2] // 1_000_000_000,
    )


def _child_dirs(directory: Path) -> list[str]:
    """Names of real (not symlinked) subdirectories that are valid id parts."""
    try:
        entries = list(os.scandir(directory))
    except OSError:
        return []
    return [e.name for e in entries if ID_PART.fullmatch(e.name) and e.is_dir(follow_symlinks=False)]


def _signature(directory: Path) -> _Signature | None:
    """(mtime, size) of both files, or None if the adapter is absent or incomplete."""
    try:
        if directory.is_symlink() or directory.parent.is_symlink():
            return None  # never follow a link out of the data dir
        config = (directory / CONFIG_FILE).lstat()
        weights = (directory / WEIGHTS_FILE).lstat()
    except OSError:
        return None
    if not (stat.S_ISREG(config.st_mode) and stat.S_ISREG(weights.st_mode)):
        return None
    return config.st_mtime_ns, config.st_size, weights.st_mtime_ns, weights.st_size


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while chunk := handle.read(_HASH_CHUNK_BYTES):
            digest.update(chunk)
    return digest.hexdigest()
