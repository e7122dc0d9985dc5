"""Device buffers of the adapter slot pool: stacked A/B per (layer, module), slot 0 = zeros."""
from __future__ import annotations

import torch

from loraplex.engine.lora_weights import HostLora
from loraplex.engine.model import LlamaForServing, LoraLinear


class LoraPool:
    """Owns the device tensors; which adapter sits in which slot is `AdapterSlots`' business."""

    def __init__(self, model: LlamaForServing, num_slots: int, max_rank: int, target_modules: list[str]):
        self.num_slots = num_slots  # including slot 0 (base)
        self.max_rank = max_rank
        self.linears: dict[tuple[int, str], LoraLinear] = {
            where: linear for where, linear in model.lora_linears().items() if where[1] in target_modules
        }
        for linear in self.linears.values():
            w = linear.weight
            linear.lora_a = torch.zeros(num_slots, max_rank, linear.in_features, dtype=w.dtype, device=w.device)
            linear.lora_bt = torch.zeros(num_slots, max_rank, linear.out_features, dtype=w.dtype, device=w.device)

    @property
    def module_shapes(self) -> dict[tuple[int, str], tuple[int, int]]:
        return {where: (l.out_features, l.in_features) for where, l in self.linears.items()}

    @property
    def num_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for l in self.linears.values() for t in (l.lora_a, l.lora_bt))

    def write(self, slot: int, host: HostLora) -> None:
        """Copy an adapter into `slot`, zero-padding ranks below max_rank."""
        assert 0 < slot < self.num_slots
        self.clear(slot)
        for where, (a, b) in host.weights.items():
            linear = self.linears[where]
            rank = a.shape[0]
            linear.lora_a[slot, :rank].copy_(a, non_blocking=True)  # [r, d_in]
            linear.lora_bt[slot, :rank].copy_(b.t(), non_blocking=True)  # B^T: [r, d_out]
            linear.active_slots.add(slot)

    def write_negated(self, dst: int, src: int) -> None:
        """dst := -(src): the compensation term for tokens that must not see a merged adapter."""
        self.clear(dst)
        for linear in self.linears.values():
            if src in linear.active_slots:
                linear.lora_a[dst].copy_(linear.lora_a[src])
                linear.lora_bt[dst].copy_(linear.lora_bt[src]).neg_()
                linear.active_slots.add(dst)

    def clear(self, slot: int) -> None:
        for linear in self.linears.values():
            if slot in linear.active_slots:
                linear.lora_a[slot].zero_()
                linear.lora_bt[slot].zero_()
                linear.active_slots.discard(slot)
