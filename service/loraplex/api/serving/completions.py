"""POST /v1/completions: OpenAI completion request -> engine -> completion (or SSE chunks)."""
from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator

from loraplex.api.errors import InvalidParameter
from loraplex.api.schemas.openai import (
    CompletionChoice,
    CompletionLogprobs,
    CompletionRequest,
    CompletionResponse,
    UsageInfo,
)
from loraplex.api.serving import generation
from loraplex.api.serving.compositions import openai_adapter
from loraplex.api.serving.context import GenerationContext
from loraplex.api.serving.generation import Accumulator, Generation
from loraplex.api.serving.guides import compile_guide, openai_guide
from loraplex.api.serving.logprobs import TokenTexts, completion_logprobs, echoed_prompt, merge, token_texts
from loraplex.api.serving.prompts import (
    OPENAI_SAMPLING_FIELDS,
    PreparedRequest,
    check_prompt_chars,
    encode_text,
    output_budget,
    sampling_params,
    stop_strings,
)
from loraplex.api.serving.sse import DONE_FRAME, SSEResponse, error_frame, frame

DEFAULT_MAX_TOKENS = 16  # OpenAI's default for legacy completions


async def create_completion(body: CompletionRequest, ctx: GenerationContext) -> CompletionResponse | SSEResponse:
    num_runs = _num_runs(body)
    prepared = await prepare(body, ctx)
    runs = generation.choices(prepared, num_runs)
    shape = _ChoiceShape(body, prepared, token_texts(ctx.engine.tokenizer), await _prompt_text(body, prepared, ctx))
    if body.stream:
        return SSEResponse(_stream(shape, await generation.start_all(ctx, runs), body.include_usage))
    results = await generation.run_all(ctx, runs)
    best = range(num_runs)
    if num_runs > body.n:  # best_of: the n most likely candidates
        best = sorted(best, key=lambda i: -results[i].cumulative_logprob)[: body.n]
    choices = [shape.choice(index, results[i], results[0].prompt_logprobs) for index, i in enumerate(best)]
    return CompletionResponse(id=_response_id(prepared), model=prepared.model, choices=choices, usage=usage(*results))


def _num_runs(body: CompletionRequest) -> int:
    """best_of candidates are generated and the n with the highest cumulative logprob returned."""
    num_runs = body.best_of or body.n
    if num_runs < body.n:
        raise InvalidParameter(f"best_of ({num_runs}) must be at least n ({body.n}).", param="best_of")
    if body.stream and num_runs > body.n:
        raise InvalidParameter("best_of greater than n cannot be streamed.", param="best_of")
    return num_runs


async def prepare(body: CompletionRequest, ctx: GenerationContext) -> PreparedRequest:
    stop = stop_strings(body.stop_list, ctx.settings.max_stop_sequences)
    model, lora = await openai_adapter(ctx, body)
    prompt = _single_prompt(body.prompt)
    if isinstance(prompt, str):
        check_prompt_chars(len(prompt), ctx.settings.max_prompt_chars, "prompt")
        prompt_ids = await ctx.tokenize(encode_text, ctx.engine.tokenizer, prompt)
    else:
        prompt_ids = prompt
    if not prompt_ids:
        raise InvalidParameter("The prompt is empty.", param="prompt")
    guide, guide_param = openai_guide(body)
    await compile_guide(ctx, guide, guide_param)
    max_tokens = output_budget(body.max_tokens, DEFAULT_MAX_TOKENS, len(prompt_ids), ctx.engine.max_model_len)
    params = sampling_params(
        max_tokens, stop, **body.model_dump(include=OPENAI_SAMPLING_FIELDS), logprobs=body.logprobs,
        prompt_logprobs=body.logprobs if body.echo else None, guide=guide,
    )
    return PreparedRequest(ctx.new_engine_request_id(), model, prompt_ids, params, lora)


def usage(*results: Accumulator) -> UsageInfo:
    """One prompt, every choice's (and best_of candidate's) completion tokens."""
    num_prompt = results[0].num_prompt_tokens
    num_completion = sum(r.num_output_tokens for r in results)
    return UsageInfo(prompt_tokens=num_prompt, completion_tokens=num_completion, total_tokens=num_prompt + num_completion)


