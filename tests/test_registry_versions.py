"""VersionedAdapterStore: immutable versions, atomic publish and delete, quotas, ids checked before any
path is built, and the read-only store's flat layout still served as version 1."""
from __future__ import annotations

import json
import shutil
import threading
from pathlib import Path

import pytest
import torch

from loraplex.engine.lora_weights import read_adapter
from loraplex.registry import LocalAdapterStore
from loraplex.registry.adapter_config import CONFIG_FILE, WEIGHTS_FILE
from loraplex.registry.errors import AdapterNotFound, InvalidAdapterFile, QuotaExceeded, RegistryUnavailable
from loraplex.registry.validation import module_shapes_from_hf_config, validate_adapter_files
from loraplex.registry.versioned_store import (
    LATEST_FILE, META_FILE, LocalJsonIndex, TenantQuota, VersionedAdapterStore, parse_adapter_id,
)


@pytest.fixture(scope="module")
def module_shapes(demo_model_dir):
    return module_shapes_from_hf_config(json.loads((demo_model_dir / "config.json").read_text()))


def load_upload(directory: Path, module_shapes):
    files = {name: (directory / name).read_bytes() for name in (CONFIG_FILE, WEIGHTS_FILE)}
    return files, validate_adapter_files(files[CONFIG_FILE], files[WEIGHTS_FILE], module_shapes, max_rank=16, max_bytes=1 << 24)


@pytest.fixture(scope="module")
def upload(make_adapter, module_shapes):
    """(files, validated) of a real adapter: r=8 on q/v."""
    return load_upload(make_adapter("versions/one", r=8), module_shapes)


@pytest.fixture(scope="module")
def upload2(make_adapter, module_shapes):
    """A different adapter (r=4, seed 1), for a second version."""
    return load_upload(make_adapter("versions/two", r=4, seed=1), module_shapes)


@pytest.fixture
def store(tmp_path) -> VersionedAdapterStore:
    return VersionedAdapterStore(tmp_path / "data")


def tree(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if not str(p.relative_to(root)).startswith(".locks"))


# --- ids ---------------------------------------------------------------------------------------------


def test_valid_ids_parse():
    assert parse_adapter_id("acme/sql") == ("acme", "sql", None)
    assert parse_adapter_id("acme/sql@12") == ("acme", "sql", 12)
    assert parse_adapter_id("a1.b_c-d/v1.2@1") == ("a1.b_c-d", "v1.2", 1)


@pytest.mark.parametrize("adapter_id", [
    "", "acme", "acme/", "/sql", "acme/sql/v2", "Acme/sql", "../sql", "acme/..", "acme/a..b", ".hidden/sql",
    "acme%2Fsql", "acme/%2e%2e", "%2e%2e/sql", "acme/sql%00", "acme\\sql", "acme/sql\n", "acme/s ql",
    "acme/sql@", "acme/sql@0", "acme/sql@01", "acme/sql@-1", "acme/sql@1.5", "acme/sql@1@2", "acme/sql@\u0661",
    "acme/sql@" + "9" * 10, "acme@1/sql", "a" * 64 + "/sql",
])
def test_malformed_ids_are_not_found_before_any_path_is_built(adapter_id, store, monkeypatch):
    monkeypatch.setattr(store.index, "get", lambda *a: pytest.fail("the index was asked for a malformed id"))
    with pytest.raises(AdapterNotFound):
        store.get_by_id(adapter_id)


@pytest.mark.parametrize(("tenant", "name", "param"), [("acme", "..", "name"), ("../x", "sql", "tenant"), ("acme", "a/b", "name")])
def test_put_refuses_bad_names(store, upload, tenant, name, param):
    with pytest.raises(InvalidAdapterFile) as caught:
        store.put(tenant, name, *upload)
    assert caught.value.param == param and tree(store.data_dir) == [".staging", ".trash"]


# --- put / get ---------------------------------------------------------------------------------------


def test_put_writes_an_immutable_version_and_publishes_it(store, upload):
    files, validated = upload
    record = store.put("acme", "sql", files, validated)
    version_dir = store.data_dir / "acme" / "sql" / "v1"
    assert (record.id, record.version, record.path, record.shared) == ("acme/sql", 1, version_dir, False)
    assert (record.rank, record.alpha, record.target_modules) == (8, 16.0, ("q_proj", "v_proj"))
    assert record.size_bytes == validated.num_bytes and record.sha256 == validated.sha256
    assert (record.kind, record.num_virtual_tokens) == ("lora", 0)
    assert record.lora_key == f"acme/sql@1:{validated.sha256[:12]}" and record.lora_request().path == str(version_dir)
    assert (version_dir / WEIGHTS_FILE).read_bytes() == files[WEIGHTS_FILE]
    assert json.loads((version_dir / META_FILE).read_text())["sha256"] == validated.sha256
    assert (store.data_dir / "acme" / "sql" / LATEST_FILE).read_text() == "1\n"
    assert store.get("acme", "sql") == record and store.get_by_id("acme/sql@1") == record
    assert list((store.data_dir / ".staging").iterdir()) == []


