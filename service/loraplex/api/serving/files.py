"""Training files: translate uploads and lookups into `FileStore` calls, for the caller's tenant only."""
from __future__ import annotations

import asyncio

from fastapi import UploadFile

from loraplex.api.errors import InvalidParameter, PayloadTooLarge
from loraplex.api.schemas.files import FilePublic, FilesPublic
from loraplex.registry.auth import Principal
from loraplex.registry.errors import Forbidden, storage_error
from loraplex.registry.versioned_store import is_id_part
from loraplex.training.files import PURPOSES, FileRecord, FileStore


async def upload(store: FileStore, principal: Principal, file: UploadFile, purpose: str, tenant: str | None) -> FilePublic:
    if purpose not in PURPOSES:
        raise InvalidParameter(f"purpose must be one of {', '.join(PURPOSES)}, got {purpose!r}", param="purpose")
    owner = owner_for_upload(principal, tenant)
    data = await file.read(store.max_bytes + 1)
    if len(data) > store.max_bytes:
        raise PayloadTooLarge(f"file is larger than the limit of {store.max_bytes} bytes", param="file")
    try:
        record = await asyncio.to_thread(store.create, owner, file.filename or "upload.jsonl", purpose, data)
    except OSError as exc:
        raise storage_error(exc, f"store the file for tenant {owner}") or exc from exc
    return to_public(record)


def owner_for_upload(principal: Principal, tenant: str | None) -> str:
    """A tenant uploads for itself; the admin names the tenant (`tenant` form field)."""
    if tenant and tenant != principal.tenant and not principal.is_admin:
        raise Forbidden("a tenant can only upload files of its own")
    owner = tenant or principal.tenant
    if not owner or not is_id_part(owner):
        raise InvalidParameter("give the owning tenant (admin uploads need `tenant`)", param="tenant")
    return owner


def visible_tenant(principal: Principal) -> str | None:
    """Whose files and jobs the caller sees: its own; the admin (and dev mode) every tenant's."""
    return None if principal.is_admin else principal.tenant


def get(store: FileStore, principal: Principal, file_id: str) -> FileRecord:
    return store.get(visible_tenant(principal), file_id)


def list_public(store: FileStore, principal: Principal, purpose: str | None, after: str | None, limit: int) -> FilesPublic:
    records = store.list(visible_tenant(principal), purpose)
    page, has_more = paginate(records, after, limit)
    return FilesPublic(data=[to_public(r) for r in page], has_more=has_more)


def paginate(items: list, after: str | None, limit: int) -> tuple[list, bool]:
    """Items (already in list order) following the one whose id is `after`; unknown `after` is a 400."""
    if after is not None:
        ids = [item.id if hasattr(item, "id") else item["id"] for item in items]
        if after not in ids:
            raise InvalidParameter(f"after: no such object {after!r} in this list", param="after")
        items = items[ids.index(after) + 1 :]
    return items[:limit], len(items) > limit


def to_public(record: FileRecord) -> FilePublic:
    return FilePublic(id=record.id, bytes=record.bytes, created_at=record.created_at, filename=record.filename,
                      purpose=record.purpose)
