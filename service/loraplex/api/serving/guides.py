"""What constrains a request's output, from whichever field asked: `response_format`, vLLM's
`guided_json` / `guided_regex` / `guided_choice`, a tool call that must be made, TGI's `grammar`. At most
one may; the guide is compiled (or found in the cache) off the event loop before the request is queued,
so a bad schema or regex is a 400 naming its field and never reaches the engine loop."""
from __future__ import annotations

import json
from typing import Any

from loraplex.api.errors import InvalidParameter
from loraplex.api.serving.context import GenerationContext
from loraplex.engine.errors import InvalidRequestError
from loraplex.engine.types import Guide

ANY_JSON_OBJECT = '{"type": "object"}'


def json_schema_guide(schema: dict[str, Any] | str | None, param: str) -> Guide:
    """A JSON schema given as an object or as JSON text (vLLM accepts both); None: any JSON object."""
    if schema is None:
        return Guide("json_schema", ANY_JSON_OBJECT)
    if isinstance(schema, str):
        try:
            schema = json.loads(schema)
        except ValueError as exc:
            raise InvalidParameter(f"{param} is not valid JSON: {exc}", param=param) from None
    if not isinstance(schema, dict | bool):
        raise InvalidParameter(f"{param} must be a JSON schema object.", param=param)
    return Guide("json_schema", json.dumps(schema))


def openai_guide(body) -> tuple[Guide | None, str | None]:
    """(guide, the field it came from) for the vLLM extensions and chat's response_format."""
    found: list[tuple[Guide, str]] = []
    if body.guided_json is not None:
        found.append((json_schema_guide(body.guided_json, "guided_json"), "guided_json"))
    if body.guided_regex is not None:
        found.append((Guide("regex", body.guided_regex), "guided_regex"))
    if body.guided_choice is not None:
        if not body.guided_choice or not all(body.guided_choice):
            raise InvalidParameter("guided_choice must hold at least one non-empty string.", param="guided_choice")
        found.append((Guide("choice", json.dumps(body.guided_choice)), "guided_choice"))
    response_format = getattr(body, "response_format", None)
    if response_format is not None and response_format.type != "text":
        spec = getattr(response_format, "json_schema", None)
        found.append((json_schema_guide(spec.schema_ if spec else None, "response_format"), "response_format"))
    if len(found) > 1:
        raise InvalidParameter(f"{found[0][1]} and {found[1][1]} cannot be combined; give one constraint.",
                               param=found[1][1])
    return found[0] if found else (None, None)


async def compile_guide(ctx: GenerationContext, guide: Guide | None, param: str | None) -> None:
    """Compile (or find cached) on the tokenizer thread; an invalid or oversized guide is a 400 on `param`."""
    if guide is None:
        return
    try:
        await ctx.tokenize(ctx.engine.grammars.compile, guide)
    except InvalidRequestError as exc:
        raise InvalidParameter(f"{param}: {exc}", param=param) from None
