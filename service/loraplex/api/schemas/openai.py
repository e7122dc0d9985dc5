"""OpenAI-compatible request and response bodies for /v1/completions, /v1/chat/completions, /v1/models.

Requests are strict: a parameter we do not implement is a 400 naming it (`extra="forbid"`), never a
silently different result, and a value of the wrong JSON type is a 400 too (`strict`: `true` is no
seed, `"16"` no max_tokens), as the published schema says. Limits that depend on settings (stop count, context) are checked in serving.
"""
from __future__ import annotations

import time
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from loraplex.api.schemas.compositions import MAX_COMPONENTS, AdapterComponent, MergeOptions
from loraplex.api.schemas.structured import (
    MAX_TOOLS,
    ResponseFormat,
    ToolCall,
    ToolCallDelta,
    ToolCallIn,
    ToolChoice,
    ToolDefinition,
)

MAX_SEED = 2**63 - 1
MAX_N = 16  # choices (n) and candidates (best_of) per request
MAX_COMPLETION_LOGPROBS = 5  # OpenAI's limit for /v1/completions
MAX_TOP_LOGPROBS = 20  # OpenAI's limit for chat
MAX_LOGIT_BIAS = 300  # entries
MAX_CHOICES = 256  # guided_choice strings
MAX_CHAT_MESSAGES = 2048  # per request; each one costs template text even when empty
MAX_CONTENT_PARTS = 256  # text parts per message


def at_most(max_items: int, what: str):
    """A list-length check that runs before the items are validated: pydantic's `max_length` counts only
    after validating every item, which for 120,000 messages is seconds of event-loop time."""
    def check(value: Any) -> Any:
        if isinstance(value, list) and len(value) > max_items:
            raise ValueError(f"at most {max_items} {what} are allowed, got {len(value)}")
        return value
    return check


def require_unicode(value: Any) -> Any:
    """Pydantic refuses a lone surrogate (JSON `"\\ud800"`) in a plain `str` field but lets one through a
    union with `str`; the tokenizer then fails on it. Strings in the value must be encodable as UTF-8."""
    texts = [value] if isinstance(value, str) else value if isinstance(value, list) else []
    for text in filter(lambda item: isinstance(item, str), texts):
        try:
            text.encode("utf-8")
        except UnicodeEncodeError as exc:
            raise ValueError(f"not valid Unicode: a lone surrogate at character {exc.start}") from None
    return value


class _Request(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


class StreamOptions(_Request):
    include_usage: bool = False
    continuous_usage_stats: bool = False  # accepted for vLLM clients; usage is sent once, at the end


class SamplingRequest(_Request):
    """Fields shared by completions and chat completions."""

    model: str | None = Field(None, min_length=1, max_length=256,
                              description="The base model or one adapter id. Required unless `adapters` is given; "
                                          "with `adapters` it may only be the base model's name.")
    adapters: list[AdapterComponent] | None = Field(
        None, min_length=1, max_length=MAX_COMPONENTS,
        description="Extension: a weighted composition of adapters to run with (each must be usable by the caller).")
    merge: MergeOptions | None = Field(None, description="Extension: how `adapters` are composed (default linear).")
    max_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0.0, le=2.0)
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    top_k: int | None = Field(None, ge=-1, description="Extension: 0 or -1 disables.")
    seed: int | None = Field(None, ge=0, le=MAX_SEED)
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = Field(None, max_length=64, description="Extension (vLLM).")
    ignore_eos: bool = Field(False, description="Extension (vLLM): keep generating past EOS, for benchmarks.")
    n: int = Field(1, ge=1, le=MAX_N)
    stream: bool = False
    stream_options: StreamOptions | None = None
    presence_penalty: float | None = Field(None, ge=-2.0, le=2.0)
    frequency_penalty: float | None = Field(None, ge=-2.0, le=2.0)
    repetition_penalty: float | None = Field(None, gt=0.0, le=10.0, description="Extension (vLLM/HF).")
    logit_bias: dict[str, float] | None = Field(None, description="Token id (as a string) -> bias in [-100, 100].")
    min_tokens: int = Field(0, ge=0, description="Extension (vLLM): no EOS or stop token before this many tokens.")
    guided_json: dict[str, Any] | str | None = Field(None, description="Extension (vLLM): a JSON schema to follow.")
    guided_regex: str | None = Field(None, description="Extension (vLLM): a regular expression to match.")
    guided_choice: list[str] | None = Field(None, max_length=MAX_CHOICES, description="Extension (vLLM): one of these strings.")
    user: str | None = Field(None, max_length=256)

    _stop_is_unicode = field_validator("stop")(require_unicode)
    _guides_are_unicode = field_validator("guided_regex", "guided_choice")(require_unicode)

    @field_validator("logit_bias")
    @classmethod
    def _bias_by_token_id(cls, value: dict[str, float] | None) -> dict[str, float] | None:
        if value is None:
            return value
        if len(value) > MAX_LOGIT_BIAS:
            raise ValueError(f"at most {MAX_LOGIT_BIAS} entries are allowed, got {len(value)}")
        for key, bias in value.items():
            if not key.isascii() or not key.isdigit() or len(key) > 12:
                raise ValueError(f"keys must be token ids (non-negative integers as strings), got {key[:20]!r}")
            if not -100.0 <= bias <= 100.0:
                raise ValueError(f"biases must be in [-100, 100], got {bias} for token {key}")
        return value

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)

    @property
    def stop_list(self) -> list[str]:
        if self.stop is None:
            return []
        return [self.stop] if isinstance(self.stop, str) else list(self.stop)


