"""DoRA served batched and unmerged: one output scale per slot and output feature.

PEFT (peft/tuners/lora/dora.py, eval mode) computes, for a DoRA module with magnitude m:

    y = m / ||W + s B A||_row  *  (W x + s B A x)  +  bias

where the norm is taken per output feature over the input dimension, detached, and computed from the
*unmerged* base weight W. That factor depends only on the weights, so it is computed once when an
adapter is written into a slot (`dora_scale`) and kept per module in `LoraLinear.dora_scale`
[num_slots, d_out]: ones for every slot that is not DoRA. After the usual base + LoRA terms, each token's
rows are rescaled by its own slot's row (`apply_dora_scale`), so DoRA tokens batch with everything else.

Merged serving (engine/merge.py) writes W' = scale * (W + s B A), PEFT's merged weight, exactly. Other
tokens must still see W: W x = W' x / scale - s B A x, so besides the usual compensation term (-s B A)
their base output is first divided by the merged adapter's scale (`undo_merged_scale`, the
compensation slot's row of `dora_scale` holds 1 / scale). The bias is outside both scales.
"""
from __future__ import annotations

import torch

from loraplex.engine.lora_ops import LoraBatch


def dora_scale(weight: torch.Tensor, a: torch.Tensor, b: torch.Tensor, magnitude: torch.Tensor) -> torch.Tensor:
    """m / ||W + B A||_row in fp32. weight: [d_out, d_in] (unmerged), a: [r, d_in], b: [d_out, r] with the
    LoRA scale folded in, magnitude: [d_out] -> [d_out]."""
    adapted = weight.float() + b.float() @ a.float()  # [d_out, d_in]
    return magnitude.float() / torch.linalg.norm(adapted, dim=1)  # [d_out]


def merged_weight(weight: torch.Tensor, a: torch.Tensor, b: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """PEFT's merged DoRA weight scale * (W + B A), fp32. weight: [d_out, d_in], scale: [d_out]."""
    return scale.float().unsqueeze(1) * (weight.float() + b.float() @ a.float())  # [d_out, d_in]


def apply_dora_scale(y: torch.Tensor, linear, lora: LoraBatch) -> None:
    """In place, after base + LoRA terms: y[t] = scale[slot_t] * (y[t] - bias) + bias for DoRA tokens."""
    if linear.dora_slots.isdisjoint(lora.used_slots):
        return
    scale_rows(y, linear.dora_scale, linear.bias, lora)


def undo_merged_scale(y: torch.Tensor, linear, lora: LoraBatch) -> None:
    """In place, on the base output only (before any LoRA term): while a DoRA adapter is merged, every
    compensated token's base output W' x is divided by that adapter's scale, giving W x again."""
    compensation = lora.compensation
    if compensation is None or linear.dora_slots.isdisjoint(compensation.used_slots):
        return
    scale_rows(y, linear.dora_scale, linear.bias, compensation)


def scale_rows(y: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None, batch: LoraBatch) -> None:
    """y: [T, d_out] (possibly a column slice of a fused output), scale: [S, d_out]; each token of
    `batch` gets its slot's row, in the token layout of lora_ops (decode tokens first, then prefill runs)."""
    n = batch.num_decode_tokens
    if batch.decode_onehot is not None:
        per_token = batch.decode_onehot.squeeze(-1).to(scale.dtype) @ scale  # [n, S] @ [S, d_out]: exact, one-hot
        _rescale(y[:n], per_token, bias)
    elif batch.gather_slots is not None:
        per_token = scale.index_select(0, batch.gather_slots)  # [m, d_out]
        if batch.gather_index is None:
            _rescale(y[:n], per_token, bias)
        else:
            rows = y.index_select(0, batch.gather_index)  # [m, d_out], a copy
            _rescale(rows, per_token, bias)
            y.index_copy_(0, batch.gather_index, rows)
    for start, end, slot in batch.segments:
        _rescale(y[start:end], scale[slot], bias)


def _rescale(rows: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None) -> None:
    """rows: [m, d_out]; scale: [m, d_out] or [d_out]; the bias is not scaled (PEFT subtracts it first)."""
    if bias is None:
        rows.mul_(scale)
        return
    rows.sub_(bias).mul_(scale).add_(bias)
