"""Adapter management: translate HTTP uploads and admin actions into registry and engine calls."""
from __future__ import annotations

import asyncio

from fastapi import UploadFile

from loraplex.api.errors import InvalidParameter, PayloadTooLarge, ServiceUnavailable
from loraplex.api.schemas.adapters import AdapterPublic, AdaptersPublic
from loraplex.engine.async_engine import AsyncEngine
from loraplex.engine.types import LoraRequest
from loraplex.registry.auth import Principal
from loraplex.registry.errors import Forbidden
from loraplex.registry.service import CONFIG_FILE, WEIGHTS_FILE, AdapterRegistry
from loraplex.registry.versioned_store import AdapterVersion

ARCHIVE_SUFFIXES = (".tar.gz", ".tgz", ".zip")
ADMIN_ACTIONS = ("pin", "unpin", "load", "evict")


async def read_upload(files: list[UploadFile], max_bytes: int) -> tuple[dict[str, bytes], bytes | None]:
    """Sort the multipart files by their names (used to classify only, never as paths)."""
    named, archive = {}, None
    for upload in files:
        filename = (upload.filename or "").rsplit("/", 1)[-1].lower()
        data = await upload.read(max_bytes + 1)
        if len(data) > max_bytes:
            raise PayloadTooLarge(f"{filename or 'a file'} is larger than {max_bytes} bytes.")
        if filename in (CONFIG_FILE, WEIGHTS_FILE):
            named[filename] = data
        elif filename.endswith(ARCHIVE_SUFFIXES) and archive is None:
            archive = data
        else:
            raise InvalidParameter(
                f"unexpected file {filename!r}: send {CONFIG_FILE} + {WEIGHTS_FILE} (safetensors only), "
                f"or one {'/'.join(ARCHIVE_SUFFIXES)} archive", param="files",
            )
    if archive is not None and named:
        raise InvalidParameter("send either the two adapter files or one archive, not both", param="files")
    return named, archive


async def to_public(engine: AsyncEngine, record: AdapterVersion) -> AdapterPublic:
    key = record.lora_key
    state = await engine.adapter_state(key)
    return AdapterPublic(
        id=record.id, versioned_id=record.versioned_id, tenant=record.tenant, name=record.name,
        version=record.version, kind=record.kind, num_virtual_tokens=record.num_virtual_tokens or None,
        rank=record.rank, alpha=record.alpha, target_modules=list(record.target_modules),
        size_bytes=record.size_bytes, sha256=record.sha256, created_at=record.created_at, shared=record.shared,
        residency=state.residency, pinned=state.is_pinned, merge_mode=state.merge_mode,
    )


async def list_public(engine: AsyncEngine, registry: AdapterRegistry, principal: Principal,
                      after: str | None, limit: int) -> AdaptersPublic:
    records = await asyncio.to_thread(registry.list, principal, after, limit + 1)
    data = [await to_public(engine, r) for r in records[:limit]]
    return AdaptersPublic(data=data, has_more=len(records) > limit)


async def admin_action(engine: AsyncEngine, registry: AdapterRegistry, principal: Principal,
                       adapter_id: str, action: str) -> AdapterPublic:
    """pin | unpin | load | evict | merged | unmerged | auto (the last three set the merge mode)."""
    if not principal.is_admin:
        raise Forbidden(f"{action} is an admin action")
    record = await asyncio.to_thread(registry.resolve, principal, adapter_id)
    lora = record.lora_request()
    if not await _apply_action(engine, lora, action):
        reason = "requests are using it" if action == "evict" else "every device slot is pinned or in use"
        raise ServiceUnavailable(f"cannot {action} {adapter_id} now: {reason}", headers={"Retry-After": "1"},
                                 code="adapter_busy")
    return await to_public(engine, record)


async def _apply_action(engine: AsyncEngine, lora: LoraRequest, action: str) -> bool:
    if action in ("merged", "unmerged", "auto"):
        return await engine.set_merge_mode(lora, action)
    if action in ("pin", "unpin"):
        return await engine.set_pinned(lora, action == "pin")
    if action == "load":
        return await engine.load_adapter(lora)
    return await engine.evict_adapter(lora.key)
