"""Prompt-tuning and prefix-tuning adapters: greedy tokens equal PEFT (fp32), alone and batched with LoRA
and base requests in the same forwards (chunked prefill, small KV blocks, prefix-cache hits)."""
from __future__ import annotations

import random

import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM

from loraplex.engine.errors import InvalidRequestError, PromptTooLongError
from loraplex.engine.types import LoraRequest, SamplingParams
from tests.engine_helpers import build_llm_engine, greedy, lora, peft_reference, run_to_completion, step_until_idle
from tests.virtual_token_adapters import make_virtual_adapter

NUM_NEW = 10
VIRTUAL = {  # name -> (peft_type, num_virtual_tokens, prefix_projection)
    "acme/prompt-5": ("PROMPT_TUNING", 5, False),
    "acme/prefix-7": ("PREFIX_TUNING", 7, False),
    "globex/prefix-proj-19": ("PREFIX_TUNING", 19, True),
}
LORA = "acme/qv-r8"


@pytest.fixture(scope="module")
def prompts():
    rng = random.Random(0)
    return [[0] + [rng.randrange(3, 1000) for _ in range(n)] for n in (3, 17, 9, 30)]


@pytest.fixture(scope="module")
def adapter_dirs(demo_model_dir, demo_data_dir, make_adapter):
    dirs = {LORA: make_adapter(LORA, r=8, alpha=16, target_modules=("q_proj", "v_proj"), seed=1)}
    for seed, (name, (peft_type, n, projection)) in enumerate(VIRTUAL.items()):
        dirs[name] = make_virtual_adapter(demo_model_dir, demo_data_dir / name, peft_type, n, projection, seed=seed + 10)
    return dirs


@pytest.fixture(scope="module")
def references(demo_model_dir, adapter_dirs, prompts):
    refs = {None: peft_reference(demo_model_dir, None, prompts, NUM_NEW)}
    for name, path in adapter_dirs.items():
        refs[name] = peft_reference(demo_model_dir, path, prompts, NUM_NEW)
    return refs


def test_every_adapter_changes_greedy_tokens(references):
    for name in VIRTUAL:
        assert references[name] != references[None], f"{name} is a no-op; the parity test would prove nothing"


@pytest.mark.parametrize("adapter", list(VIRTUAL))
def test_single_adapter_matches_peft(demo_model_dir, adapter_dirs, prompts, references, adapter):
    engine = build_llm_engine(demo_model_dir, max_loras=2, max_lora_rank=16, max_model_len=128)
    requests = {f"r{i}": (p, greedy(NUM_NEW), lora(adapter_dirs[adapter])) for i, p in enumerate(prompts)}
    tokens = run_to_completion(engine, requests)
    assert [tokens[f"r{i}"] for i in range(len(prompts))] == references[adapter]
    assert engine.stats()["resident_adapters"] == []  # no LoRA slot taken


@pytest.mark.parametrize("block_size, chunk_tokens", [(16, 2048), (4, 12)])
def test_mixed_batch_matches_peft_twice(demo_model_dir, adapter_dirs, prompts, references, block_size, chunk_tokens):
    """Every virtual-token adapter + a LoRA adapter + base, in one batch; small blocks and a small token
    budget split prompts (and prompt tuning's virtual tokens) over chunks. The second pass finds the
    first pass's blocks in the prefix cache and must give the same tokens."""
    engine = build_llm_engine(demo_model_dir, max_loras=2, max_lora_rank=16, max_model_len=128, max_num_seqs=32,
                              kv_block_size=block_size, max_num_batched_tokens=chunk_tokens)
    for attempt in range(2):
        requests = {}
        for adapter in [None, LORA, *VIRTUAL]:
            for i, prompt in enumerate(prompts):
                requests[f"{adapter}|{i}|{attempt}"] = (prompt, greedy(NUM_NEW), lora(adapter_dirs.get(adapter)))
        tokens = run_to_completion(engine, requests)
        for key, generated in tokens.items():
            adapter, i, _ = key.split("|")
            assert generated == references[None if adapter == "None" else adapter][int(i)], key
    stats = engine.stats()
    assert stats["prefix_cache_hits"] > 0
    assert sorted(stats["virtual_token_adapters"]) == sorted(VIRTUAL)


