"""Paged KV bookkeeping: which cache blocks each sequence holds. Pure Python, never a tensor.

Verbs pair like nano-vllm's: `can_allocate`/`allocate`/`free` for a sequence's prompt,
`can_append`/`append` for the block a decode step may need. Blocks are reference counted, so
sequences with a common prefix share them.

Prefix caching: once a full block's KV has been computed, it is registered under a chain hash of
(adapter identity, parent block's hash, the block's token ids). A later sequence reuses it only if
identity, parent and tokens all match exactly (compared, not just hashed), so a block computed with
one adapter version is never read by another version, another adapter or the base model. Freed
blocks keep their cached contents until reused; the least recently freed goes first (LRU).
"""
from __future__ import annotations

import hashlib
from array import array
from collections import OrderedDict
from dataclasses import dataclass, field


@dataclass
class Block:
    index: int
    num_refs: int = 0
    hash: bytes | None = None  # set while the block is registered in the prefix cache
    identity: str = ""
    token_ids: tuple[int, ...] = ()


@dataclass
class PrefixMatch:
    """Cached blocks a sequence can reuse, found by `match`; consumed by `allocate`."""

    blocks: list[Block] = field(default_factory=list)
    hashes: list[bytes] = field(default_factory=list)

    @property
    def num_blocks(self) -> int:
        return len(self.blocks)


def block_hash(parent: bytes | None, identity: str, token_ids: tuple[int, ...]) -> bytes:
    digest = hashlib.blake2b(digest_size=16)
    digest.update(parent or b"root")
    digest.update(identity.encode())
    digest.update(b"\0")
    digest.update(array("q", token_ids).tobytes())
    return digest.digest()


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True):
        self.num_blocks, self.block_size = num_blocks, block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.blocks = [Block(i) for i in range(num_blocks)]
        self._free: OrderedDict[int, None] = OrderedDict((i, None) for i in range(num_blocks))
        self._cached: dict[bytes, int] = {}  # hash -> block index
        self.num_cache_queries = 0  # prompt tokens looked up (vLLM's prefix_cache_queries)
        self.num_cache_hits = 0  # of those, tokens found cached

    # --- state ---------------------------------------------------------------------------------
    @property
    def num_free(self) -> int:
        return len(self._free)

    @property
    def num_used(self) -> int:
        return self.num_blocks - len(self._free)

    @property
    def num_cached(self) -> int:
        return len(self._cached)

    def blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    # --- prompts -------------------------------------------------------------------------------
    def match(self, identity: str, token_ids: list[int]) -> PrefixMatch:
        """The longest cached run of full blocks for these tokens. The last token is never matched:
        its logits must be computed."""
        found = PrefixMatch()
        if not self.enable_prefix_caching:
            return found
        parent = None
        for start in range(0, len(token_ids) - 1 - self.block_size + 1, self.block_size):
            tokens = tuple(token_ids[start:start + self.block_size])
            digest = block_hash(parent, identity, tokens)
            block = self._lookup(digest, identity, tokens)
            if block is None:
                break
            found.blocks.append(block)
            found.hashes.append(digest)
            parent = digest
        return found

    def can_allocate(self, num_tokens: int, match: PrefixMatch) -> bool:
        """Enough free blocks for a sequence of `num_tokens`, reusing `match`."""
        num_new = self.blocks_for(num_tokens) - match.num_blocks
        num_revived = sum(1 for b in match.blocks if b.num_refs == 0)  # cached but free: leave the free list
        return num_new + num_revived <= self.num_free

    def allocate(self, num_tokens: int, match: PrefixMatch) -> list[int]:
        """Returns the block table: the matched blocks (shared), then fresh ones."""
        assert self.can_allocate(num_tokens, match)
        self.num_cache_queries += num_tokens
        self.num_cache_hits += match.num_blocks * self.block_size
        table = []
        for block in match.blocks:
            if block.num_refs == 0:
                del self._free[block.index]
            block.num_refs += 1
            table.append(block.index)
        for _ in range(self.blocks_for(num_tokens) - match.num_blocks):
            table.append(self._take_free())
        return table

    def free(self, block_table: list[int]) -> None:
        """Release a sequence's blocks; cached ones stay findable until reused (freed last = reused last)."""
        for index in reversed(block_table):  # a prefix's tail is evicted before its head
            block = self.blocks[index]
            block.num_refs -= 1
            assert block.num_refs >= 0
            if block.num_refs == 0:
                self._free[index] = None

    # --- decode --------------------------------------------------------------------------------
    def can_append(self, block_table: list[int], num_tokens: int) -> bool:
        """Can the sequence grow to `num_tokens`?"""
        return self.blocks_for(num_tokens) - len(block_table) <= self.num_free

    def append(self, block_table: list[int], num_tokens: int) -> None:
        """Grow the block table (in place) to hold `num_tokens`."""
        while len(block_table) < self.blocks_for(num_tokens):
            block_table.append(self._take_free())

    # --- prefix cache --------------------------------------------------------------------------
    def cache_full_blocks(self, identity: str, token_ids: list[int], block_table: list[int],
                          num_computed: int, hashes: list[bytes]) -> None:
        """Register the blocks whose KV is now fully computed. `hashes` (the sequence's chain so far)
        grows in place."""
        if not self.enable_prefix_caching:
            return
        num_full = min(num_computed // self.block_size, len(block_table))
        for i in range(len(hashes), num_full):
            tokens = tuple(token_ids[i * self.block_size:(i + 1) * self.block_size])
            digest = block_hash(hashes[-1] if hashes else None, identity, tokens)
            hashes.append(digest)
            block = self.blocks[block_table[i]]
            if block.hash is None and digest not in self._cached:
                block.hash, block.identity, block.token_ids = digest, identity, tokens
                self._cached[digest] = block.index

    def drop_identity(self, prefix: str) -> int:
        """Forget every cached block whose identity starts with `prefix` (an adapter deleted).
        Returns how many blocks were dropped; free ones return to the pool as plain blocks."""
        dropped = [b for b in self.blocks if b.hash is not None and b.identity.startswith(prefix)]
        for block in dropped:
            self._uncache(block)
        return len(dropped)

    def num_cached_for(self, prefix: str) -> int:
        return sum(1 for b in self.blocks if b.hash is not None and b.identity.startswith(prefix))

    def _lookup(self, digest: bytes, identity: str, tokens: tuple[int, ...]) -> Block | None:
        index = self._cached.get(digest)
        if index is None:
            return None
        block = self.blocks[index]
        return block if block.identity == identity and block.token_ids == tokens else None

    def _take_free(self) -> int:
        index, _ = self._free.popitem(last=False)  # least recently freed
        block = self.blocks[index]
        if block.hash is not None:
            self._uncache(block)
        block.num_refs = 1
        return index

    def _uncache(self, block: Block) -> None:
        if self._cached.get(block.hash) == block.index:
            del self._cached[block.hash]
        block.hash, block.identity, block.token_ids = None, "", ()
