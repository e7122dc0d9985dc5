"""Paged KV, chunked prefill, prefix caching and preemption keep greedy tokens identical to HF (fp32)."""
from __future__ import annotations

import random

import pytest

from tests.conftest import has_cuda
from tests.engine_helpers import build_llm_engine, greedy, peft_reference, run_to_completion, step_until_idle

NUM_NEW = 12


@pytest.fixture(scope="module")
def long_prompts():
    rng = random.Random(5)
    return [[0] + [rng.randrange(3, 1000) for _ in range(n)] for n in (70, 45, 101)]


@pytest.fixture(scope="module")
def long_references(demo_model_dir, long_prompts):
    return peft_reference(demo_model_dir, None, long_prompts, NUM_NEW)


def _engine(demo_model_dir, **limits):
    return build_llm_engine(demo_model_dir, max_loras=2, max_lora_rank=8, max_model_len=192, **limits)


def test_prompts_longer_than_the_step_budget_are_prefilled_in_chunks(demo_model_dir, long_prompts, long_references):
    engine = _engine(demo_model_dir, max_num_batched_tokens=16, kv_block_size=8, enable_prefix_caching=False)
    engine.add_request("decoding", long_prompts[1][:10], greedy(40), None)
    engine.step()  # "decoding" is running when the long prompts arrive
    for i, prompt in enumerate(long_prompts):
        engine.add_request(f"r{i}", prompt, greedy(NUM_NEW), None)
    tokens = {f"r{i}": [] for i in range(3)} | {"decoding": []}
    for request_id, output in step_until_idle(engine):
        tokens[request_id] += output.new_token_ids
    assert [tokens[f"r{i}"] for i in range(3)] == long_references
    assert engine.scheduler.max_num_running >= 2  # chunks of the long prompts ran beside the decode


def test_a_prompt_chunked_while_others_decode_never_stalls_them(demo_model_dir, long_prompts, long_references):
    engine = _engine(demo_model_dir, max_num_batched_tokens=20, kv_block_size=8)
    for i in range(4):
        engine.add_request(f"d{i}", [0, 5 + i, 7], greedy(60), None)
    engine.step()
    engine.add_request("long", long_prompts[2], greedy(NUM_NEW), None)
    tokens_per_step = []
    long_tokens = []
    while engine.unfinished_request_ids():
        results = engine.step()
        tokens_per_step.append(sum(len(o.new_token_ids) for rid, o in results if rid.startswith("d")))
        long_tokens += [t for rid, o in results if rid == "long" for t in o.new_token_ids]
        if len(long_tokens) == NUM_NEW:
            break
    assert long_tokens == long_references[2]
    assert all(n == 4 for n in tokens_per_step)  # every decode got its token at every step of the prefill


def test_cached_prefix_gives_the_same_tokens_as_caching_off(demo_model_dir, long_prompts, long_references):
    engine = _engine(demo_model_dir, kv_block_size=8)
    first = run_to_completion(engine, {"a": (long_prompts[0], greedy(NUM_NEW), None)})
    assert engine.blocks.num_cache_hits == 0
    variant = long_prompts[0][:64] + [7, 8, 9]  # shares 8 full blocks, then differs
    second = run_to_completion(engine, {"b": (long_prompts[0], greedy(NUM_NEW), None), "c": (variant, greedy(NUM_NEW), None)})
    assert engine.blocks.num_cache_hits == 2 * 64  # 8 blocks each
    off = _engine(demo_model_dir, kv_block_size=8, enable_prefix_caching=False)
    reference = run_to_completion(off, {"b": (long_prompts[0], greedy(NUM_NEW), None), "c": (variant, greedy(NUM_NEW), None)})
    assert first["a"] == second["b"] == reference["b"] == long_references[0]
    assert second["c"] == reference["c"]
    assert off.blocks.num_cache_hits == 0


def test_preemption_under_a_small_kv_budget_finishes_every_request_exactly(demo_model_dir):
    probe = _engine(demo_model_dir, kv_block_size=8)
    block_bytes = probe.kv_cache.num_bytes // probe.kv_cache.num_blocks
    engine = build_llm_engine(demo_model_dir, max_model_len=64, kv_block_size=8, kv_cache_bytes=block_bytes * 16)  # 128 tokens
    rng = random.Random(9)
    prompts = [[0] + [rng.randrange(3, 1000) for _ in range(rng.randrange(8, 24))] for _ in range(6)]
    requests = {f"r{i}": (p, greedy(24), None) for i, p in enumerate(prompts)}  # ~6 x 40 tokens > 128
    tokens = run_to_completion(engine, requests)
    assert engine.scheduler.num_preemptions > 0
    assert engine.stats()["num_preemptions"] == engine.scheduler.num_preemptions
    assert [tokens[f"r{i}"] for i in range(6)] == peft_reference(demo_model_dir, None, prompts, 24)
    assert engine.blocks.num_used == 0


@pytest.mark.cuda
@pytest.mark.skipif(not has_cuda(), reason="needs CUDA")
def test_cuda_chunked_and_cached_prompts_match_the_fp32_reference(demo_model_dir, long_prompts, long_references):
    engine = build_llm_engine(demo_model_dir, device="cuda", dtype="float32", max_loras=2, max_lora_rank=8,
                              max_model_len=192, max_num_batched_tokens=32, kv_block_size=16)
    for _ in range(2):  # the second pass reads its prefixes from the cache
        tokens = run_to_completion(engine, {f"r{i}": (p, greedy(NUM_NEW), None) for i, p in enumerate(long_prompts)})
        assert [tokens[f"r{i}"] for i in range(3)] == long_references
    assert engine.blocks.num_cache_hits > 0
