"""Adapter resource bodies: AdapterPublic / AdaptersPublic / AdapterDeleted."""
from __future__ import annotations

from typing import Literal

from pydantic import BaseModel

Residency = Literal["storage", "host", "loading", "device", "merged"]
MergeMode = Literal["merged", "unmerged", "auto"]
AdapterKind = Literal["lora", "dora", "prompt_tuning", "prefix_tuning"]  # registry.adapter_kinds.ALL_KINDS


class AdapterPublic(BaseModel):
    id: str  # "<tenant>/<name>" (the latest version)
    object: Literal["adapter"] = "adapter"
    versioned_id: str  # "<tenant>/<name>@<version>"
    tenant: str
    name: str
    version: int
    kind: AdapterKind
    num_virtual_tokens: int | None = None  # prompt/prefix tuning only
    rank: int
    alpha: float
    target_modules: list[str]
    size_bytes: int
    sha256: str
    created_at: int
    shared: bool
    residency: Residency
    pinned: bool
    merge_mode: MergeMode


class MergeModeUpdate(BaseModel):
    mode: MergeMode


class AdaptersPublic(BaseModel):
    object: Literal["list"] = "list"
    data: list[AdapterPublic]
    has_more: bool


class AdapterDeleted(BaseModel):
    id: str
    object: Literal["adapter"] = "adapter"
    deleted: bool = True
