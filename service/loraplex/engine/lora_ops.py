"""Heterogeneous LoRA for a flat token batch: each token uses its own adapter slot.

The base matmul runs once for every token; this module adds the low-rank term
`B[slot] @ (A[slot] @ x)` per token. Slot 0 of every pool buffer is all zeros (the base
model), so tokens without an adapter need no masking. Three kernels, all plain torch ops that
run on CPU and CUDA:

- dense (decode, small pools, most tokens adapted): one GEMM against every slot's A stacked
  ([S*r, d_in]), zero all but each token's own slot block, one GEMM against every slot's B^T stacked
  ([S*r, d_out]). Two dense matmuls beat gathering per-token weight copies while S*r stays small, but
  they cost the same for every decode token, adapted or not.
- gather (BGMV-style): only the adapted decode tokens, each with its own A/B; used for big pools and
  when few tokens need LoRA (e.g. the others while an adapter is merged).
- segments (SGMV-style, prefill): each contiguous run of tokens sharing an adapter does two matmuls.

The scaling alpha/r (or alpha/sqrt(r) for rsLoRA) is folded into B at load time.

While an adapter M is merged into the base weights, every other token also gets a second pass
(`compensation`) with the slot holding -B_M A_M, so it still computes with base + its own adapter.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

DENSE_MAX_POOL_COLUMNS = 512  # use the dense decode kernel while num_slots * max_rank <= this


@dataclass(frozen=True)
class LoraBatch:
    """Which adapter slot each token of a step uses, computed once per step."""

    num_decode_tokens: int  # decode tokens lead the flat batch
    # dense kernel: [n, num_slots, 1] one-hot of each decode token's slot (None: not used)
    decode_onehot: torch.Tensor | None
    # gather kernel: slot of each decode token that has an adapter ([m]) ...
    gather_slots: torch.Tensor | None
    # ... and which decode tokens those are ([m]); None when every decode token has one
    gather_index: torch.Tensor | None
    # (start, end, slot) runs over the prefill tokens that follow, base runs left out
    segments: tuple[tuple[int, int, int], ...]
    used_slots: frozenset[int]  # non-zero slots present in this step
    compensation: LoraBatch | None = None  # a second pass (merged mode), same token layout
    used_mask: int = 0  # used_slots as bits (1 << slot): modules test it against SlotSet.mask

    def __post_init__(self):
        object.__setattr__(self, "used_mask", sum(1 << s for s in self.used_slots))

    @property
    def is_empty(self) -> bool:
        return not self.used_slots and self.compensation is None


class SlotSet(set):
    """The slots holding non-zero weights for one module; `mask` mirrors it as bits, so the per-module
    test in forward is one integer AND instead of a set intersection."""

    mask = 0

    def add(self, slot: int) -> None:
        super().add(slot)
        self.mask |= 1 << slot

    def discard(self, slot: int) -> None:
        super().discard(slot)
        self.mask &= ~(1 << slot)


EMPTY_LORA_BATCH = LoraBatch(0, None, None, None, (), frozenset())


def build_lora_batch(
    decode_slots: list[int], prefill_runs: list[tuple[int, int]], device: torch.device,
    num_slots: int, max_rank: int, compensation: LoraBatch | None = None,
) -> LoraBatch:
    """decode_slots: slot of each decode token; prefill_runs: (num_tokens, slot) per prefill seq."""
    used = frozenset({s for s in decode_slots if s} | {s for _, s in prefill_runs if s})
    if not used:
        return EMPTY_LORA_BATCH if compensation is None else LoraBatch(0, None, None, None, (), used, compensation)
    num_decode = len(decode_slots)
    onehot = gather = index = None
    with_adapter = [i for i, s in enumerate(decode_slots) if s]
    if with_adapter and num_slots * max_rank <= DENSE_MAX_POOL_COLUMNS and 2 * len(with_adapter) >= num_decode:
        onehot = torch.zeros(num_decode, num_slots, 1)
        onehot[torch.arange(num_decode), torch.tensor(decode_slots)] = 1.0
        onehot = onehot.to(device, non_blocking=True)
    elif with_adapter:
        gather = _long_tensor([decode_slots[i] for i in with_adapter], device)
        if len(with_adapter) < num_decode:  # only these tokens do LoRA work
            index = _long_tensor(with_adapter, device)
    segments, start = [], num_decode
    for num_tokens, slot in prefill_runs:
        if slot:
            segments.append((start, start + num_tokens, slot))
        start += num_tokens
    return LoraBatch(num_decode, onehot, gather, index, tuple(segments), used, compensation)


def add_lora(y: torch.Tensor, x: torch.Tensor, lora_a: torch.Tensor, lora_bt: torch.Tensor, batch: LoraBatch) -> None:
    """In place: y[t] += B[slot_t] @ A[slot_t] @ x[t].

    y: [T, d_out], x: [T, d_in], lora_a: [S, r, d_in], lora_bt: [S, r, d_out] (B transposed).
    """
    if batch.decode_onehot is not None:
        _add_dense(y, x, lora_a, lora_bt, batch)
    elif batch.gather_slots is not None:
        _add_gathered(y, x, lora_a, lora_bt, batch)
    for start, end, slot in batch.segments:
        shrunk = x[start:end] @ lora_a[slot].t()  # [len, r]
        y[start:end] += shrunk @ lora_bt[slot]  # [len, d_out]


def _add_dense(y, x, lora_a, lora_bt, batch: LoraBatch) -> None:
    n = batch.num_decode_tokens
    num_slots, rank, d_in = lora_a.shape
    shrunk = x[:n] @ lora_a.view(num_slots * rank, d_in).t()  # [n, S*r]: every slot's shrink
    own = (shrunk.view(n, num_slots, rank) * batch.decode_onehot.to(shrunk.dtype)).view(n, num_slots * rank)  # keep own slot
    y[:n] += own @ lora_bt.view(num_slots * rank, -1)  # [n, d_out]


def _add_gathered(y, x, lora_a, lora_bt, batch: LoraBatch) -> None:
    index = batch.gather_index
    xs = x[: batch.num_decode_tokens] if index is None else x.index_select(0, index)  # [m, d_in]
    a = lora_a.index_select(0, batch.gather_slots)  # [m, r, d_in]
    bt = lora_bt.index_select(0, batch.gather_slots)  # [m, r, d_out]
    shrunk = torch.bmm(a, xs.unsqueeze(-1))  # [m, r, 1]
    out = torch.bmm(shrunk.transpose(1, 2), bt).squeeze(1)  # [m, d_out]
    if index is None:
        y[: batch.num_decode_tokens] += out
    else:
        y.index_add_(0, index, out)


def _long_tensor(values: list[int], device: torch.device) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.long).to(device, non_blocking=True)
