"""Attention over the paged KV cache.

Every new token's k/v is written first, to its slot (`block * block_size + offset`) in the layer's
block pool. Reads then take one of three paths:
- decode (one new token per sequence): gather each sequence's blocks by its block table, pad to the
  longest of its group, one batched SDPA per group with a length mask. Groups split where lengths
  halve, so one long context does not make every short one read (and copy) that many tokens;
- fresh prompts (nothing computed before them) of equal length: one batched causal SDPA over the
  new k/v themselves, no gather;
- prompt chunks after cached or earlier-computed tokens (prefix hits, chunked prefill): gather the
  sequence's blocks up to the chunk's end and attend with a causal mask offset by the context; chunks
  of one shape (num_tokens, context_len) next to each other run as one batch with one mask.
An optional sliding window (per layer) limits every path to the last `window` positions.
"""
from __future__ import annotations

from dataclasses import dataclass, field

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
class DecodeGroup:
    """Decoding sequences of similar length, attended in one batched SDPA."""

    rows: torch.Tensor | None  # [g] their indices among the decode rows (None: all of them, in order)
    block_tables: torch.Tensor  # [g, max_blocks of the group]
    lengths: torch.Tensor  # [g] cache length after this step's write
    max_len: int


@dataclass(frozen=True)
class AttentionMetadata:
    slot_mapping: torch.Tensor  # [T] cache slot of each new token
    num_decode: int
    decode_groups: tuple[DecodeGroup, ...]
    prefill_groups: tuple[PrefillGroup, ...]
    prefill_chunks: tuple[PrefillChunk, ...]
    memo: dict = field(default_factory=dict, compare=False, repr=False)  # per step, shared by the layers


@dataclass(frozen=True)
class ChunkRun:
    """Consecutive prompt chunks of one shape (e.g. the uncached tails of prompts behind one cached
    prefix): one gather and one batched SDPA with one shared mask."""

    token_start: int
    num_seqs: int
    num_tokens: int  # per chunk
    context_len: int
    block_tables: torch.Tensor  # [g, num_blocks covering context_len]


def chunk_runs(meta: AttentionMetadata) -> list[ChunkRun]:
    """meta.prefill_chunks as runs of consecutive equal (num_tokens, context_len), built once per step."""
    if "runs" not in meta.memo:
        groups: list[list[PrefillChunk]] = []
        for chunk in meta.prefill_chunks:
            last = groups[-1][-1] if groups else None
            if last and (last.num_tokens, last.context_len) == (chunk.num_tokens, chunk.context_len):
                groups[-1].append(chunk)
            else:
                groups.append([chunk])
        meta.memo["runs"] = [ChunkRun(g[0].token_start, len(g), g[0].num_tokens, g[0].context_len,
                                      torch.stack([c.block_table for c in g])) for g in groups]
    return meta.memo["runs"]


def chunk_mask(meta: AttentionMetadata, num_tokens: int, context_len: int, window: int | None, dtype, device) -> torch.Tensor:
    """Additive [c, ctx] mask (0 = attend, -inf = not), built once per step and shared by the layers
    (a bool mask would be converted to this inside SDPA in every layer)."""
    key = ("mask", num_tokens, context_len, window, dtype)
    if key not in meta.memo:
        allowed = _causal_mask(num_tokens, context_len, window, device)
        zeros = torch.zeros(allowed.shape, dtype=dtype, device=device)
        meta.memo[key] = zeros.masked_fill_(~allowed, float("-inf"))
    return meta.memo[key]


MIN_SPLIT_TOKENS = 256  # a decode group splits only where it saves at least this much padding per row


