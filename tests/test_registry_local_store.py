"""LocalAdapterStore: ids validated before any path is built, live scanning, content-keyed records."""
from __future__ import annotations

import hashlib
import os
import shutil

import pytest

from loraplex.registry import AdapterNotFound, InvalidAdapter, LocalAdapterStore, parse_adapter_id
from tests.test_registry_adapter_config import ALLOWED, lora_tensors, write_adapter


@pytest.fixture
def store(tmp_path) -> LocalAdapterStore:
    return LocalAdapterStore(tmp_path, max_lora_rank=16, allowed_target_modules=ALLOWED)


@pytest.mark.parametrize(
    "adapter_id",
    ["", "acme", "acme/", "/sql", "acme/sql/v2", "Acme/sql", "acme/SQL", "../sql", "acme/..", "./sql",
     ".models/demo", "acme/.hidden", "-acme/sql", "acme/s ql", "acme\\sql", "a" * 64 + "/sql", "acme/sql\n"],
)
def test_malformed_ids_are_not_found_without_touching_disk(adapter_id, store, monkeypatch):
    def no_disk(*args, **kwargs):
        raise AssertionError("the filesystem was touched for a malformed id")

    monkeypatch.setattr(store, "_load", no_disk)
    with pytest.raises(AdapterNotFound):
        store.get(adapter_id)


def test_valid_ids_parse():
    assert parse_adapter_id("acme/sql") == ("acme", "sql")
    assert parse_adapter_id("a1.b_c-d/v1.2") == ("a1.b_c-d", "v1.2")


def test_get_builds_a_content_keyed_record(tmp_path, store):
    directory = write_adapter(tmp_path / "acme" / "sql", r=4, lora_alpha=16)
    record = store.get("acme/sql")
    weights = (directory / "adapter_model.safetensors").read_bytes()
    assert (record.tenant, record.name, record.path) == ("acme", "sql", directory)
    assert record.rank == 4 and record.alpha == 16.0 and record.target_modules == ("q_proj", "v_proj")
    assert record.sha256 == hashlib.sha256(weights).hexdigest() and record.size_bytes == len(weights)
    assert record.created == int((directory / "adapter_model.safetensors").stat().st_mtime)
    lora = record.lora_request()
    assert lora.key == f"acme/sql@{record.sha256[:16]}" and lora.path == str(directory)


def test_rank_is_max_over_rank_pattern(tmp_path, store):
    write_adapter(tmp_path / "acme" / "mixed", r=4, rank_pattern={"v_proj": 8}, tensors=lora_tensors(rank=4))
    assert store.get("acme/mixed").rank == 8


def test_list_scans_live_and_skips_unservable(tmp_path, store):
    assert store.list() == []
    write_adapter(tmp_path / "acme" / "sql")
    write_adapter(tmp_path / "globex" / "chat")
    write_adapter(tmp_path / "acme" / "dora", use_dora=True)
    write_adapter(tmp_path / ".models" / "demo")  # dot-dirs are not tenants
    write_adapter(tmp_path / "Upper" / "case")
    (tmp_path / "acme" / "incomplete").mkdir()
    assert [r.id for r in store.list()] == ["acme/sql", "globex/chat"]
    with pytest.raises(InvalidAdapter, match="DoRA"):
        store.get("acme/dora")
    for missing in ("acme/incomplete", "acme/nothing"):
        with pytest.raises(AdapterNotFound):
            store.get(missing)
    shutil.rmtree(tmp_path / "globex")
    assert [r.id for r in store.list()] == ["acme/sql"]


def test_cache_hashes_once_and_sees_replacements(tmp_path, store, monkeypatch):
    directory = write_adapter(tmp_path / "acme" / "sql")
    first = store.get("acme/sql")
    import loraplex.registry.local_store as local_store

    calls = []
    real_sha = local_store._sha256
    monkeypatch.setattr(local_store, "_sha256", lambda path: calls.append(path) or real_sha(path))
    assert store.get("acme/sql") is first and store.list() == [first] and calls == []
    write_adapter(directory, tensors=lora_tensors(rank=8), r=8)  # replaced in place
    stat = (directory / "adapter_model.safetensors").stat()
    os.utime(directory / "adapter_model.safetensors", ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000))
    second = store.get("acme/sql")
    assert second.rank == 8 and second.sha256 != first.sha256 and len(calls) == 1
    assert second.lora_request().key != first.lora_request().key


def test_symlinked_adapters_are_ignored(tmp_path, store):
    outside = write_adapter(tmp_path.parent / f"{tmp_path.name}-outside" / "x")
    (tmp_path / "acme").mkdir()
    (tmp_path / "acme" / "linked").symlink_to(outside, target_is_directory=True)
    assert store.list() == []
    with pytest.raises(AdapterNotFound):
        store.get("acme/linked")
