"""Decides, each step, which tokens are computed. Bookkeeping only: never touches a tensor.

A step's token budget (`max_num_batched_tokens`) goes first to the running decodes (one token each),
then to running sequences still prefilling (chunked prefill: a long prompt takes several steps while
the others keep decoding), then to waiting sequences admitted while `max_num_seqs`, free KV blocks
and a ready adapter slot allow. A sequence whose adapter is cold asks for a load and waits; others
keep being admitted. When a decode needs a block and none is free, the newest running sequence is
preempted: its blocks are freed and it waits to be recomputed (its full blocks usually stay in the
prefix cache, so the recompute is mostly a cache hit).

Admission is fair across tenants (a virtual token counter): waiting sequences are considered in
order of how many tokens their tenant has been served, so one tenant's flood cannot starve another;
within a tenant, arrival order holds. A tenant that becomes active starts level with the least
served active tenant (it gets no credit for having been idle).

With `context_cost` (context positions whose attention costs as much as one token through the layers'
weights), a prompt chunk computed beside decodes is sized by compute, not by token count: a chunk of n
tokens after s computed ones costs n + n * (s + (n + 1) / 2) / context_cost token-equivalents. Deep in
a long prompt every token attends to everything before it, so later chunks get fewer tokens and no
step costs the decodes more than the budget's worth of compute. With no decode waiting, chunks are
sized by tokens (nobody stalls; fewer, larger steps prefill fastest).
"""
from __future__ import annotations

import math
import time
from collections import deque
from dataclasses import dataclass, field

from loraplex.engine.adapter_slots import AdapterSlots
from loraplex.engine.block_manager import BlockManager, PrefixMatch
from loraplex.engine.sequence import Sequence, SeqStatus
from loraplex.engine.types import FinishReason, LoraRequest


@dataclass(frozen=True)
class ScheduledChunk:
    """Tokens [start, start + num_tokens) of one sequence's prompt (+ recomputed outputs)."""

    seq: Sequence
    start: int
    num_tokens: int

    @property
    def is_last(self) -> bool:
        """The chunk reaches the sequence's end: its last logits are sampled."""
        return self.start + self.num_tokens == self.seq.num_tokens


@dataclass
class ScheduledBatch:
    decode_seqs: list[Sequence]  # one new token each, first in the flat batch
    prefill_chunks: list[ScheduledChunk]  # fresh prompts by length, then continuation chunks
    adapter_loads: list[tuple[LoraRequest, int]] = field(default_factory=list)  # (adapter, reserved slot)

    @property
    def sampled_seqs(self) -> list[Sequence]:
        """The sequences that get a new token this step, in logits order."""
        return self.decode_seqs + [c.seq for c in self.prefill_chunks if c.is_last]

    @property
    def num_tokens(self) -> int:
        return len(self.decode_seqs) + sum(c.num_tokens for c in self.prefill_chunks)

    @property
    def is_empty(self) -> bool:
        return not self.decode_seqs and not self.prefill_chunks