def test_a_record_from_before_kinds_takes_its_kind_from_its_config(store, upload):
    """meta.json written before `kind` existed: read back as what its stored adapter_config.json says."""
    store.put("acme", "old", *upload)
    version_dir = store.data_dir / "acme" / "old" / "v1"
    meta = json.loads((version_dir / META_FILE).read_text())
    assert (meta.pop("kind"), meta.pop("num_virtual_tokens")) == ("lora", 0)
    (version_dir / META_FILE).write_text(json.dumps(meta))
    assert store.get("acme", "old").kind == "lora"
    config = json.loads((version_dir / CONFIG_FILE).read_text())
    (version_dir / CONFIG_FILE).write_text(json.dumps({**config, "use_dora": True}))
    assert store.get("acme", "old").kind == "dora"
    prompt = {"peft_type": "PROMPT_TUNING", "num_virtual_tokens": 7, "task_type": "CAUSAL_LM"}
    (version_dir / CONFIG_FILE).write_text(json.dumps(prompt))
    assert (store.get("acme", "old").kind, store.get("acme", "old").num_virtual_tokens) == ("prompt_tuning", 7)


def test_new_versions_leave_old_ones_untouched(store, upload, upload2):
    first = store.put("acme", "sql", *upload)
    second = store.put("acme", "sql", *upload2)
    assert second.version == 2 and store.get("acme", "sql") == second
    assert store.get("acme", "sql", 1) == first and store.get_by_id("acme/sql@2").rank == 4
    assert (first.path / WEIGHTS_FILE).read_bytes() == upload[0][WEIGHTS_FILE]
    with pytest.raises(AdapterNotFound, match="acme/sql@3"):
        store.get("acme", "sql", 3)


def test_engine_reads_a_stored_version(store, upload, module_shapes):
    record = store.put("acme", "sql", *upload)
    host = read_adapter(record.lora_key, str(record.path), 16, dict(module_shapes), torch.float32)
    assert host.max_rank == 8 and host.key == record.lora_key


def test_files_must_be_the_validated_ones(store, upload, upload2):
    with pytest.raises(InvalidAdapterFile, match="differ"):
        store.put("acme", "sql", upload2[0], upload[1])
    with pytest.raises(InvalidAdapterFile, match="missing"):
        store.put("acme", "sql", {CONFIG_FILE: upload[0][CONFIG_FILE]}, upload[1])


def test_unfinished_version_is_never_served_and_the_next_put_replaces_it(store, upload, upload2):
    """Numbers come from the index: a dir a killed put left above the published mark was never acknowledged,
    so it is removed and its number handed out again (never served: issue 20, finding 9)."""
    store.put("acme", "sql", *upload)
    shutil.copytree(store.data_dir / "acme" / "sql" / "v1", store.data_dir / "acme" / "sql" / "v2")  # crash before publish
    assert store.get("acme", "sql").version == 1
    with pytest.raises(AdapterNotFound):
        store.get("acme", "sql", 2)
    second = store.put("acme", "sql", *upload2)
    assert second.version == 2 and store.get("acme", "sql", 2).sha256 == upload2[1].sha256 != upload[1].sha256


# --- failures leave no trace -------------------------------------------------------------------------


def test_failed_publish_leaves_no_trace(store, upload, monkeypatch):
    before = tree(store.data_dir)
    monkeypatch.setattr(store.index, "publish", lambda record, promote: (_ for _ in ()).throw(OSError(28, "No space left on device")))
    with pytest.raises(RegistryUnavailable, match="No space left"):
        store.put("acme", "sql", *upload)
    assert tree(store.data_dir) == before
    with pytest.raises(AdapterNotFound):
        store.get("acme", "sql")


def test_failed_write_leaves_no_trace_and_keeps_old_versions(store, upload, upload2, monkeypatch):
    first = store.put("acme", "sql", *upload)
    before = tree(store.data_dir)
    monkeypatch.setattr("loraplex.registry.versioned_store.os.fsync", lambda fd: (_ for _ in ()).throw(OSError(5, "I/O error")))
    with pytest.raises(RegistryUnavailable):
        store.put("acme", "sql", *upload2)
    assert tree(store.data_dir) == before and store.get("acme", "sql") == first


