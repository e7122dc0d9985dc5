"""Operations through a real server process: metrics, the LoRA info gauge, probes, SIGTERM drain, logs."""
from __future__ import annotations

import json
import re
import signal
import threading
import time

import httpx
import pytest

from tests.server_process import ServerProcess


@pytest.fixture(scope="module")
def ops_data(tmp_path_factory, demo_model_dir):
    data_dir = tmp_path_factory.mktemp("ops-data")
    from loraplex.models.demo import ensure_demo_model, make_demo_adapter

    model_dir = ensure_demo_model(data_dir)
    for name, seed in (("acme/one", 21), ("acme/two", 22)):
        make_demo_adapter(model_dir, data_dir / name, r=4, seed=seed)
    return data_dir


@pytest.fixture
def server(ops_data, tmp_path):
    proc = ServerProcess(ops_data, tmp_path / "server.log", max_num_seqs=1, max_model_len=2048, drain_grace_s=60)
    proc.wait_ready()
    yield proc
    proc.stop()


def _metric(text: str, name: str, labels: str = "") -> float:
    pattern = re.escape(name) + (re.escape("{" + labels + "}") if labels else r"(\{[^}]*\})?") + r" ([0-9.e+-]+)"
    match = re.search(r"^" + pattern + "$", text, re.M)
    assert match, f"{name}{labels} not in metrics"
    return float(match.groups()[-1])


def _stream(url: str, model: str, max_tokens: int, chunks: list, first_chunk: threading.Event) -> None:
    body = {"model": model, "prompt": "hello", "max_tokens": max_tokens, "ignore_eos": True, "stream": True}
    try:
        with httpx.stream("POST", f"{url}/v1/completions", json=body, timeout=120) as response:
            chunks.append(response.status_code)
            for line in response.iter_lines():
                if line:
                    chunks.append(line)
                    first_chunk.set()
    except httpx.HTTPError as exc:  # the server went away (a test's teardown): recorded, not raised
        chunks.append(f"transport error: {exc}")


def test_metrics_count_requests_and_tokens(server):
    before = httpx.get(f"{server.url}/metrics").text
    response = httpx.post(f"{server.url}/v1/completions", json={"model": "acme/one", "prompt": "hi", "max_tokens": 6, "ignore_eos": True})
    assert response.status_code == 200
    after = httpx.get(f"{server.url}/metrics").text
    route = 'method="POST",route="/v1/completions",status="200"'
    assert _metric(after, "loraplex_http_requests_total", route) == 1 + (_metric(before, "loraplex_http_requests_total", route) if route in before else 0)
    assert _metric(after, "loraplex_generation_tokens_total") - _metric(before, "loraplex_generation_tokens_total") == 6
    assert _metric(after, "loraplex_time_to_first_token_seconds_count") >= 1
    assert _metric(after, "loraplex_adapter_loads_total") >= 1
    assert _metric(after, "loraplex_adapter_load_seconds_count") >= 1
    bad = httpx.post(f"{server.url}/v1/completions", json={"model": "demo", "prompt": "hi", "max_tokens": -1})
    assert bad.status_code == 400
    assert 'route="/v1/completions",status="400"' in httpx.get(f"{server.url}/metrics").text


def test_lora_info_gauge_lists_running_and_waiting_adapters(server):
    running_chunks, waiting_chunks = [], []
    started, waiting_started = threading.Event(), threading.Event()
    threading.Thread(target=_stream, args=(server.url, "acme/one", 1500, running_chunks, started), daemon=True).start()
    assert started.wait(60)
    threading.Thread(target=_stream, args=(server.url, "acme/two", 4, waiting_chunks, waiting_started), daemon=True).start()
    deadline, text = time.monotonic() + 30, ""
    while time.monotonic() < deadline:
        text = httpx.get(f"{server.url}/metrics").text
        if 'waiting_lora_adapters="acme/two"' in text:
            break
        time.sleep(0.05)
    assert re.search(r'vllm:lora_requests_info\{max_lora="8",running_lora_adapters="acme/one",waiting_lora_adapters="acme/two"\}', text), text
    assert _metric(text, "vllm:num_requests_running") == 1
    assert _metric(text, "vllm:num_requests_waiting") == 1
    assert 0 < _metric(text, "vllm:gpu_cache_usage_perc") <= 1