async def _prompt_text(body: CompletionRequest, prepared: PreparedRequest, ctx: GenerationContext) -> str:
    if not body.echo:
        return ""
    prompt = _single_prompt(body.prompt)
    if isinstance(prompt, str):
        return prompt
    return await ctx.tokenize(lambda ids: ctx.engine.tokenizer.decode(ids), prepared.prompt_token_ids)


class _ChoiceShape:
    """How a request wants its choices: echoed prompt or not, logprobs or not."""

    def __init__(self, body: CompletionRequest, prepared: PreparedRequest, texts: TokenTexts, prompt_text: str):
        self.body, self.prepared, self.texts, self.prompt_text = body, prepared, texts, prompt_text

    def choice(self, index: int, result: Accumulator, prompt_logprobs) -> CompletionChoice:
        logprobs = None
        if self.body.logprobs is not None:
            logprobs = self.logprobs(result, 0, len(self.prompt_text))
            if self.body.echo:
                logprobs = merge(self.echoed_logprobs(prompt_logprobs), logprobs)
        return CompletionChoice(index=index, text=self.prompt_text + result.text, logprobs=logprobs,
                                finish_reason=result.openai_finish_reason)

    def logprobs(self, result: Accumulator, start: int, text_offset: int) -> CompletionLogprobs:
        return completion_logprobs(self.texts, result.token_ids[start:], result.logprobs[start:],
                                   result.top_logprobs[start:], text_offset)

    def echoed_logprobs(self, prompt_logprobs) -> CompletionLogprobs:
        prompt_ids = self.prepared.prompt_token_ids
        return completion_logprobs(self.texts, prompt_ids, *echoed_prompt(prompt_ids, prompt_logprobs))


def _single_prompt(prompt: str | list) -> str | list[int]:
    """One prompt per request: a string, a token list, or a batch of exactly one of those."""
    if isinstance(prompt, str) or not prompt or isinstance(prompt[0], int):
        return prompt
    if len(prompt) != 1:
        raise InvalidParameter("Only one prompt per request is supported; send one request per prompt.", param="prompt")
    return prompt[0]


def _response_id(prepared: PreparedRequest) -> str:
    return f"cmpl-{prepared.engine_request_id}"


async def _stream(shape: _ChoiceShape, generations: list[Generation], include_usage: bool) -> AsyncIterator[str]:
    created, prepared = int(time.time()), shape.prepared
    results = [Accumulator(prepared.num_prompt_tokens) for _ in generations]
    text_offsets = [len(shape.prompt_text)] * len(generations)

    def chunk(choices: list[CompletionChoice], with_usage: bool = False) -> str:
        return frame(CompletionResponse(id=_response_id(prepared), created=created, model=prepared.model,
                                        choices=choices, usage=usage(*results) if with_usage else None))

    try:
        async for index, output in generation.interleaved(generations):
            result = results[index]
            num_before = result.num_output_tokens
            result.add(output)
            if shape.body.echo and num_before == 0 and output is generations[index].first:
                echoed = shape.echoed_logprobs(result.prompt_logprobs) if shape.body.logprobs is not None else None
                yield chunk([CompletionChoice(index=index, text=shape.prompt_text, logprobs=echoed)])
            if output.new_text or output.new_token_ids or output.is_finished:
                logprobs = None
                if shape.body.logprobs is not None:
                    logprobs = shape.logprobs(result, num_before, text_offsets[index])
                    text_offsets[index] += sum(map(shape.texts.width, output.new_token_ids))
                yield chunk([CompletionChoice(index=index, text=output.new_text, logprobs=logprobs,
                                              finish_reason=result.openai_finish_reason)])
        if include_usage:
            yield chunk([], with_usage=True)
    except Exception as exc:
        yield error_frame(exc)
    finally:
        await asyncio.gather(*(g.aclose() for g in generations), return_exceptions=True)
    yield DONE_FRAME