# --- list --------------------------------------------------------------------------------------------


def test_list_shows_own_and_shared_adapters(store, upload, upload2):
    store.put("acme", "sql", *upload)
    store.put("acme", "sql", *upload2)  # only the latest version is listed
    store.put("acme", "chat", *upload)
    store.put("globex", "public", *upload, shared=True)
    store.put("globex", "private", *upload)
    ids = lambda records: [(r.id, r.version) for r in records]
    assert ids(store.list("acme")) == [("acme/chat", 1), ("acme/sql", 2), ("globex/public", 1)]
    assert ids(store.list("acme", include_shared=False)) == [("acme/chat", 1), ("acme/sql", 2)]
    assert ids(store.list("initech")) == [("globex/public", 1)]
    assert len(store.list(None)) == 4  # admin: everything
    assert ids(store.list("acme", after="acme/chat", limit=1)) == [("acme/sql", 2)]
    assert ids(store.list("acme", after="acme/sql")) == [("globex/public", 1)]


def test_sharing_belongs_to_the_adapter_not_the_version(store, upload, upload2):
    store.put("globex", "tool", *upload, shared=True)
    store.put("globex", "tool", *upload2, shared=False)
    assert store.get("globex", "tool", 1).shared is False
    assert store.list("acme") == []


# --- delete ------------------------------------------------------------------------------------------


def test_delete_removes_every_version_at_once(store, upload, upload2):
    store.put("acme", "sql", *upload)
    old = store.put("acme", "sql", *upload2)
    store.delete("acme", "sql")
    for version in (None, 1, 2):
        with pytest.raises(AdapterNotFound):
            store.get("acme", "sql", version)
    assert not old.path.exists() and tree(store.data_dir) == [".staging", ".trash"]
    with pytest.raises(AdapterNotFound):
        store.delete("acme", "sql")


def test_recreated_adapter_starts_over_with_a_new_key_if_content_differs(store, upload, upload2):
    first = store.put("acme", "sql", *upload)
    store.delete("acme", "sql")
    again = store.put("acme", "sql", *upload2)
    assert again.version == 1 and again.lora_key != first.lora_key


def test_delete_of_malformed_or_foreign_path_is_not_found(store, upload):
    store.put("acme", "sql", *upload)
    for tenant, name in (("acme", ".."), ("..", "acme"), ("globex", "sql")):
        with pytest.raises(AdapterNotFound):
            store.delete(tenant, name)
    assert store.get("acme", "sql").version == 1


# --- quota -------------------------------------------------------------------------------------------


def test_quota_on_number_of_adapters(tmp_path, upload):
    store = VersionedAdapterStore(tmp_path, quota=TenantQuota(max_adapters=2))
    store.put("acme", "a", *upload)
    store.put("acme", "b", *upload)
    store.put("acme", "b", *upload)  # a new version is no new adapter
    store.put("globex", "a", *upload)  # another tenant's quota
    with pytest.raises(QuotaExceeded, match="2 adapters"):
        store.put("acme", "c", *upload)
    assert not (tmp_path / "acme" / "c").exists()


def test_quota_on_bytes_counts_every_version(tmp_path, upload):
    size = upload[1].num_bytes
    store = VersionedAdapterStore(tmp_path, quota=TenantQuota(max_bytes=2 * size + 2 * 1024))  # + meta.json files
    store.put("acme", "a", *upload)
    store.put("acme", "a", *upload)
    with pytest.raises(QuotaExceeded, match="bytes"):
        store.put("acme", "a", *upload)
    assert store.get("acme", "a").version == 2
    store.delete("acme", "a")
    assert store.put("acme", "a", *upload).version == 1  # deleting frees the quota


