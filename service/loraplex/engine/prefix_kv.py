"""A prefix-tuning adapter's K/V in the paged cache: written once per version, shared by its requests.

When a version loads, the full blocks of its prefix (n // block_size of them) are allocated, written
and registered in the prefix cache under the version's key and the placeholder ids; the version holds
a reference, so they stay until it is dropped (LRU or deleted). A request of that version then finds
them as an ordinary prefix-cache hit and starts with all n virtual positions computed (the scheduler
asks `Sequence.num_precomputed_tokens`). What the hit cannot give, the request's first chunk writes
into its own blocks (`write_missing_prefixes`): the prefix's last partial block (it is shared with the
request's first prompt tokens), or everything when prefix caching is off or the request bypasses the
cache (prompt logprobs). Keys are stored as PEFT keeps them, unrotated; values as they are.
"""
from __future__ import annotations

import torch

from loraplex.engine.block_manager import BlockManager
from loraplex.engine.kv_cache import KVCache
from loraplex.engine.virtual_tokens import VirtualTokens


class PrefixBlocks:
    """Owns and frees the prefix blocks of prefix-tuning versions (VirtualTokenStore's load/drop hooks)."""

    def __init__(self, blocks: BlockManager, kv_cache: KVCache):
        self.blocks, self.kv_cache = blocks, kv_cache

    def own(self, entry: VirtualTokens) -> None:
        block_size = self.blocks.block_size
        num_tokens = entry.num_tokens // block_size * block_size
        if not entry.is_prefix or not num_tokens or not self.blocks.enable_prefix_caching:
            return
        tokens = entry.placeholder_ids[:num_tokens]
        match = self.blocks.match(entry.key, tokens + [0])  # blocks still cached from an earlier load
        if not self.blocks.can_allocate(num_tokens, match):
            return  # no room now: each request writes the prefix into its own blocks
        queries, hits = self.blocks.num_cache_queries, self.blocks.num_cache_hits
        table = self.blocks.allocate(num_tokens, match)
        self.blocks.num_cache_queries, self.blocks.num_cache_hits = queries, hits  # not a request's lookup
        write_prefix(self.kv_cache, entry, table, range(num_tokens))
        self.blocks.cache_full_blocks(entry.key, tokens, table, num_tokens, list(match.hashes))
        entry.blocks = table

    def release(self, entry: VirtualTokens) -> None:
        """Drop the version's reference; blocks requests still use stay theirs until they finish."""
        if entry.blocks:
            self.blocks.free(entry.blocks)
            entry.blocks = []


def write_prefix(kv_cache: KVCache, entry: VirtualTokens, block_table: list[int], positions) -> None:
    """Copy the prefix K/V of `positions` (< n) into the slots `block_table` gives them, every layer."""
    block_size = kv_cache.block_size
    positions = list(positions)
    device = kv_cache.k[0].device
    slots = torch.tensor([block_table[p // block_size] * block_size + p % block_size for p in positions],
                         dtype=torch.long).to(device, non_blocking=True)
    rows = torch.tensor(positions, dtype=torch.long).to(device, non_blocking=True)
    for layer, (cache_k, cache_v) in enumerate(zip(kv_cache.k, kv_cache.v)):
        flat_k = cache_k.view(-1, *cache_k.shape[2:])  # [blocks * bs, Hkv, hd]
        flat_v = cache_v.view(-1, *cache_v.shape[2:])
        flat_k.index_copy_(0, slots, entry.kv[layer, 0].index_select(0, rows))  # kv: [L, 2, n, Hkv, hd]
        flat_v.index_copy_(0, slots, entry.kv[layer, 1].index_select(0, rows))


def write_missing_prefixes(chunks, kv_cache: KVCache) -> None:
    """Before a forward: for each prefix-tuning sequence's first chunk (it starts right after the
    prefix), write the prefix positions its block table does not share with the version's blocks."""
    block_size = kv_cache.block_size
    for chunk in chunks:
        entry = chunk.seq.virtual
        if entry is None or not entry.is_prefix or chunk.start != entry.num_tokens:
            continue
        table, owned = chunk.seq.block_table, entry.blocks
        missing = [p for p in range(entry.num_tokens)
                   if p // block_size >= len(owned) or table[p // block_size] != owned[p // block_size]]
        if missing:
            write_prefix(kv_cache, entry, table, missing)
