"""File resource bodies (OpenAI's shape): FilePublic / FilesPublic / FileDeleted."""
from __future__ import annotations

from typing import Literal

from pydantic import BaseModel


class FilePublic(BaseModel):
    id: str  # "file-<hex>"
    object: Literal["file"] = "file"
    bytes: int
    created_at: int
    filename: str
    purpose: str
    status: Literal["processed"] = "processed"  # validated on upload: a stored file is always usable
    status_details: str | None = None
    expires_at: int | None = None


class FilesPublic(BaseModel):
    object: Literal["list"] = "list"
    data: list[FilePublic]
    has_more: bool


class FileDeleted(BaseModel):
    id: str
    object: Literal["file"] = "file"
    deleted: bool = True