def test_prefix_blocks_are_shared_and_freed_on_delete(demo_model_dir, adapter_dirs, prompts, references):
    """The 19-token prefix owns one full 16-token block, written once: both requests' tables start with
    it. Deleting the adapter frees it (and its cached blocks)."""
    name = "globex/prefix-proj-19"
    engine = build_llm_engine(demo_model_dir, max_loras=2, max_lora_rank=16, max_model_len=128)
    free_before = engine.blocks.num_free
    version = LoraRequest(key=f"{name}@1", path=str(adapter_dirs[name]))
    engine.add_request("a", prompts[1], greedy(NUM_NEW), version)
    engine.add_request("b", prompts[3], greedy(NUM_NEW), version)
    entry = engine._seqs["a"].virtual
    assert len(entry.blocks) == 1 and engine.blocks.num_free == free_before - 1
    tokens = {"a": [], "b": []}
    for request_id, output in engine.step():  # both prefill in this step
        tokens[request_id] += output.new_token_ids
    tables = {rid: list(engine._seqs[rid].block_table) for rid in ("a", "b")}
    assert tables["a"][0] == tables["b"][0] == entry.blocks[0]
    for request_id, output in step_until_idle(engine):
        tokens[request_id] += output.new_token_ids
    assert [tokens["a"], tokens["b"]] == [references[name][1], references[name][3]]
    assert engine.blocks.num_cached_for(version.key) >= 2  # the prefix block + a's full prompt block
    engine.evict_versions_of(name)
    assert entry.blocks == [] and engine.blocks.num_free == free_before
    assert engine.blocks.num_cached_for(version.key) == 0
    assert engine.stats()["virtual_token_adapters"] == []


def test_preemption_under_a_small_kv_budget_keeps_peft_tokens(demo_model_dir, adapter_dirs, prompts, references):
    """Too few blocks for everyone: sequences are preempted and recomputed (the prefix blocks stay owned
    by their version meanwhile) and every request still ends with PEFT's tokens."""
    probe = build_llm_engine(demo_model_dir, max_model_len=64, kv_block_size=4)
    block_bytes = probe.kv_cache.num_bytes // probe.kv_cache.num_blocks
    engine = build_llm_engine(demo_model_dir, max_model_len=64, kv_block_size=4, kv_cache_bytes=block_bytes * 36)
    requests = {f"{name}|{i}": (prompts[i], greedy(NUM_NEW), lora(adapter_dirs[name])) for name in VIRTUAL for i in range(4)}
    tokens = run_to_completion(engine, requests)
    assert engine.scheduler.num_preemptions > 0
    for key, generated in tokens.items():
        name, i = key.split("|")
        assert generated == references[name][int(i)], key
    owned = sum(len(engine.virtual.store._entries[k].blocks) for k in engine.virtual.store.keys())
    assert owned == 7 // 4 + 19 // 4 and engine.blocks.num_used == owned  # only the versions' prefix blocks remain


@pytest.mark.parametrize("adapter", ["acme/prompt-5", "globex/prefix-proj-19"])
def test_prompt_logprobs_match_peft(demo_model_dir, adapter_dirs, prompts, adapter):
    """Prompt token i + 1's logprob at prompt position i: the virtual tokens shift positions, not entries."""
    prompt = prompts[3]
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(demo_model_dir, dtype=torch.float32),
                                      adapter_dirs[adapter]).eval()
    with torch.no_grad():
        ids = torch.tensor([prompt])
        logits = model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits[0, -len(prompt):]  # [L, V]
    expected = torch.log_softmax(logits, -1)[torch.arange(len(prompt) - 1), torch.tensor(prompt[1:])]
    engine = build_llm_engine(demo_model_dir, max_model_len=128, max_num_batched_tokens=16)  # chunked
    params = SamplingParams(max_tokens=1, temperature=0.0, prompt_logprobs=1)
    engine.add_request("p", prompt, params, lora(adapter_dirs[adapter]))
    first = next(output for _, output in step_until_idle(engine))
    got = torch.tensor([logprob for logprob, _ in first.prompt_logprobs])
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)


def test_a_prompt_that_leaves_no_room_after_the_virtual_tokens_is_refused(demo_model_dir, adapter_dirs, prompts):
    engine = build_llm_engine(demo_model_dir, max_model_len=24)
    engine.add_request("long", prompts[1], greedy(2), lora(adapter_dirs["acme/prefix-7"]))  # 7 + 18 tokens > 24
    engine.add_request("fits", prompts[0], greedy(2), lora(adapter_dirs["acme/prefix-7"]))  # 7 + 4
    results = dict(engine.step())
    assert isinstance(results["long"], PromptTooLongError) and "7 virtual tokens" in str(results["long"])
    assert engine.unfinished_request_ids() == ["fits"]


def test_loaded_versions_are_bounded_lru_and_pins_stay(demo_model_dir, adapter_dirs, prompts):
    engine = build_llm_engine(demo_model_dir, max_model_len=128, max_cpu_loras=2)
    first, second, third = (lora(adapter_dirs[name]) for name in VIRTUAL)
    assert engine.set_pinned(first, True) and engine.adapter_state(first.key).is_pinned
    for adapter in (second, third):
        run_to_completion(engine, {"r": (prompts[0], greedy(2), adapter)})
    assert engine.stats()["virtual_token_adapters"] == [first.key, third.key]  # second dropped: least recent, unpinned
    assert engine.adapter_state(second.key).residency == "storage"
    with pytest.raises(InvalidRequestError):
        engine.set_merge_mode(first, "merged")
