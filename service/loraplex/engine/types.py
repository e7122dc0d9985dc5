"""Plain request/response types shared by the engine and its callers."""
from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum
from typing import Literal

GuideKind = Literal["json_schema", "regex", "choice", "lark"]
TopLogprobs = list[tuple[int, float]]  # (token id, logprob), most likely first


@dataclass(frozen=True)
class Guide:
    """A constraint on the output: a JSON schema (JSON text), a regex, a choice (JSON list of strings) or a
    Lark grammar. Compiled once per distinct (kind, spec) by engine/structured.py."""

    kind: GuideKind
    spec: str


@dataclass(frozen=True)
class SamplingParams:
    """Per-request sampling settings. temperature == 0 means greedy.

    Penalties: presence/frequency as OpenAI defines them (over the output so far), repetition as HF/TGI
    define it (over prompt + output: a seen token's logit is divided by it when positive, multiplied when
    negative). logit_bias adds to the logits. logprobs/prompt_logprobs: how many alternatives to report
    per output/prompt token (None: none; the chosen token's logprob is always reported)."""

    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0 disables top-k
    seed: int | None = None
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    min_tokens: int = 0  # EOS and stop_token_ids are banned until this many tokens were generated
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    logit_bias: tuple[tuple[int, float], ...] = ()  # (token id, bias)
    logprobs: int | None = None
    prompt_logprobs: int | None = None
    guide: Guide | None = None

    @property
    def has_penalties(self) -> bool:
        return self.presence_penalty != 0.0 or self.frequency_penalty != 0.0 or self.repetition_penalty != 1.0

    @property
    def is_greedy(self) -> bool:
        return self.temperature <= 0.0 or self.top_k == 1


@dataclass(frozen=True)
class LoraRequest:
    """An adapter version to apply. `key` must be unique per version (e.g. "acme/sql@3")."""

    key: str
    path: str  # directory holding adapter_config.json + adapter_model.safetensors


class FinishReason(str, Enum):
    STOP = "stop"  # EOS, stop token or stop string
    LENGTH = "length"  # max_tokens or context length reached
    ABORT = "abort"  # client went away or server shut down


@dataclass
class RequestOutput:
    """A delta produced by one engine step for one request."""

    request_id: str
    new_token_ids: list[int]
    new_logprobs: list[float]
    new_text: str
    num_prompt_tokens: int
    num_output_tokens: int
    finish_reason: FinishReason | None = None
    stop_reason: str | int | None = None  # the stop string or token that ended it
    metrics: dict[str, float] = field(default_factory=dict)
    new_top_logprobs: list[TopLogprobs] = field(default_factory=list)  # per new token, when params.logprobs
    # once, on the first output when params.prompt_logprobs: per prompt token after the first,
    # (its logprob, the top alternatives at that position)
    prompt_logprobs: list[tuple[float, TopLogprobs]] | None = None

    @property
    def is_finished(self) -> bool:
        return self.finish_reason is not None
