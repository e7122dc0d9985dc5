"""/v1/files: upload (validated JSONL), list, get, content, delete; a tenant sees only its own files."""
from __future__ import annotations

import asyncio
from typing import Annotated

from fastapi import APIRouter, Depends, File, Form, Query, Request, UploadFile
from fastapi.responses import Response

from loraplex.api.deps import PrincipalDep
from loraplex.api.schemas.files import FileDeleted, FilePublic, FilesPublic
from loraplex.api.serving import files
from loraplex.training.files import FileStore

router = APIRouter(tags=["files"])


def get_file_store(request: Request) -> FileStore:
    return request.app.state.file_store


FileStoreDep = Annotated[FileStore, Depends(get_file_store)]


@router.post("/v1/files", response_model=FilePublic)
async def upload_file(
    store: FileStoreDep, principal: PrincipalDep,
    file: Annotated[UploadFile, File(description="JSONL training data, one example per line")],
    purpose: Annotated[str, Form(max_length=32)],
    tenant: Annotated[str | None, Form(max_length=63)] = None,
) -> FilePublic:
    return await files.upload(store, principal, file, purpose, tenant)


@router.get("/v1/files", response_model=FilesPublic)
async def list_files(
    store: FileStoreDep, principal: PrincipalDep,
    purpose: Annotated[str | None, Query(max_length=32)] = None,
    after: Annotated[str | None, Query(max_length=64)] = None,
    limit: Annotated[int, Query(ge=1, le=10_000)] = 10_000,
) -> FilesPublic:
    return await asyncio.to_thread(files.list_public, store, principal, purpose, after, limit)


@router.get("/v1/files/{file_id}", response_model=FilePublic)
async def get_file(file_id: str, store: FileStoreDep, principal: PrincipalDep) -> FilePublic:
    return files.to_public(await asyncio.to_thread(files.get, store, principal, file_id))


@router.get("/v1/files/{file_id}/content", response_class=Response, responses={
    200: {"content": {"application/jsonl": {"schema": {"type": "string"}}}, "description": "The file as uploaded."}})
async def get_file_content(file_id: str, store: FileStoreDep, principal: PrincipalDep) -> Response:
    record = await asyncio.to_thread(files.get, store, principal, file_id)
    return Response(await asyncio.to_thread(store.content, record), media_type="application/jsonl")


@router.delete("/v1/files/{file_id}", response_model=FileDeleted)
async def delete_file(file_id: str, store: FileStoreDep, principal: PrincipalDep) -> FileDeleted:
    record = await asyncio.to_thread(files.get, store, principal, file_id)
    await asyncio.to_thread(store.delete, record)
    return FileDeleted(id=record.id)