def test_sigterm_drains_streams_then_exits_zero(server):
    chunks, started = [], threading.Event()
    reader = threading.Thread(target=_stream, args=(server.url, "demo", 1200, chunks, started), daemon=True)
    reader.start()
    assert started.wait(60)
    server.proc.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + 10
    while httpx.get(f"{server.url}/readyz").status_code == 200 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert httpx.get(f"{server.url}/readyz").status_code == 503
    assert httpx.get(f"{server.url}/healthz").status_code == 200
    refused = httpx.post(f"{server.url}/v1/completions", json={"model": "demo", "prompt": "x", "max_tokens": 2})
    assert refused.status_code == 503 and refused.json()["error"]["message"]
    reader.join(120)
    assert server.proc.wait(60) == 0
    assert chunks[0] == 200 and chunks[-1] == "data: [DONE]"
    final = json.loads(chunks[-2].removeprefix("data: "))
    assert final["choices"][0]["finish_reason"] == "length"  # ran to its end, not cut off


def test_logs_are_json_with_request_ids(server):
    response = httpx.post(f"{server.url}/v1/completions", headers={"X-Request-ID": "trace-abc-123"},
                          json={"model": "demo", "prompt": "hi", "max_tokens": 2})
    assert response.headers["X-Request-ID"] == "trace-abc-123"
    time.sleep(0.2)
    lines = [json.loads(l) for l in server.log_path.read_text().splitlines() if l.startswith("{")]
    access = [l for l in lines if l.get("logger") == "loraplex.access" and l.get("request_id") == "trace-abc-123"]
    assert access and access[0]["status"] == 200 and access[0]["path"] == "/v1/completions"


JOB_STATUSES = ("queued", "validating_files", "running", "succeeded", "failed", "cancelled")


def _jobs_by_status(text: str) -> dict[str, float]:
    return {status: _metric(text, "loraplex_fine_tuning_jobs", f'status="{status}"') for status in JOB_STATUSES}


def test_fine_tuning_jobs_gauge_follows_create_and_cancel(api_settings, api_engine, tmp_path):
    """No worker here, so the job stays queued until cancelled: the gauge must show exactly that."""
    from fastapi.testclient import TestClient

    from loraplex.api import create_app

    settings = api_settings.model_copy(update={"data_dir": tmp_path, "start_local_worker": False})
    with TestClient(create_app(settings, api_engine)) as client:
        assert _jobs_by_status(client.get("/metrics").text) == dict.fromkeys(JOB_STATUSES, 0)
        examples = "\n".join(json.dumps({"prompt": f"Q{i}", "completion": " A"}) for i in range(4)).encode()
        uploaded = client.post("/v1/files", data={"purpose": "fine-tune"}, files={"file": ("t.jsonl", examples)})
        assert uploaded.status_code == 200, uploaded.text
        created = client.post("/v1/fine_tuning/jobs", json={"model": "demo", "training_file": uploaded.json()["id"]})
        assert created.status_code == 200, created.text
        assert _jobs_by_status(client.get("/metrics").text) == {**dict.fromkeys(JOB_STATUSES, 0), "queued": 1}

        cancelled = client.post(f"/v1/fine_tuning/jobs/{created.json()['id']}/cancel")
        assert cancelled.status_code == 200 and cancelled.json()["status"] == "cancelled"
        assert _jobs_by_status(client.get("/metrics").text) == {**dict.fromkeys(JOB_STATUSES, 0), "cancelled": 1}


def test_fine_tuning_jobs_gauge_is_left_out_when_the_store_is_down():
    """Redis refusing connections, or hanging: the scrape still answers, without the jobs gauge."""
    from prometheus_client import generate_latest

    from loraplex.api.metrics import ServiceMetrics
    from loraplex.training.redis_jobs import RedisJobStore
    from tests.server_process import free_port

    class HangingStore:
        def list(self, tenant):
            time.sleep(2)
            return []

    for store in (RedisJobStore(f"redis://127.0.0.1:{free_port()}"), HangingStore()):
        metrics = ServiceMetrics()
        metrics.watch_jobs(lambda store=store: store)
        metrics.http_requests.labels("/x", "GET", "200").inc()
        start = time.monotonic()
        text = generate_latest(metrics.registry).decode()
        assert time.monotonic() - start < 1.5
        assert "loraplex_http_requests_total" in text and "loraplex_fine_tuning_jobs" not in text
