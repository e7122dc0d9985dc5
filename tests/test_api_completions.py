"""POST /v1/completions on the real engine: streaming, determinism, stop strings, usage, adapters, the SDK."""
from __future__ import annotations

import json

import openai

from tests.api_fixtures import GOOD_ADAPTER, completion, sse_payloads

PROMPT = "The river ran"


def stream_completion(client, **fields) -> tuple[list[dict], list[str]]:
    body = {"model": "demo", "prompt": PROMPT, "max_tokens": 12, "temperature": 0, "stream": True, **fields}
    response = client.post("/v1/completions", json=body)
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("text/event-stream")
    payloads = sse_payloads(response.text)
    assert payloads[-1] == "[DONE]"
    return [json.loads(p) for p in payloads[:-1]], payloads


def test_completion_shape_and_usage(api_client, api_engine):
    body = completion(api_client, prompt=PROMPT, max_tokens=7, ignore_eos=True)
    assert body["object"] == "text_completion" and body["model"] == "demo" and body["id"].startswith("cmpl-")
    [choice] = body["choices"]
    assert choice["index"] == 0 and choice["finish_reason"] == "length" and choice["text"]
    num_prompt = len(api_engine.tokenizer.encode(PROMPT))
    assert body["usage"] == {"prompt_tokens": num_prompt, "completion_tokens": 7, "total_tokens": num_prompt + 7}


def test_stream_text_equals_non_stream_text_for_greedy(api_client):
    expected = completion(api_client, prompt=PROMPT, max_tokens=16)["choices"][0]
    chunks, _ = stream_completion(api_client, max_tokens=16)
    assert "".join(c["choices"][0]["text"] for c in chunks) == expected["text"]
    assert chunks[-1]["choices"][0]["finish_reason"] == expected["finish_reason"]
    assert all(c["choices"][0]["finish_reason"] is None for c in chunks[:-1])
    assert len({c["id"] for c in chunks}) == 1


def test_stream_usage_only_when_asked(api_client, api_engine):
    chunks, _ = stream_completion(api_client, max_tokens=5, ignore_eos=True, stream_options={"include_usage": True})
    assert chunks[-1]["choices"] == []
    num_prompt = len(api_engine.tokenizer.encode(PROMPT))
    assert chunks[-1]["usage"] == {"prompt_tokens": num_prompt, "completion_tokens": 5, "total_tokens": num_prompt + 5}
    assert all(c["usage"] is None for c in chunks[:-1])
    chunks, _ = stream_completion(api_client, max_tokens=5)
    assert all(c["usage"] is None and c["choices"] for c in chunks)


def test_same_seed_same_text_when_sampling(api_client):
    def sample(seed: int) -> str:
        fields = {"max_tokens": 16, "temperature": 1.0, "seed": seed, "ignore_eos": True}
        return completion(api_client, **fields)["choices"][0]["text"]

    assert sample(1234) == sample(1234)
    assert sample(1234) != sample(4321)


def test_stop_string_truncates(api_client):
    full = completion(api_client, max_tokens=24, ignore_eos=True)["choices"][0]["text"]
    stop = full[8:11]
    expected = full[: full.index(stop)]
    body = completion(api_client, max_tokens=24, ignore_eos=True, stop=[stop, "never-appears"])
    assert body["choices"][0] == {**body["choices"][0], "text": expected, "finish_reason": "stop"}
    chunks, _ = stream_completion(api_client, max_tokens=24, ignore_eos=True, stop=stop)
    assert "".join(c["choices"][0]["text"] for c in chunks) == expected
    assert chunks[-1]["choices"][0]["finish_reason"] == "stop"


def test_token_id_prompts_match_string_prompt(api_client, api_engine):
    ids = api_engine.tokenizer.encode(PROMPT)
    expected = completion(api_client, max_tokens=8)["choices"][0]["text"]
    assert completion(api_client, prompt=ids, max_tokens=8)["choices"][0]["text"] == expected
    assert completion(api_client, prompt=[ids], max_tokens=8)["choices"][0]["text"] == expected
    assert completion(api_client, prompt=[PROMPT], max_tokens=8)["choices"][0]["text"] == expected


def test_adapter_model_changes_output_and_is_echoed(api_client, api_adapters):
    base = completion(api_client, max_tokens=16, ignore_eos=True)
    tuned = completion(api_client, model=GOOD_ADAPTER, max_tokens=16, ignore_eos=True)
    assert tuned["model"] == GOOD_ADAPTER
    assert tuned["choices"][0]["text"] != base["choices"][0]["text"]
    again = completion(api_client, model=GOOD_ADAPTER, max_tokens=16, ignore_eos=True)
    assert again["choices"][0]["text"] == tuned["choices"][0]["text"]


def test_request_id_is_echoed(api_client):
    response = api_client.post(
        "/v1/completions", json={"model": "demo", "prompt": "x", "max_tokens": 1}, headers={"X-Request-ID": "abc-123"}
    )
    assert response.headers["X-Request-ID"] == "abc-123"
    assert response.json()["id"].startswith("cmpl-abc-123-")
    generated = api_client.get("/healthz", headers={"X-Request-ID": "bad id with spaces"}).headers["X-Request-ID"]
    assert generated and " " not in generated


def test_openai_sdk_completions(api_client, api_adapters):
    client = openai.OpenAI(base_url="http://testserver/v1", api_key="x", http_client=api_client)
    expected = completion(api_client, max_tokens=10)["choices"][0]["text"]
    result = client.completions.create(model="demo", prompt=PROMPT, max_tokens=10, temperature=0)
    assert result.choices[0].text == expected
    assert result.usage.completion_tokens == 10 or result.choices[0].finish_reason == "stop"
    stream = client.completions.create(
        model="demo", prompt=PROMPT, max_tokens=10, temperature=0, stream=True, stream_options={"include_usage": True}
    )
    chunks = list(stream)
    assert "".join(c.choices[0].text for c in chunks if c.choices) == expected
    assert chunks[-1].usage is not None
    extra = client.completions.create(model=GOOD_ADAPTER, prompt=PROMPT, max_tokens=4, extra_body={"top_k": 5, "ignore_eos": True})
    assert extra.usage.completion_tokens == 4
    try:
        client.completions.create(model="acme/missing", prompt=PROMPT, max_tokens=4)
    except openai.NotFoundError as exc:
        assert exc.body["code"] == "model_not_found"
    else:
        raise AssertionError("expected NotFoundError")
