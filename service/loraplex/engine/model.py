"""A Llama-family decoder (Llama, Mistral, Qwen2) written for batched multi-LoRA serving.

Weights are shared with (taken from) a loaded HF model; this module only changes how the
forward pass is organised: one flat token batch, per-token adapter slots, a static KV cache.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from loraplex.engine.attention import AttentionMetadata, attend
from loraplex.engine.lora_ops import LoraBatch, add_lora

ATTN_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP_MODULES = ("gate_proj", "up_proj", "down_proj")
LORA_MODULES = ATTN_MODULES + MLP_MODULES


@dataclass(frozen=True)
class ForwardBatch:
    """Everything one forward step needs besides token ids."""

    positions: torch.Tensor  # [T]
    attention: AttentionMetadata
    lora: LoraBatch
    logits_indices: torch.Tensor  # [num_seqs] token index whose logits are sampled


class LoraLinear(nn.Module):
    """A frozen linear layer plus a slice of the adapter pool (one buffer per layer/module)."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        self.weight = linear.weight  # [d_out, d_in]
        self.bias = linear.bias
        self.lora_a: torch.Tensor | None = None  # [num_slots, r, d_in]
        self.lora_bt: torch.Tensor | None = None  # [num_slots, r, d_out] (B transposed)
        self.active_slots: set[int] = set()  # slots holding non-zero weights for this module

    @property
    def in_features(self) -> int:
        return self.weight.shape[1]

    @property
    def out_features(self) -> int:
        return self.weight.shape[0]

    def forward(self, x: torch.Tensor, lora: LoraBatch) -> torch.Tensor:
        y = F.linear(x, self.weight, self.bias)  # x: [T, d_in] -> y: [T, d_out]
        self.add_lora_terms(y, x, lora)
        return y

    def add_lora_terms(self, y: torch.Tensor, x: torch.Tensor, lora: LoraBatch) -> None:
        """In place on y (possibly a column slice of a fused output)."""
        if self.lora_a is None:
            return
        if not self.active_slots.isdisjoint(lora.used_slots):
            add_lora(y, x, self.lora_a, self.lora_bt, lora)
        if lora.compensation is not None and not self.active_slots.isdisjoint(lora.compensation.used_slots):
            add_lora(y, x, self.lora_a, self.lora_bt, lora.compensation)


class FusedProjection(nn.Module):
    """Projections that read the same input (q/k/v, gate/up) as one wider GEMM: decode batches are
    skinny, and one [T, d] x [d, sum d_out] matmul runs faster than several. Each member keeps its
    own LoraLinear, whose weight is now a view into the fused weight (merging writes through it)."""

    def __init__(self, members: list[LoraLinear]):
        super().__init__()
        self.members = nn.ModuleList(members)
        self.weight = nn.Parameter(torch.cat([m.weight.detach() for m in members]), requires_grad=False)
        has_bias = [m.bias is not None for m in members]
        assert all(has_bias) or not any(has_bias), "fused projections need all or no biases"
        self.bias = nn.Parameter(torch.cat([m.bias.detach() for m in members]), requires_grad=False) if all(has_bias) else None
        self.slices, start = [], 0
        for m in members:
            end = start + m.out_features
            m.weight = nn.Parameter(self.weight.data[start:end], requires_grad=False)  # a view, no copy
            if self.bias is not None:
                m.bias = nn.Parameter(self.bias.data[start:end], requires_grad=False)
            self.slices.append((start, end))
            start = end

    def forward(self, x: torch.Tensor, lora: LoraBatch) -> list[torch.Tensor]:
        y = F.linear(x, self.weight, self.bias)  # [T, sum d_out]
        parts = []
        for member, (start, end) in zip(self.members, self.slices):
            part = y[:, start:end]  # a view: LoRA terms land in y
            member.add_lora_terms(part, x, lora)
            parts.append(part)
        return parts


class RMSNorm(nn.Module):
    def __init__(self, norm: nn.Module):
        super().__init__()
        self.weight = norm.weight
        self.eps = getattr(norm, "variance_epsilon", getattr(norm, "eps", 1e-6))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Same arithmetic as HF (fp32 variance) so greedy tokens match the reference.
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


