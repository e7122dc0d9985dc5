"""TGI / LoRAX request and response bodies for /generate, /generate_stream and the compat route `/`.

The HF `text_generation` client sends every parameter it knows, most of them null or false; those are
accepted at their neutral value and refused (400) otherwise, so no option is silently ignored.
"""
from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from loraplex.api.schemas.openai import MAX_N, MAX_SEED
from loraplex.api.schemas.compositions import MergedAdapters

MAX_TOP_N_TOKENS = 5  # TGI's default limit

TgiFinishReason = Literal["length", "eos_token", "stop_sequence"]

# parameter -> the values that mean "feature off"
_NEUTRAL_VALUES: dict[str, tuple[Any, ...]] = {
    "return_full_text": (None, False),
    "truncate": (None,),
    "typical_p": (None, 1.0),
    "watermark": (None, False),
    "adapter_source": (None, "local"),
    "adapter_parameters": (None,),
    "response_format": (None,),
}


class Grammar(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    type: Literal["json", "regex"]
    value: dict[str, Any] | str = Field(description="A JSON schema (object or JSON text) or a regular expression.")


class GenerateParameters(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)  # wrong JSON types are refused, not coerced

    adapter_id: str | None = Field(None, max_length=256, description="LoRAX: `<tenant>/<name>`; null = base model.")
    merged_adapters: MergedAdapters | None = Field(None, description="LoRAX: a weighted composition (not with adapter_id).")
    max_new_tokens: int | None = Field(None, ge=1)
    do_sample: bool = False
    temperature: float | None = Field(None, ge=0.0, le=100.0)
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    top_k: int | None = Field(None, ge=0)
    seed: int | None = Field(None, ge=0, le=MAX_SEED)
    stop: list[str] = Field(default_factory=list)
    details: bool = False
    ignore_eos: bool = Field(False, description="Extension, as in the OpenAI routes.")
    repetition_penalty: float | None = Field(None, gt=0.0, le=10.0)
    frequency_penalty: float | None = Field(None, ge=-2.0, le=2.0)
    return_full_text: bool | None = None
    decoder_input_details: bool | None = Field(None, description="Prompt tokens with their logprobs in details.prefill.")
    truncate: int | None = None
    typical_p: float | None = None
    best_of: int | None = Field(None, ge=1, le=MAX_N, description="Sampled candidates; the most likely is returned.")
    watermark: bool | None = None
    top_n_tokens: int | None = Field(None, ge=0, le=MAX_TOP_N_TOKENS)
    grammar: Grammar | None = None
    adapter_source: str | None = None
    adapter_parameters: dict[str, Any] | None = None
    response_format: dict[str, Any] | None = None
    api_token: str | None = Field(None, description="LoRAX: accepted and ignored (no remote adapter sources).")

    @field_validator(*_NEUTRAL_VALUES)
    @classmethod
    def _neutral_only(cls, value: Any, info) -> Any:
        if value not in _NEUTRAL_VALUES[info.field_name]:
            raise ValueError(f"{info.field_name}={value!r} is not supported")
        return value

    @property
    def is_sampling(self) -> bool:
        """TGI samples when asked to, or when any sampling warper is set away from its neutral value."""
        warped = (
            self.temperature not in (None, 1.0) or self.top_k not in (None, 0) or self.top_p not in (None, 1.0)
        )
        return self.do_sample or warped


class GenerateRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    inputs: str = Field(min_length=1)
    parameters: GenerateParameters = Field(default_factory=GenerateParameters)
    stream: bool = False  # read by the compat route `/` only


class InputToken(BaseModel):
    id: int
    text: str
    logprob: float | None = None


class Token(InputToken):
    special: bool = False


class SequenceDetails(BaseModel):
    """What TGI reports of one generated sequence: the answer's `details` and each `best_of` candidate."""

    finish_reason: TgiFinishReason
    generated_tokens: int
    seed: int | None = None
    prefill: list[InputToken] = Field(default_factory=list)
    tokens: list[Token] = Field(default_factory=list)
    top_tokens: list[list[Token]] | None = None


class BestOfSequence(SequenceDetails):
    generated_text: str


class Details(SequenceDetails):
    best_of_sequences: list[BestOfSequence] | None = None


class GenerateResponse(BaseModel):
    generated_text: str
    details: Details | None = None


class StreamDetails(BaseModel):
    finish_reason: TgiFinishReason
    generated_tokens: int
    seed: int | None = None


class StreamResponse(BaseModel):
    index: int
    token: Token
    top_tokens: list[Token] | None = None
    generated_text: str | None = None
    details: StreamDetails | None = None
