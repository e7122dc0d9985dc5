"""LoRA for the compiled decode step: per-row slot metadata as tensors, no Python checks per module.

The eager path (lora_ops.py) decides per module and per step which kernel runs and skips modules no
adapter of the step targets. Inside a compiled region that would be data-dependent control flow, so
here every module that has a pool buffer always runs the same kernel, chosen once per engine:
- dense (num_slots * max_rank <= DENSE_MAX_POOL_COLUMNS): a multi-hot [B, S, 1] per row; a row's own
  slot and, while an adapter is merged, its compensation slot are both 1, so one pass adds both;
- gather otherwise: each row's own slot [B] (and compensation slot [B]) index the pool.
Padded rows and base rows use slot 0, whose weights are zeros: they add exact zeros.
Which module kinds (q_proj, ..., down_proj) get the LoRA term at all is decided once per step from the
slots present (`targets`, a tuple of names: a compile-time constant, so each distinct set seen is its
own graph); a q/v-only adapter mix costs no LoRA work on the other five projections.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from loraplex.engine.lora_ops import DENSE_MAX_POOL_COLUMNS


@dataclass(frozen=True)
class DecodeLora:
    """Per-row adapter metadata of one padded decode batch of B rows."""

    multihot: torch.Tensor | None  # [B, S, 1] dense kernel
    slots: torch.Tensor | None  # [B] gather kernel: each row's own slot
    compensation: torch.Tensor | None  # [B] gather kernel: each row's compensation slot (merged mode)
    targets: tuple[str, ...] = ()  # module kinds some slot of this step holds weights for


def step_targets(linears: dict, slots: set[int]) -> tuple[str, ...]:
    """linears: (layer, module name) -> LoraLinear; slots: non-zero slots of the step -> module names
    whose pool holds weights in one of them (at any layer), in a fixed order."""
    used = sum(1 << s for s in slots if s)
    names = {name for (_, name), linear in linears.items() if linear.active_slots.mask & used}
    return tuple(sorted(names))


def uses_dense(num_slots: int, max_rank: int) -> bool:
    return num_slots * max_rank <= DENSE_MAX_POOL_COLUMNS


def build_decode_lora(own: list[int], compensation: list[int] | None, rows: int, num_slots: int, max_rank: int,
                      device: torch.device, targets: tuple[str, ...]) -> DecodeLora:
    """own/compensation: slot per real row (0 = none); rows: the bucket size (pads with slot 0)."""
    if not targets:
        return DecodeLora(None, None, None)
    pad = [0] * (rows - len(own))
    if uses_dense(num_slots, max_rank):
        hot = torch.zeros(rows, num_slots)  # [B, S]
        hot[torch.arange(len(own)), torch.tensor(own, dtype=torch.long)] = 1.0
        if compensation is not None:
            hot[torch.arange(len(own)), torch.tensor(compensation, dtype=torch.long)] += 1.0
        hot[:, 0] = 0.0  # slot 0 is zeros anyway; keep the mask tidy
        return DecodeLora(hot.unsqueeze(-1).to(device, non_blocking=True), None, None, targets)
    slots = _long(own + pad, device)
    comp = _long(compensation + pad, device) if compensation is not None else None
    return DecodeLora(None, slots, comp, targets)


def lora_delta(x: torch.Tensor, lora_a: torch.Tensor, lora_bt: torch.Tensor, meta: DecodeLora) -> torch.Tensor:
    """x: [B, d_in], lora_a: [S, r, d_in], lora_bt: [S, r, d_out] -> [B, d_out] (sum of B[s] A[s] x per row)."""
    if meta.multihot is not None:
        rows = x.shape[0]
        num_slots, rank, d_in = lora_a.shape
        shrunk = x @ lora_a.view(num_slots * rank, d_in).t()  # [B, S*r]
        own = (shrunk.view(rows, num_slots, rank) * meta.multihot.to(shrunk.dtype)).view(rows, num_slots * rank)  # bf16 too
        return own @ lora_bt.view(num_slots * rank, -1)  # [B, d_out]
    out = _gathered(x, lora_a, lora_bt, meta.slots)
    if meta.compensation is not None:
        out = out + _gathered(x, lora_a, lora_bt, meta.compensation)
    return out


def _gathered(x, lora_a, lora_bt, slots: torch.Tensor) -> torch.Tensor:
    a = lora_a.index_select(0, slots)  # [B, r, d_in]
    bt = lora_bt.index_select(0, slots)  # [B, r, d_out]
    shrunk = torch.bmm(a, x.unsqueeze(-1))  # [B, r, 1]
    return torch.bmm(shrunk.transpose(1, 2), bt).squeeze(1)  # [B, d_out]


def _long(values: list[int], device: torch.device) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.long).to(device, non_blocking=True)
