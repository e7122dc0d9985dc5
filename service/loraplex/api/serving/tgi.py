"""TGI / LoRAX /generate and /generate_stream: `inputs` + `parameters` -> engine -> text and details.

TGI semantics kept: greedy unless `do_sample` or a sampling warper is set; a sampled request without a
seed gets one chosen here, so `details.seed` can report it; streams are `data:{json}` events with the
full text and details on the last token, and no `[DONE]` frame.
"""
from __future__ import annotations

import random
from collections.abc import AsyncIterator

from loraplex.api.schemas.tgi import (
    Details,
    GenerateParameters,
    GenerateRequest,
    GenerateResponse,
    StreamDetails,
    StreamResponse,
    Token,
)
from loraplex.api.serving import generation
from loraplex.api.serving.context import GenerationContext
from loraplex.api.serving.generation import Accumulator, Generation
from loraplex.api.serving.prompts import (
    PreparedRequest,
    check_prompt_chars,
    encode_text,
    output_budget,
    resolve_model,
    sampling_params,
    stop_strings,
)
from loraplex.api.serving.sse import SSEResponse, error_frame, frame
from loraplex.engine.types import FinishReason

DEFAULT_MAX_NEW_TOKENS = 100  # TGI's default
_SEEDS = random.SystemRandom()


async def generate(body: GenerateRequest, ctx: GenerationContext) -> GenerateResponse:
    prepared = await prepare(body, ctx)
    result = await generation.run_to_completion(ctx, prepared)
    details = _details(result, prepared, ctx) if body.parameters.details else None
    return GenerateResponse(generated_text=result.text, details=details)


async def generate_stream(body: GenerateRequest, ctx: GenerationContext) -> SSEResponse:
    prepared = await prepare(body, ctx)
    return SSEResponse(_stream(prepared, await generation.start(ctx, prepared), ctx))


async def prepare(body: GenerateRequest, ctx: GenerationContext) -> PreparedRequest:
    parameters = body.parameters
    stop = stop_strings(parameters.stop, ctx.settings.max_stop_sequences, param="parameters.stop")
    model = parameters.adapter_id or ctx.engine.model_name
    lora = await resolve_model(ctx, model)
    check_prompt_chars(len(body.inputs), ctx.settings.max_prompt_chars, "inputs")
    prompt_ids = await ctx.tokenize(encode_text, ctx.engine.tokenizer, body.inputs)
    max_tokens = output_budget(
        parameters.max_new_tokens, DEFAULT_MAX_NEW_TOKENS, len(prompt_ids), ctx.engine.max_model_len,
        param="parameters.max_new_tokens",
    )
    params = sampling_params(max_tokens, stop, **_sampling_fields(parameters))
    return PreparedRequest(ctx.new_engine_request_id(), model, prompt_ids, params, lora)


def _sampling_fields(parameters: GenerateParameters) -> dict:
    if not parameters.is_sampling:
        return {"temperature": 0.0, "ignore_eos": parameters.ignore_eos}
    seed = parameters.seed if parameters.seed is not None else _SEEDS.randrange(2**63)
    return {
        "temperature": parameters.temperature,
        "top_p": parameters.top_p,
        "top_k": parameters.top_k,
        "seed": seed,
        "ignore_eos": parameters.ignore_eos,
    }


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


def _logprob(result: Accumulator, index: int) -> float | None:
    return result.logprobs[index] if index < len(result.logprobs) else None


def _details(result: Accumulator, prepared: PreparedRequest, ctx: GenerationContext) -> Details:
    return Details(
        finish_reason=_finish_reason(result, prepared),
        generated_tokens=result.num_output_tokens,
        seed=prepared.params.seed,
        tokens=_tokens(result, ctx),
    )


async def _stream(prepared: PreparedRequest, gen: Generation, ctx: GenerationContext) -> AsyncIterator[str]:
    result = Accumulator(prepared.num_prompt_tokens)
    try:
        async for output in gen.outputs():
            num_sent = result.num_output_tokens
            result.add(output)
            for token in _tokens(result, ctx, start=num_sent):
                yield frame(_event(result, prepared, token, index=num_sent), prefix="data:")
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
