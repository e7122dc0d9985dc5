"""Attention over a static KV cache (gpt-fast style): one row per running sequence.

Cache layout per layer: [max_rows, num_kv_heads, max_model_len, head_dim]. Running sequences
occupy rows 0..num_decode-1 (the scheduler keeps them compact), so decode attention reads a
plain view of the cache, no gather. Prefill sequences of equal length are processed as one group.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class PrefillGroup:
    """Prefill sequences with the same prompt length, contiguous in the flat token batch."""

    token_start: int
    num_seqs: int
    seq_len: int
    rows: torch.Tensor  # [num_seqs] cache rows


@dataclass(frozen=True)
class AttentionMetadata:
    num_decode: int
    decode_write_index: torch.Tensor | None  # [num_decode * Hkv] flat cache slot of each new k/v head
    decode_mask: torch.Tensor | None  # [num_decode, 1, 1, max_decode_len] True = attend
    decode_lengths: torch.Tensor | None  # [num_decode] cache length of each decode row (sliding windows)
    max_decode_len: int
    prefill_groups: tuple[PrefillGroup, ...]


def attend(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cache_k: torch.Tensor,
    cache_v: torch.Tensor,
    meta: AttentionMetadata,
    scale: float | None = None,
    sliding_window: int | None = None,
) -> torch.Tensor:
    """q: [T, H, hd], k/v: [T, Hkv, hd] (new tokens) -> out [T, H*hd]; writes k/v to the cache.

    Per layer: `scale` is the softmax scale (None: 1/sqrt(hd)); with `sliding_window`, a query at
    position p attends to positions p - sliding_window + 1 .. p only."""
    outputs = []
    if meta.num_decode:
        outputs.append(_decode(q, k, v, cache_k, cache_v, meta, scale, sliding_window))
    for group in meta.prefill_groups:
        outputs.append(_prefill(q, k, v, cache_k, cache_v, group, scale, sliding_window))
    out = outputs[0] if len(outputs) == 1 else torch.cat(outputs, dim=0)
    return out.reshape(q.shape[0], -1)


def _decode(q, k, v, cache_k, cache_v, meta: AttentionMetadata, scale, sliding_window) -> torch.Tensor:
    n = meta.num_decode
    num_heads, num_kv, head_dim = q.shape[1], k.shape[1], q.shape[2]
    # cache.view(-1, hd) is indexed by (row * Hkv + head) * max_len + position.
    cache_k.view(-1, head_dim).index_copy_(0, meta.decode_write_index, k[:n].reshape(-1, head_dim))
    cache_v.view(-1, head_dim).index_copy_(0, meta.decode_write_index, v[:n].reshape(-1, head_dim))
    keys = cache_k[:n, :, : meta.max_decode_len]  # [n, Hkv, L, hd], a view
    values = cache_v[:n, :, : meta.max_decode_len]
    # One query token: fold the query heads of a KV group into the query-length axis (GQA, no copy).
    queries = q[:n].reshape(n, num_kv, num_heads // num_kv, head_dim)  # [n, Hkv, G, hd]
    mask = meta.decode_mask  # [n, 1, 1, L]
    if sliding_window is not None:
        mask = mask & _decode_window_mask(meta.decode_lengths, meta.max_decode_len, sliding_window)
    out = F.scaled_dot_product_attention(queries, keys, values, attn_mask=mask, scale=scale)
    return out.reshape(n, num_heads, head_dim)


def _decode_window_mask(lengths: torch.Tensor, max_len: int, window: int) -> torch.Tensor:
    """lengths: [n] cache lengths (the query is at lengths - 1) -> [n, 1, 1, L], True = inside the window."""
    columns = torch.arange(max_len, device=lengths.device)  # [L]
    return (columns[None, :] > lengths[:, None] - 1 - window)[:, None, None, :]


def _prefill_window_mask(length: int, window: int, device) -> torch.Tensor:
    """[L, L] causal band: query i attends to keys i - window + 1 .. i."""
    offsets = torch.arange(length, device=device)[:, None] - torch.arange(length, device=device)[None, :]  # i - j
    return (offsets >= 0) & (offsets < window)


def _prefill(q, k, v, cache_k, cache_v, group: PrefillGroup, scale, sliding_window) -> torch.Tensor:
    g, length, start = group.num_seqs, group.seq_len, group.token_start
    end = start + g * length
    num_heads, num_kv, head_dim = q.shape[1], k.shape[1], q.shape[2]
    q_g = q[start:end].view(g, length, num_heads, head_dim).transpose(1, 2)  # [g, H, L, hd]
    k_g = k[start:end].view(g, length, num_kv, head_dim).transpose(1, 2)  # [g, Hkv, L, hd]
    v_g = v[start:end].view(g, length, num_kv, head_dim).transpose(1, 2)
    cache_k[group.rows, :, :length] = k_g
    cache_v[group.rows, :, :length] = v_g
    if num_kv != num_heads:
        k_g = k_g.repeat_interleave(num_heads // num_kv, dim=1)  # [g, H, L, hd]
        v_g = v_g.repeat_interleave(num_heads // num_kv, dim=1)
    if sliding_window is not None and sliding_window < length:
        mask = _prefill_window_mask(length, sliding_window, q.device)  # [L, L]
        out = F.scaled_dot_product_attention(q_g, k_g, v_g, attn_mask=mask, scale=scale)  # [g, H, L, hd]
    else:
        out = F.scaled_dot_product_attention(q_g, k_g, v_g, is_causal=True, scale=scale)
    return out.transpose(1, 2).reshape(g * length, num_heads, head_dim)
