"""POST /v1/chat/completions: messages -> chat template -> engine -> assistant messages (or SSE chunks).

n choices are n engine requests batched together. A tool call that must be made is decoded under its
schema (see tool_calls.py); in a stream its arguments go out as `tool_calls` deltas, as OpenAI sends them.
"""
from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator

from loraplex.api.errors import InvalidParameter
from loraplex.api.schemas.openai import (
    ChatChoice,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatCompletionResponse,
    ChatLogprobs,
    ChatMessageOut,
    ChatStreamChoice,
    DeltaMessage,
)
from loraplex.api.schemas.structured import FunctionCallDelta, ToolCall, ToolCallDelta
from loraplex.api.serving import generation, tool_calls
from loraplex.api.serving.completions import usage
from loraplex.api.serving.compositions import openai_adapter
from loraplex.api.serving.context import GenerationContext
from loraplex.api.serving.generation import Accumulator, Generation
from loraplex.api.serving.guides import compile_guide, openai_guide
from loraplex.api.serving.logprobs import TokenTexts, chat_logprobs, token_texts
from loraplex.api.serving.prompts import (
    OPENAI_SAMPLING_FIELDS,
    PreparedRequest,
    check_prompt_chars,
    encode_chat,
    output_budget,
    sampling_params,
    stop_strings,
)
from loraplex.api.serving.sse import DONE_FRAME, SSEResponse, error_frame, frame
from loraplex.api.serving.tool_calls import ToolPlan

_TEMPLATE_ROLES = {"developer": "system"}  # OpenAI's newer name for the system role


async def create_chat_completion(
    body: ChatCompletionRequest, ctx: GenerationContext
) -> ChatCompletionResponse | SSEResponse:
    tools = tool_calls.plan(body.tools, body.tool_choice)
    prepared = await prepare(body, ctx, tools)
    runs = generation.choices(prepared, body.n)
    texts = token_texts(ctx.engine.tokenizer)
    if body.stream:
        return SSEResponse(_stream(prepared, tools, await generation.start_all(ctx, runs), body.include_usage, texts))
    results = await generation.run_all(ctx, runs)
    choices = [_choice(i, r, tools, texts if body.logprobs else None) for i, r in enumerate(results)]
    return ChatCompletionResponse(id=_response_id(prepared), model=prepared.model, choices=choices, usage=usage(*results))


async def prepare(body: ChatCompletionRequest, ctx: GenerationContext, tools: ToolPlan) -> PreparedRequest:
    stop = stop_strings(body.stop_list, ctx.settings.max_stop_sequences)
    model, lora = await openai_adapter(ctx, body)
    messages = [_template_message(m) for m in body.messages]
    check_prompt_chars(sum(len(m["content"]) for m in messages), ctx.settings.max_prompt_chars, "messages")
    prompt_ids = await ctx.tokenize(encode_chat, ctx.engine.tokenizer, messages, tools.template_tools(),
                                    ctx.settings.max_prompt_chars)
    guide, guide_param = _guide(body, tools)
    await compile_guide(ctx, guide, guide_param)
    if body.top_logprobs is not None and not body.logprobs:
        raise InvalidParameter("top_logprobs needs logprobs: true.", param="top_logprobs")
    requested = body.max_completion_tokens or body.max_tokens
    param = "max_completion_tokens" if body.max_completion_tokens else "max_tokens"
    max_tokens = output_budget(requested, None, len(prompt_ids), ctx.engine.max_model_len, param)
    params = sampling_params(max_tokens, stop, **body.model_dump(include=OPENAI_SAMPLING_FIELDS), guide=guide,
                             logprobs=(body.top_logprobs or 0) if body.logprobs else None)
    return PreparedRequest(ctx.new_engine_request_id(), model, prompt_ids, params, lora)


def _guide(body: ChatCompletionRequest, tools: ToolPlan):
    guide, param = openai_guide(body)
    if tools.is_constrained:
        if guide is not None:
            raise InvalidParameter(f"tool_choice `{tools.mode}` and {param} cannot be combined.", param="tool_choice")
        return tool_calls.guide(tools), "tools"
    return guide, param


def _template_message(message) -> dict:
    """A message as chat templates take it: earlier tool calls with their arguments parsed back."""
    out = {"role": _TEMPLATE_ROLES.get(message.role, message.role), "content": message.text}
    if message.tool_calls:
        out["tool_calls"] = [{"id": c.id, "type": "function", "function": {
            "name": c.function.name, "arguments": tool_calls.arguments_for_template(c.function.arguments)}}
            for c in message.tool_calls]
    if message.tool_call_id is not None:
        out["tool_call_id"] = message.tool_call_id
    return out


