"""Heterogeneous LoRA for a flat token batch: each token uses its own adapter slot.

The base matmul runs once for every token; this module adds the low-rank term
`B[slot] @ (A[slot] @ x)` per token. Slot 0 of every pool buffer is all zeros (the base
model), so tokens without an adapter need no masking. Two kernels, both plain torch ops
that run on CPU and CUDA:

- gather (BGMV-style), for decode tokens: gather each token's A/B, two batched matvecs.
- segments (SGMV-style), for prefill: each contiguous run of tokens that shares an adapter
  does two dense matmuls.

The scaling alpha/r (or alpha/sqrt(r) for rsLoRA) is folded into B at load time.

While an adapter M is merged into the base weights, every other token also gets a second pass
(`compensation`) with the slot holding -B_M A_M, so it still computes with base + its own adapter.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class LoraBatch:
    """Which adapter slot each token of a step uses, computed once per step."""

    # slot per decode token that has an adapter ([m]), or None if no decode token has one
    gather_slots: torch.Tensor | None
    num_gather_tokens: int  # decode tokens lead the flat batch
    # [m] which decode tokens gather_slots belongs to; None when every decode token has an adapter
    gather_index: torch.Tensor | None
    # (start, end, slot) runs over the prefill tokens that follow, base runs left out
    segments: tuple[tuple[int, int, int], ...]
    used_slots: frozenset[int]  # non-zero slots present in this step
    compensation: LoraBatch | None = None  # a second pass (merged mode), same token layout

    @property
    def is_empty(self) -> bool:
        return not self.used_slots and self.compensation is None


EMPTY_LORA_BATCH = LoraBatch(None, 0, None, (), frozenset())


def build_lora_batch(
    decode_slots: list[int], prefill_runs: list[tuple[int, int]], device: torch.device,
    compensation: LoraBatch | None = None,
) -> LoraBatch:
    """decode_slots: slot of each decode token; prefill_runs: (num_tokens, slot) per prefill seq."""
    used = {s for s in decode_slots if s} | {s for _, s in prefill_runs if s}
    if not used:
        return EMPTY_LORA_BATCH if compensation is None else LoraBatch(None, 0, None, (), frozenset(), compensation)
    num_decode = len(decode_slots)
    gather = index = None
    with_adapter = [i for i, s in enumerate(decode_slots) if s]
    if with_adapter:
        gather = _long_tensor([decode_slots[i] for i in with_adapter], device)
        if len(with_adapter) < num_decode:  # only these tokens do LoRA work
            index = _long_tensor(with_adapter, device)
    segments, start = [], num_decode
    for num_tokens, slot in prefill_runs:
        if slot:
            segments.append((start, start + num_tokens, slot))
        start += num_tokens
    return LoraBatch(gather, num_decode, index, tuple(segments), frozenset(used), compensation)


def _long_tensor(values: list[int], device: torch.device) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.long).to(device, non_blocking=True)


def add_lora(
    y: torch.Tensor, x: torch.Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor, batch: LoraBatch
) -> None:
    """In place: y[t] += B[slot_t] @ A[slot_t] @ x[t].

    y: [T, d_out], x: [T, d_in], lora_a: [num_slots, r, d_in], lora_b: [num_slots, d_out, r].
    """
    if batch.gather_slots is not None:
        index = batch.gather_index
        xs = x[: batch.num_gather_tokens] if index is None else x.index_select(0, index)  # [m, d_in]
        a = lora_a.index_select(0, batch.gather_slots)  # [m, r, d_in]
        b = lora_b.index_select(0, batch.gather_slots)  # [m, d_out, r]
        out = torch.bmm(b, torch.bmm(a, xs.unsqueeze(-1))).squeeze(-1)  # [m, d_out]
        if index is None:
            y[: batch.num_gather_tokens] += out
        else:
            y.index_add_(0, index, out)
    for start, end, slot in batch.segments:
        shrunk = x[start:end] @ lora_a[slot].t()  # [len, r]
        y[start:end] += shrunk @ lora_b[slot].t()  # [len, d_out]
