"""/v1/files through real HTTP: validated uploads, line-numbered errors, limits, tenant isolation."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from loraplex.api.app import create_app
from loraplex.config import Settings
from loraplex.engine_factory import build_engine

KEYS = {"acme": "key-acme", "globex": "key-globex", "admin": "key-admin"}
GOOD = b'{"prompt": "a", "completion": " b"}\n{"prompt": "c", "completion": " d"}\n'
MAX_FILE_BYTES = 50_000
MAX_EXAMPLE_TOKENS = 1000


def auth(who: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {KEYS[who]}"}


@pytest.fixture(scope="module")
def settings(tmp_path_factory) -> Settings:
    return Settings(
        model="demo", data_dir=tmp_path_factory.mktemp("files-data"), device="cpu", dtype="float32",
        max_model_len=256, max_num_seqs=4, max_loras=2, max_lora_rank=8, start_local_worker=False,
        max_file_bytes=MAX_FILE_BYTES, max_file_lines=100, max_example_tokens=MAX_EXAMPLE_TOKENS,
        api_keys=f"{KEYS['acme']}:acme,{KEYS['globex']}:globex", admin_key=KEYS["admin"],
    )


@pytest.fixture(scope="module")
def client(settings):
    engine = build_engine(settings)
    engine.start()
    with TestClient(create_app(settings, engine)) as client:
        yield client
    engine.shutdown()


def upload(client, who: str, data: bytes, purpose: str = "fine-tune", name: str = "train.jsonl", **form):
    return client.post("/v1/files", headers=auth(who), data={"purpose": purpose, **form}, files={"file": (name, data)})


def test_upload_list_get_content_delete(client, settings):
    response = upload(client, "acme", GOOD, name="../../etc/my data.jsonl")
    assert response.status_code == 200, response.text
    record = response.json()
    assert record["id"].startswith("file-") and record["object"] == "file" and record["purpose"] == "fine-tune"
    assert record["bytes"] == len(GOOD) and record["filename"] == "my data.jsonl" and record["status"] == "processed"
    assert (Path(settings.data_dir) / ".files" / "acme" / f"{record['id']}.jsonl").read_bytes() == GOOD
    file_id = record["id"]
    assert file_id in [f["id"] for f in client.get("/v1/files", headers=auth("acme")).json()["data"]]
    assert client.get(f"/v1/files/{file_id}", headers=auth("acme")).json() == record
    assert client.get(f"/v1/files/{file_id}/content", headers=auth("acme")).content == GOOD
    deleted = client.delete(f"/v1/files/{file_id}", headers=auth("acme"))
    assert deleted.status_code == 200 and deleted.json() == {"id": file_id, "object": "file", "deleted": True}
    assert client.get(f"/v1/files/{file_id}", headers=auth("acme")).status_code == 404


def test_bad_jsonl_is_400_listing_line_numbers(client):
    bad = GOOD + b'{"prompt": "x"}\nnot json\n{"messages": []}\n'
    response = upload(client, "acme", bad)
    assert response.status_code == 400
    error = response.json()["error"]
    assert error["param"] == "file" and error["code"] == "invalid_file_format"
    for line in ("line 3", "line 4", "line 5"):
        assert line in error["message"]
    assert upload(client, "acme", b"").status_code == 400  # no examples
    mixed = GOOD + json.dumps({"messages": [{"role": "assistant", "content": "x"}]}).encode()
    assert "line 3" in upload(client, "acme", mixed).json()["error"]["message"]


def test_wrong_purpose_too_big_and_too_many_lines(client):
    wrong = upload(client, "acme", GOOD, purpose="assistants")
    assert wrong.status_code == 400 and wrong.json()["error"]["param"] == "purpose"
    line = b'{"prompt": "p", "completion": " ' + b"x" * 200 + b'"}\n'
    too_big = upload(client, "acme", line * (MAX_FILE_BYTES // len(line) + 1))
    assert too_big.status_code == 413 and too_big.json()["error"]["code"] == "request_too_large"
    too_many = upload(client, "acme", b'{"prompt": "p", "completion": " c"}\n' * 101)
    assert too_many.status_code == 400 and "line 101" in too_many.json()["error"]["message"]


def test_an_example_over_the_token_cap_is_400_naming_its_line(client):
    """Counted with the served model's tokenizer at upload (LORAPLEX_MAX_EXAMPLE_TOKENS); nothing is stored."""
    tokenizer = client.app.state.engine.engine.tokenizer
    story = "Once upon a time a little fox found a shiny stone. " * 60
    assert len(tokenizer(story, add_special_tokens=False)["input_ids"]) > MAX_EXAMPLE_TOKENS  # over, on its own
    long = json.dumps({"messages": [{"role": "user", "content": "Tell a story."},
                                    {"role": "assistant", "content": story}]}).encode()
    short = json.dumps({"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello."}]})
    before = client.get("/v1/files", headers=auth("acme")).json()["data"]
    refused = upload(client, "acme", short.encode() + b"\n" + long + b"\n")
    error = refused.json()["error"]
    assert refused.status_code == 400 and (error["param"], error["code"]) == ("file", "invalid_file_format")
    assert "line 2: the example has" in error["message"] and f"limit of {MAX_EXAMPLE_TOKENS} tokens" in error["message"]
    assert client.get("/v1/files", headers=auth("acme")).json()["data"] == before
    assert upload(client, "acme", short.encode() + b"\n" + short.encode()).status_code == 200


