"""Tenants, auth and the adapter lifecycle through real HTTP: isolation, uploads, versions, residency."""
from __future__ import annotations

import pickle

import pytest

from tests.tenant_fixtures import adapter_files, auth, tenant_client, tenant_engine, tenant_settings, upload, with_config, zipped  # noqa: F401

GREEDY = {"max_tokens": 8, "temperature": 0, "ignore_eos": True}


def complete(client, who, model, prompt="The cat", **extra):
    return client.post("/v1/completions", headers=auth(who), json={"model": model, "prompt": prompt, **GREEDY, **extra})


@pytest.fixture(scope="module")
def acme_secret(tenant_client, adapter_files):
    response = upload(tenant_client, "acme", "secret", adapter_files(31))
    assert response.status_code == 201, response.text
    return response.json()


def test_missing_or_wrong_key_is_401(tenant_client):
    for headers in ({}, {"Authorization": "Bearer nope"}, {"Authorization": "Basic a2V5"}):
        response = tenant_client.get("/v1/models", headers=headers)
        assert response.status_code == 401
        assert set(response.json()["error"]) == {"message", "type", "param", "code"}
        assert response.headers["WWW-Authenticate"] == "Bearer"
    assert complete(tenant_client, "acme", "demo").status_code == 200


def test_upload_creates_versioned_record(acme_secret):
    assert acme_secret["id"] == "acme/secret" and acme_secret["versioned_id"] == "acme/secret@1"
    assert acme_secret["rank"] == 8 and set(acme_secret["target_modules"]) == {"q_proj", "v_proj"}
    assert acme_secret["residency"] == "storage" and len(acme_secret["sha256"]) == 64


def test_other_tenant_cannot_see_or_use_through_any_route(tenant_client, acme_secret):
    c = tenant_client
    missing = "acme/does-not-exist"
    for adapter_id in ("acme/secret", "acme/secret@1", "acme%2Fsecret", "ACME/secret", "acme/../acme/secret"):
        probes = {
            "completion": complete(c, "globex", adapter_id),
            "chat": c.post("/v1/chat/completions", headers=auth("globex"),
                           json={"model": adapter_id, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}),
            "tgi": c.post("/generate", headers=auth("globex"),
                          json={"inputs": "hi", "parameters": {"adapter_id": adapter_id, "max_new_tokens": 2}}),
            "get": c.get(f"/v1/adapters/{adapter_id}", headers=auth("globex")),
            "model": c.get(f"/v1/models/{adapter_id}", headers=auth("globex")),
            "delete": c.delete(f"/v1/adapters/{adapter_id}", headers=auth("globex")),
        }
        for route, response in probes.items():
            assert response.status_code == 404, (route, adapter_id, response.text)
            assert response.json()["error"]["code"] in ("model_not_found", "adapter_not_found")
    # a foreign adapter reads exactly like a missing one
    foreign = complete(c, "globex", "acme/secret").json()["error"]
    absent = complete(c, "globex", missing).json()["error"]
    assert foreign["message"].replace("acme/secret", "X") == absent["message"].replace(missing, "X")
    listed = [a["id"] for a in c.get("/v1/adapters", headers=auth("globex")).json()["data"]]
    models = [m["id"] for m in c.get("/v1/models", headers=auth("globex")).json()["data"]]
    assert "acme/secret" not in listed + models
    assert complete(c, "acme", "acme/secret").status_code == 200  # the owner still can


def test_admin_sees_all_and_owner_lists_own(tenant_client, acme_secret):
    assert "acme/secret" in [a["id"] for a in tenant_client.get("/v1/adapters", headers=auth("admin")).json()["data"]]
    assert "acme/secret" in [a["id"] for a in tenant_client.get("/v1/adapters", headers=auth("acme")).json()["data"]]


def test_adapter_changes_tokens_and_versions_are_immutable(tenant_client, adapter_files):
    c = tenant_client
    assert upload(c, "acme", "versioned", adapter_files(41)).status_code == 201
    v1 = complete(c, "acme", "acme/versioned").json()["choices"][0]["text"]
    second = upload(c, "acme", "versioned", adapter_files(42))
    assert second.status_code == 201 and second.json()["version"] == 2
    latest = complete(c, "acme", "acme/versioned").json()["choices"][0]["text"]
    pinned_v1 = complete(c, "acme", "acme/versioned@1").json()["choices"][0]["text"]
    base = complete(c, "acme", "demo").json()["choices"][0]["text"]
    assert pinned_v1 == v1 and latest != v1 and base not in (v1, latest)


