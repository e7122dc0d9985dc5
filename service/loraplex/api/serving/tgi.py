"""TGI / LoRAX /generate and /generate_stream: `inputs` + `parameters` -> engine -> text and details.

TGI semantics kept: greedy unless `do_sample` or a sampling warper is set; a sampled request without a
seed gets one chosen here, so `details.seed` can report it; streams are `data:{json}` events with the
full text and details on the last token, and no `[DONE]` frame.
"""
from __future__ import annotations

import random
from collections.abc import AsyncIterator

from loraplex.api.errors import InvalidParameter
from loraplex.api.schemas.tgi import (
    BestOfSequence,
    Details,
    GenerateParameters,
    GenerateRequest,
    GenerateResponse,
    Grammar,
    InputToken,
    StreamDetails,
    StreamResponse,
    Token,
)
from loraplex.api.serving import generation
from loraplex.api.serving.compositions import tgi_adapter
from loraplex.api.serving.context import GenerationContext
from loraplex.api.serving.generation import Accumulator, Generation
from loraplex.api.serving.guides import compile_guide, json_schema_guide
from loraplex.api.serving.logprobs import TokenTexts, token_texts
from loraplex.api.serving.prompts import (
    PreparedRequest,
    check_prompt_chars,
    encode_text,
    output_budget,
    sampling_params,
    stop_strings,
)
from loraplex.api.serving.sse import SSEResponse, error_frame, frame
from loraplex.engine.types import FinishReason, Guide

DEFAULT_MAX_NEW_TOKENS = 100  # TGI's default
_SEEDS = random.SystemRandom()


async def generate(body: GenerateRequest, ctx: GenerationContext) -> GenerateResponse:
    prepared = await prepare(body, ctx)
    runs = generation.choices(prepared, body.parameters.best_of or 1)
    results = await generation.run_all(ctx, runs)
    order = sorted(range(len(runs)), key=lambda i: -results[i].cumulative_logprob)  # best_of: most likely first
    best = results[order[0]]
    if not body.parameters.details:
        return GenerateResponse(generated_text=best.text)
    details = _details(best, runs[order[0]], ctx)
    if len(runs) > 1:
        details.best_of_sequences = [
            BestOfSequence(generated_text=results[i].text, **_details(results[i], runs[i], ctx).model_dump())
            for i in order[1:]
        ]
    return GenerateResponse(generated_text=best.text, details=details)


async def generate_stream(body: GenerateRequest, ctx: GenerationContext) -> SSEResponse:
    if (body.parameters.best_of or 1) > 1:
        raise InvalidParameter("best_of > 1 cannot be streamed.", param="parameters.best_of")
    if body.parameters.decoder_input_details:
        raise InvalidParameter("decoder_input_details cannot be streamed.", param="parameters.decoder_input_details")
    prepared = await prepare(body, ctx)
    return SSEResponse(_stream(prepared, await generation.start(ctx, prepared), ctx), end_frame=None, error_prefix="data:")


async def prepare(body: GenerateRequest, ctx: GenerationContext) -> PreparedRequest:
    parameters = body.parameters
    stop = stop_strings(parameters.stop, ctx.settings.max_stop_sequences, param="parameters.stop")
    model, lora = await tgi_adapter(ctx, parameters)
    check_prompt_chars(len(body.inputs), ctx.settings.max_prompt_chars, "inputs")
    prompt_ids = await ctx.tokenize(encode_text, ctx.engine.tokenizer, body.inputs)
    guide = _guide(parameters.grammar)
    await compile_guide(ctx, guide, "parameters.grammar")
    max_tokens = output_budget(
        parameters.max_new_tokens, DEFAULT_MAX_NEW_TOKENS, len(prompt_ids), ctx.engine.max_model_len,
        param="parameters.max_new_tokens",
    )
    params = sampling_params(max_tokens, stop, **_sampling_fields(parameters), guide=guide)
    return PreparedRequest(ctx.new_engine_request_id(), model, prompt_ids, params, lora)


def _guide(grammar: Grammar | None) -> Guide | None:
    if grammar is None:
        return None
    if grammar.type == "json":
        return json_schema_guide(grammar.value, "parameters.grammar")
    if not isinstance(grammar.value, str) or not grammar.value:
        raise InvalidParameter("A regex grammar's value must be a non-empty string.", param="parameters.grammar")
    return Guide("regex", grammar.value)


