"""The OpenAI sampling surface over HTTP: n and best_of with seeds, logprobs / top_logprobs / echo and their
wire shapes, penalties and logit_bias reaching the engine, and the limits (400 naming the param)."""
from __future__ import annotations

import json

import openai
import pytest

from tests.api_fixtures import GOOD_ADAPTER, completion, sse_payloads

PROMPT = "The river ran"
MESSAGES = [{"role": "user", "content": "Tell me about rivers."}]


def test_n4_with_a_seed_gives_four_distinct_choices_the_same_on_a_second_call(api_client, api_engine):
    fields = {"n": 4, "seed": 42, "temperature": 1.0, "max_tokens": 8, "ignore_eos": True}
    first = completion(api_client, **fields)
    second = completion(api_client, **fields)
    texts = [c["text"] for c in first["choices"]]
    assert [c["index"] for c in first["choices"]] == [0, 1, 2, 3]
    assert len(set(texts)) == 4 and texts == [c["text"] for c in second["choices"]]
    num_prompt = len(api_engine.tokenizer.encode(PROMPT))
    assert first["usage"] == {"prompt_tokens": num_prompt, "completion_tokens": 32, "total_tokens": num_prompt + 32}
    assert texts[0] == completion(api_client, **{**fields, "n": 1})["choices"][0]["text"]  # choice 0 keeps the seed


def test_chat_n_through_the_sdk_streamed_and_not(api_server_url):
    client = openai.OpenAI(base_url=f"{api_server_url}/v1", api_key="unused")
    fields = dict(model=GOOD_ADAPTER, messages=MESSAGES, n=3, seed=5, max_tokens=6, temperature=1.0)
    response = client.chat.completions.create(**fields)
    texts = [c.message.content for c in sorted(response.choices, key=lambda c: c.index)]
    assert len(set(texts)) == 3 and response.usage.completion_tokens == sum(
        len(c.logprobs.content) for c in client.chat.completions.create(**fields, logprobs=True).choices)
    streamed = ["", "", ""]
    for chunk in client.chat.completions.create(**fields, stream=True):
        for choice in chunk.choices:
            streamed[choice.index] += choice.delta.content or ""
    assert streamed == texts


def test_best_of_returns_the_most_likely_candidates_and_counts_them_all(api_client):
    fields = {"seed": 9, "temperature": 1.0, "max_tokens": 6, "ignore_eos": True, "logprobs": 0}
    candidates = completion(api_client, n=5, **fields)["choices"]
    best = completion(api_client, n=2, best_of=5, **fields)
    ranked = sorted(candidates, key=lambda c: -sum(c["logprobs"]["token_logprobs"]))
    assert [c["text"] for c in best["choices"]] == [c["text"] for c in ranked[:2]]
    assert best["usage"]["completion_tokens"] == 30


def test_completion_logprobs_echo_and_text_offset(api_client, api_engine):
    body = completion(api_client, logprobs=3, echo=True, max_tokens=5, ignore_eos=True)
    [choice] = body["choices"]
    logprobs, prompt_ids = choice["logprobs"], api_engine.tokenizer.encode(PROMPT)
    assert choice["text"].startswith(PROMPT)
    assert len(logprobs["tokens"]) == len(prompt_ids) + 5
    assert logprobs["token_logprobs"][0] is None and logprobs["top_logprobs"][0] is None
    for token, logprob, top in zip(logprobs["tokens"][1:], logprobs["token_logprobs"][1:], logprobs["top_logprobs"][1:]):
        assert top[token] == logprob and 3 <= len(top) <= 4 and logprob <= max(top.values())
    offsets = logprobs["text_offset"]
    assert offsets == sorted(offsets) and offsets[len(prompt_ids)] == len(PROMPT)
    plain = completion(api_client, logprobs=3, max_tokens=5, ignore_eos=True)["choices"][0]
    assert plain["logprobs"]["token_logprobs"] == logprobs["token_logprobs"][len(prompt_ids):]
    assert plain["logprobs"]["text_offset"][0] == 0


