"""/metrics names every tenant's running adapters (`vllm:lora_requests_info`), so tenants must not read it.

A real server with `LORAPLEX_METRICS_PORT`: the metrics port serves /metrics (with the adapter labels the
endpoint picker needs) and nothing else; the public port answers /metrics with 404 whatever the key.
Without a metrics port (in process): /metrics on the public port needs the admin key or the metrics
token; no key is 401, a tenant's key 403. Before, anyone read it with no key at all.
"""
from __future__ import annotations

import httpx
import pytest
from fastapi.testclient import TestClient

from loraplex.api.app import create_app
from loraplex.models.demo import make_demo_adapter
from tests.server_process import ServerProcess, free_port
from tests.tenant_fixtures import KEYS, auth, tenant_engine, tenant_settings  # noqa: F401

METRICS_TOKEN = "scraper-token"


@pytest.fixture(scope="module")
def server(tmp_path_factory, demo_model_dir):
    data_dir = tmp_path_factory.mktemp("metrics-data")
    settings = dict(api_keys=f"{KEYS['acme']}:acme,{KEYS['globex']}:globex", admin_key=KEYS["admin"],
                    metrics_port=free_port(), metrics_token=METRICS_TOKEN, max_model_len=128, log_level="warning")
    process = ServerProcess(data_dir, data_dir.parent / f"{data_dir.name}.log", model=demo_model_dir, **settings)
    process.metrics_url = f"http://127.0.0.1:{settings['metrics_port']}"
    try:
        process.wait_ready()
        yield process
    finally:
        process.stop()


def test_metrics_only_on_the_metrics_port(server, demo_model_dir, tmp_path):
    adapter = make_demo_adapter(demo_model_dir, tmp_path / "mlp", r=4, seed=3)
    parts = [("files", (n, (adapter / n).read_bytes())) for n in ("adapter_config.json", "adapter_model.safetensors")]
    with httpx.Client(base_url=server.url, timeout=60) as public, httpx.Client(base_url=server.metrics_url, timeout=30) as internal:
        assert public.post("/v1/adapters", headers=auth("globex"), data={"name": "mlp"}, files=parts).status_code == 201
        body = {"model": "globex/mlp", "prompt": "hi", "max_tokens": 2, "temperature": 0}
        assert public.post("/v1/completions", headers=auth("globex"), json=body).status_code == 200
        for headers in ({}, auth("acme"), auth("admin"), {"Authorization": f"Bearer {METRICS_TOKEN}"}):
            refused = public.get("/metrics", headers=headers)
            assert refused.status_code == 404 and set(refused.json()["error"]) == {"message", "type", "param", "code"}
        scraped = internal.get("/metrics")
        assert scraped.status_code == 200 and "vllm:lora_requests_info" in scraped.text
        assert "vllm:num_requests_waiting" in scraped.text
        for path in ("/v1/models", "/healthz", "/v1/adapters/globex/mlp", "/console"):
            assert internal.get(path, headers=auth("globex")).status_code == 404, path
        assert internal.post("/v1/completions", headers=auth("globex"), json=body).status_code == 404


@pytest.fixture(scope="module")
def token_client(tenant_settings, tenant_engine):  # noqa: F811
    settings = tenant_settings.model_copy(update={"metrics_token": METRICS_TOKEN})
    with TestClient(create_app(settings, tenant_engine)) as client:
        yield client


@pytest.mark.parametrize("headers, status", [
    ({}, 401),
    ({"Authorization": "Bearer wrong"}, 401),
    (auth("acme"), 403),
    (auth("admin"), 200),
    ({"Authorization": f"Bearer {METRICS_TOKEN}"}, 200),
])
def test_metrics_on_the_public_port_need_the_admin_key_or_the_token(token_client, headers, status):
    response = token_client.get("/metrics", headers=headers)
    assert response.status_code == status, response.text
    if status == 200:
        assert "vllm:lora_requests_info" in response.text
    else:
        assert "lora" not in response.text and set(response.json()["error"]) == {"message", "type", "param", "code"}
