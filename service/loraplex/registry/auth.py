"""API keys -> tenants, and who may use or manage which adapter. No web framework here: routes pass
the raw `Authorization` header in and map the typed errors out.

With no key configured at all the service runs in single-tenant dev mode: every caller is the admin of
tenant `default`. Configuring one key (tenant or admin) turns authentication on for everyone.
"""
from __future__ import annotations

import hashlib
import hmac
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from loraplex.registry.errors import AdapterNotFound, Forbidden, Unauthorized
from loraplex.registry.versioned_store import is_id_part

DEV_TENANT = "default"


@dataclass(frozen=True)
class Principal:
    tenant: str | None  # None: an admin acting for no tenant in particular
    is_admin: bool
    is_dev_mode: bool = False


DEV_PRINCIPAL = Principal(tenant=DEV_TENANT, is_admin=True, is_dev_mode=True)


class OwnedAdapter(Protocol):
    tenant: str
    shared: bool


def parse_api_keys(spec: str) -> dict[str, str]:
    """`"key1:acme,key2:globex"` -> {"key1": "acme", "key2": "globex"}. Errors name the entry's position,
    never the key, so a typo does not print a secret into the logs."""
    entries = [entry.strip() for entry in spec.split(",")]
    return _keys_from_entries([(f"entry {i + 1}", entry) for i, entry in enumerate(entries) if entry])


def parse_api_keys_file(path: Path) -> dict[str, str]:
    """One `key:tenant` per line; blank lines and `#` comments are skipped."""
    lines = Path(path).read_text().splitlines()
    entries = [(f"{path} line {i + 1}", line.strip()) for i, line in enumerate(lines)]
    return _keys_from_entries([(where, line) for where, line in entries if line and not line.startswith("#")])


def load_api_keys(spec: str | None = None, path: Path | None = None) -> dict[str, str]:
    """Keys from the comma-separated setting and the keys file together; a key may not name two tenants."""
    keys = parse_api_keys(spec) if spec else {}
    for key, tenant in (parse_api_keys_file(path) if path else {}).items():
        if keys.setdefault(key, tenant) != tenant:
            raise ValueError(f"an API key in {path} is also configured for tenant {keys[key]!r}")
    return keys


def authenticate(authorization_header: str | None, keys: Mapping[str, str], admin_key: str | None) -> Principal:
    """`Bearer <key>` -> the key's tenant (or the admin); Unauthorized for anything else."""
    if not keys and not admin_key:
        return DEV_PRINCIPAL
    token = _bearer_token(authorization_header)
    if admin_key and _same_secret(token, admin_key):
        return Principal(tenant=None, is_admin=True)
    tenant = _tenant_of(token, keys)
    if tenant is None:
        raise Unauthorized("invalid API key")
    return Principal(tenant=tenant, is_admin=False)


def can_use(principal: Principal, record: OwnedAdapter) -> bool:
    return principal.is_admin or record.tenant == principal.tenant or bool(getattr(record, "shared", False))


def can_manage(principal: Principal, record: OwnedAdapter) -> bool:
    return principal.is_admin or record.tenant == principal.tenant


def require_use(principal: Principal, record: OwnedAdapter, requested_id: str) -> None:
    """Another tenant's private adapter is reported exactly like a missing one."""
    if not can_use(principal, record):
        raise AdapterNotFound(requested_id)


def require_manage(principal: Principal, record: OwnedAdapter, requested_id: str) -> None:
    require_use(principal, record, requested_id)
    if not can_manage(principal, record):
        raise Forbidden(f"adapter {requested_id!r} is shared with you but owned by another tenant")


def _keys_from_entries(entries: list[tuple[str, str]]) -> dict[str, str]:
    keys: dict[str, str] = {}
    for where, entry in entries:
        key, _, tenant = entry.rpartition(":")  # rpartition: a key may itself hold ':'
        if not key or any(char.isspace() for char in key) or not is_id_part(tenant):
            raise ValueError(f"API key {where} must be `key:tenant` with a tenant matching [a-z0-9][a-z0-9_.-]*")
        if keys.setdefault(key, tenant) != tenant:
            raise ValueError(f"API key {where} is already configured for tenant {keys[key]!r}")
    return keys


def _bearer_token(authorization_header: str | None) -> str:
    if not authorization_header:
        raise Unauthorized("missing Authorization header (expected `Bearer <api key>`)")
    scheme, _, token = authorization_header.strip().partition(" ")
    token = token.strip()
    if scheme.lower() != "bearer" or not token or any(char.isspace() for char in token):
        raise Unauthorized("malformed Authorization header (expected `Bearer <api key>`)")
    return token


def _tenant_of(token: str, keys: Mapping[str, str]) -> str | None:
    """Compares against every key, without stopping early, so timing says nothing about which matched."""
    found = None
    for key, tenant in keys.items():
        if _same_secret(token, key):
            found = tenant
    return found


def _same_secret(given: str, expected: str) -> bool:
    # Digests first: equal lengths, so compare_digest does not leak the expected key's length either.
    return hmac.compare_digest(hashlib.sha256(given.encode()).digest(), hashlib.sha256(expected.encode()).digest())