def test_other_tenants_files_read_like_missing_ones(client):
    file_id = upload(client, "acme", GOOD).json()["id"]
    missing = "file-000000000000000000000000"
    for probe in (file_id, missing):
        for method, path in (("GET", ""), ("GET", "/content"), ("DELETE", "")):
            response = client.request(method, f"/v1/files/{probe}{path}", headers=auth("globex"))
            assert response.status_code == 404, (probe, method, path)
            assert response.json()["error"]["message"] == f"No such File object: {probe}"
    for weird in ("..%2F..%2Fetc%2Fpasswd", "file-ABC", "file-" + "0" * 23 + "%00"):
        assert client.get(f"/v1/files/{weird}", headers=auth("acme")).status_code == 404
    assert file_id not in [f["id"] for f in client.get("/v1/files", headers=auth("globex")).json()["data"]]
    assert file_id in [f["id"] for f in client.get("/v1/files", headers=auth("admin")).json()["data"]]
    assert client.get(f"/v1/files/{file_id}", headers=auth("acme")).status_code == 200  # still there
    assert client.get("/v1/files").status_code == 401


def test_uploads_are_for_the_callers_own_tenant(client):
    assert upload(client, "acme", GOOD, tenant="globex").status_code == 403
    assert upload(client, "admin", GOOD).json()["error"]["param"] == "tenant"
    by_admin = upload(client, "admin", GOOD, tenant="globex").json()["id"]
    assert client.get(f"/v1/files/{by_admin}", headers=auth("globex")).status_code == 200


def test_listing_paginates_newest_first(client):
    ids = [upload(client, "globex", GOOD).json()["id"] for _ in range(3)]
    page = client.get("/v1/files", headers=auth("globex"), params={"limit": 2}).json()
    assert page["has_more"] and [f["id"] for f in page["data"]] == ids[::-1][:2]
    rest = client.get("/v1/files", headers=auth("globex"), params={"after": page["data"][-1]["id"], "limit": 1}).json()
    assert [f["id"] for f in rest["data"]] == [ids[0]]
    assert client.get("/v1/files", headers=auth("globex"), params={"after": "file-x"}).status_code == 400


def test_a_failed_record_write_leaves_no_orphaned_data(tmp_path, monkeypatch):
    from loraplex.training import files as files_module

    store = files_module.FileStore(tmp_path, 1 << 20, 100)
    real_write = files_module._write_atomically

    def record_write_fails(path, data):
        if path.suffix == ".json":
            raise OSError(28, "No space left on device")
        real_write(path, data)

    monkeypatch.setattr(files_module, "_write_atomically", record_write_fails)
    with pytest.raises(OSError):
        store.create("acme", "t.jsonl", "fine-tune", b'{"prompt": "a", "completion": " b"}\n')
    assert [p for p in tmp_path.rglob("*") if p.is_file()] == []


def test_per_tenant_file_quotas_refuse_uploads_over_them(client, settings, tmp_path):
    """Issue 20 finding 4: 20 uploads of 16 MB were all accepted. Now a tenant's count and bytes are capped
    (LORAPLEX_MAX_FILES_PER_TENANT, LORAPLEX_MAX_FILE_BYTES_PER_TENANT): 403 quota_exceeded, nothing stored."""
    quota = settings.model_copy(update={"data_dir": tmp_path, "max_files_per_tenant": 2,
                                        "max_file_bytes_per_tenant": 2 * len(GOOD) + 10})
    with TestClient(create_app(quota, client.app.state.engine)) as small:
        assert [upload(small, "acme", GOOD).status_code for _ in range(2)] == [200, 200]
        refused = upload(small, "acme", GOOD)
        assert refused.status_code == 403 and refused.json()["error"]["code"] == "quota_exceeded", refused.text
        assert "2 training files" in refused.json()["error"]["message"]
        assert upload(small, "globex", GOOD).status_code == 200  # per tenant: the other one is not affected
        first = small.get("/v1/files", headers=auth("acme")).json()["data"][0]["id"]
        assert small.delete(f"/v1/files/{first}", headers=auth("acme")).status_code == 200
        too_big = upload(small, "acme", GOOD * 2)  # room for one more file, not for these bytes
        assert too_big.status_code == 403 and "bytes of training files" in too_big.json()["error"]["message"]
        assert len(small.get("/v1/files", headers=auth("acme")).json()["data"]) == 1


def test_a_chat_file_whose_first_message_is_the_assistants_is_refused_at_upload(client):
    """Issue 20 finding 8: it passed upload and failed the job with IndexError."""
    line = {"messages": [{"role": "assistant", "content": "Hi!"}, {"role": "user", "content": "Hello"},
                         {"role": "assistant", "content": "How can I help?"}]}
    refused = upload(client, "acme", json.dumps(line).encode() + b"\n")
    assert refused.status_code == 400, refused.text
    error = refused.json()["error"]
    assert error["param"] == "file" and "line 1: the first message must be from the system or the user" in error["message"]
