"""Attention over the paged KV cache.

Every new token's k/v is written first, to its slot (`block * block_size + offset`) in the layer's
block pool. Reads then take one of three paths:
- decode (one new token per sequence): gather each sequence's blocks by its block table, pad to the
  longest, one batched SDPA with a length mask;
- fresh prompts (nothing computed before them) of equal length: one batched causal SDPA over the
  new k/v themselves, no gather;
- prompt chunks after cached or earlier-computed tokens (prefix hits, chunked prefill): gather the
  sequence's blocks up to the chunk's end and attend with a causal mask offset by the context.
An optional sliding window (per layer) limits every path to the last `window` positions.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class PrefillGroup:
    """Fresh prompts with the same length, contiguous in the flat token batch."""

    token_start: int
    num_seqs: int
    seq_len: int


@dataclass(frozen=True)
class PrefillChunk:
    """One sequence's prompt chunk that follows `context_len - num_tokens` tokens already in the cache."""

    token_start: int
    num_tokens: int
    context_len: int  # tokens in the cache once this chunk is written
    block_table: torch.Tensor  # [num_blocks covering context_len]


@dataclass(frozen=True)
class AttentionMetadata:
    slot_mapping: torch.Tensor  # [T] cache slot of each new token
    num_decode: int
    decode_block_tables: torch.Tensor | None  # [n, max_blocks]
    decode_lengths: torch.Tensor | None  # [n] cache length after this step's write
    max_decode_len: int
    prefill_groups: tuple[PrefillGroup, ...]
    prefill_chunks: tuple[PrefillChunk, ...]


def attend(q, k, v, cache_k, cache_v, meta: AttentionMetadata, scale: float | None = None,
           sliding_window: int | None = None) -> torch.Tensor:
    """q: [T, H, hd], k/v: [T, Hkv, hd] (new tokens); cache_k/v: [blocks, bs, Hkv, hd] -> out [T, H*hd].

    Per layer: `scale` is the softmax scale (None: 1/sqrt(hd)); with `sliding_window`, a query at
    position p attends to positions p - sliding_window + 1 .. p only."""
    num_blocks, block_size = cache_k.shape[:2]
    cache_k.view(num_blocks * block_size, *cache_k.shape[2:]).index_copy_(0, meta.slot_mapping, k)
    cache_v.view(num_blocks * block_size, *cache_v.shape[2:]).index_copy_(0, meta.slot_mapping, v)
    outputs = []
    if meta.num_decode:
        outputs.append(_decode(q, cache_k, cache_v, meta, scale, sliding_window))
    for group in meta.prefill_groups:
        outputs.append(_prefill_fresh(q, k, v, group, scale, sliding_window))
    for chunk in meta.prefill_chunks:
        outputs.append(_prefill_chunk(q, cache_k, cache_v, chunk, scale, sliding_window))
    out = outputs[0] if len(outputs) == 1 else torch.cat(outputs, dim=0)
    return out.reshape(q.shape[0], -1)


def gather_blocks(cache: torch.Tensor, block_tables: torch.Tensor) -> torch.Tensor:
    """cache: [blocks, bs, Hkv, hd], block_tables: [n, m] -> [n, Hkv, m*bs, hd] (a strided view of one copy)."""
    n, m = block_tables.shape
    gathered = cache.index_select(0, block_tables.reshape(-1))  # [n*m, bs, Hkv, hd]
    return gathered.view(n, m * cache.shape[1], *cache.shape[2:]).transpose(1, 2)


def _decode(q, cache_k, cache_v, meta: AttentionMetadata, scale, window: int | None) -> torch.Tensor:
    n = meta.num_decode
    num_heads, head_dim = q.shape[1], q.shape[2]
    num_kv = cache_k.shape[2]
    keys = gather_blocks(cache_k, meta.decode_block_tables)[:, :, : meta.max_decode_len]  # [n, Hkv, L, hd]
    values = gather_blocks(cache_v, meta.decode_block_tables)[:, :, : meta.max_decode_len]
    columns = torch.arange(meta.max_decode_len, device=q.device)  # [L]
    lengths = meta.decode_lengths.unsqueeze(1)  # [n, 1]
    mask = columns < lengths  # [n, L] True = attend
    if window is not None:
        mask &= columns >= lengths - window
    # One query token: fold the query heads of a KV group into the query-length axis (GQA, no copy).
    queries = q[:n].reshape(n, num_kv, num_heads // num_kv, head_dim)  # [n, Hkv, G, hd]
    out = F.scaled_dot_product_attention(queries, keys, values, attn_mask=mask[:, None, None, :], scale=scale)
    return out.reshape(n, num_heads, head_dim)


def _prefill_fresh(q, k, v, group: PrefillGroup, scale, window: int | None) -> torch.Tensor:
    g, length, start = group.num_seqs, group.seq_len, group.token_start
    end = start + g * length
    num_heads, num_kv, head_dim = q.shape[1], k.shape[1], q.shape[2]
    q_g = q[start:end].view(g, length, num_heads, head_dim).transpose(1, 2)  # [g, H, L, hd]
    k_g = _repeat_kv(k[start:end].view(g, length, num_kv, head_dim).transpose(1, 2), num_heads)  # [g, H, L, hd]
    v_g = _repeat_kv(v[start:end].view(g, length, num_kv, head_dim).transpose(1, 2), num_heads)
    if window is None or window >= length:
        out = F.scaled_dot_product_attention(q_g, k_g, v_g, is_causal=True, scale=scale)  # [g, H, L, hd]
    else:
        mask = _causal_mask(length, length, window, q.device)
        out = F.scaled_dot_product_attention(q_g, k_g, v_g, attn_mask=mask, scale=scale)
    return out.transpose(1, 2).reshape(g * length, num_heads, head_dim)


def _prefill_chunk(q, cache_k, cache_v, chunk: PrefillChunk, scale, window: int | None) -> torch.Tensor:
    start, c, ctx = chunk.token_start, chunk.num_tokens, chunk.context_len
    num_heads, head_dim = q.shape[1], q.shape[2]
    tables = chunk.block_table.unsqueeze(0)  # [1, m]
    keys = _repeat_kv(gather_blocks(cache_k, tables)[:, :, :ctx], num_heads)  # [1, H, ctx, hd]
    values = _repeat_kv(gather_blocks(cache_v, tables)[:, :, :ctx], num_heads)
    queries = q[start:start + c].transpose(0, 1).unsqueeze(0)  # [1, H, c, hd]
    mask = _causal_mask(c, ctx, window, q.device)  # [c, ctx]
    out = F.scaled_dot_product_attention(queries, keys, values, attn_mask=mask, scale=scale)  # [1, H, c, hd]
    return out[0].transpose(0, 1)  # [c, H, hd]


def _causal_mask(num_queries: int, context_len: int, window: int | None, device) -> torch.Tensor:
    """[c, ctx] True = attend: the queries are the last c of ctx positions."""
    query_pos = torch.arange(context_len - num_queries, context_len, device=device).unsqueeze(1)  # [c, 1]
    key_pos = torch.arange(context_len, device=device).unsqueeze(0)  # [1, ctx]
    mask = key_pos <= query_pos
    if window is not None:
        mask &= key_pos > query_pos - window
    return mask


def _repeat_kv(x: torch.Tensor, num_heads: int) -> torch.Tensor:
    """[n, Hkv, L, hd] -> [n, H, L, hd] for grouped-query attention."""
    num_kv = x.shape[1]
    return x if num_kv == num_heads else x.repeat_interleave(num_heads // num_kv, dim=1)