def _choice(index: int, result: Accumulator, tools: ToolPlan, texts: TokenTexts | None) -> ChatChoice:
    content, calls = tool_calls.parse(tools, result.text)
    logprobs = chat_logprobs(texts, result.token_ids, result.logprobs, result.top_logprobs) if texts else None
    return ChatChoice(index=index, message=ChatMessageOut(content=content, tool_calls=calls), logprobs=logprobs,
                      finish_reason=_finish_reason(result, calls))


def _finish_reason(result: Accumulator, calls: list[ToolCall]) -> str | None:
    return "tool_calls" if calls and result.openai_finish_reason == "stop" else result.openai_finish_reason


def _response_id(prepared: PreparedRequest) -> str:
    return f"chatcmpl-{prepared.engine_request_id}"


class _ChoiceStream:
    """One choice's chunks: content as it comes, unless it is (or may become) a tool call: then held
    back and sent as tool_calls deltas at the end (a named function's arguments stream as they come)."""

    def __init__(self, index: int, tools: ToolPlan, texts: TokenTexts | None):
        self.index, self.tools, self.texts = index, tools, texts
        self.result: Accumulator | None = None
        self.num_sent_tokens, self.num_sent_chars = 0, 0

    def deltas(self, output) -> list[tuple[DeltaMessage, ChatLogprobs | None, str | None]]:
        result = self.result
        if self.tools.mode == "named":
            return self._named(output)
        is_held = self.tools.mode == "required" or tool_calls.may_become_call(self.tools, result.text)
        if not output.is_finished:
            return [] if is_held or not output.new_text else [(DeltaMessage(content=self._take_text()), self._logprobs(), None)]
        content, calls = tool_calls.parse(self.tools, result.text) if is_held else (None, [])
        finish = _finish_reason(result, calls)
        if calls:
            deltas = [_call_header(0, calls[0]), _call_arguments(0, calls[0].function.arguments)]
            return [(d, self._logprobs(), None) for d in deltas] + [(DeltaMessage(), None, finish)]
        return [(DeltaMessage(content=self._take_text()), self._logprobs(), finish)]

    def _named(self, output) -> list:
        chunks = []
        if self.num_sent_chars == 0 and self.num_sent_tokens == 0:
            call = tool_calls.parse(self.tools, "")[1][0]
            chunks.append((_call_header(0, call), None, None))
        if output.new_text:
            chunks.append((_call_arguments(0, self._take_text()), self._logprobs(), None))
        if output.is_finished:
            chunks.append((DeltaMessage(), self._logprobs(), "tool_calls" if self.result.openai_finish_reason == "stop"
                           else self.result.openai_finish_reason))
        return chunks

    def _take_text(self) -> str:
        text = self.result.text[self.num_sent_chars:]
        self.num_sent_chars = len(self.result.text)
        return text

    def _logprobs(self) -> ChatLogprobs | None:
        if self.texts is None or self.num_sent_tokens == self.result.num_output_tokens:
            return None
        start, self.num_sent_tokens = self.num_sent_tokens, self.result.num_output_tokens
        r = self.result
        return chat_logprobs(self.texts, r.token_ids[start:], r.logprobs[start:], r.top_logprobs[start:])


def _call_header(index: int, call: ToolCall) -> DeltaMessage:
    function = FunctionCallDelta(name=call.function.name, arguments="")
    return DeltaMessage(tool_calls=[ToolCallDelta(index=index, id=call.id, type="function", function=function)])


def _call_arguments(index: int, arguments: str) -> DeltaMessage:
    return DeltaMessage(tool_calls=[ToolCallDelta(index=index, function=FunctionCallDelta(arguments=arguments))])


async def _stream(prepared: PreparedRequest, tools: ToolPlan, generations: list[Generation], include_usage: bool,
                  texts: TokenTexts | None) -> AsyncIterator[str]:
    created = int(time.time())
    streams = [_ChoiceStream(i, tools, texts if prepared.params.logprobs is not None else None)
               for i in range(len(generations))]
    for stream in streams:
        stream.result = Accumulator(prepared.num_prompt_tokens)

    def chunk(choices: list[ChatStreamChoice], with_usage: bool = False) -> str:
        return frame(ChatCompletionChunk(
            id=_response_id(prepared), created=created, model=prepared.model, choices=choices,
            usage=usage(*(s.result for s in streams)) if with_usage else None,
        ))

    try:
        for stream in streams:
            yield chunk([ChatStreamChoice(index=stream.index, delta=DeltaMessage(role="assistant", content=""))])
        async for index, output in generation.interleaved(generations):
            stream = streams[index]
            stream.result.add(output)
            for delta, logprobs, finish in stream.deltas(output):
                yield chunk([ChatStreamChoice(index=index, delta=delta, logprobs=logprobs, finish_reason=finish)])
        if include_usage:
            yield chunk([], with_usage=True)
    except Exception as exc:
        yield error_frame(exc)
    finally:
        await asyncio.gather(*(g.aclose() for g in generations), return_exceptions=True)
    yield DONE_FRAME
