"""Typed registry errors, each with an HTTP-ish `status` and a stable `code` for the one error handler.

`RegistryError`, `InvalidAdapter` and `AdapterNotFound` already exist (read-only store) and are reused
here, not redefined: their status and code come from `http_status` / `error_code`, so a handler can map
any `RegistryError` with two calls. `AdapterNotFound` carries only the id that was asked for, so a
missing adapter and another tenant's private one read exactly the same (no existence oracle).
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
    "error_code",
    "error_param",
    "http_status",
    "storage_error",
]

_NAMED_IN_MESSAGE = ("adapter_config.json", "adapter_model.safetensors", "archive")
# Statuses of the classes defined before this module existed (they carry no attributes of their own).
_REUSED_STATUS_AND_CODE: dict[type[RegistryError], tuple[int, str]] = {
    AdapterNotFound: (404, "adapter_not_found"),
    InvalidAdapter: (400, "invalid_adapter"),
}


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
    """Missing, malformed or unknown API key; the handler should add `WWW-Authenticate: Bearer`."""

    status = 401
    code = "unauthorized"


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


def http_status(exc: RegistryError) -> int:
    """400/401/403/404/413/503 for every registry error; 500 for one this module does not know."""
    if hasattr(exc, "status"):
        return exc.status
    return _reused_status_and_code(exc)[0]


def error_code(exc: RegistryError) -> str:
    if hasattr(exc, "code"):
        return exc.code
    return _reused_status_and_code(exc)[1]


def error_param(exc: RegistryError) -> str | None:
    """The offending file or field, when the error names one."""
    return getattr(exc, "param", None)


def _reused_status_and_code(exc: RegistryError) -> tuple[int, str]:
    for cls, status_and_code in _REUSED_STATUS_AND_CODE.items():
        if isinstance(exc, cls):
            return status_and_code
    return 500, "registry_error"
