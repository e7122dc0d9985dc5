"""Plain request/response types shared by the engine and its callers."""
from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum


@dataclass(frozen=True)
class SamplingParams:
    """Per-request sampling settings. temperature == 0 means greedy."""

    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0 disables top-k
    seed: int | None = None
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False

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

    @property
    def is_finished(self) -> bool:
        return self.finish_reason is not None
