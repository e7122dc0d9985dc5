"""TGI / LoRAX routes, checked with raw HTTP and with the unmodified HF `text_generation` client."""
from __future__ import annotations

import json

import pytest
import text_generation
from text_generation.errors import BadRequestError

from tests.api_fixtures import DORA_ADAPTER, GOOD_ADAPTER, MAX_MODEL_LEN, completion, sse_payloads

PROMPT = "Once upon a time"
pytestmark = pytest.mark.filterwarnings("ignore:The `dict` method is deprecated")  # inside text_generation


def generate(client, **parameters) -> dict:
    response = client.post("/generate", json={"inputs": PROMPT, "parameters": {"max_new_tokens": 10, **parameters}})
    assert response.status_code == 200, response.text
    return response.json()


def test_generate_is_greedy_by_default_and_matches_openai(api_client):
    body = generate(api_client, details=True)
    expected = completion(api_client, prompt=PROMPT, max_tokens=10)["choices"][0]["text"]
    assert body["generated_text"] == expected
    details = body["details"]
    assert details["generated_tokens"] == len(details["tokens"]) and details["prefill"] == []
    assert "".join(t["text"] for t in details["tokens"]) == expected
    assert details["finish_reason"] in ("length", "eos_token")
    assert all(isinstance(t["logprob"], float) and t["logprob"] <= 0 for t in details["tokens"])
    assert "details" not in generate(api_client)


def test_generate_stop_sequence_and_adapter(api_client, api_adapters):
    full = generate(api_client, max_new_tokens=20, ignore_eos=True)["generated_text"]
    stop = full[6:9]
    body = generate(api_client, max_new_tokens=20, ignore_eos=True, stop=[stop], details=True)
    assert body["generated_text"] == full[: full.index(stop)]
    assert body["details"]["finish_reason"] == "stop_sequence"
    tuned = generate(api_client, adapter_id=GOOD_ADAPTER, max_new_tokens=20, ignore_eos=True)
    assert tuned["generated_text"] != full


def test_sampling_reports_its_seed_and_replays(api_client):
    first = generate(api_client, do_sample=True, details=True, ignore_eos=True)
    seed = first["details"]["seed"]
    assert isinstance(seed, int)
    again = generate(api_client, do_sample=True, seed=seed, details=True, ignore_eos=True)
    assert again["generated_text"] == first["generated_text"]


def test_generate_stream_events(api_client):
    expected = generate(api_client, max_new_tokens=8, ignore_eos=True, details=True)
    response = api_client.post("/generate_stream", json={"inputs": PROMPT, "parameters": {"max_new_tokens": 8, "ignore_eos": True}})
    events = [json.loads(p) for p in sse_payloads(response.text, prefix="data:")]
    assert [e["index"] for e in events] == list(range(8))
    assert all(e["generated_text"] is None and e["details"] is None for e in events[:-1])
    assert events[-1]["generated_text"] == expected["generated_text"]
    assert events[-1]["details"] == {"finish_reason": "length", "generated_tokens": 8, "seed": None}
    assert [e["token"] for e in events] == expected["details"]["tokens"]


@pytest.mark.parametrize(
    ("parameters", "status", "code"),
    [
        ({"repetition_penalty": 1.2}, 400, "invalid_parameter"),
        ({"return_full_text": True}, 400, "invalid_parameter"),
        ({"decoder_input_details": True}, 400, "invalid_parameter"),
        ({"max_new_tokens": MAX_MODEL_LEN}, 400, "context_length_exceeded"),
        ({"adapter_id": "acme/missing"}, 404, "model_not_found"),
        ({"adapter_id": DORA_ADAPTER}, 400, "invalid_adapter"),
    ],
)
def test_generate_errors_use_the_envelope(api_client, api_adapters, parameters, status, code):
    response = api_client.post("/generate", json={"inputs": PROMPT, "parameters": parameters})
    assert response.status_code == status
    assert response.json()["error"]["code"] == code


def test_text_generation_client(api_server_url, api_client):
    client = text_generation.Client(api_server_url, timeout=30)
    result = client.generate(PROMPT, max_new_tokens=9)
    assert result.generated_text == generate(api_client, max_new_tokens=9)["generated_text"]
    assert result.details.generated_tokens == len(result.details.tokens)
    streamed = list(client.generate_stream(PROMPT, max_new_tokens=9))
    assert "".join(r.token.text for r in streamed if not r.token.special) == result.generated_text
    assert streamed[-1].generated_text == result.generated_text
    assert streamed[-1].details.finish_reason.value == result.details.finish_reason.value
    sampled = client.generate(PROMPT, max_new_tokens=6, do_sample=True, seed=7, top_k=20, temperature=0.8)
    assert sampled.details.seed == 7
    with pytest.raises(BadRequestError, match="stop"):
        client.generate(PROMPT, max_new_tokens=4, stop_sequences=["a", "b", "c", "d", "e"])
    with pytest.raises(BadRequestError, match="context_length_exceeded"):
        list(client.generate_stream(PROMPT, max_new_tokens=MAX_MODEL_LEN))


def test_text_generation_async_client(api_server_url):
    import asyncio

    async def run() -> tuple[str, str]:
        client = text_generation.AsyncClient(api_server_url, timeout=30)
        result = await client.generate(PROMPT, max_new_tokens=5)
        tokens = [r.token.text async for r in client.generate_stream(PROMPT, max_new_tokens=5)]
        return result.generated_text, "".join(tokens)

    text, streamed = asyncio.run(run())
    assert text == streamed and text
