"""Swap a LlamaForServing's projections for quantized ones (engine/quantization.py holds the weights).

The LoraLinear objects stay LoraLinears (the adapter pool, lora_linears() and add_lora_terms work as
before); only the frozen GEMM changes. The full-precision weights are released.
"""
from __future__ import annotations

import torch
from torch import nn

from loraplex.engine.lora_ops import LoraBatch
from loraplex.engine.model import LoraLinear, split_with_lora
from loraplex.engine.quantization import Int8Weight, SequenceIndex, fuse


class QuantizedLoraLinear(LoraLinear):
    """A LoraLinear whose frozen weight is quantized. `weight` dequantizes (a temporary, for shapes and
    dtype); `qweight` is None for a member of a fused projection (the fused module does its GEMM)."""

    def __init__(self, member: LoraLinear, qweight: nn.Module | None, shape: tuple[int, int], dtype: torch.dtype,
                 device: torch.device):
        super().__init__(member)
        del self.weight  # the full-precision (or meta) weight: the quantized one replaces it
        self.qweight = qweight
        self._shape, self._dtype, self._device = shape, dtype, device

    @property
    def weight(self) -> torch.Tensor:  # [d_out, d_in]; lora_pool reads its dtype and device
        if self.qweight is None:
            return torch.empty(1, 1, dtype=self._dtype, device=self._device).expand(*self._shape)  # no storage
        return self.qweight.dequantize().to(self._dtype)

    @property
    def in_features(self) -> int:
        return self._shape[1]

    @property
    def out_features(self) -> int:
        return self._shape[0]

    def forward(self, x: torch.Tensor, lora: LoraBatch) -> torch.Tensor:
        y = self.qweight(x, self.bias)  # x: [T, d_in] -> y: [T, d_out]
        self.add_lora_terms(y, x, lora)
        return y


class QuantizedFusedProjection(nn.Module):
    """FusedProjection over quantized weights: one GEMM when the members' blocks align, else one per member."""

    def __init__(self, members: list[QuantizedLoraLinear], weights: list[nn.Module], bias: torch.Tensor | None):
        super().__init__()
        self.members = nn.ModuleList(members)
        self.weights = nn.ModuleList(weights)
        self.bias = bias
        self.slices, start = [], 0
        for m in members:
            self.slices.append((start, start + m.out_features))
            start += m.out_features

    def forward(self, x: torch.Tensor, lora: LoraBatch) -> list[torch.Tensor]:
        if len(self.weights) == 1:
            y = self.weights[0](x, self.bias)  # [T, sum d_out]
        else:
            y = torch.cat([w(x, None) for w in self.weights], dim=-1)
            if self.bias is not None:
                y = y + self.bias
        return split_with_lora(y, x, lora, self.members, self.slices)


def install(model: nn.Module, quantized: dict[tuple[int, str], nn.Module], dtype: torch.dtype, device: torch.device) -> None:
    """quantized: (layer, module name) -> Nf4Weight | Int8Weight for every projection of every layer."""
    for i, layer in enumerate(model.layers):
        attn, mlp = layer.self_attn, layer.mlp
        attn.qkv = _fused(attn, attn.qkv, ("q_proj", "k_proj", "v_proj"), i, quantized, dtype, device)
        mlp.gate_up = _fused(mlp, mlp.gate_up, ("gate_proj", "up_proj"), i, quantized, dtype, device)
        for parent, name in ((attn, "o_proj"), (mlp, "down_proj")):
            old, q = getattr(parent, name), quantized[(i, name)]
            setattr(parent, name, QuantizedLoraLinear(old, q, q.shape, dtype, device))
    int8 = [m for m in model.modules() if isinstance(m, Int8Weight)]
    if int8:
        _track_sequences(model, int8)


def _track_sequences(model: nn.Module, weights: list[Int8Weight]) -> None:
    """LLM.int8 picks outlier columns per sequence: each forward first records the step's token layout."""
    index = SequenceIndex()
    for w in weights:
        w.sequences = index
    inner = model.forward

    def forward(input_ids, batch, kv_cache):
        index.labels = sequence_labels(batch.attention, input_ids.shape[0], input_ids.device)
        return inner(input_ids, batch, kv_cache)

    model.forward = forward


def sequence_labels(meta, num_tokens: int, device) -> torch.Tensor:
    """[T]: the flat index of each token's sequence's first token (decode tokens: one sequence each)."""
    labels = torch.arange(num_tokens)
    for g in meta.prefill_groups:  # equal-length fresh prompts, back to back
        for s in range(g.num_seqs):
            start = g.token_start + s * g.seq_len
            labels[start:start + g.seq_len] = start
    for c in meta.prefill_chunks:
        labels[c.token_start:c.token_start + c.num_tokens] = c.token_start
    return labels.to(device)


def _fused(parent, fused, names, i, quantized, dtype, device) -> QuantizedFusedProjection:
    weights = [quantized[(i, name)] for name in names]
    members = []
    for name, q in zip(names, weights):
        member = QuantizedLoraLinear(getattr(parent, name), None, q.shape, dtype, device)
        setattr(parent, name, member)
        members.append(member)
    return QuantizedFusedProjection(members, fuse(weights), fused.bias)


def weight_bytes(model: nn.Module) -> int:
    """Resident bytes of the base's weights: quantized codes and scales, plus full-precision parameters
    (embeddings, norms, LM head, biases); each storage once (fused members are views, the LM head may share
    the embedding's). The adapter pool (plain tensors on the LoraLinears) is not counted."""
    seen, total = set(), 0
    for module in model.modules():
        if hasattr(module, "nbytes") and hasattr(module, "dequantize"):
            total += module.nbytes
    for t in model.parameters():
        key = t.untyped_storage().data_ptr()
        if t.device.type != "meta" and key not in seen:
            seen.add(key)
            total += t.untyped_storage().nbytes()
    return total


def projection_bytes(model: nn.Module) -> int:
    """Bytes of the decoder projections alone (what quantization shrinks)."""
    total = 0
    for layer in model.layers:
        for module in (layer.self_attn.qkv, layer.self_attn.o_proj, layer.mlp.gate_up, layer.mlp.down_proj):
            if isinstance(module, QuantizedFusedProjection):
                total += sum(w.nbytes for w in module.weights)
            elif isinstance(module, QuantizedLoraLinear):
                total += module.qweight.nbytes
            else:
                total += module.weight.nbytes
    return total