def test_concurrent_puts_get_distinct_versions_and_respect_quota(tmp_path, upload):
    store = VersionedAdapterStore(tmp_path, quota=TenantQuota(max_adapters=3))
    results: list[object] = []

    def put(name: str) -> None:
        try:
            results.append(store.put("acme", name, *upload).versioned_id)
        except QuotaExceeded as exc:
            results.append(exc)

    threads = [threading.Thread(target=put, args=("same",)) for _ in range(6)]
    threads += [threading.Thread(target=put, args=(f"n{i}",)) for i in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    stored = sorted(r for r in results if isinstance(r, str))
    assert [r for r in stored if r.startswith("acme/same")] == [f"acme/same@{v}" for v in range(1, 7)]
    assert len(stored) == 6 + 2 and store.usage("acme")[0] == 3 and store.get("acme", "same").version == 6


# --- legacy flat layout ------------------------------------------------------------------------------


def test_flat_adapter_is_version_one_and_can_gain_versions(tmp_path, make_adapter, upload2):
    flat = tmp_path / "acme" / "legacy"
    shutil.copytree(make_adapter("versions/one", r=8), flat)
    store = VersionedAdapterStore(tmp_path)
    v1 = store.get("acme", "legacy")
    assert (v1.version, v1.path, v1.rank) == (1, flat, 8) and v1.lora_key.startswith("acme/legacy@1:")
    assert [r.id for r in store.list("acme")] == ["acme/legacy"]
    v2 = store.put("acme", "legacy", *upload2)
    assert v2.version == 2 and v2.path == flat / "v2"
    assert store.get("acme", "legacy") == v2 and store.get_by_id("acme/legacy@1").path == flat
    assert LocalAdapterStore(tmp_path, 16, ["q_proj", "v_proj"]).get("acme/legacy").path == flat  # still served there


def test_read_only_store_skips_versioned_adapters(tmp_path, upload):
    VersionedAdapterStore(tmp_path).put("acme", "sql", *upload)
    assert LocalAdapterStore(tmp_path, 16, ["q_proj", "v_proj"]).list() == []


def test_a_custom_index_is_used(tmp_path, upload):
    class CountingIndex(LocalJsonIndex):
        num_published = 0

        def publish(self, record, promote=True):
            CountingIndex.num_published += 1
            super().publish(record, promote)

    store = VersionedAdapterStore(tmp_path, index=CountingIndex(tmp_path, 16, ["q_proj", "v_proj"]))
    store.put("acme", "sql", *upload)
    assert CountingIndex.num_published == 1 and store.get("acme", "sql").version == 1


def test_upload_flow_archive_to_stored_version(store, make_adapter, module_shapes):
    """What the upload route will do: unpack in memory, validate, store."""
    import io
    import tarfile

    from loraplex.registry.archive import extract_adapter_archive

    directory = make_adapter("versions/one", r=8)
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as tar:
        tar.add(directory, arcname="my-adapter")
    files = extract_adapter_archive(buffer.getvalue(), max_total_bytes=1 << 24)
    validated = validate_adapter_files(files[CONFIG_FILE], files[WEIGHTS_FILE], module_shapes, max_rank=16, max_bytes=1 << 24)
    record = store.put("acme", "sql", files, validated, shared=True)
    assert store.get_by_id("acme/sql@1") == record and record.shared


def test_an_unpromoted_version_is_served_only_by_its_number(store, upload, upload2):
    """What the negative-transfer guard relies on: a version put with promote=False never moves the bare name."""
    fresh = store.put("acme", "new", *upload2, promote=False)
    assert fresh.version == 1 and store.get("acme", "new", 1).sha256 == fresh.sha256
    with pytest.raises(AdapterNotFound):
        store.get("acme", "new")  # nothing promoted yet: the bare name serves nothing
    assert "acme/new" not in [r.id for r in store.list("acme")]

    first = store.put("acme", "sql", *upload)
    held_back = store.put("acme", "sql", *upload2, promote=False)
    assert held_back.version == 2 and store.get("acme", "sql").version == 1
    assert store.get("acme", "sql", 2).sha256 == held_back.sha256 != first.sha256
    assert [r.versioned_id for r in store.list("acme")] == ["acme/sql@1"]
    assert store.put("acme", "sql", *upload2).version == 3 and store.get("acme", "sql").version == 3
    assert store.get("acme", "sql", 2).version == 2  # still addressable after a newer promotion
    with pytest.raises(AdapterNotFound):
        store.get("acme", "sql", 4)


def test_an_unpromoted_version_of_a_shared_adapter_is_not_shared(store, upload, upload2):
    """Issue 20 finding 8: a fine-tune that did not beat the base model (promote=False) inherited shared=True
    from the admin-shared latest version, publishing a tenant's new weights to everyone without the admin."""
    shared = store.put("globex", "tool", *upload, shared=True)
    held_back = store.put("globex", "tool", *upload2, promote=False)
    assert store.get("globex", "tool").version == shared.version and store.get("globex", "tool").shared
    assert store.get("globex", "tool", held_back.version).shared is False
    assert store.get("globex", "tool", shared.version).shared  # versions up to the latest follow its flag
