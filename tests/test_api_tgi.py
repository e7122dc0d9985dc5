"""TGI / LoRAX routes, checked with raw HTTP and with the unmodified HF `text_generation` client."""
from __future__ import annotations

import json
import re

import jsonschema
import pytest
import text_generation
from text_generation.errors import BadRequestError

from tests.api_fixtures import GOOD_ADAPTER, IA3_ADAPTER, MAX_MODEL_LEN, completion, sse_payloads

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
        ({"repetition_penalty": 0.0}, 400, "invalid_parameter"),
        ({"return_full_text": True}, 400, "invalid_parameter"),
        ({"top_n_tokens": 6}, 400, "invalid_parameter"),
        ({"best_of": 2}, 400, "invalid_parameter"),  # TGI: best_of needs sampling
        ({"grammar": {"type": "regex", "value": "[a-"}}, 400, "invalid_parameter"),
        ({"grammar": {"type": "json", "value": "{no"}}, 400, "invalid_parameter"),
        ({"max_new_tokens": MAX_MODEL_LEN}, 400, "context_length_exceeded"),
        ({"adapter_id": "acme/missing"}, 404, "model_not_found"),
        ({"adapter_id": IA3_ADAPTER}, 400, "invalid_adapter"),
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


def test_text_generation_client_details_top_n_tokens_and_json_grammar(api_server_url, api_engine):
    from text_generation.types import Grammar, GrammarType

    client = text_generation.Client(api_server_url, timeout=30)
    result = client.generate(PROMPT, max_new_tokens=6, top_n_tokens=3, decoder_input_details=True)
    details = result.details
    assert len(details.top_tokens) == len(details.tokens) == 6
    for token, top in zip(details.tokens, details.top_tokens):
        assert len(top) == 3 and top[0].id == token.id and abs(top[0].logprob - token.logprob) < 1e-6  # greedy
    assert [t.id for t in details.prefill] == api_engine.tokenizer.encode(PROMPT)
    assert details.prefill[0].logprob is None and all(t.logprob <= 0 for t in details.prefill[1:])
    schema = {"type": "object", "additionalProperties": False, "required": ["name", "n"],
              "properties": {"name": {"type": "string", "maxLength": 6}, "n": {"type": "integer", "minimum": 0, "maximum": 9}}}
    for seed in range(3):
        json_result = client.generate(PROMPT, max_new_tokens=40, do_sample=True, seed=seed,
                                      grammar=Grammar(type=GrammarType.Json, value=schema))
        jsonschema.validate(json.loads(json_result.generated_text), schema)
    regex = client.generate(PROMPT, max_new_tokens=10, grammar=Grammar(type=GrammarType.Regex, value="[0-9]{4}"))
    assert re.fullmatch("[0-9]{4}", regex.generated_text)
    streamed = list(client.generate_stream(PROMPT, max_new_tokens=4, top_n_tokens=2))
    assert all(len(r.top_tokens) == 2 for r in streamed)


def test_tgi_penalties_and_best_of(api_client):
    plain = generate(api_client, max_new_tokens=12, ignore_eos=True)["generated_text"]
    assert generate(api_client, max_new_tokens=12, ignore_eos=True, repetition_penalty=3.0)["generated_text"] != plain
    assert generate(api_client, max_new_tokens=12, ignore_eos=True, frequency_penalty=2.0)["generated_text"] != plain
    body = generate(api_client, max_new_tokens=5, ignore_eos=True, do_sample=True, best_of=3, seed=4, details=True)
    others = body["details"]["best_of_sequences"]
    assert len(others) == 2
    best_logprob = sum(t["logprob"] for t in body["details"]["tokens"])
    assert all(best_logprob >= sum(t["logprob"] for t in o["tokens"]) for o in others)