def _data_files(settings):
    return sorted(p.relative_to(settings.data_dir) for p in settings.data_dir.rglob("*")
                  if p.is_file() and ".locks" not in p.parts)


@pytest.mark.parametrize("case", [
    "pickle_bin", "bad_json", "dora", "rank_too_high", "wrong_shape", "nan", "truncated", "zip_slip", "missing_weights",
    "oversized",
])
def test_malformed_upload_is_refused_and_leaves_no_trace(tenant_client, tenant_settings, adapter_files, case):
    import torch
    from safetensors.torch import load, save

    good = adapter_files(51)
    tensors = load(good["adapter_model.safetensors"])
    first_a = next(k for k in tensors if "lora_A" in k)
    cases = {
        "pickle_bin": ({"adapter_config.json": good["adapter_config.json"], "adapter_model.bin": pickle.dumps({"x": 1})}, 400),
        "bad_json": ({**good, "adapter_config.json": b"{not json"}, 400),
        "dora": (with_config(good, use_dora=True), 400),
        "rank_too_high": (adapter_files(52, r=16), 400),
        "wrong_shape": ({**good, "adapter_model.safetensors": save({**tensors, first_a: torch.zeros(8, 7)})}, 400),
        "nan": ({**good, "adapter_model.safetensors": save({**tensors, first_a: torch.full_like(tensors[first_a], float("nan"))})}, 400),
        "truncated": ({**good, "adapter_model.safetensors": good["adapter_model.safetensors"][:-100]}, 400),
        "zip_slip": (zipped(good, {"../../evil.txt": b"x"}), 400),
        "missing_weights": ({"adapter_config.json": good["adapter_config.json"]}, 400),
        "oversized": ({**good, "adapter_model.safetensors": b"\0" * 2_100_000}, 413),
    }
    files, status = cases[case]
    before = _data_files(tenant_settings)
    response = upload(tenant_client, "acme", f"bad-{case.replace('_', '-')}", files)
    assert response.status_code == status, response.text
    assert set(response.json()["error"]) == {"message", "type", "param", "code"}
    assert _data_files(tenant_settings) == before
    assert tenant_client.get("/healthz").status_code == 200
    assert complete(tenant_client, "acme", "demo").status_code == 200


def test_delete_makes_it_404_and_only_owner_or_admin_may(tenant_client, adapter_files):
    c = tenant_client
    assert upload(c, "acme", "doomed", adapter_files(61)).status_code == 201
    assert c.delete("/v1/adapters/acme/doomed", headers=auth("globex")).status_code == 404
    assert c.delete("/v1/adapters/acme/doomed", headers=auth("acme")).json() == {"id": "acme/doomed", "object": "adapter", "deleted": True}
    assert complete(c, "acme", "acme/doomed").status_code == 404
    assert c.get("/v1/adapters/acme/doomed", headers=auth("acme")).status_code == 404


def test_shared_adapter_usable_by_all_but_managed_by_owner(tenant_client, adapter_files):
    c = tenant_client
    assert upload(c, "globex", "public", adapter_files(71), shared="true").status_code == 403  # only admin shares
    made = upload(c, "admin", "public", adapter_files(71), tenant="globex", shared="true")
    assert made.status_code == 201 and made.json()["shared"] is True
    assert complete(c, "acme", "globex/public").status_code == 200
    assert c.delete("/v1/adapters/globex/public", headers=auth("acme")).status_code == 403
    assert upload(c, "acme", "x", adapter_files(72), tenant="globex").status_code == 403


def test_admin_residency_actions(tenant_client, adapter_files):
    c = tenant_client
    assert upload(c, "acme", "hot", adapter_files(81)).status_code == 201
    assert c.post("/v1/adapters/acme/hot/pin", headers=auth("acme")).status_code == 403
    pinned = c.post("/v1/adapters/acme/hot/pin", headers=auth("admin")).json()
    assert pinned["pinned"] is True and pinned["residency"] in ("loading", "device")
    for _ in range(100):
        if c.get("/v1/adapters/acme/hot", headers=auth("acme")).json()["residency"] == "device":
            break
    assert c.get("/v1/adapters/acme/hot", headers=auth("acme")).json()["residency"] == "device"
    assert c.post("/v1/adapters/acme/hot/unpin", headers=auth("admin")).json()["pinned"] is False
    evicted = c.post("/v1/adapters/acme/hot/evict", headers=auth("admin")).json()
    assert evicted["residency"] == "storage"
    assert c.post("/v1/adapters/acme/hot/nonsense", headers=auth("admin")).status_code in (404, 422, 400)


