"""POST /v1/chat/completions: messages -> chat template -> engine -> assistant message (or SSE chunks)."""
from __future__ import annotations

import time
from collections.abc import AsyncIterator

from loraplex.api.schemas.openai import (
    ChatChoice,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatCompletionResponse,
    ChatMessageOut,
    ChatStreamChoice,
    DeltaMessage,
)
from loraplex.api.serving import generation
from loraplex.api.serving.completions import usage
from loraplex.api.serving.context import GenerationContext
from loraplex.api.serving.generation import Accumulator, Generation
from loraplex.api.serving.prompts import (
    OPENAI_SAMPLING_FIELDS,
    PreparedRequest,
    check_prompt_chars,
    encode_chat,
    output_budget,
    resolve_model,
    sampling_params,
    stop_strings,
)
from loraplex.api.serving.sse import DONE_FRAME, SSEResponse, error_frame, frame

_TEMPLATE_ROLES = {"developer": "system"}  # OpenAI's newer name for the system role


async def create_chat_completion(
    body: ChatCompletionRequest, ctx: GenerationContext
) -> ChatCompletionResponse | SSEResponse:
    prepared = await prepare(body, ctx)
    if body.stream:
        return SSEResponse(_stream(prepared, await generation.start(ctx, prepared), body.include_usage))
    result = await generation.run_to_completion(ctx, prepared)
    choice = ChatChoice(message=ChatMessageOut(content=result.text), finish_reason=result.openai_finish_reason)
    response_id = _response_id(prepared)
    return ChatCompletionResponse(id=response_id, model=prepared.model, choices=[choice], usage=usage(result))


async def prepare(body: ChatCompletionRequest, ctx: GenerationContext) -> PreparedRequest:
    stop = stop_strings(body.stop_list, ctx.settings.max_stop_sequences)
    lora = await resolve_model(ctx, body.model)
    messages = [{"role": _TEMPLATE_ROLES.get(m.role, m.role), "content": m.text} for m in body.messages]
    check_prompt_chars(sum(len(m["content"]) for m in messages), ctx.settings.max_prompt_chars, "messages")
    prompt_ids = await ctx.tokenize(encode_chat, ctx.engine.tokenizer, messages)
    requested = body.max_completion_tokens or body.max_tokens
    param = "max_completion_tokens" if body.max_completion_tokens else "max_tokens"
    max_tokens = output_budget(requested, None, len(prompt_ids), ctx.engine.max_model_len, param)
    params = sampling_params(max_tokens, stop, **body.model_dump(include=OPENAI_SAMPLING_FIELDS))
    return PreparedRequest(ctx.new_engine_request_id(), body.model, prompt_ids, params, lora)


def _response_id(prepared: PreparedRequest) -> str:
    return f"chatcmpl-{prepared.engine_request_id}"


async def _stream(prepared: PreparedRequest, gen: Generation, include_usage: bool) -> AsyncIterator[str]:
    created = int(time.time())
    result = Accumulator(prepared.num_prompt_tokens)

    def chunk(delta: DeltaMessage, finish_reason: str | None = None, with_usage: bool = False) -> str:
        choices = [] if with_usage else [ChatStreamChoice(delta=delta, finish_reason=finish_reason)]
        return frame(ChatCompletionChunk(
            id=_response_id(prepared), created=created, model=prepared.model, choices=choices,
            usage=usage(result) if with_usage else None,
        ))

    try:
        yield chunk(DeltaMessage(role="assistant", content=""))
        async for output in gen.outputs():
            result.add(output)
            if output.new_text or output.is_finished:
                yield chunk(DeltaMessage(content=output.new_text), result.openai_finish_reason)
        if include_usage:
            yield chunk(DeltaMessage(), with_usage=True)
    except Exception as exc:
        yield error_frame(exc)
    finally:
        await gen.aclose()
    yield DONE_FRAME
