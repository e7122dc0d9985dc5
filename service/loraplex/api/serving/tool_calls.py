"""Chat tool calling. `tool_choice`:
- "none" (or no tools): plain text.
- a named function: the output is decoded under that function's parameter schema; it is the arguments.
- "required": decoded under `{"name": <one of the tools>, "arguments": <its parameters>}` (anyOf over the
  tools), so the call always parses and its arguments validate.
- "auto" (the default with tools): the model decides; its output is parsed in the chat template's tool
  format: `<tool_call>{"name": ..., "arguments": ...}</tool_call>` blocks (Hermes/Qwen templates), or the
  whole output being one such JSON object (Llama 3 templates, `parameters` accepted for `arguments`).
"""
from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass
from typing import Any, Literal

from loraplex.api.errors import InvalidParameter
from loraplex.api.schemas.structured import FunctionCall, NamedToolChoice, ToolCall, ToolDefinition
from loraplex.engine.types import Guide

_TAGGED_CALL = re.compile(r"<tool_call>\s*(.*?)\s*</tool_call>", re.DOTALL)
_TAG = "<tool_call>"


@dataclass(frozen=True)
class ToolPlan:
    mode: Literal["none", "auto", "required", "named"]
    tools: tuple[ToolDefinition, ...] = ()
    function: str | None = None  # the named function

    @property
    def is_constrained(self) -> bool:
        return self.mode in ("required", "named")

    def template_tools(self) -> list[dict[str, Any]] | None:
        """The tools as chat templates expect them (None: no tools in the prompt)."""
        if self.mode == "none":
            return None
        return [{"type": "function", "function": t.function.model_dump(exclude_none=True)} for t in self.tools]


def plan(tools: list[ToolDefinition] | None, tool_choice) -> ToolPlan:
    if not tools:
        if tool_choice not in (None, "none"):
            raise InvalidParameter("tool_choice needs tools.", param="tool_choice")
        return ToolPlan("none")
    tools = tuple(tools)
    if len({t.function.name for t in tools}) != len(tools):
        raise InvalidParameter("Function names in tools must be unique.", param="tools")
    if isinstance(tool_choice, NamedToolChoice):
        name = tool_choice.function.name
        if name not in {t.function.name for t in tools}:
            raise InvalidParameter(f"tool_choice names `{name}`, which is not in tools.", param="tool_choice")
        return ToolPlan("named", tools, name)
    return ToolPlan(tool_choice or "auto", tools)


def guide(plan: ToolPlan) -> Guide | None:
    if plan.mode == "named":
        return Guide("json_schema", json.dumps(_parameters(_tool(plan, plan.function))))
    if plan.mode == "required":
        options = [{"type": "object", "additionalProperties": False, "required": ["name", "arguments"],
                    "properties": {"name": {"const": t.function.name}, "arguments": _parameters(t)}}
                   for t in plan.tools]
        return Guide("json_schema", json.dumps({"anyOf": options}))
    return None


def parse(plan: ToolPlan, text: str) -> tuple[str | None, list[ToolCall]]:
    """(the message content, its tool calls) from a choice's text."""
    if plan.mode == "named":
        return None, [_call(plan.function, text)]
    if plan.mode == "required":
        call = _as_call(plan, text)
        return (None, [call]) if call else (text, [])
    if plan.mode == "auto":
        return _parse_auto(plan, text)
    return text, []


def may_become_call(plan: ToolPlan, text: str) -> bool:
    """Auto mode, streaming: whether text so far could still be a tool call (then it is held back)."""
    head = text.lstrip()
    return plan.mode == "auto" and (head.startswith("{") or _TAG.startswith(head[: len(_TAG)]))


def arguments_for_template(arguments: str) -> Any:
    """Chat templates render a call's arguments from a mapping; the wire carries them as JSON text."""
    try:
        return json.loads(arguments)
    except ValueError:
        return arguments


def _parse_auto(plan: ToolPlan, text: str) -> tuple[str | None, list[ToolCall]]:
    tagged = [_as_call(plan, block) for block in _TAGGED_CALL.findall(text)]
    if tagged and all(tagged):
        rest = _TAGGED_CALL.sub("", text).strip()
        return rest or None, tagged
    call = _as_call(plan, text.strip())
    return (None, [call]) if call else (text, [])


def _as_call(plan: ToolPlan, text: str) -> ToolCall | None:
    try:
        value = json.loads(text)
    except ValueError:
        return None
    if not isinstance(value, dict) or value.get("name") not in {t.function.name for t in plan.tools}:
        return None
    arguments = value.get("arguments", value.get("parameters", {}))
    return _call(value["name"], json.dumps(arguments) if not isinstance(arguments, str) else arguments)


def _call(name: str, arguments: str) -> ToolCall:
    return ToolCall(id=f"call_{uuid.uuid4().hex[:24]}", function=FunctionCall(name=name, arguments=arguments))


def _tool(plan: ToolPlan, name: str) -> ToolDefinition:
    return next(t for t in plan.tools if t.function.name == name)


def _parameters(tool: ToolDefinition) -> dict[str, Any]:
    return tool.function.parameters or {"type": "object"}
