"""Structured outputs over real HTTP on the random-weight demo model (its free output is noise, so a valid
answer comes from the grammar alone): JSON schema, regex and choice constraints, streamed and not, on the
base model and two adapters in the same batches as free requests; the openai SDK's `parse`; tool calls."""
from __future__ import annotations

import asyncio
import json
import re

import httpx
import jsonschema
import openai
import pydantic
import pytest

from tests.api_fixtures import GOOD_ADAPTER, OTHER_ADAPTER, sse_payloads

MODELS = ("demo", GOOD_ADAPTER, OTHER_ADAPTER)
SCHEMAS = [
    {"type": "object", "additionalProperties": False, "required": ["city", "rank"],
     "properties": {"city": {"type": "string", "maxLength": 8}, "rank": {"type": "integer", "minimum": 1, "maximum": 99}}},
    {"type": "object", "additionalProperties": False, "required": ["ok", "tags"],
     "properties": {"ok": {"type": "boolean"},
                    "tags": {"type": "array", "maxItems": 2, "items": {"enum": ["red", "green", "blue"]}}}},
    {"type": "object", "additionalProperties": False, "required": ["kind"],
     "properties": {"kind": {"enum": ["cat", "dog"]}, "note": {"type": "string", "maxLength": 4}}},
]
REGEX = r"[A-Z]{2}-[0-9]{3}"
CHOICES = ["yes", "no", "not sure"]
MESSAGES = [{"role": "user", "content": "Answer in JSON."}]


async def _constrained(client: httpx.AsyncClient, i: int) -> tuple[dict, str]:
    """Request i of the mix: a JSON schema on chat (odd: streamed) or a completion's guided_json."""
    schema, model = SCHEMAS[i % len(SCHEMAS)], MODELS[i % len(MODELS)]
    common = {"model": model, "max_tokens": 60, "temperature": 1.0, "seed": i}
    if i % 4 == 3:
        body = {**common, "prompt": "Some JSON:", "guided_json": schema, "stream": i % 8 == 7}
        return schema, await _text(client, "/v1/completions", body)
    response_format = {"type": "json_schema", "json_schema": {"name": f"s{i % 3}", "schema": schema, "strict": True}}
    body = {**common, "messages": MESSAGES, "response_format": response_format, "stream": i % 2 == 1}
    return schema, await _text(client, "/v1/chat/completions", body)


async def _text(client: httpx.AsyncClient, path: str, body: dict) -> str:
    response = await client.post(path, json=body)
    assert response.status_code == 200, response.text
    if not body.get("stream"):
        choice = response.json()["choices"][0]
        assert choice["finish_reason"] == "stop", choice
        return choice["message"]["content"] if "message" in choice else choice["text"]
    chunks = [json.loads(p) for p in sse_payloads(response.text)[:-1]]
    assert chunks[-1]["choices"][0]["finish_reason"] == "stop"
    key = "delta" if path.endswith("chat/completions") else None
    return "".join((c["choices"][0][key]["content"] or "") if key else c["choices"][0]["text"] for c in chunks)


async def _free(client: httpx.AsyncClient, i: int) -> str:
    body = {"model": MODELS[i % 3], "prompt": "Once", "max_tokens": 24, "temperature": 1.0, "seed": i, "ignore_eos": True}
    response = await client.post("/v1/completions", json=body)
    assert response.status_code == 200, response.text
    return response.json()["choices"][0]["text"]


def test_100_of_100_constrained_responses_validate_mixed_with_free_requests(api_server_url):
    async def run():
        async with httpx.AsyncClient(base_url=api_server_url, timeout=120) as client:
            constrained = [_constrained(client, i) for i in range(100)]
            free = [_free(client, i) for i in range(12)]
            return await asyncio.gather(asyncio.gather(*constrained), asyncio.gather(*free))

    answers, free_texts = asyncio.run(run())
    for schema, text in answers:
        jsonschema.validate(json.loads(text), schema)
    assert len(answers) == 100 and all(free_texts)


def test_regex_and_choice_constraints_streamed_and_not(api_client):
    for i, model in enumerate(MODELS):
        for stream in (False, True):
            body = {"model": model, "prompt": "Code:", "max_tokens": 20, "temperature": 1.0, "seed": i, "stream": stream}
            regex_text = _post_text(api_client, {**body, "guided_regex": REGEX})
            assert re.fullmatch(REGEX, regex_text), regex_text
            choice_text = _post_text(api_client, {**body, "guided_choice": CHOICES})
            assert choice_text in CHOICES


def _post_text(client, body: dict) -> str:
    response = client.post("/v1/completions", json=body)
    assert response.status_code == 200, response.text
    if not body["stream"]:
        return response.json()["choices"][0]["text"]
    return "".join(json.loads(p)["choices"][0]["text"] for p in sse_payloads(response.text)[:-1])


class Answer(pydantic.BaseModel):
    model_config = pydantic.ConfigDict(extra="forbid")
    verdict: bool
    score: int = pydantic.Field(ge=0, le=10)


def test_openai_sdk_parse_returns_a_parsed_object(api_server_url):
    client = openai.OpenAI(base_url=f"{api_server_url}/v1", api_key="unused")
    completion = client.chat.completions.parse(model=GOOD_ADAPTER, messages=MESSAGES, response_format=Answer,
                                               max_tokens=40, seed=3)
    parsed = completion.choices[0].message.parsed
    assert isinstance(parsed, Answer) and 0 <= parsed.score <= 10