class Scheduler:
    def __init__(self, blocks: BlockManager, slots: AdapterSlots, max_num_seqs: int, max_num_batched_tokens: int,
                 context_cost: float | None = None):
        self.blocks, self.slots = blocks, slots
        self.max_num_seqs, self.max_num_batched_tokens = max_num_seqs, max_num_batched_tokens
        self.context_cost = context_cost  # None: chunks are sized by token count alone
        self._cost_per_context = None  # this step's: context_cost while decodes run, else None
        self.watermark_blocks = max(1, blocks.num_blocks // 100)  # kept free at admission for decodes
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []  # in admission order: the newest is preempted first
        self.served_tokens: dict[str, int] = {}  # tenant -> virtual token counter
        self.num_preemptions = 0
        self.max_num_running = 0  # peak since start

    @property
    def num_waiting(self) -> int:
        return len(self.waiting)

    @property
    def num_running(self) -> int:
        return len(self.running)

    def add(self, seq: Sequence) -> None:
        if seq.tenant not in self._active_tenants():
            floor = min((self.served_tokens[t] for t in self._active_tenants()), default=0)
            self.served_tokens[seq.tenant] = max(self.served_tokens.get(seq.tenant, 0), floor)
        self.waiting.append(seq)

    def _active_tenants(self) -> set[str]:
        return {s.tenant for s in self.waiting} | {s.tenant for s in self.running}

    # --- the step ----------------------------------------------------------------------------
    def schedule(self) -> ScheduledBatch:
        decode_seqs = self._schedule_decodes()
        self._cost_per_context = self.context_cost if decode_seqs else None
        budget = self.max_num_batched_tokens - len(decode_seqs)
        chunks = self._continue_prefills(budget)
        budget -= sum(self._cost(c) for c in chunks)
        admitted, loads = self._admit(budget)
        chunks += admitted
        # fresh prompts by length, then continuation chunks by shape: equal neighbours share one attention call
        chunks.sort(key=lambda c: (c.start > 0, c.num_tokens, c.start))
        self.max_num_running = max(self.max_num_running, len(self.running))
        return ScheduledBatch(decode_seqs, chunks, loads)

    def _schedule_decodes(self) -> list[Sequence]:
        scheduled = []
        for seq in list(self.running):
            if seq.status is not SeqStatus.RUNNING or seq.num_uncomputed_tokens != 1:
                continue  # preempted in this loop, or still prefilling
            while not self.blocks.can_append(seq.block_table, seq.num_tokens):
                victim = self.running[-1]
                self.preempt(victim)
                if victim is seq:
                    break
            if seq.status is SeqStatus.RUNNING:
                self.blocks.append(seq.block_table, seq.num_tokens)
                scheduled.append(seq)
        return scheduled

    def _continue_prefills(self, budget: int) -> list[ScheduledChunk]:
        chunks = []
        for seq in self.running:
            if seq.num_uncomputed_tokens > 1 and budget > 0:
                chunk = self._chunk(seq, budget)
                chunks.append(chunk)
                budget -= self._cost(chunk)
        return chunks

    def _chunk(self, seq: Sequence, budget: int) -> ScheduledChunk:
        """The next chunk of `seq` that fits `budget` (at least one token, so every prefill advances)."""
        start, num_tokens = seq.num_computed_tokens, min(seq.num_uncomputed_tokens, budget)
        if self._cost_per_context is not None and num_tokens > 1:
            num_tokens = max(1, min(num_tokens, chunk_tokens_for_cost(start, budget, self._cost_per_context)))
        return ScheduledChunk(seq, start, num_tokens)

    def _cost(self, chunk: ScheduledChunk) -> int:
        """Token-equivalents of a chunk (its token count when chunks are sized by tokens)."""
        n = chunk.num_tokens
        if self._cost_per_context is None:
            return n
        return math.ceil(n + n * (chunk.start + (n + 1) / 2) / self._cost_per_context)

    def _admit(self, budget: int) -> tuple[list[ScheduledChunk], list[tuple[LoraRequest, int]]]:
        admitted, loads = [], []
        fair_order = sorted(self.waiting, key=lambda s: (self.served_tokens.get(s.tenant, 0), s.arrival_time))
        for seq in fair_order:
            if budget <= 0 or len(self.running) >= self.max_num_seqs:
                break
            if seq.lora and not self._ensure_adapter(seq.lora, loads):
                continue
            match = PrefixMatch() if seq.needs_prompt_logprobs else self.blocks.match(seq.cache_identity, seq.token_ids)
            reserve = self.watermark_blocks if self.running else 0
            if not self.blocks.can_allocate(seq.num_tokens + reserve * self.blocks.block_size, match):
                break  # wait for blocks rather than let later, shorter requests overtake forever
            self._start(seq, match)
            chunk = self._chunk(seq, budget)
            admitted.append(chunk)
            budget -= self._cost(chunk)
        return admitted, loads

    def _ensure_adapter(self, lora: LoraRequest, loads: list) -> bool:
        """True if the adapter is ready now; otherwise start a load when a slot can be had."""
        if self.slots.is_ready(lora.key):
            return True
        if self.slots.slot_of(lora.key) is None and self.slots.can_load():
            slot, _ = self.slots.load(lora.key)
            loads.append((lora, slot))
        return False

    def _start(self, seq: Sequence, match) -> None:
        self.waiting.remove(seq)
        seq.status = SeqStatus.RUNNING
        seq.scheduled_time = seq.scheduled_time or time.monotonic()
        seq.block_table = self.blocks.allocate(seq.num_tokens, match)
        seq.block_hashes = list(match.hashes)
        seq.num_computed_tokens = seq.num_cached_tokens = match.num_blocks * self.blocks.block_size
        seq.num_computed_tokens = max(seq.num_computed_tokens, seq.num_precomputed_tokens)  # a prefix-tuning prefix
        if seq.lora:
            seq.slot = self.slots.acquire(seq.lora.key)
        self.running.append(seq)

    def update_computed(self, batch: ScheduledBatch) -> None:
        """After the forward pass: advance each sequence and register its newly full blocks."""
        for seq in batch.decode_seqs:
            self._computed(seq, 1)
        for chunk in batch.prefill_chunks:
            self._computed(chunk.seq, chunk.num_tokens)

    def _computed(self, seq: Sequence, num_tokens: int) -> None:
        seq.num_computed_tokens += num_tokens
        self.served_tokens[seq.tenant] = self.served_tokens.get(seq.tenant, 0) + num_tokens
        self.blocks.cache_full_blocks(seq.cache_identity, seq.token_ids, seq.block_table,
                                      seq.num_computed_tokens, seq.block_hashes)

    # --- leaving the batch -------------------------------------------------------------------
    def preempt(self, seq: Sequence) -> None:
        """Free a running sequence's blocks and slot; it waits (first in line) to be recomputed."""
        self._release(seq)
        seq.status = SeqStatus.WAITING
        seq.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.appendleft(seq)

    def finish(self, seq: Sequence, reason: FinishReason, stop_reason=None) -> None:
        """Free a sequence's blocks and adapter slot (works for waiting or running sequences)."""
        if seq.status is SeqStatus.WAITING:
            self.waiting.remove(seq)
        elif seq.status is SeqStatus.RUNNING:
            self._release(seq)
        seq.status = SeqStatus.FINISHED
        seq.finish_reason, seq.stop_reason = reason, stop_reason

    def _release(self, seq: Sequence) -> None:
        self.running.remove(seq)
        self.blocks.free(seq.block_table)
        seq.block_table, seq.block_hashes, seq.num_computed_tokens = [], [], 0
        if seq.lora:
            self.slots.release(seq.lora.key)

    def fail_waiting_for(self, adapter_key: str) -> list[Sequence]:
        """Remove the waiting sequences that need an adapter whose load failed."""
        failed = [s for s in self.waiting if s.lora_key == adapter_key]
        for seq in failed:
            self.finish(seq, FinishReason.ABORT)
        return failed


def chunk_tokens_for_cost(start: int, budget: int, context_cost: float) -> int:
    """The most tokens n after `start` computed ones with n + n * (start + (n + 1) / 2) / context_cost <= budget."""
    a, b = 1 / (2 * context_cost), 1 + (start + 0.5) / context_cost  # cost(n) = a n^2 + b n
    cost = lambda n: a * n * n + b * n  # noqa: E731
    n = int(2 * budget / (b + math.sqrt(b * b + 4 * a * budget)))  # the positive root, without cancellation
    while cost(n + 1) <= budget:  # float rounding either way
        n += 1
    while n > 0 and cost(n) > budget:
        n -= 1
    return n