def _sampling_fields(parameters: GenerateParameters) -> dict:
    fields = {
        "ignore_eos": parameters.ignore_eos,
        "repetition_penalty": parameters.repetition_penalty,
        "frequency_penalty": parameters.frequency_penalty,
        "logprobs": parameters.top_n_tokens or None,
        "prompt_logprobs": 0 if parameters.decoder_input_details else None,
    }
    if not parameters.is_sampling:
        if (parameters.best_of or 1) > 1:
            raise InvalidParameter("best_of > 1 needs sampling (do_sample or a sampling parameter).",
                                   param="parameters.best_of")
        return {**fields, "temperature": 0.0}
    seed = parameters.seed if parameters.seed is not None else _SEEDS.randrange(2**63)
    return {**fields, "temperature": parameters.temperature, "top_p": parameters.top_p, "top_k": parameters.top_k,
            "seed": seed}


def _finish_reason(result: Accumulator, prepared: PreparedRequest) -> str:
    if result.finish_reason is FinishReason.LENGTH:
        return "length"
    if isinstance(result.stop_reason, str) or result.stop_reason in prepared.params.stop_token_ids:
        return "stop_sequence"
    return "eos_token"


def _tokens(result: Accumulator, ctx: GenerationContext, start: int = 0) -> list[Token]:
    special_ids = set(ctx.engine.tokenizer.all_special_ids)
    return [
        Token(id=token_id, text=result.token_texts[i], logprob=_logprob(result, i), special=token_id in special_ids)
        for i, token_id in enumerate(result.token_ids[start:], start)
    ]


def _top_tokens(result: Accumulator, texts: TokenTexts, special_ids: set[int], start: int = 0) -> list[list[Token]]:
    return [[Token(id=t, text=texts(t), logprob=lp, special=t in special_ids) for t, lp in top]
            for top in result.top_logprobs[start:]]


def _logprob(result: Accumulator, index: int) -> float | None:
    return result.logprobs[index] if index < len(result.logprobs) else None


def _prefill(result: Accumulator, prepared: PreparedRequest, texts: TokenTexts) -> list[InputToken]:
    """The prompt's tokens with their logprobs (none for the first: nothing predicts it), as TGI sends them."""
    if result.prompt_logprobs is None:
        return []
    logprobs = [None] + [lp for lp, _ in result.prompt_logprobs]
    return [InputToken(id=t, text=texts(t), logprob=lp) for t, lp in zip(prepared.prompt_token_ids, logprobs)]


def _details(result: Accumulator, prepared: PreparedRequest, ctx: GenerationContext) -> Details:
    texts = token_texts(ctx.engine.tokenizer)
    top = None
    if prepared.params.logprobs:
        top = _top_tokens(result, texts, set(ctx.engine.tokenizer.all_special_ids))
    return Details(
        finish_reason=_finish_reason(result, prepared),
        generated_tokens=result.num_output_tokens,
        seed=prepared.params.seed,
        prefill=_prefill(result, prepared, texts),
        tokens=_tokens(result, ctx),
        top_tokens=top,
    )


async def _stream(prepared: PreparedRequest, gen: Generation, ctx: GenerationContext) -> AsyncIterator[str]:
    result = Accumulator(prepared.num_prompt_tokens)
    texts, special_ids = token_texts(ctx.engine.tokenizer), set(ctx.engine.tokenizer.all_special_ids)
    try:
        async for output in gen.outputs():
            num_sent = result.num_output_tokens
            result.add(output)
            tops = _top_tokens(result, texts, special_ids, num_sent) if prepared.params.logprobs else None
            for j, token in enumerate(_tokens(result, ctx, start=num_sent)):
                event = _event(result, prepared, token, index=num_sent)
                event.top_tokens = tops[j] if tops else None
                yield frame(event, prefix="data:")
                num_sent += 1
    except Exception as exc:
        yield error_frame(exc, prefix="data:")
    finally:
        await gen.aclose()


def _event(result: Accumulator, prepared: PreparedRequest, token: Token, index: int) -> StreamResponse:
    if result.finish_reason is None or index < result.num_output_tokens - 1:
        return StreamResponse(index=index, token=token)
    details = StreamDetails(
        finish_reason=_finish_reason(result, prepared),
        generated_tokens=result.num_output_tokens,
        seed=prepared.params.seed,
    )
    return StreamResponse(index=index, token=token, generated_text=result.text, details=details)