WEATHER = {"type": "function", "function": {"name": "get_weather", "parameters": {
    "type": "object", "additionalProperties": False, "required": ["city", "unit"],
    "properties": {"city": {"type": "string", "maxLength": 10}, "unit": {"enum": ["C", "F"]}}}}}
CLOCK = {"type": "function", "function": {"name": "get_time", "parameters": {
    "type": "object", "additionalProperties": False, "required": ["zone"],
    "properties": {"zone": {"enum": ["UTC", "CET"]}}}}}


@pytest.mark.parametrize("model", [OTHER_ADAPTER, "demo"])
def test_tool_choice_required_through_the_sdk_gives_valid_arguments(api_server_url, model):
    client = openai.OpenAI(base_url=f"{api_server_url}/v1", api_key="unused")
    schemas = {t["function"]["name"]: t["function"]["parameters"] for t in (WEATHER, CLOCK)}
    for seed in range(3):
        response = client.chat.completions.create(model=model, messages=MESSAGES, tools=[WEATHER, CLOCK],
                                                  tool_choice="required", max_tokens=60, seed=seed)
        choice = response.choices[0]
        assert choice.finish_reason == "tool_calls" and choice.message.content is None
        call = choice.message.tool_calls[0]
        jsonschema.validate(json.loads(call.function.arguments), schemas[call.function.name])


def test_named_tool_call_streams_as_openai_streams_it(api_server_url):
    client = openai.OpenAI(base_url=f"{api_server_url}/v1", api_key="unused")
    stream = client.chat.completions.create(
        model="demo", messages=MESSAGES, tools=[WEATHER, CLOCK], max_tokens=60, stream=True,
        tool_choice={"type": "function", "function": {"name": "get_weather"}})
    chunks = list(stream)
    calls = [c.choices[0].delta.tool_calls[0] for c in chunks if c.choices and c.choices[0].delta.tool_calls]
    assert calls[0].id.startswith("call_") and calls[0].function.name == "get_weather"
    assert all(c.index == 0 and c.id is None for c in calls[1:]) and len(calls) > 2
    jsonschema.validate(json.loads("".join(c.function.arguments for c in calls)), WEATHER["function"]["parameters"])
    assert chunks[-1].choices[0].finish_reason == "tool_calls"


def test_tool_choice_auto_parses_a_tagged_call_and_none_gives_text(api_client):
    from loraplex.api.schemas.structured import ToolDefinition
    from loraplex.api.serving import tool_calls

    plan = tool_calls.plan([ToolDefinition.model_validate(WEATHER)], "auto")
    content, calls = tool_calls.parse(plan, 'Sure. <tool_call>\n{"name": "get_weather", "arguments": {"city": "Oslo", "unit": "C"}}\n</tool_call>')
    assert content == "Sure." and calls[0].function.name == "get_weather"
    assert json.loads(calls[0].function.arguments) == {"city": "Oslo", "unit": "C"}
    assert tool_calls.parse(plan, "no call here") == ("no call here", [])
    body = {"model": "demo", "messages": MESSAGES, "tools": [WEATHER], "tool_choice": "none", "max_tokens": 5}
    message = api_client.post("/v1/chat/completions", json=body).json()["choices"][0]["message"]
    assert message["tool_calls"] == [] and isinstance(message["content"], str)


@pytest.mark.parametrize(("change", "param"), [
    ({"guided_regex": "[a-"}, "guided_regex"),
    ({"guided_json": {"type": "nope"}}, "guided_json"),
    ({"guided_json": "{not json"}, "guided_json"),
    ({"guided_choice": []}, "guided_choice"),
    ({"guided_json": {"type": "object"}, "guided_regex": "a"}, "guided_regex"),
    ({"guided_json": {"enum": ["x" * 100] * 400}}, "guided_json"),
    ({"guided_regex": "(a|b)" * 7000}, "guided_regex"),
])
def test_bad_constraints_are_400_naming_the_param_and_the_server_stays_healthy(api_client, change, param):
    response = api_client.post("/v1/completions", json={"model": "demo", "prompt": "x", "max_tokens": 4, **change})
    assert response.status_code == 400, response.text
    assert response.json()["error"]["param"] == param
    assert api_client.post("/v1/completions", json={"model": "demo", "prompt": "x", "max_tokens": 2}).status_code == 200


def test_bad_response_format_and_tools_are_400(api_client):
    base = {"model": "demo", "messages": MESSAGES, "max_tokens": 4}
    bad_schema = {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "object", "properties": {"a": {"type": 7}}}}}
    cases = [({"response_format": bad_schema}, "response_format"),
             ({"tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": "nope"}}}, "tool_choice"),
             ({"tool_choice": "required"}, "tool_choice"),
             ({"tools": [WEATHER, WEATHER]}, "tools"),
             ({"tools": [WEATHER], "tool_choice": "required", "response_format": {"type": "json_object"}}, "tool_choice")]
    for change, param in cases:
        response = api_client.post("/v1/chat/completions", json={**base, **change})
        assert response.status_code == 400, (change, response.text)
        assert response.json()["error"]["param"] == param, response.text