def test_streamed_completion_logprobs_equal_non_streamed(api_client):
    expected = completion(api_client, logprobs=2, max_tokens=6, ignore_eos=True)["choices"][0]["logprobs"]
    body = {"model": "demo", "prompt": PROMPT, "max_tokens": 6, "temperature": 0, "logprobs": 2, "stream": True, "ignore_eos": True}
    chunks = [json.loads(p) for p in sse_payloads(api_client.post("/v1/completions", json=body).text)[:-1]]
    streamed = [c["choices"][0]["logprobs"] for c in chunks if c["choices"][0]["logprobs"]]
    assert sum((s["token_logprobs"] for s in streamed), []) == expected["token_logprobs"]
    assert sum((s["text_offset"] for s in streamed), []) == expected["text_offset"]


def test_chat_logprobs_shape_through_the_sdk(api_server_url):
    client = openai.OpenAI(base_url=f"{api_server_url}/v1", api_key="unused")
    response = client.chat.completions.create(model="demo", messages=MESSAGES, max_tokens=5, temperature=0,
                                              logprobs=True, top_logprobs=20)
    content = response.choices[0].logprobs.content
    assert len(content) == response.usage.completion_tokens
    for token in content:
        assert len(token.top_logprobs) == 20 and token.top_logprobs[0].logprob == token.logprob  # greedy: the top one
        assert bytes(token.bytes).decode(errors="replace") == token.token


def test_penalties_and_logit_bias_change_tokens(api_client, api_engine):
    plain = completion(api_client, max_tokens=12, ignore_eos=True)["choices"][0]["text"]
    assert completion(api_client, max_tokens=12, ignore_eos=True, frequency_penalty=2.0, presence_penalty=2.0)["choices"][0]["text"] != plain
    assert completion(api_client, max_tokens=12, ignore_eos=True, repetition_penalty=3.0)["choices"][0]["text"] != plain
    forced = completion(api_client, max_tokens=4, ignore_eos=True, logit_bias={"400": 100}, logprobs=0)
    assert forced["choices"][0]["logprobs"]["tokens"] == [api_engine.tokenizer.decode([400])] * 4


@pytest.mark.parametrize(("change", "param"), [
    ({"n": 17}, "n"), ({"n": 0}, "n"), ({"best_of": 2, "n": 3}, "best_of"), ({"best_of": 3, "stream": True}, "best_of"),
    ({"logprobs": 6}, "logprobs"), ({"logprobs": -1}, "logprobs"),
    ({"logit_bias": {str(i): 1 for i in range(301)}}, "logit_bias"), ({"logit_bias": {"a": 1}}, "logit_bias"),
    ({"logit_bias": {"5": 101}}, "logit_bias"), ({"logit_bias": {"99999": 1}}, "logit_bias"),
    ({"presence_penalty": 2.5}, "presence_penalty"), ({"repetition_penalty": 0}, "repetition_penalty"),
    ({"min_tokens": -1}, "min_tokens"), ({"suffix": "x"}, "suffix"),
])
def test_out_of_range_sampling_params_are_400_naming_them(api_client, change, param):
    response = api_client.post("/v1/completions", json={"model": "demo", "prompt": "x", "max_tokens": 2, **change})
    assert response.status_code == 400, response.text
    assert response.json()["error"]["param"] == param


def test_chat_top_logprobs_limits(api_client):
    base = {"model": "demo", "messages": MESSAGES, "max_tokens": 2}
    for change, param in [({"logprobs": True, "top_logprobs": 21}, "top_logprobs"), ({"top_logprobs": 2}, "top_logprobs")]:
        response = api_client.post("/v1/chat/completions", json={**base, **change})
        assert response.status_code == 400 and response.json()["error"]["param"] == param, response.text
