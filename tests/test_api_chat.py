"""POST /v1/chat/completions: chat template, streaming deltas, max_completion_tokens, the SDK."""
from __future__ import annotations

import json

import openai

from tests.api_fixtures import OTHER_ADAPTER, sse_payloads

MESSAGES = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Tell me about rivers."}]


def chat(client, **fields) -> dict:
    body = {"model": "demo", "messages": MESSAGES, "max_tokens": 12, "temperature": 0, **fields}
    response = client.post("/v1/chat/completions", json=body)
    assert response.status_code == 200, response.text
    return response.json()


def test_chat_uses_template_and_counts_usage(api_client, api_engine):
    body = chat(api_client, max_tokens=6, ignore_eos=True)
    assert body["object"] == "chat.completion" and body["id"].startswith("chatcmpl-")
    [choice] = body["choices"]
    assert choice["message"]["role"] == "assistant" and choice["finish_reason"] == "length"
    prompt_ids = api_engine.tokenizer.apply_chat_template(MESSAGES, add_generation_prompt=True, tokenize=True, return_dict=False)
    assert body["usage"]["prompt_tokens"] == len(prompt_ids)
    assert body["usage"]["completion_tokens"] == 6


def test_chat_stream_matches_non_stream(api_client):
    expected = chat(api_client, max_tokens=14)["choices"][0]
    body = {"model": "demo", "messages": MESSAGES, "max_tokens": 14, "temperature": 0, "stream": True,
            "stream_options": {"include_usage": True}}
    response = api_client.post("/v1/chat/completions", json=body)
    payloads = sse_payloads(response.text)
    assert payloads[-1] == "[DONE]"
    chunks = [json.loads(p) for p in payloads[:-1]]
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    text = "".join(c["choices"][0]["delta"]["content"] or "" for c in chunks if c["choices"])
    assert text == expected["message"]["content"]
    assert chunks[-2]["choices"][0]["finish_reason"] == expected["finish_reason"]
    assert chunks[-1]["usage"]["completion_tokens"] > 0


def test_max_completion_tokens_wins_and_content_parts_work(api_client):
    parts = [{"role": "user", "content": [{"type": "text", "text": "Tell me "}, {"type": "text", "text": "about rivers."}]}]
    body = chat(api_client, messages=parts, max_tokens=50, max_completion_tokens=3, ignore_eos=True)
    assert body["usage"]["completion_tokens"] == 3
    plain = chat(api_client, messages=[{"role": "user", "content": "Tell me about rivers."}], max_tokens=3)
    assert body["usage"]["prompt_tokens"] == plain["usage"]["prompt_tokens"]


def test_openai_sdk_chat_with_adapter(api_client, api_adapters):
    client = openai.OpenAI(base_url="http://testserver/v1", api_key="x", http_client=api_client)
    result = client.chat.completions.create(model=OTHER_ADAPTER, messages=MESSAGES, max_tokens=8, temperature=0)
    assert result.model == OTHER_ADAPTER
    expected = result.choices[0].message.content
    assert expected == chat(api_client, model=OTHER_ADAPTER, max_tokens=8)["choices"][0]["message"]["content"]
    stream = client.chat.completions.create(
        model=OTHER_ADAPTER, messages=MESSAGES, max_completion_tokens=8, temperature=0, stream=True
    )
    assert "".join(c.choices[0].delta.content or "" for c in stream) == expected
