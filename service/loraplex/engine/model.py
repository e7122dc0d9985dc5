"""A Llama-shaped decoder (Llama, Mistral, Qwen2, Qwen3, Gemma 3 text) for batched multi-LoRA serving.

Weights are shared with (taken from) a loaded HF model; this module only changes how the
forward pass is organised: one flat token batch, per-token adapter slots, a static KV cache.
What differs between families is data in a FamilySpec (engine/family.py), read per layer here.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from loraplex.engine.attention import AttentionMetadata, attend
from loraplex.engine.family import FamilySpec, LayerSpec
from loraplex.engine.frozen_gemm import FrozenGemm
from loraplex.engine.dora import apply_dora_scale, undo_merged_scale
from loraplex.engine.lora_ops import LoraBatch, SlotSet, add_lora

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
    # prompt-tuning virtual tokens: (token indices [k], embeddings [k, d]) used instead of the table's
    input_embeds: tuple[torch.Tensor, torch.Tensor] | None = None


class LoraLinear(nn.Module):
    """A frozen linear layer plus a slice of the adapter pool (one buffer per layer/module)."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        self.weight = linear.weight  # [d_out, d_in]
        self.bias = linear.bias
        self.lora_a: torch.Tensor | None = None  # [num_slots, r, d_in]
        self.lora_bt: torch.Tensor | None = None  # [num_slots, r, d_out] (B transposed)
        self.active_slots = SlotSet()  # slots holding non-zero weights for this module
        self.dora_scale: torch.Tensor | None = None  # [num_slots, d_out]: DoRA output scale, ones elsewhere (dora.py)
        self.dora_slots = SlotSet()  # slots whose dora_scale row is not ones
        self.gemm = FrozenGemm()  # the base GEMM (oneDNN-packed weight on CPU when enabled)

    @property
    def in_features(self) -> int:
        return self.weight.shape[1]

    @property
    def out_features(self) -> int:
        return self.weight.shape[0]

    def forward(self, x: torch.Tensor, lora: LoraBatch) -> torch.Tensor:
        y = self.gemm(x, self.weight, self.bias)  # x: [T, d_in] -> y: [T, d_out]
        self.add_lora_terms(y, x, lora)
        return y

    def add_lora_terms(self, y: torch.Tensor, x: torch.Tensor, lora: LoraBatch) -> None:
        """In place on y (possibly a column slice of a fused output)."""
        if self.lora_a is None:
            return
        if self.dora_slots.mask:
            undo_merged_scale(y, self, lora)  # a DoRA adapter is merged: other tokens' base output / its scale
        mask = self.active_slots.mask
        if mask & lora.used_mask:
            add_lora(y, x, self.lora_a, self.lora_bt, lora)
        if lora.compensation is not None and mask & lora.compensation.used_mask:
            add_lora(y, x, self.lora_a, self.lora_bt, lora.compensation)
        if self.dora_slots.mask:
            apply_dora_scale(y, self, lora)  # DoRA tokens: m / ||W + sBA|| per output feature


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
        self.gemm = FrozenGemm()

    def forward(self, x: torch.Tensor, lora: LoraBatch) -> list[torch.Tensor]:
        y = self.gemm(x, self.weight, self.bias)  # [T, sum d_out]
        return split_with_lora(y, x, lora, self.members, self.slices)


def split_with_lora(y: torch.Tensor, x: torch.Tensor, lora: LoraBatch, members, slices) -> list[torch.Tensor]:
    """y: [T, sum d_out], a fused GEMM's output -> each member's column view, its LoRA terms added in place."""
    parts = []
    for member, (start, end) in zip(members, slices):
        part = y[:, start:end]  # a view: LoRA terms land in y
        member.add_lora_terms(part, x, lora)
        parts.append(part)
    return parts


class RMSNorm(nn.Module):
    def __init__(self, norm: nn.Module, unit_offset: bool = False):
        super().__init__()
        self.weight = norm.weight
        self.eps = getattr(norm, "variance_epsilon", getattr(norm, "eps", 1e-6))
        self.unit_offset = unit_offset  # Gemma stores w - 1: scale by (1 + w)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Same arithmetic as HF (fp32 variance; where the cast happens) so greedy tokens match the reference.
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        if self.unit_offset:
            return (x * (1.0 + self.weight.float())).to(dtype)
        return self.weight * x.to(dtype)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


class Attention(nn.Module):
    def __init__(self, hf_attn: nn.Module, config, spec: FamilySpec, layer: LayerSpec):
        super().__init__()
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
        self.head_dim = spec.head_dim
        self.scale = spec.attn_scale  # None: 1/sqrt(head_dim)
        self.sliding_window = layer.sliding_window
        for name in ATTN_MODULES:
            setattr(self, name, LoraLinear(getattr(hf_attn, name)))
        self.qkv = FusedProjection([self.q_proj, self.k_proj, self.v_proj])
        self.q_norm = RMSNorm(hf_attn.q_norm, spec.norm_unit_offset) if spec.has_qk_norm else None
        self.k_norm = RMSNorm(hf_attn.k_norm, spec.norm_unit_offset) if spec.has_qk_norm else None

    def forward(self, x, cos, sin, cache_k, cache_v, batch: ForwardBatch) -> torch.Tensor:
        t = x.shape[0]
        q, k, v = self.qkv(x, batch.lora)
        q = q.reshape(t, self.num_heads, self.head_dim)  # [T, H, hd]
        k = k.reshape(t, self.num_kv_heads, self.head_dim)  # [T, Hkv, hd]
        v = v.reshape(t, self.num_kv_heads, self.head_dim)
        if self.q_norm is not None:  # per head, over hd
            q, k = self.q_norm(q), self.k_norm(k)
        q = q * cos + _rotate_half(q) * sin  # cos/sin: [T, 1, hd]
        k = k * cos + _rotate_half(k) * sin
        out = attend(q, k, v, cache_k, cache_v, batch.attention, self.scale, self.sliding_window)  # [T, H*hd]
        return self.o_proj(out, batch.lora)


