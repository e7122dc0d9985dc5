"""POST /v1/completions: OpenAI completion request -> engine -> completion (or SSE chunks)."""
from __future__ import annotations

import time
from collections.abc import AsyncIterator

from loraplex.api.errors import InvalidParameter
from loraplex.api.schemas.openai import CompletionChoice, CompletionRequest, CompletionResponse, UsageInfo
from loraplex.api.serving import generation
from loraplex.api.serving.context import GenerationContext
from loraplex.api.serving.generation import Accumulator, Generation
from loraplex.api.serving.prompts import (
    OPENAI_SAMPLING_FIELDS,
    PreparedRequest,
    check_prompt_chars,
    encode_text,
    output_budget,
    resolve_model,
    sampling_params,
    stop_strings,
)
from loraplex.api.serving.sse import DONE_FRAME, SSEResponse, error_frame, frame

DEFAULT_MAX_TOKENS = 16  # OpenAI's default for legacy completions


async def create_completion(body: CompletionRequest, ctx: GenerationContext) -> CompletionResponse | SSEResponse:
    prepared = await prepare(body, ctx)
    if body.stream:
        return SSEResponse(_stream(prepared, await generation.start(ctx, prepared), body.include_usage))
    result = await generation.run_to_completion(ctx, prepared)
    choice = CompletionChoice(text=result.text, finish_reason=result.openai_finish_reason)
    return CompletionResponse(id=_response_id(prepared), model=prepared.model, choices=[choice], usage=usage(result))


async def prepare(body: CompletionRequest, ctx: GenerationContext) -> PreparedRequest:
    stop = stop_strings(body.stop_list, ctx.settings.max_stop_sequences)
    lora = await resolve_model(ctx, body.model)
    prompt = _single_prompt(body.prompt)
    if isinstance(prompt, str):
        check_prompt_chars(len(prompt), ctx.settings.max_prompt_chars, "prompt")
        prompt_ids = await ctx.tokenize(encode_text, ctx.engine.tokenizer, prompt)
    else:
        prompt_ids = prompt
    if not prompt_ids:
        raise InvalidParameter("The prompt is empty.", param="prompt")
    max_tokens = output_budget(body.max_tokens, DEFAULT_MAX_TOKENS, len(prompt_ids), ctx.engine.max_model_len)
    params = sampling_params(max_tokens, stop, **body.model_dump(include=OPENAI_SAMPLING_FIELDS))
    return PreparedRequest(ctx.new_engine_request_id(), body.model, prompt_ids, params, lora)


def usage(result: Accumulator) -> UsageInfo:
    return UsageInfo(
        prompt_tokens=result.num_prompt_tokens,
        completion_tokens=result.num_output_tokens,
        total_tokens=result.num_prompt_tokens + result.num_output_tokens,
    )


def _single_prompt(prompt: str | list) -> str | list[int]:
    """One prompt per request: a string, a token list, or a batch of exactly one of those."""
    if isinstance(prompt, str) or not prompt or isinstance(prompt[0], int):
        return prompt
    if len(prompt) != 1:
        raise InvalidParameter("Only one prompt per request is supported; send one request per prompt.", param="prompt")
    return prompt[0]


def _response_id(prepared: PreparedRequest) -> str:
    return f"cmpl-{prepared.engine_request_id}"


async def _stream(prepared: PreparedRequest, gen: Generation, include_usage: bool) -> AsyncIterator[str]:
    created = int(time.time())
    result = Accumulator(prepared.num_prompt_tokens)

    def chunk(text: str, finish_reason: str | None) -> str:
        choice = CompletionChoice(text=text, finish_reason=finish_reason)
        response = CompletionResponse(id=_response_id(prepared), created=created, model=prepared.model, choices=[choice])
        return frame(response)

    try:
        async for output in gen.outputs():
            result.add(output)
            if output.new_text or output.is_finished:
                yield chunk(output.new_text, result.openai_finish_reason)
        if include_usage:
            yield frame(CompletionResponse(
                id=_response_id(prepared), created=created, model=prepared.model, choices=[], usage=usage(result)
            ))
    except Exception as exc:
        yield error_frame(exc)
    finally:
        await gen.aclose()
    yield DONE_FRAME