def build_decode_groups(lengths: list[int], tables: list[list[int]], block_size: int, tensor) -> tuple[DecodeGroup, ...]:
    """Group decodes longest first; a new group starts where a length is under half the group's longest
    (and shorter by MIN_SPLIT_TOKENS). `tensor(list[int])` makes a device long tensor."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    members: list[list[int]] = [[]]
    for i in order:
        head = lengths[members[-1][0]] if members[-1] else lengths[i]
        if 2 * lengths[i] < head and head - lengths[i] >= MIN_SPLIT_TOKENS:
            members.append([])
        members[-1].append(i)
    if len(members) == 1:
        members = [list(range(len(lengths)))]  # one group: keep the rows' order, no index ops
    groups = []
    for rows in members:
        max_len = max(lengths[i] for i in rows)
        width = -(-max_len // block_size)
        padded = [t[:width] + [0] * (width - len(t[:width])) for t in (tables[i] for i in rows)]  # pad: block 0, masked
        groups.append(DecodeGroup(
            rows=None if len(members) == 1 else tensor(rows),
            block_tables=tensor([b for t in padded for b in t]).view(len(rows), width),
            lengths=tensor([lengths[i] for i in rows]),
            max_len=max_len,
        ))
    return tuple(groups)


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
    for run in chunk_runs(meta) if meta.prefill_chunks else ():
        outputs.append(_prefill_chunks(q, cache_k, cache_v, run, meta, scale, sliding_window))
    out = outputs[0] if len(outputs) == 1 else torch.cat(outputs, dim=0)
    return out.reshape(q.shape[0], -1)


def gather_blocks(cache: torch.Tensor, block_tables: torch.Tensor) -> torch.Tensor:
    """cache: [blocks, bs, Hkv, hd], block_tables: [n, m] -> [n, Hkv, m*bs, hd] (a strided view of one copy)."""
    n, m = block_tables.shape
    gathered = cache.index_select(0, block_tables.reshape(-1))  # [n*m, bs, Hkv, hd]
    return gathered.view(n, m * cache.shape[1], *cache.shape[2:]).transpose(1, 2)


def _decode(q, cache_k, cache_v, meta: AttentionMetadata, scale, window: int | None) -> torch.Tensor:
    """q[:n]: [n, H, hd] -> [n, H, hd], one SDPA per decode group."""
    queries = q[: meta.num_decode]
    if len(meta.decode_groups) == 1 and meta.decode_groups[0].rows is None:
        return _decode_group(queries, cache_k, cache_v, meta.decode_groups[0], scale, window)
    out = torch.empty_like(queries)
    for group in meta.decode_groups:
        rows = _decode_group(queries.index_select(0, group.rows), cache_k, cache_v, group, scale, window)
        out.index_copy_(0, group.rows, rows)
    return out


def _decode_group(q, cache_k, cache_v, group: DecodeGroup, scale, window: int | None) -> torch.Tensor:
    n, num_heads, head_dim = q.shape  # q: [n, H, hd]
    num_kv = cache_k.shape[2]
    keys = gather_blocks(cache_k, group.block_tables)[:, :, : group.max_len]  # [n, Hkv, L, hd]
    values = gather_blocks(cache_v, group.block_tables)[:, :, : group.max_len]
    columns = torch.arange(group.max_len, device=q.device)  # [L]
    lengths = group.lengths.unsqueeze(1)  # [n, 1]
    mask = columns < lengths  # [n, L] True = attend
    if window is not None:
        mask &= columns >= lengths - window
    # One query token: fold the query heads of a KV group into the query-length axis (GQA, no copy).
    queries = q.reshape(n, num_kv, num_heads // num_kv, head_dim)  # [n, Hkv, G, hd]
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


def _prefill_chunks(q, cache_k, cache_v, run: ChunkRun, meta, scale, window: int | None) -> torch.Tensor:
    g, c, ctx, start = run.num_seqs, run.num_tokens, run.context_len, run.token_start
    num_heads, head_dim = q.shape[1], q.shape[2]
    keys = _repeat_kv(gather_blocks(cache_k, run.block_tables)[:, :, :ctx], num_heads)  # [g, H, ctx, hd]
    values = _repeat_kv(gather_blocks(cache_v, run.block_tables)[:, :, :ctx], num_heads)
    queries = q[start:start + g * c].reshape(g, c, num_heads, head_dim).transpose(1, 2)  # [g, H, c, hd]
    mask = chunk_mask(meta, c, ctx, window, q.dtype, q.device)  # [c, ctx]
    out = F.scaled_dot_product_attention(queries, keys, values, attn_mask=mask, scale=scale)  # [g, H, c, hd]
    return out.transpose(1, 2).reshape(g * c, num_heads, head_dim)


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
