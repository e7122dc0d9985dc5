"""Device buffers of the adapter slot pool: stacked A/B per (layer, module), slot 0 = zeros; DoRA scales."""
from __future__ import annotations

import torch

from loraplex.engine.dora import dora_scale
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
        # Unmerged base weights of the modules an adapter is merged into (MergeManager keeps them here):
        # a DoRA norm is always taken against the unmerged weight.
        self.originals: dict[tuple[int, str], torch.Tensor] = {}
        # Slots whose tokens need a DoRA output scale (the compensation slot while a DoRA adapter is merged).
        self.dora_slots: set[int] = set()
        # A DoRA norm needs the dense base weight; a quantized base's fused members have none at hand.
        self.serves_dora = getattr(model, "quantization", None) is None
        for linear in self.linears.values():
            w = linear.weight
            linear.lora_a = torch.zeros(num_slots, max_rank, linear.in_features, dtype=w.dtype, device=w.device)
            linear.lora_bt = torch.zeros(num_slots, max_rank, linear.out_features, dtype=w.dtype, device=w.device)

    @property
    def module_shapes(self) -> dict[tuple[int, str], tuple[int, int]]:
        return {where: (l.out_features, l.in_features) for where, l in self.linears.items()}

    @property
    def num_bytes(self) -> int:
        buffers = [t for l in self.linears.values() for t in (l.lora_a, l.lora_bt, l.dora_scale) if t is not None]
        return sum(t.numel() * t.element_size() for t in buffers)

    def write(self, slot: int, host: HostLora) -> None:
        """Copy an adapter into `slot`, zero-padding ranks below max_rank; DoRA scales computed here, once."""
        assert 0 < slot < self.num_slots
        self.clear(slot)
        for where, (a, b) in host.weights.items():
            linear = self.linears[where]
            rank = a.shape[0]
            linear.lora_a[slot, :rank].copy_(a, non_blocking=True)  # [r, d_in]
            linear.lora_bt[slot, :rank].copy_(b.t(), non_blocking=True)  # B^T: [r, d_out]
            linear.active_slots.add(slot)
            if where in host.magnitudes:
                base = self.originals.get(where, linear.weight)
                magnitude = host.magnitudes[where].to(base.device)
                scale = dora_scale(base, linear.lora_a[slot, :rank], linear.lora_bt[slot, :rank].t(), magnitude)
                self._set_scale(linear, slot, scale)  # [d_out]

    def write_negated(self, dst: int, src: int) -> None:
        """dst := -(src): the compensation term for tokens that must not see a merged adapter; for a DoRA
        adapter also 1 / its scale, which undoes the merged weight's scale on those tokens' base output."""
        self.clear(dst)
        for linear in self.linears.values():
            if src in linear.active_slots:
                linear.lora_a[dst].copy_(linear.lora_a[src])
                linear.lora_bt[dst].copy_(linear.lora_bt[src]).neg_()
                linear.active_slots.add(dst)
            if src in linear.dora_slots:
                self._set_scale(linear, dst, linear.dora_scale[src].float().reciprocal())

    def clear(self, slot: int) -> None:
        self.dora_slots.discard(slot)
        for linear in self.linears.values():
            if slot in linear.active_slots:
                linear.lora_a[slot].zero_()
                linear.lora_bt[slot].zero_()
                linear.active_slots.discard(slot)
            if slot in linear.dora_slots:
                linear.dora_scale[slot].fill_(1.0)
                linear.dora_slots.discard(slot)

    def _set_scale(self, linear: LoraLinear, slot: int, scale: torch.Tensor) -> None:
        if linear.dora_scale is None:  # allocated on the first DoRA adapter this module sees
            w = linear.weight
            linear.dora_scale = torch.ones(self.num_slots, linear.out_features, dtype=w.dtype, device=w.device)
        linear.dora_scale[slot].copy_(scale)
        linear.dora_slots.add(slot)
        self.dora_slots.add(slot)
