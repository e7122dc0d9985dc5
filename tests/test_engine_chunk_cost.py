"""Prompt chunks sized by compute, decodes grouped by context length: same tokens as HF (fp32)."""
from __future__ import annotations

import random

import pytest
import torch
import torch.nn.functional as F

from loraplex.engine.attention import AttentionMetadata, attend, build_decode_groups
from loraplex.engine.scheduler import chunk_tokens_for_cost
from tests.engine_helpers import build_llm_engine, greedy, peft_reference, run_to_completion


def _cost(n: int, start: int, context_cost: float) -> float:
    return n + n * (start + (n + 1) / 2) / context_cost


@pytest.mark.parametrize("start, budget, context_cost", [(0, 512, 1414.0), (1536, 496, 1414.0), (900, 20, 704.0),
                                                         (0, 7, 1e12), (5000, 3, 10.0)])
def test_a_chunk_is_the_most_tokens_the_budget_pays_for(start, budget, context_cost):
    n = chunk_tokens_for_cost(start, budget, context_cost)
    assert _cost(n, start, context_cost) <= budget < _cost(n + 1, start, context_cost)
    if context_cost == 1e12:
        assert n >= budget - 1  # attention nearly free: about the token count


def test_decode_groups_attend_exactly_as_each_sequence_alone():
    torch.manual_seed(0)
    num_blocks, block_size, num_kv, num_heads, head_dim = 160, 16, 2, 4, 32
    cache_k = torch.randn(num_blocks, block_size, num_kv, head_dim)  # [blocks, bs, Hkv, hd]
    cache_v = torch.randn(num_blocks, block_size, num_kv, head_dim)
    lengths = [900, 40, 300, 35, 880]
    blocks = iter(random.Random(1).sample(range(num_blocks), num_blocks))
    tables = [[next(blocks) for _ in range(-(-n // block_size))] for n in lengths]
    groups = build_decode_groups(lengths, tables, block_size, lambda v: torch.tensor(v, dtype=torch.long))
    assert sorted(len(g.lengths) for g in groups) == [1, 2, 2]  # 900 and 880 | 300 | 40 and 35
    q = torch.randn(len(lengths), num_heads, head_dim)  # one new token each; its k/v is already in the cache
    slots = torch.tensor([t[(n - 1) // block_size] * block_size + (n - 1) % block_size for t, n in zip(tables, lengths)])
    new_k = cache_k.view(-1, num_kv, head_dim)[slots].clone()
    new_v = cache_v.view(-1, num_kv, head_dim)[slots].clone()
    meta = AttentionMetadata(slot_mapping=slots, num_decode=len(lengths), decode_groups=groups, prefill_groups=(), prefill_chunks=())
    for window in (None, 64):
        out = attend(q, new_k, new_v, cache_k, cache_v, meta, sliding_window=window)  # [n, H*hd]
        for i, (table, n) in enumerate(zip(tables, lengths)):
            first = 0 if window is None else max(0, n - window)
            keys = cache_k[table].reshape(-1, num_kv, head_dim)[first:n].repeat_interleave(2, dim=1).transpose(0, 1)
            values = cache_v[table].reshape(-1, num_kv, head_dim)[first:n].repeat_interleave(2, dim=1).transpose(0, 1)
            expected = F.scaled_dot_product_attention(q[i].unsqueeze(1), keys, values)  # [H, 1, hd]
            torch.testing.assert_close(out[i], expected.reshape(-1), rtol=1e-5, atol=1e-5)


def test_a_long_prompt_chunked_by_compute_beside_decodes_matches_hf(demo_model_dir):
    rng = random.Random(11)
    long_prompt = [0] + [rng.randrange(3, 1000) for _ in range(599)]
    short = [[0] + [rng.randrange(3, 1000) for _ in range(8 + i)] for i in range(3)]
    engine = build_llm_engine(demo_model_dir, max_model_len=1024, max_num_batched_tokens=128, kv_block_size=16)
    assert engine.scheduler.context_cost is not None  # on by default
    for i, prompt in enumerate(short):
        engine.add_request(f"d{i}", prompt, greedy(40), None)
    tokens = {request_id: output.new_token_ids for request_id, output in engine.step()} | {"long": []}
    engine.add_request("long", long_prompt, greedy(12), None)
    long_seq, chunk_sizes = engine._seqs["long"], []
    while engine.unfinished_request_ids():
        before = long_seq.num_computed_tokens
        results = engine.step()
        if not tokens["long"] and long_seq.num_computed_tokens > before:
            chunk_sizes.append(long_seq.num_computed_tokens - before)
            assert sum(1 for rid, _ in results if rid.startswith("d")) == 3  # no decode waits for a chunk
        for request_id, output in results:
            tokens[request_id] += output.new_token_ids
    assert sum(chunk_sizes) == len(long_prompt)
    assert chunk_sizes[:-1] == sorted(chunk_sizes[:-1], reverse=True) and chunk_sizes[-2] < chunk_sizes[0] < 125
    # after the prefill the long sequence decodes beside the short ones in its own group
    assert tokens["long"] == peft_reference(demo_model_dir, None, [long_prompt], 12)[0]
    assert [tokens[f"d{i}"] for i in range(3)] == peft_reference(demo_model_dir, None, short, 40)
    # with nothing decoding, nobody stalls: the same prompt alone is chunked by tokens (full budgets)
    engine.add_request("alone", long_prompt[::-1], greedy(1), None)  # nothing of it cached
    alone, sizes = engine._seqs["alone"], []
    while engine.unfinished_request_ids():
        before = alone.num_computed_tokens
        engine.step()
        sizes.append(alone.num_computed_tokens - before)
    assert len(sizes) == 5 and sizes[:-1] == [128] * 4


def test_tails_behind_one_cached_prefix_run_as_one_batch_and_match_hf(demo_model_dir, monkeypatch):
    from loraplex.engine import attention

    rng = random.Random(12)
    prefix = [0] + [rng.randrange(3, 1000) for _ in range(47)]  # 6 blocks of 8
    prompts = [prefix + [rng.randrange(3, 1000) for _ in range(10)] for _ in range(5)]
    engine = build_llm_engine(demo_model_dir, max_model_len=192, kv_block_size=8)
    first = run_to_completion(engine, {"warm": (prompts[0], greedy(6), None)})  # caches the prefix
    batch_sizes = []
    original = attention.chunk_runs

    def recording(meta):
        runs = original(meta)
        batch_sizes.extend(r.num_seqs for r in runs)
        return runs

    monkeypatch.setattr(attention, "chunk_runs", recording)
    tokens = run_to_completion(engine, {f"r{i}": (p, greedy(6), None) for i, p in enumerate(prompts[1:])})
    assert engine.blocks.num_cache_hits == 4 * 48
    assert max(batch_sizes) == 4  # the four 10-token tails at context 58: one gather, one SDPA per layer
    assert [first["warm"]] + [tokens[f"r{i}"] for i in range(4)] == peft_reference(demo_model_dir, None, prompts, 6)