class Attention(nn.Module):
    def __init__(self, hf_attn: nn.Module, num_heads: int, num_kv_heads: int, head_dim: int):
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim = num_heads, num_kv_heads, head_dim
        for name in ATTN_MODULES:
            setattr(self, name, LoraLinear(getattr(hf_attn, name)))
        self.qkv = FusedProjection([self.q_proj, self.k_proj, self.v_proj])

    def forward(self, x, cos, sin, cache_k, cache_v, batch: ForwardBatch) -> torch.Tensor:
        t = x.shape[0]
        q, k, v = self.qkv(x, batch.lora)
        q = q.reshape(t, self.num_heads, self.head_dim)  # [T, H, hd]
        k = k.reshape(t, self.num_kv_heads, self.head_dim)  # [T, Hkv, hd]
        v = v.reshape(t, self.num_kv_heads, self.head_dim)
        q = q * cos + _rotate_half(q) * sin  # cos/sin: [T, 1, hd]
        k = k * cos + _rotate_half(k) * sin
        out = attend(q, k, v, cache_k, cache_v, batch.attention)  # [T, H*hd]
        return self.o_proj(out, batch.lora)


class MLP(nn.Module):
    def __init__(self, hf_mlp: nn.Module, act: str):
        super().__init__()
        for name in MLP_MODULES:
            setattr(self, name, LoraLinear(getattr(hf_mlp, name)))
        self.gate_up = FusedProjection([self.gate_proj, self.up_proj])
        self.act = {"silu": F.silu, "gelu": F.gelu}[act]

    def forward(self, x: torch.Tensor, lora: LoraBatch) -> torch.Tensor:
        gate, up = self.gate_up(x, lora)
        return self.down_proj(self.act(gate) * up, lora)


class DecoderLayer(nn.Module):
    def __init__(self, hf_layer: nn.Module, config, head_dim: int):
        super().__init__()
        self.input_layernorm = RMSNorm(hf_layer.input_layernorm)
        self.post_attention_layernorm = RMSNorm(hf_layer.post_attention_layernorm)
        num_kv = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
        self.self_attn = Attention(hf_layer.self_attn, config.num_attention_heads, num_kv, head_dim)
        self.mlp = MLP(hf_layer.mlp, config.hidden_act)

    def forward(self, x, cos, sin, cache_k, cache_v, batch: ForwardBatch) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, cache_k, cache_v, batch)
        return x + self.mlp(self.post_attention_layernorm(x), batch.lora)


class LlamaForServing(nn.Module):
    """Wraps the weights of an HF `*ForCausalLM` of the Llama family."""

    def __init__(self, hf_model: nn.Module, rope_cos: torch.Tensor, rope_sin: torch.Tensor):
        super().__init__()
        config = hf_model.config
        self.config = config
        self.generation_config = getattr(hf_model, "generation_config", None)
        self.head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        self.embed_tokens = hf_model.model.embed_tokens
        self.layers = nn.ModuleList(DecoderLayer(l, config, self.head_dim) for l in hf_model.model.layers)
        self.norm = RMSNorm(hf_model.model.norm)
        self.lm_head = hf_model.lm_head
        self.register_buffer("rope_cos", rope_cos, persistent=False)  # [max_len, hd]
        self.register_buffer("rope_sin", rope_sin, persistent=False)

    def lora_linears(self) -> dict[tuple[int, str], LoraLinear]:
        found = {}
        for i, layer in enumerate(self.layers):
            for name in ATTN_MODULES:
                found[(i, name)] = getattr(layer.self_attn, name)
            for name in MLP_MODULES:
                found[(i, name)] = getattr(layer.mlp, name)
        return found

    @torch.inference_mode()
    def forward(self, input_ids, batch: ForwardBatch, kv_cache) -> torch.Tensor:
        """input_ids: [T] -> logits [num_seqs, vocab] (float32) at batch.logits_indices."""
        x = self.embed_tokens(input_ids)  # [T, d]
        cos = self.rope_cos[batch.positions].unsqueeze(1).to(x.dtype)  # [T, 1, hd]
        sin = self.rope_sin[batch.positions].unsqueeze(1).to(x.dtype)
        for i, layer in enumerate(self.layers):
            x = layer(x, cos, sin, kv_cache.k[i], kv_cache.v[i], batch)
        x = self.norm(x[batch.logits_indices])  # [num_seqs, d]
        return self.lm_head(x).float()  # [num_seqs, vocab]
