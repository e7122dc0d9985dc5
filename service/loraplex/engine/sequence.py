"""A request's state inside the engine (plain Python, no tensors)."""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from enum import Enum

from loraplex.engine.detokenizer import IncrementalDetokenizer
from loraplex.engine.types import FinishReason, LoraRequest, SamplingParams
from loraplex.engine.virtual_tokens import VirtualTokens


class SeqStatus(Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass(eq=False)
class Sequence:
    request_id: str
    prompt_ids: list[int]
    params: SamplingParams
    lora: LoraRequest | None
    detokenizer: IncrementalDetokenizer
    seed: int
    tenant: str = ""
    status: SeqStatus = SeqStatus.WAITING
    output_ids: list[int] = field(default_factory=list)
    output_logprobs: list[float] = field(default_factory=list)
    output_top_logprobs: list = field(default_factory=list)  # per output token when params.logprobs
    prompt_logprobs: list | None = None  # (logprob, top) per prompt token after the first, filled chunk by chunk
    block_table: list[int] = field(default_factory=list)  # KV cache blocks while running
    block_hashes: list[bytes] = field(default_factory=list)  # prefix-cache chain of the full computed blocks
    num_computed_tokens: int = 0  # tokens whose KV is in the cache
    num_cached_tokens: int = 0  # of the prompt, found in the prefix cache at the last admission
    num_preemptions: int = 0
    slot: int = 0  # adapter slot while running (0 = base)
    finish_reason: FinishReason | None = None
    stop_reason: str | int | None = None
    arrival_time: float = field(default_factory=time.monotonic)
    scheduled_time: float | None = None
    first_token_time: float | None = None
    num_emitted_tokens: int = 0  # tokens already reported to the caller
    # A prompt/prefix-tuning adapter (then lora is None): its n virtual positions come first, as
    # placeholder ids -1..-n, so positions, blocks and prefix-cache hashes all count them.
    virtual: VirtualTokens | None = None

    def __post_init__(self):
        self._virtual_ids = self.virtual.placeholder_ids if self.virtual else []

    @property
    def num_virtual_tokens(self) -> int:
        return len(self._virtual_ids)

    @property
    def num_precomputed_tokens(self) -> int:
        """Leading positions whose KV no forward computes (a prefix-tuning adapter's prefix)."""
        return self.virtual.num_precomputed if self.virtual else 0

    @property
    def num_tokens(self) -> int:
        return len(self._virtual_ids) + len(self.prompt_ids) + len(self.output_ids)

    @property
    def token_ids(self) -> list[int]:
        """Every position's id, virtual placeholders included."""
        return self._virtual_ids + self.prompt_ids + self.output_ids

    @property
    def num_uncomputed_tokens(self) -> int:
        return self.num_tokens - self.num_computed_tokens

    @property
    def needs_prompt_logprobs(self) -> bool:
        """Prompt logprobs asked for and not all computed yet (cached blocks would skip their logits)."""
        return self.params.prompt_logprobs is not None and len(self.prompt_logprobs or ()) < len(self.prompt_ids) - 1

    @property
    def cache_identity(self) -> str:
        """Prefix-cache blocks are shared only between sequences with the same identity."""
        if self.virtual is not None:
            return self.virtual.key
        return self.lora.key if self.lora else "base"

    @property
    def last_token(self) -> int:
        return self.output_ids[-1] if self.output_ids else self.prompt_ids[-1]

    @property
    def lora_key(self) -> str | None:
        return self.lora.key if self.lora else None

    @property
    def is_finished(self) -> bool:
        return self.status is SeqStatus.FINISHED
