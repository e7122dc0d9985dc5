"""From a wire request to what the engine runs: model -> adapter, prompt -> token ids, limits checked.

Checks that need settings or the tokenizer live here (stop count, context length, prompt size); checks
that need only the body live in the pydantic schemas.
"""
from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Any

from jinja2 import TemplateError

from loraplex.api.errors import ContextLengthExceeded, InvalidParameter
from loraplex.api.serving.context import GenerationContext
from loraplex.engine.types import LoraRequest, SamplingParams

OPENAI_SAMPLING_FIELDS = {"temperature", "top_p", "top_k", "seed", "stop_token_ids", "ignore_eos", "min_tokens",
                          "presence_penalty", "frequency_penalty", "repetition_penalty", "logit_bias"}
MIN_SAMPLING_TEMPERATURE = 1e-5  # below it sampling is greedy anyway; 1e-300 would overflow the logits


@dataclass(frozen=True)
class PreparedRequest:
    engine_request_id: str
    model: str  # echoed in responses: the base name or the adapter id
    prompt_token_ids: list[int]
    params: SamplingParams
    lora: LoraRequest | None

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)


async def resolve_model(ctx: GenerationContext, model: str) -> LoraRequest | None:
    """None for the base model, else the adapter's content-keyed LoraRequest (registry errors propagate)."""
    if model == ctx.engine.model_name:
        return None
    cached = ctx.registry.cached_lora_request(ctx.principal, model)
    if cached is not None:
        return cached
    return await asyncio.to_thread(ctx.registry.lora_request, ctx.principal, model)  # reads the index


def encode_text(tokenizer, text: str) -> list[int]:
    return list(tokenizer.encode(text))


def encode_chat(tokenizer, messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None = None,
                max_chars: int | None = None) -> list[int]:
    """Messages (and the tools, for templates that describe them to the model) -> prompt token ids.
    The rendered prompt is measured before it is tokenized: the template adds text per message, so a
    request within the content limit can still render far past it (120,000 empty messages: 480k tokens)."""
    if not getattr(tokenizer, "chat_template", None):
        raise InvalidParameter("This model has no chat template; use /v1/completions.", param="messages")
    try:
        text = tokenizer.apply_chat_template(messages, tools=tools, add_generation_prompt=True, tokenize=False)
    except TemplateError as exc:
        raise InvalidParameter(f"messages do not fit the chat template: {exc}", param="messages") from None
    if max_chars is not None and len(text) > max_chars:
        raise InvalidParameter(f"The rendered chat prompt is {len(text)} characters long; the limit is {max_chars}.",
                               param="messages")
    return list(tokenizer.encode(text, add_special_tokens=False))  # the template writes the special tokens


def check_prompt_chars(num_chars: int, max_chars: int, param: str) -> None:
    if num_chars > max_chars:
        raise InvalidParameter(f"{param} is {num_chars} characters long; the limit is {max_chars}.", param=param)


def output_budget(requested: int | None, default: int | None, num_prompt_tokens: int, max_model_len: int,
                  param: str = "max_tokens") -> int:
    """The max_tokens to run with: the requested one if it fits the context, else a 400."""
    room = max_model_len - num_prompt_tokens
    if room < 1:
        raise ContextLengthExceeded(
            f"The prompt is {num_prompt_tokens} tokens long; this model's context is {max_model_len} tokens.",
            param="prompt",
        )
    if requested is None:
        return room if default is None else min(default, room)
    if requested > room:
        raise ContextLengthExceeded(
            f"This model's context is {max_model_len} tokens; the prompt ({num_prompt_tokens} tokens) "
            f"plus {param} ({requested}) exceeds it.",
            param=param,
        )
    return requested


def stop_strings(stop: list[str], max_stop_sequences: int, param: str = "stop") -> tuple[str, ...]:
    if len(stop) > max_stop_sequences:
        message = f"At most {max_stop_sequences} stop sequences are allowed, got {len(stop)}."
        raise InvalidParameter(message, param=param)
    if any(not s for s in stop):
        raise InvalidParameter("Stop sequences must not be empty.", param=param)
    return tuple(stop)


def sampling_params(max_tokens: int, stop: tuple[str, ...], **fields: Any) -> SamplingParams:
    """SamplingParams with the wire's nulls replaced by neutral values (top_k -1 or 0: disabled), and a
    temperature too small to divide logits by (they overflow to inf, the softmax to NaN) made greedy."""
    top_k = fields.get("top_k")
    temperature = 1.0 if fields.get("temperature") is None else fields["temperature"]
    return SamplingParams(
        max_tokens=max_tokens,
        temperature=0.0 if temperature < MIN_SAMPLING_TEMPERATURE else temperature,
        top_p=1.0 if fields.get("top_p") is None else fields["top_p"],
        top_k=0 if top_k is None or top_k < 0 else top_k,
        seed=fields.get("seed"),
        stop=stop,
        stop_token_ids=tuple(fields.get("stop_token_ids") or ()),
        ignore_eos=bool(fields.get("ignore_eos")),
        min_tokens=fields.get("min_tokens") or 0,
        presence_penalty=fields.get("presence_penalty") or 0.0,
        frequency_penalty=fields.get("frequency_penalty") or 0.0,
        repetition_penalty=fields.get("repetition_penalty") or 1.0,
        logit_bias=tuple((int(token), bias) for token, bias in (fields.get("logit_bias") or {}).items()),
        logprobs=fields.get("logprobs"),
        prompt_logprobs=fields.get("prompt_logprobs"),
        guide=fields.get("guide"),
    )