class CompletionRequest(SamplingRequest):
    prompt: str | list[int] | list[str] | list[list[int]]
    echo: bool = False
    logprobs: int | None = Field(None, ge=0, le=MAX_COMPLETION_LOGPROBS)
    best_of: int | None = Field(None, ge=1, le=MAX_N)
    suffix: str | None = None

    _prompt_is_unicode = field_validator("prompt")(require_unicode)

    @field_validator("suffix")
    @classmethod
    def _no_suffix(cls, value: str | None) -> str | None:
        if value:
            raise ValueError("suffix is not supported (no fill-in-the-middle model)")
        return value


class TextPart(_Request):
    type: Literal["text"]
    text: str


class ChatMessage(_Request):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = None
    name: str | None = None
    tool_calls: list[ToolCallIn] | None = Field(None, max_length=MAX_TOOLS, description="Assistant messages only.")
    tool_call_id: str | None = Field(None, max_length=256, description="Tool messages only.")

    _content_is_unicode = field_validator("content")(require_unicode)
    _content_parts_bounded = field_validator("content", mode="before")(at_most(MAX_CONTENT_PARTS, "content parts"))

    @property
    def text(self) -> str:
        if isinstance(self.content, list):
            return "".join(part.text for part in self.content)
        return self.content or ""


class ChatCompletionRequest(SamplingRequest):
    messages: list[ChatMessage] = Field(min_length=1, max_length=MAX_CHAT_MESSAGES)

    _messages_bounded = field_validator("messages", mode="before")(at_most(MAX_CHAT_MESSAGES, "messages"))
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool | None = None
    top_logprobs: int | None = Field(None, ge=0, le=MAX_TOP_LOGPROBS)
    response_format: ResponseFormat | None = Field(None, discriminator="type")
    tools: list[ToolDefinition] | None = Field(None, max_length=MAX_TOOLS)
    tool_choice: ToolChoice | None = None
    parallel_tool_calls: bool | None = Field(None, description="Accepted; at most one call is made per choice.")


class UsageInfo(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class CompletionLogprobs(BaseModel):
    tokens: list[str] = Field(default_factory=list)
    token_logprobs: list[float | None] = Field(default_factory=list)
    top_logprobs: list[dict[str, float] | None] = Field(default_factory=list)
    text_offset: list[int] = Field(default_factory=list)


class CompletionChoice(BaseModel):
    index: int = 0
    text: str
    logprobs: CompletionLogprobs | None = None
    finish_reason: Literal["stop", "length"] | None = None


class CompletionResponse(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[CompletionChoice]
    usage: UsageInfo | None = None


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int] | None = None


class TokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob] = Field(default_factory=list)


class ChatLogprobs(BaseModel):
    content: list[TokenLogprob] | None = None
    refusal: list[TokenLogprob] | None = None


ChatFinishReason = Literal["stop", "length", "tool_calls"]


class ChatMessageOut(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str | None
    tool_calls: list[ToolCall] = Field(default_factory=list)


class ChatChoice(BaseModel):
    index: int = 0
    message: ChatMessageOut
    logprobs: ChatLogprobs | None = None
    finish_reason: ChatFinishReason | None = None


class ChatCompletionResponse(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[ChatChoice]
    usage: UsageInfo


class DeltaMessage(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None
    tool_calls: list[ToolCallDelta] | None = None


class ChatStreamChoice(BaseModel):
    index: int = 0
    delta: DeltaMessage
    logprobs: ChatLogprobs | None = None
    finish_reason: ChatFinishReason | None = None


class ChatCompletionChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChatStreamChoice]
    usage: UsageInfo | None = None


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str
    parent: str | None = None
    max_model_len: int | None = None
    quantization: str | None = None  # the base model's card only: none | int8 | nf4 (fp4: a saved 4-bit checkpoint)
    weight_bytes: int | None = None  # the base model's card only: resident weight bytes


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]
