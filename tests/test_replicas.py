"""Two server processes sharing one Redis and one data volume see each other's uploads and deletes."""
from __future__ import annotations

import time

import httpx
import pytest

from tests.redis_server import redis_server, redis_url  # noqa: F401
from tests.server_process import ServerProcess

KEYS = "key-acme:acme,key-globex:globex"
ACME = {"Authorization": "Bearer key-acme"}


@pytest.fixture
def replicas(redis_url, tmp_path, demo_model_dir):  # noqa: F811
    from loraplex.models.demo import ensure_demo_model

    data_dir = tmp_path / "shared-volume"
    ensure_demo_model(data_dir)
    servers = [ServerProcess(data_dir, tmp_path / f"replica{i}.log", redis_url=redis_url, api_keys=KEYS,
                             max_lora_rank=8, max_model_len=256) for i in range(2)]
    try:
        for server in servers:
            server.wait_ready()
        yield servers
    finally:
        for server in servers:
            server.stop()


def _eventually(check, timeout_s=2.0):
    deadline = time.monotonic() + timeout_s
    while True:
        if check():
            return True
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)


def test_upload_and_delete_propagate_between_replicas(replicas, tmp_path, demo_model_dir):
    from loraplex.models.demo import make_demo_adapter

    a, b = replicas
    out = make_demo_adapter(demo_model_dir, tmp_path / "upload", r=4, seed=5)
    files = [("files", (name, (out / name).read_bytes())) for name in ("adapter_config.json", "adapter_model.safetensors")]
    made = httpx.post(f"{a.url}/v1/adapters", headers=ACME, data={"name": "shared-vol"}, files=files, timeout=30)
    assert made.status_code == 201, made.text
    body = {"model": "acme/shared-vol", "prompt": "hi", "max_tokens": 4, "temperature": 0, "ignore_eos": True}
    assert _eventually(lambda: httpx.post(f"{b.url}/v1/completions", headers=ACME, json=body, timeout=30).status_code == 200)
    text_a = httpx.post(f"{a.url}/v1/completions", headers=ACME, json=body, timeout=30).json()["choices"][0]["text"]
    text_b = httpx.post(f"{b.url}/v1/completions", headers=ACME, json=body, timeout=30).json()["choices"][0]["text"]
    assert text_a == text_b
    assert httpx.delete(f"{b.url}/v1/adapters/acme/shared-vol", headers=ACME, timeout=30).status_code == 200
    assert _eventually(lambda: httpx.post(f"{a.url}/v1/completions", headers=ACME, json=body, timeout=30).status_code == 404)


def test_redis_outage_keeps_known_adapters_serving_and_registry_503(redis_server, tmp_path, demo_model_dir):  # noqa: F811
    from fastapi.testclient import TestClient

    from loraplex.api.app import create_app
    from loraplex.config import Settings
    from loraplex.models.demo import ensure_demo_model, make_demo_adapter

    data_dir = tmp_path / "data"
    ensure_demo_model(data_dir)
    settings = Settings(model="demo", data_dir=data_dir, api_keys=KEYS, max_lora_rank=8, max_model_len=256, redis_url=redis_server.url)
    out = make_demo_adapter(demo_model_dir, tmp_path / "upload", r=4, seed=6)
    files = [("files", (name, (out / name).read_bytes())) for name in ("adapter_config.json", "adapter_model.safetensors")]
    body = {"model": "acme/steady", "prompt": "hi", "max_tokens": 4, "temperature": 0, "ignore_eos": True}
    with TestClient(create_app(settings)) as c:
        assert c.post("/v1/adapters", headers=ACME, data={"name": "steady"}, files=files).status_code == 201
        before = c.post("/v1/completions", headers=ACME, json=body).json()["choices"][0]["text"]
        redis_server.stop()
        during = c.post("/v1/completions", headers=ACME, json=body)
        assert during.status_code == 200 and during.json()["choices"][0]["text"] == before
        listing = c.get("/v1/adapters", headers=ACME)
        assert listing.status_code == 503 and listing.json()["error"]["message"]
        assert c.post("/v1/completions", headers=ACME, json={**body, "model": "acme/never-seen"}).status_code == 503
        redis_server.start()
        assert _eventually(lambda: c.get("/v1/adapters", headers=ACME).status_code == 200, timeout_s=10)
