"""Every failure comes back in the one OpenAI envelope with the right status, and leaves the service healthy."""
from __future__ import annotations

import json

import pytest

from loraplex.engine.errors import EngineNotRunningError, QueueFullError
from tests.api_fixtures import (
    BIG_RANK_ADAPTER,
    IA3_ADAPTER,
    MAX_MODEL_LEN,
    MAX_REQUEST_BYTES,
    MAX_STOP_SEQUENCES,
    completion,
)

GOOD = {"model": "demo", "prompt": "Hello", "max_tokens": 4, "temperature": 0}


def assert_envelope(response, status: int, code=None, param=None) -> dict:
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error"}
    error = body["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert isinstance(error["message"], str) and error["message"]
    assert "Traceback" not in error["message"]
    if code is not None:
        assert error["code"] == code
    if param is not None:
        assert error["param"] == param
    return error


@pytest.mark.parametrize(
    ("change", "param"),
    [
        ({"max_tokens": -1}, "max_tokens"),
        ({"max_tokens": 0}, "max_tokens"),
        ({"temperature": -0.5}, "temperature"),
        ({"top_p": 0.0}, "top_p"),
        ({"top_p": 1.5}, "top_p"),
        ({"n": 17}, "n"),
        ({"echo": 1}, "echo"),
        ({"logprobs": 6}, "logprobs"),
        ({"best_of": 17}, "best_of"),
        ({"presence_penalty": 2.5}, "presence_penalty"),
        ({"seed": -1}, "seed"),
        ({"unknown_field": 1}, "unknown_field"),
        ({"stop": ["a"] * (MAX_STOP_SEQUENCES + 1)}, "stop"),
        ({"stop": [""]}, "stop"),
        ({"prompt": ["one", "two"]}, "prompt"),
        ({"prompt": []}, "prompt"),
    ],
)
def test_invalid_completion_parameters_are_400(api_client, change, param):
    response = api_client.post("/v1/completions", json={**GOOD, **change})
    error = assert_envelope(response, 400, param=param)
    assert error["type"] == "invalid_request_error"


def test_missing_field_is_400_naming_it(api_client):
    error = assert_envelope(api_client.post("/v1/completions", json={"model": "demo"}), 400, param="prompt")
    assert "required" in error["message"].lower()


def test_bad_json_is_400(api_client):
    response = api_client.post("/v1/completions", content=b'{"model": "demo",', headers={"content-type": "application/json"})
    assert "JSON" in assert_envelope(response, 400)["message"]


def test_chat_logprobs_and_n_over_their_limits_are_refused(api_client):
    base = {"model": "demo", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
    assert_envelope(api_client.post("/v1/chat/completions", json={**base, "logprobs": 3}), 400, param="logprobs")
    assert_envelope(api_client.post("/v1/chat/completions", json={**base, "n": 17}), 400, param="n")
    assert_envelope(api_client.post("/v1/chat/completions", json={**base, "messages": []}), 400, param="messages")


def test_prompt_over_context_is_400_context_length_exceeded(api_client):
    long_prompt = list(range(10, 10 + MAX_MODEL_LEN + 5))
    response = api_client.post("/v1/completions", json={**GOOD, "prompt": long_prompt})
    assert_envelope(response, 400, code="context_length_exceeded")
    response = api_client.post("/v1/completions", json={**GOOD, "max_tokens": MAX_MODEL_LEN})
    assert_envelope(response, 400, code="context_length_exceeded", param="max_tokens")


def test_unknown_model_is_404(api_client):
    for model in ("nope", "acme/missing", "ACME/sql", "acme/../sql", "../etc/passwd", ".models/demo"):
        response = api_client.post("/v1/completions", json={**GOOD, "model": model})
        assert_envelope(response, 404, code="model_not_found", param="model")


def test_unservable_adapters_are_400_not_base_fallback(api_client, api_adapters):
    error = assert_envelope(api_client.post("/v1/completions", json={**GOOD, "model": IA3_ADAPTER}), 400, param="model")
    assert error["code"] == "invalid_adapter" and "peft_type 'IA3' is not supported" in error["message"]
    error = assert_envelope(api_client.post("/v1/completions", json={**GOOD, "model": BIG_RANK_ADAPTER}), 400)
    assert "max_lora_rank" in error["message"]


def test_unknown_route_method_and_big_body(api_client):
    assert_envelope(api_client.get("/v1/nothing"), 404, code="not_found")
    assert_envelope(api_client.get("/v1/completions"), 405, code="method_not_allowed")
    big = json.dumps({**GOOD, "prompt": "x" * MAX_REQUEST_BYTES})
    response = api_client.post("/v1/completions", content=big, headers={"content-type": "application/json"})
    assert_envelope(response, 413, code="request_too_large")


def test_big_chunked_body_is_413(api_client):
    chunks = (b"x" * 10_000 for _ in range(MAX_REQUEST_BYTES // 10_000 + 2))  # no Content-Length
    response = api_client.post("/v1/completions", content=chunks, headers={"content-type": "application/json"})
    assert_envelope(response, 413, code="request_too_large")


def test_queue_full_is_429_with_retry_after(api_client, api_engine, monkeypatch):
    async def full(*args, **kwargs):
        raise QueueFullError("queue is full", retry_after_s=7)
        yield  # an async generator, like the engine's

    monkeypatch.setattr(api_engine, "generate", full)
    response = api_client.post("/v1/completions", json=GOOD)
    assert_envelope(response, 429, code="queue_full")
    assert response.headers["Retry-After"] == "7"
    stream = api_client.post("/v1/completions", json={**GOOD, "stream": True})
    assert_envelope(stream, 429, code="queue_full")  # admission errors come before the stream starts


def test_engine_not_running_is_503(api_client, api_engine, monkeypatch):
    async def stopped(*args, **kwargs):
        raise EngineNotRunningError("the engine is not running")
        yield

    monkeypatch.setattr(api_engine, "generate", stopped)
    assert_envelope(api_client.post("/v1/chat/completions", json={
        "model": "demo", "messages": [{"role": "user", "content": "hi"}],
    }), 503, code="engine_not_running")


def test_bug_is_500_envelope_without_details(api_client, api_engine, monkeypatch):
    async def broken(*args, **kwargs):
        raise RuntimeError("secret internal detail")
        yield

    monkeypatch.setattr(api_engine, "generate", broken)
    from fastapi.testclient import TestClient

    # Not entered with `with`: that would run the shared app's lifespan a second time.
    client = TestClient(api_client.app, raise_server_exceptions=False)
    error = assert_envelope(client.post("/v1/completions", json=GOOD), 500, code="internal_error")
    assert "secret" not in error["message"]


def test_service_is_healthy_after_errors(api_client):
    api_client.post("/v1/completions", content=b"{", headers={"content-type": "application/json"})
    api_client.post("/v1/completions", json={**GOOD, "model": IA3_ADAPTER})
    api_client.post("/v1/completions", json={**GOOD, "max_tokens": 10_000})
    assert api_client.get("/healthz").status_code == 200
    assert api_client.get("/readyz").status_code == 200
    assert completion(api_client, max_tokens=3)["choices"][0]["finish_reason"] in ("stop", "length")
