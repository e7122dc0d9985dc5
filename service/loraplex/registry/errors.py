"""Typed registry errors. Each carries its `status`, `code` and `param` (the base class is in
loraplex/errors.py), so the API's one handler maps any of them without a table here.

`RegistryError`, `InvalidAdapter` and `AdapterNotFound` live beside the read-only store and are reused
here, not redefined. `AdapterNotFound` carries only the id that was asked for, so a missing adapter and
another tenant's private one read exactly the same (no existence oracle).
"""
from __future__ import annotations

import errno

from loraplex.registry.adapter_config import InvalidAdapter, RegistryError
from loraplex.registry.local_store import AdapterNotFound

__all__ = [
    "AdapterNotFound",
    "AdapterTooLarge",
    "Forbidden",
    "InvalidAdapter",
    "InvalidAdapterFile",
    "QuotaExceeded",
    "RegistryError",
    "RegistryUnavailable",
    "StorageFull",
    "StorageUnavailable",
    "Unauthorized",
    "storage_error",
]

_NAMED_IN_MESSAGE = ("adapter_config.json", "adapter_model.safetensors", "archive")


class InvalidAdapterFile(InvalidAdapter):
    """An uploaded file or field is refused; `param` names it (`adapter_model.safetensors`, `r`...).
    The message names the file too (`... cannot be served: adapter_config.json: not valid JSON`) unless
    the reason already does, so it reads on its own, without `param`."""

    def __init__(self, reason: str, param: str, adapter_id: str = "upload"):
        shown = f"{param}: {reason}" if param in _NAMED_IN_MESSAGE and param not in reason else reason
        super().__init__(adapter_id, shown)
        self.reason = reason  # as given: re-raising with another adapter id adds the name once
        self.param = param


class AdapterTooLarge(RegistryError):
    status = 413
    code = "adapter_too_large"

    def __init__(self, num_bytes: int, max_bytes: int, what: str = "adapter"):
        super().__init__(f"{what} is {num_bytes} bytes, more than the limit of {max_bytes} bytes")
        self.num_bytes = num_bytes
        self.max_bytes = max_bytes


class QuotaExceeded(RegistryError):
    """403, not 429: the condition lasts until the tenant deletes adapters or an operator raises the
    quota, so waiting never helps, and 429 makes OpenAI-style SDKs retry the upload automatically."""

    status = 403
    code = "quota_exceeded"


class Unauthorized(RegistryError):
    """Missing, malformed or unknown API key."""

    status = 401
    code = "unauthorized"
    headers = {"WWW-Authenticate": "Bearer"}


class Forbidden(RegistryError):
    """The caller may see the adapter (shared) or the route, but not change it."""

    status = 403
    code = "forbidden"


class RegistryUnavailable(RegistryError):
    """Storage (disk, later Redis) failed; the request may succeed if retried."""

    status = 503
    code = "registry_unavailable"


class StorageFull(RegistryUnavailable):
    """507 Insufficient Storage: the data volume (or a quota on it) is full. Not 503: retrying does not
    help until an operator frees space; not 413: the request itself is within every limit. Still a kind
    of RegistryUnavailable for callers that catch that (storing failed, nothing was stored)."""

    status = 507
    code = "insufficient_storage"


class StorageUnavailable(RegistryUnavailable):
    """503: the data volume cannot be written (read-only, permissions, I/O error); reads still work."""

    code = "storage_unavailable"


_FULL_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EFBIG})
_UNWRITABLE_ERRNOS = frozenset({errno.EROFS, errno.EACCES, errno.EPERM, errno.EIO})


def storage_error(exc: OSError, action: str) -> RegistryError | None:
    """The typed error for a failed write of the data volume, or None for an OSError of another kind."""
    reason = exc.strerror or str(exc)
    if exc.errno in _FULL_ERRNOS:
        return StorageFull(f"cannot {action}: the storage volume is full ({reason})")
    if exc.errno in _UNWRITABLE_ERRNOS:
        return StorageUnavailable(f"cannot {action}: storage is not writable ({reason})")
    return None

