"""The decode step with `torch.compile`: static shapes per batch-size bucket, attention kept eager.

A pure-decode step (one new token per sequence, no prompt chunk) is padded to the next bucket
(1, 2, 4, 8, ...). Per layer, two compiled pieces run on all B rows:
- `pre_attention`: input norm, fused q/k/v GEMM + LoRA, q/k norms (Qwen3/Gemma 3), rotary;
- `post_attention`: o_proj + LoRA, residual, norms, fused gate/up GEMM + LoRA, activation, down_proj
  + LoRA, residual.
Between them the paged attention (engine/attention.py) runs eagerly on the n real rows only: its
block-table width grows with the longest sequence, and a static width would read max_model_len
tokens of KV per row per layer (or multiply the compiles by width buckets). Padded rows therefore
never touch the KV cache; they use adapter slot 0 (zeros) and their outputs are dropped. Embedding,
rotary table lookup, final norm and lm_head (on the n real rows) stay eager too.
Both pieces take the layer module as an argument, so one graph serves every layer: one compile per
bucket and piece (and per set of projection kinds the step's adapters target, see compiled_lora.py). On CUDA the mode is reduce-overhead (CUDA graphs, one per piece and layer).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from loraplex.engine.attention import AttentionMetadata, attend
from loraplex.engine.compiled_lora import DecodeLora, lora_delta
from loraplex.engine.model import FusedProjection, LlamaForServing, LoraLinear, _rotate_half

RECOMPILE_LIMIT = 64  # graphs per piece: buckets x the distinct LoRA target sets seen (DecodeLora.targets)
QKV, GATE_UP = ("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj")  # FusedProjection member order


def bucket_for(num_rows: int) -> int:
    """The padded batch size: the next power of two."""
    return 1 << (num_rows - 1).bit_length()


def _linear(linear: LoraLinear, name: str, x: torch.Tensor, lora: DecodeLora) -> torch.Tensor:
    y = F.linear(x, linear.weight, linear.bias)  # [B, d_out]
    if linear.lora_a is not None and name in lora.targets:
        y = y + lora_delta(x, linear.lora_a, linear.lora_bt, lora)
    return y


def _fused(fused: FusedProjection, names: tuple[str, ...], x: torch.Tensor, lora: DecodeLora) -> list[torch.Tensor]:
    y = F.linear(x, fused.weight, fused.bias)  # [B, sum d_out]
    parts = []
    for member, name, (start, end) in zip(fused.members, names, fused.slices):
        part = y[:, start:end]
        if member.lora_a is not None and name in lora.targets:
            part = part + lora_delta(x, member.lora_a, member.lora_bt, lora)
        parts.append(part)
    return parts


def pre_attention(layer, x, cos, sin, lora: DecodeLora):
    """x: [B, d], cos/sin: [B, 1, hd] -> q [B, H, hd], k/v [B, Hkv, hd] (rotary applied)."""
    attn = layer.self_attn
    rows = x.shape[0]
    q, k, v = _fused(attn.qkv, QKV, layer.input_layernorm(x), lora)
    q = q.reshape(rows, attn.num_heads, attn.head_dim)
    k = k.reshape(rows, attn.num_kv_heads, attn.head_dim)
    v = v.reshape(rows, attn.num_kv_heads, attn.head_dim)
    if attn.q_norm is not None:
        q, k = attn.q_norm(q), attn.k_norm(k)
    return q * cos + _rotate_half(q) * sin, k * cos + _rotate_half(k) * sin, v


def post_attention(layer, x, attn_out, lora: DecodeLora):
    """x: [B, d] residual, attn_out: [B, H*hd] -> [B, d] after o_proj and the MLP block."""
    h = _linear(layer.self_attn.o_proj, "o_proj", attn_out, lora)
    x = x + (layer.attn_out_norm(h) if layer.attn_out_norm is not None else h)
    mlp = layer.mlp
    gate, up = _fused(mlp.gate_up, GATE_UP, layer.mlp_norm(x), lora)
    h = _linear(mlp.down_proj, "down_proj", mlp.act(gate) * up, lora)
    return x + (layer.mlp_out_norm(h) if layer.mlp_out_norm is not None else h)


class CompiledDecode:
    """Runs a padded decode batch through the compiled pieces; `buckets` lists the sizes seen."""

    def __init__(self, model: LlamaForServing, device: torch.device):
        torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, RECOMPILE_LIMIT)
        self.model, self.cuda = model, device.type == "cuda"
        mode = "reduce-overhead" if self.cuda else None
        self.pre = torch.compile(pre_attention, dynamic=False, mode=mode)
        self.post = torch.compile(post_attention, dynamic=False, mode=mode)
        self.buckets: set[int] = set()
        if self.cuda:  # pool buffers are written in place: keep their addresses in the CUDA graphs
            for linear in model.lora_linears().values():
                for t in (linear.lora_a, linear.lora_bt):
                    if t is not None:
                        torch._dynamo.mark_static_address(t)

    @torch.inference_mode()
    def __call__(self, input_ids, positions, lora: DecodeLora, meta: AttentionMetadata, kv_cache) -> torch.Tensor:
        """input_ids/positions: [B] (rows past meta.num_decode are padding) -> logits [n, V] of the real rows."""
        model, n = self.model, meta.num_decode
        self.buckets.add(input_ids.shape[0])
        if self.cuda:
            torch.compiler.cudagraph_mark_step_begin()
        x = model.embed(input_ids)  # [B, d]
        rope = {key: model._rope_at(key, positions, x.dtype) for key in model.rope_keys}
        for i, layer in enumerate(model.layers):
            cos, sin = rope[layer.rope_key]
            q, k, v = self.pre(layer, x, cos, sin, lora)
            attn = layer.self_attn
            out = attend(q[:n], k[:n], v[:n], kv_cache.k[i], kv_cache.v[i], meta, attn.scale, attn.sliding_window)
            if n < x.shape[0]:
                out = torch.cat([out, out.new_zeros(x.shape[0] - n, out.shape[1])])  # [B, H*hd]
            x = self.post(layer, x, out, lora)
        return model.logits(model.norm(x[:n]))  # [n, V]
