"""Decides, each step, which sequences run. Bookkeeping only: never touches a tensor.

Every running sequence decodes one token per step; waiting sequences are admitted (prefilled)
in the same step while a KV row, prompt-token budget and a ready adapter slot are available.
A sequence whose adapter is cold asks for a load and waits; others keep being admitted.

Admission is fair across tenants (a virtual token counter): waiting sequences are considered in
order of how many tokens their tenant has been served, so one tenant's flood cannot starve another;
within a tenant, arrival order holds. A tenant that becomes active starts level with the least
served active tenant (it gets no credit for having been idle).
"""
from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, field

from loraplex.engine.adapter_slots import AdapterSlots
from loraplex.engine.kv_cache import RowAllocator
from loraplex.engine.sequence import Sequence, SeqStatus
from loraplex.engine.types import FinishReason, LoraRequest


@dataclass
class ScheduledBatch:
    decode_seqs: list[Sequence]  # rows 0..len-1, in row order
    prefill_seqs: list[Sequence]  # sorted by prompt length
    row_moves: list[tuple[int, int, int]]  # (src row, dst row, num tokens) to apply first
    adapter_loads: list[tuple[LoraRequest, int]] = field(default_factory=list)  # (adapter, reserved slot)

    @property
    def seqs(self) -> list[Sequence]:
        return self.decode_seqs + self.prefill_seqs

    @property
    def is_empty(self) -> bool:
        return not self.decode_seqs and not self.prefill_seqs


class Scheduler:
    def __init__(self, rows: RowAllocator, slots: AdapterSlots, max_num_batched_tokens: int):
        self.rows, self.slots = rows, slots
        self.max_num_batched_tokens = max_num_batched_tokens
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []  # running[i].row == i
        self._pending_moves: list[tuple[int, int, int]] = []
        self.served_tokens: dict[str, int] = {}  # tenant -> virtual token counter

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

    def charge(self, seqs: list[Sequence], num_tokens: list[int]) -> None:
        """Count tokens computed for each sequence against its tenant."""
        for seq, n in zip(seqs, num_tokens):
            self.served_tokens[seq.tenant] = self.served_tokens.get(seq.tenant, 0) + n

    def _active_tenants(self) -> set[str]:
        return {s.tenant for s in self.waiting} | {s.tenant for s in self.running}

    def schedule(self) -> ScheduledBatch:
        decode_seqs = list(self.running)
        prefill_seqs, loads = self._admit()
        moves, self._pending_moves = self._pending_moves, []
        prefill_seqs.sort(key=lambda s: len(s.prompt_ids))
        return ScheduledBatch(decode_seqs, prefill_seqs, moves, loads)

    def _admit(self) -> tuple[list[Sequence], list[tuple[LoraRequest, int]]]:
        admitted, loads, budget = [], [], self.max_num_batched_tokens
        fair_order = sorted(self.waiting, key=lambda s: (self.served_tokens.get(s.tenant, 0), s.arrival_time))
        for seq in fair_order:
            if not self.rows.can_allocate():
                break
            if len(seq.prompt_ids) > budget:
                continue
            if seq.lora and not self._ensure_adapter(seq.lora, loads):
                continue
            self._start(seq)
            admitted.append(seq)
            budget -= len(seq.prompt_ids)
        return admitted, loads

    def _ensure_adapter(self, lora: LoraRequest, loads: list) -> bool:
        """True if the adapter is ready now; otherwise start a load when a slot can be had."""
        if self.slots.is_ready(lora.key):
            return True
        if self.slots.slot_of(lora.key) is None and self.slots.can_load():
            slot, _ = self.slots.load(lora.key)
            loads.append((lora, slot))
        return False

    def _start(self, seq: Sequence) -> None:
        self.waiting.remove(seq)
        seq.status = SeqStatus.RUNNING
        seq.scheduled_time = time.monotonic()
        seq.row = self.rows.allocate()
        if seq.lora:
            seq.slot = self.slots.acquire(seq.lora.key)
        self.running.append(seq)

    def finish(self, seq: Sequence, reason: FinishReason, stop_reason=None) -> None:
        """Free a sequence's row and adapter slot (works for waiting or running sequences)."""
        if seq.status is SeqStatus.WAITING:
            self.waiting.remove(seq)
        elif seq.status is SeqStatus.RUNNING:
            self._free_row(seq)
            if seq.lora:
                self.slots.release(seq.lora.key)
        seq.status = SeqStatus.FINISHED
        seq.finish_reason, seq.stop_reason = reason, stop_reason

    def fail_waiting_for(self, adapter_key: str) -> list[Sequence]:
        """Remove the waiting sequences that need an adapter whose load failed."""
        failed = [s for s in self.waiting if s.lora_key == adapter_key]
        for seq in failed:
            self.finish(seq, FinishReason.ABORT)
        return failed

    def _free_row(self, seq: Sequence) -> None:
        moved_from = self.rows.deallocate(seq.row)
        last = self.running.pop()
        if moved_from is not None:
            assert last.row == moved_from
            self._pending_moves.append((moved_from, seq.row, last.num_tokens))
            last.row = seq.row
            self.running[seq.row] = last
        seq.row = -1
