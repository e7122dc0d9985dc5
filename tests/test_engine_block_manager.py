"""BlockManager without a model: paired verbs, ref counts, prefix matching by identity, LRU eviction."""
from __future__ import annotations

from loraplex.engine.block_manager import BlockManager, PrefixMatch


def _seq_blocks(bm: BlockManager, identity: str, tokens: list[int]) -> tuple[list[int], list[bytes], PrefixMatch]:
    match = bm.match(identity, tokens)
    assert bm.can_allocate(len(tokens), match)
    table = bm.allocate(len(tokens), match)
    hashes = list(match.hashes)
    bm.cache_full_blocks(identity, tokens, table, len(tokens), hashes)
    return table, hashes, match


def test_allocate_append_free_keep_counts():
    bm = BlockManager(num_blocks=6, block_size=4, enable_prefix_caching=False)
    table = bm.allocate(9, PrefixMatch())  # 3 blocks
    assert len(table) == 3 and bm.num_free == 3
    assert bm.can_append(table, 12) and bm.can_append(table, 13)
    bm.append(table, 13)
    assert len(table) == 4 and bm.num_free == 2
    assert not bm.can_append(table, 25)  # would need 3 more
    assert not bm.can_allocate(12, PrefixMatch())
    bm.free(table)
    assert bm.num_free == 6 and bm.num_used == 0


def test_shared_prefix_is_reused_with_ref_counts():
    bm = BlockManager(num_blocks=8, block_size=4)
    prompt = list(range(1, 11))  # 10 tokens: 2 full blocks + 2
    first, _, _ = _seq_blocks(bm, "base", prompt)
    second, _, match = _seq_blocks(bm, "base", prompt[:8] + [99, 98, 97])
    assert match.num_blocks == 2 and second[:2] == first[:2] and second[2] != first[2]
    assert bm.blocks[first[0]].num_refs == 2
    assert bm.num_cache_hits == 8 and bm.num_cache_queries == 21
    bm.free(first)
    assert bm.blocks[first[0]].num_refs == 1
    bm.free(second)
    assert bm.num_free == 8 and bm.num_cached >= 2  # freed blocks stay findable


def test_the_last_token_is_never_matched():
    bm = BlockManager(num_blocks=8, block_size=4)
    prompt = list(range(8))
    table, _, _ = _seq_blocks(bm, "base", prompt)
    bm.free(table)
    assert bm.match("base", prompt).num_blocks == 1  # block 2 holds the last token: recomputed
    assert bm.match("base", prompt + [5]).num_blocks == 2


def test_identities_never_share_blocks():
    bm = BlockManager(num_blocks=16, block_size=4)
    prompt = list(range(12))
    for identity in ("base", "acme/a@1:aaa", "acme/b@1:bbb"):
        table, _, match = _seq_blocks(bm, identity, prompt)
        assert match.num_blocks == 0
        bm.free(table)
    assert bm.match("acme/a@2:ccc", prompt).num_blocks == 0  # a new version reuses nothing
    assert bm.match("acme/a@1:aaa", prompt).num_blocks == 2
    assert bm.drop_identity("acme/a@") == 3
    assert bm.match("acme/a@1:aaa", prompt).num_blocks == 0
    assert bm.match("base", prompt).num_blocks == 2  # others untouched


def test_a_chain_differs_after_a_differing_block():
    bm = BlockManager(num_blocks=8, block_size=2)
    table, _, _ = _seq_blocks(bm, "base", [1, 2, 3, 4, 5])
    bm.free(table)
    assert bm.match("base", [9, 9, 3, 4, 5]).num_blocks == 0  # same second block, different parent


def test_least_recently_freed_cached_block_is_reused_first():
    bm = BlockManager(num_blocks=4, block_size=2)
    old, _, _ = _seq_blocks(bm, "base", [1, 2, 0])
    new, _, _ = _seq_blocks(bm, "base", [3, 4, 0])
    bm.free(old)
    bm.free(new)
    bm.allocate(3, PrefixMatch())  # two blocks: the least recently freed ones (old's) are taken
    assert bm.match("base", [1, 2, 0]).num_blocks == 0
    assert bm.match("base", [3, 4, 0]).num_blocks == 1


def test_reviving_a_free_cached_block_counts_against_free_blocks():
    bm = BlockManager(num_blocks=3, block_size=2)
    table, _, _ = _seq_blocks(bm, "base", [1, 2, 3, 4, 0])
    bm.free(table)
    match = bm.match("base", [1, 2, 3, 4, 7])
    assert match.num_blocks == 2
    assert bm.can_allocate(5, match)  # 2 revived + 1 new = all 3
    assert not bm.can_allocate(7, match)
