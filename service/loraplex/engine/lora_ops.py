"""Heterogeneous LoRA for a flat token batch: each token uses its own adapter slot.

The base matmul runs once for every token; this module adds the low-rank term
`B[slot] @ (A[slot] @ x)` per token. Slot 0 of every pool buffer is all zeros (the base
model), so tokens without an adapter need no masking. Two kernels, both plain torch ops
that run on CPU and CUDA:

- gather (BGMV-style), for decode tokens: gather each token's A/B, two batched matvecs.
- segments (SGMV-style), for prefill: each contiguous run of tokens that shares an adapter
  does two dense matmuls.

The scaling alpha/r (or alpha/sqrt(r) for rsLoRA) is folded into B at load time.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class LoraBatch:
    """Which adapter slot each token of a step uses, computed once per step."""

    # [num_gather_tokens] slot per token for the leading decode tokens, or None if all base
    gather_slots: torch.Tensor | None
    num_gather_tokens: int
    # (start, end, slot) runs over the prefill tokens that follow, base runs left out
    segments: tuple[tuple[int, int, int], ...]
    used_slots: frozenset[int]  # non-zero slots present in this step

    @property
    def is_empty(self) -> bool:
        return not self.used_slots


EMPTY_LORA_BATCH = LoraBatch(None, 0, (), frozenset())


def build_lora_batch(
    decode_slots: list[int], prefill_runs: list[tuple[int, int]], device: torch.device
) -> LoraBatch:
    """decode_slots: slot of each decode token; prefill_runs: (num_tokens, slot) per prefill seq."""
    used = {s for s in decode_slots if s} | {s for _, s in prefill_runs if s}
    if not used:
        return EMPTY_LORA_BATCH
    num_decode = len(decode_slots)
    gather = None
    if any(decode_slots):
        gather = torch.tensor(decode_slots, dtype=torch.long).to(device, non_blocking=True)
    segments, start = [], num_decode
    for num_tokens, slot in prefill_runs:
        if slot:
            segments.append((start, start + num_tokens, slot))
        start += num_tokens
    return LoraBatch(gather, num_decode, tuple(segments), frozenset(used))


def add_lora(
    y: torch.Tensor, x: torch.Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor, batch: LoraBatch
) -> None:
    """In place: y[t] += B[slot_t] @ A[slot_t] @ x[t].

    y: [T, d_out], x: [T, d_in], lora_a: [num_slots, r, d_in], lora_b: [num_slots, d_out, r].
    """
    if batch.gather_slots is not None:
        n = batch.num_gather_tokens
        a = lora_a.index_select(0, batch.gather_slots)  # [n, r, d_in]
        b = lora_b.index_select(0, batch.gather_slots)  # [n, d_out, r]
        shrunk = torch.bmm(a, x[:n].unsqueeze(-1))  # [n, r, 1]
        y[:n] += torch.bmm(b, shrunk).squeeze(-1)  # [n, d_out]
    for start, end, slot in batch.segments:
        shrunk = x[start:end] @ lora_a[slot].t()  # [len, r]
        y[start:end] += shrunk @ lora_b[slot].t()  # [len, d_out]