ACTIVATION_FNS = {
    "silu": F.silu,
    "gelu": F.gelu,
    "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),  # Gemma's GeGLU
}


class MLP(nn.Module):
    def __init__(self, hf_mlp: nn.Module, act: str):
        super().__init__()
        for name in MLP_MODULES:
            setattr(self, name, LoraLinear(getattr(hf_mlp, name)))
        self.gate_up = FusedProjection([self.gate_proj, self.up_proj])
        self.act = ACTIVATION_FNS[act]

    def forward(self, x: torch.Tensor, lora: LoraBatch) -> torch.Tensor:
        gate, up = self.gate_up(x, lora)
        return self.down_proj(self.act(gate) * up, lora)


class DecoderLayer(nn.Module):
    """x += attn(norm(x)); x += mlp(norm(x)). Gemma 3 also norms each branch's output ("sandwich")."""

    def __init__(self, hf_layer: nn.Module, config, spec: FamilySpec, layer: LayerSpec):
        super().__init__()
        offset = spec.norm_unit_offset
        self.rope_key = layer.rope_key
        self.input_layernorm = RMSNorm(hf_layer.input_layernorm, offset)
        self.self_attn = Attention(hf_layer.self_attn, config, spec, layer)
        self.mlp = MLP(hf_layer.mlp, spec.activation)
        self.attn_out_norm = self.mlp_out_norm = None
        if spec.has_sandwich_norms:  # Gemma's post_attention_layernorm is on the attention output
            self.attn_out_norm = RMSNorm(hf_layer.post_attention_layernorm, offset)
            self.mlp_norm = RMSNorm(hf_layer.pre_feedforward_layernorm, offset)
            self.mlp_out_norm = RMSNorm(hf_layer.post_feedforward_layernorm, offset)
        else:
            self.mlp_norm = RMSNorm(hf_layer.post_attention_layernorm, offset)

    def forward(self, x, cos, sin, cache_k, cache_v, batch: ForwardBatch) -> torch.Tensor:
        h = self.self_attn(self.input_layernorm(x), cos, sin, cache_k, cache_v, batch)
        x = x + (self.attn_out_norm(h) if self.attn_out_norm is not None else h)
        h = self.mlp(self.mlp_norm(x), batch.lora)
        return x + (self.mlp_out_norm(h) if self.mlp_out_norm is not None else h)


class LlamaForServing(nn.Module):
    """Wraps the weights of an HF `*ForCausalLM` of a supported family (engine/family.py)."""

    def __init__(self, hf_model: nn.Module, spec: FamilySpec, rope: dict[str, tuple[torch.Tensor, torch.Tensor]]):
        super().__init__()
        config = hf_model.config
        self.config, self.spec = config, spec
        self.generation_config = getattr(hf_model, "generation_config", None)
        self.head_dim = spec.head_dim
        self.embed_weight = hf_model.model.embed_tokens.weight  # [V, d]
        self.layers = nn.ModuleList(
            DecoderLayer(hf_layer, config, spec, layer_spec) for hf_layer, layer_spec in zip(hf_model.model.layers, spec.layers)
        )
        self.norm = RMSNorm(hf_model.model.norm, spec.norm_unit_offset)
        self.lm_head = hf_model.lm_head
        self.lm_head_gemm = FrozenGemm()
        self.rope_keys = tuple(rope)
        for key, (cos, sin) in rope.items():  # [max_len, hd] each
            self.register_buffer(f"rope_cos_{key}", cos, persistent=False)
            self.register_buffer(f"rope_sin_{key}", sin, persistent=False)

    def pack_weights(self, enabled: bool) -> None:
        """Route the frozen GEMMs (projections, LM head) through FrozenGemm's packed oneDNN path or not."""
        gemms = [self.lm_head_gemm] + [m.gemm for m in self.modules() if isinstance(m, (LoraLinear, FusedProjection))]
        for gemm in gemms:
            gemm.enabled = enabled
            gemm.release()

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
        x = self.embed(input_ids)  # [T, d]
        if batch.input_embeds is not None:
            x.index_copy_(0, *batch.input_embeds)
        rope = {key: self._rope_at(key, batch.positions, x.dtype) for key in self.rope_keys}
        for i, layer in enumerate(self.layers):
            cos, sin = rope[layer.rope_key]
            x = layer(x, cos, sin, kv_cache.k[i], kv_cache.v[i], batch)
        x = self.norm(x[batch.logits_indices])  # [num_seqs, d]
        return self.logits(x)

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        x = F.embedding(input_ids, self.embed_weight)  # [T, d]
        if self.spec.embed_scale is not None:  # rounded to the weights' dtype first, as HF does
            x = x * torch.tensor(self.spec.embed_scale, dtype=torch.float32).to(x.dtype)
        return x

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        logits = self.lm_head_gemm(x, self.lm_head.weight, self.lm_head.bias)  # [num_seqs, vocab]
        cap = self.spec.final_logit_softcap
        if cap is not None:
            logits = torch.tanh(logits / cap) * cap
        return logits.float()

    def _rope_at(self, key: str, positions: torch.Tensor, dtype) -> tuple[torch.Tensor, torch.Tensor]:
        cos = getattr(self, f"rope_cos_{key}")[positions].unsqueeze(1).to(dtype)  # [T, 1, hd]
        sin = getattr(self, f"rope_sin_{key}")[positions].unsqueeze(1).to(dtype)
        return cos, sin
