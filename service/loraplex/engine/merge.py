"""Merging one adapter into the base weights, exactly reversibly.

merge(slot): W := W0 + B[slot] A[slot] for each module the adapter touches (originals W0 kept), and
the compensation slot := -B A, which every other token applies so it still sees W0 + its own delta.
A DoRA adapter merges as PEFT merges it, W := scale * (W0 + B A) (engine/dora.py); its compensation
slot also holds 1 / scale, which other tokens' base output is divided by first.
unmerge(): W := W0, copied back bit for bit, so any number of cycles leaves the base unchanged.
"""
from __future__ import annotations

import time

import torch

from loraplex.engine.dora import merged_weight
from loraplex.engine.frozen_gemm import weights_changed
from loraplex.engine.lora_pool import LoraPool


class MergeManager:
    def __init__(self, pool: LoraPool, compensation_slot: int):
        self.pool, self.compensation_slot = pool, compensation_slot
        self.merged_slot: int | None = None
        self._originals = pool.originals  # shared: DoRA norms of adapters loaded while merged read W0 there
        self.last_switch_s = 0.0

    @torch.inference_mode()
    def merge(self, slot: int) -> None:
        assert self.merged_slot is None, "unmerge first"
        started = time.perf_counter()
        for where, linear in self.pool.linears.items():
            if slot not in linear.active_slots:
                continue
            original = linear.weight.detach().clone()
            self._originals[where] = original
            a, b = linear.lora_a[slot], linear.lora_bt[slot].t()  # [r, d_in], [d_out, r]
            if slot in linear.dora_slots:
                merged = merged_weight(original, a, b, linear.dora_scale[slot])
            else:
                merged = original.float() + b.float() @ a.float()  # [d_out, r] @ [r, d_in]
            linear.weight.copy_(merged.to(original.dtype))
        weights_changed()
        self.pool.write_negated(self.compensation_slot, slot)
        self.merged_slot = slot
        self._synchronize()
        self.last_switch_s = time.perf_counter() - started

    @torch.inference_mode()
    def unmerge(self) -> None:
        started = time.perf_counter()
        for where, original in self._originals.items():
            self.pool.linears[where].weight.copy_(original)
        self._originals.clear()
        weights_changed()
        self.pool.clear(self.compensation_slot)
        self.merged_slot = None
        self._synchronize()
        self.last_switch_s = time.perf_counter() - started

    def _synchronize(self) -> None:
        if torch.cuda.is_available() and self.pool.linears:
            device = next(iter(self.pool.linears.values())).weight.device
            if device.type == "cuda":
                torch.cuda.synchronize(device)