def test_new_version_mid_stream_does_not_change_the_running_request(tenant_client, adapter_files):
    import json

    c = tenant_client
    assert upload(c, "acme", "midstream", adapter_files(91)).status_code == 201
    body = {"model": "acme/midstream", "prompt": "Once", "max_tokens": 120, "temperature": 0, "ignore_eos": True, "stream": True}
    text, uploaded = "", False
    with c.stream("POST", "/v1/completions", headers=auth("acme"), json=body) as response:
        for line in response.iter_lines():
            if not line.startswith("data: {"):
                continue
            text += json.loads(line[6:])["choices"][0]["text"]
            if not uploaded:
                assert upload(c, "acme", "midstream", adapter_files(92)).json()["version"] == 2
                uploaded = True
    assert uploaded
    v1 = complete(c, "acme", "acme/midstream@1", prompt="Once", max_tokens=120).json()["choices"][0]["text"]
    v2 = complete(c, "acme", "acme/midstream", prompt="Once", max_tokens=120).json()["choices"][0]["text"]
    assert text == v1 and v1 != v2


def test_tenant_rate_limit_answers_429_with_retry_after(tenant_settings, tenant_engine):
    from fastapi.testclient import TestClient

    from loraplex.api.app import create_app

    limited = tenant_settings.model_copy(update={"tenant_requests_per_minute": 2})
    with TestClient(create_app(limited, tenant_engine)) as c:
        assert [complete(c, "acme", "demo").status_code for _ in range(2)] == [200, 200]
        refused = complete(c, "acme", "demo")
        assert refused.status_code == 429 and int(refused.headers["Retry-After"]) >= 1
        assert refused.json()["error"]["code"] == "tenant_rate_limited"
        assert complete(c, "globex", "demo").status_code == 200  # another tenant is unaffected


def test_admin_sets_merge_mode_and_tokens_stay_the_same(tenant_client, tenant_engine, adapter_files):
    c = tenant_client
    assert upload(c, "acme", "fast", adapter_files(95)).status_code == 201
    unmerged = complete(c, "acme", "acme/fast").json()["choices"][0]["text"]
    assert c.post("/v1/adapters/acme/fast/mode", headers=auth("acme"), json={"mode": "merged"}).status_code == 403
    assert c.post("/v1/adapters/acme/fast/mode", headers=auth("admin"), json={"mode": "sideways"}).status_code == 400
    set_merged = c.post("/v1/adapters/acme/fast/mode", headers=auth("admin"), json={"mode": "merged"})
    assert set_merged.status_code == 200 and set_merged.json()["merge_mode"] == "merged"
    merged = complete(c, "acme", "acme/fast").json()["choices"][0]["text"]
    base_while_merged = complete(c, "acme", "demo").json()["choices"][0]["text"]
    assert c.get("/v1/adapters/acme/fast", headers=auth("acme")).json()["residency"] == "merged"
    assert "loraplex_merge_switches_total 1.0" in c.get("/metrics", headers=auth("admin")).text
    back = c.post("/v1/adapters/acme/fast/mode", headers=auth("admin"), json={"mode": "unmerged"}).json()
    assert back["merge_mode"] == "unmerged" and back["residency"] == "device"
    assert merged == unmerged and base_while_merged == complete(c, "acme", "demo").json()["choices"][0]["text"]


def test_training_file_larger_than_the_request_limit_is_accepted(tenant_client, tenant_settings):
    line = b'{"prompt": "Review: the soup was dry.\\nSentiment:", "completion": " negative"}\n'
    data = line * (tenant_settings.max_request_bytes // len(line) + 1000)  # over the 4 MB JSON limit
    assert tenant_settings.max_request_bytes < len(data) < tenant_settings.max_file_bytes
    response = tenant_client.post("/v1/files", headers=auth("acme"), data={"purpose": "fine-tune"},
                                  files={"file": ("big.jsonl", data)})
    assert response.status_code == 200, response.text
    assert response.json()["bytes"] == len(data)
