"""GET /v1/models (base + every servable adapter, picked up live) and the three probes."""
from __future__ import annotations

import shutil

from tests.api_fixtures import BIG_RANK_ADAPTER, DORA_ADAPTER, GOOD_ADAPTER, IA3_ADAPTER, OTHER_ADAPTER, completion


def model_ids(client) -> list[str]:
    response = client.get("/v1/models")
    assert response.status_code == 200
    body = response.json()
    assert body["object"] == "list"
    return [card["id"] for card in body["data"]]


def test_models_lists_base_and_servable_adapters(api_client, api_adapters):
    cards = {card["id"]: card for card in api_client.get("/v1/models").json()["data"]}
    assert list(cards)[0] == "demo" and cards["demo"]["parent"] is None
    assert cards[GOOD_ADAPTER]["owned_by"] == "acme" and cards[GOOD_ADAPTER]["parent"] == "demo"
    assert cards[OTHER_ADAPTER]["owned_by"] == "globex"
    assert IA3_ADAPTER not in cards and BIG_RANK_ADAPTER not in cards  # refused adapters are not offered
    assert cards[DORA_ADAPTER]["owned_by"] == "acme"  # DoRA is served
    assert all(card["object"] == "model" for card in cards.values())


def test_retrieve_model(api_client, api_adapters):
    assert api_client.get(f"/v1/models/{GOOD_ADAPTER}").json()["id"] == GOOD_ADAPTER
    assert api_client.get("/v1/models/demo").json()["owned_by"] == "loraplex"
    assert api_client.get("/v1/models/acme/missing").json()["error"]["code"] == "model_not_found"


def test_adapter_copied_in_while_serving_is_served(api_client, api_adapters, api_settings):
    new_dir = api_settings.data_dir / "initech" / "fresh"
    assert "initech/fresh" not in model_ids(api_client)
    assert api_client.post("/v1/completions", json={"model": "initech/fresh", "prompt": "x"}).status_code == 404
    shutil.copytree(api_adapters[GOOD_ADAPTER], new_dir)
    try:
        assert "initech/fresh" in model_ids(api_client)
        fresh = completion(api_client, model="initech/fresh", max_tokens=6)
        same = completion(api_client, model=GOOD_ADAPTER, max_tokens=6)
        assert fresh["choices"][0]["text"] == same["choices"][0]["text"]  # same weights, same output
    finally:
        shutil.rmtree(new_dir.parent)
    assert "initech/fresh" not in model_ids(api_client)


def test_probes_and_openapi(api_client):
    assert api_client.get("/openapi.json").status_code == 200
    assert api_client.get("/healthz").json() == {"status": "ok"}
    assert api_client.get("/readyz").status_code == 200
    assert api_client.get("/startupz").status_code == 200


def test_readyz_is_503_when_engine_is_not_ready(api_client, api_engine, monkeypatch):
    monkeypatch.setattr(type(api_engine), "is_ready", property(lambda self: False))
    response = api_client.get("/readyz")
    assert response.status_code == 503 and response.json()["error"]["code"] == "engine_not_running"
    assert api_client.get("/healthz").status_code == 200
