"""Greedy tokens from the engine equal HF generate + PEFT (fp32), alone and in mixed batches."""
from __future__ import annotations

import random

import pytest
import torch

from tests.conftest import has_cuda
from tests.engine_helpers import build_llm_engine, greedy, lora, peft_reference, run_to_completion, step_until_idle

NUM_NEW = 10
ADAPTERS = {
    "acme/qv-r8": dict(r=8, alpha=16, target_modules=("q_proj", "v_proj"), seed=1),
    "acme/all-r4-rslora": dict(
        r=4, alpha=8, seed=2, use_rslora=True,
        target_modules=("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"),
    ),
    "globex/mlp-patterns": dict(
        r=16, alpha=8, target_modules=("up_proj", "down_proj"), seed=3,
        rank_pattern={"up_proj": 4}, alpha_pattern={"down_proj": 32},
    ),
    "globex/top-layers": dict(r=8, alpha=16, target_modules=("o_proj", "gate_proj"), seed=4, layers_to_transform=[2, 3]),
}


@pytest.fixture(scope="module")
def prompts(demo_model_dir):
    rng = random.Random(0)
    return [[0] + [rng.randrange(3, 1000) for _ in range(n)] for n in (3, 17, 9, 30)]


@pytest.fixture(scope="module")
def adapter_dirs(make_adapter):
    return {name: make_adapter(name, **kwargs) for name, kwargs in ADAPTERS.items()}


@pytest.fixture(scope="module")
def references(demo_model_dir, adapter_dirs, prompts):
    refs = {None: peft_reference(demo_model_dir, None, prompts, NUM_NEW)}
    for name, path in adapter_dirs.items():
        refs[name] = peft_reference(demo_model_dir, path, prompts, NUM_NEW)
    return refs


def test_every_adapter_changes_greedy_tokens(references):
    for name in ADAPTERS:
        assert references[name] != references[None], f"{name} is a no-op; the parity test would prove nothing"


@pytest.mark.parametrize("adapter", [None, *ADAPTERS])
def test_single_adapter_matches_peft(demo_model_dir, adapter_dirs, prompts, references, adapter):
    engine = build_llm_engine(demo_model_dir, max_loras=2, max_lora_rank=16, max_model_len=128)
    requests = {f"r{i}": (p, greedy(NUM_NEW), lora(adapter_dirs.get(adapter))) for i, p in enumerate(prompts)}
    tokens = run_to_completion(engine, requests)
    assert [tokens[f"r{i}"] for i in range(len(prompts))] == references[adapter]


@pytest.mark.parametrize("max_loras", [4, 2])
def test_mixed_batch_matches_peft_row_by_row(demo_model_dir, adapter_dirs, prompts, references, max_loras):
    """All adapters + base in one batch; with 2 slots the pool must evict and reload (LRU) mid-run."""
    engine = build_llm_engine(demo_model_dir, max_loras=max_loras, max_lora_rank=16, max_model_len=128, max_num_seqs=32)
    requests = {}
    for adapter in [None, *ADAPTERS]:
        for i, prompt in enumerate(prompts):
            requests[f"{adapter}|{i}"] = (prompt, greedy(NUM_NEW), lora(adapter_dirs.get(adapter)))
    tokens = run_to_completion(engine, requests)
    for key, generated in tokens.items():
        adapter, i = key.split("|")
        adapter = None if adapter == "None" else adapter
        assert generated == references[adapter][int(i)], key


def test_batch_composition_does_not_change_tokens(demo_model_dir, adapter_dirs, prompts, references):
    """Requests joining mid-generation (continuous batching) leave the others' tokens unchanged."""
    engine = build_llm_engine(demo_model_dir, max_loras=4, max_lora_rank=16, max_model_len=128)
    adapter = "acme/qv-r8"
    engine.add_request("early", prompts[3], greedy(NUM_NEW), lora(adapter_dirs[adapter]))
    tokens = {"early": [], "late": []}
    while len(tokens["early"]) < 3:  # the adapter loads, then "early" prefills and decodes
        for request_id, output in engine.step():
            tokens[request_id] += output.new_token_ids
    assert 0 < len(tokens["early"]) < NUM_NEW  # "late" really joins mid-generation
    engine.add_request("late", prompts[1], greedy(NUM_NEW), None)
    for request_id, output in step_until_idle(engine):
        tokens[request_id] += output.new_token_ids
    assert tokens["early"] == references[adapter][3]
    assert tokens["late"] == references[None][1]


@pytest.mark.cuda
@pytest.mark.skipif(not has_cuda(), reason="needs CUDA")
def test_cuda_mixed_batch_matches_fp32_reference(demo_model_dir, adapter_dirs, prompts, references):
    engine = build_llm_engine(demo_model_dir, device="cuda", dtype="float32", max_loras=4, max_lora_rank=16, max_model_len=128)
    requests = {f"{a}|{i}": (p, greedy(NUM_NEW), lora(adapter_dirs.get(a))) for a in [None, *ADAPTERS] for i, p in enumerate(prompts)}
    tokens = run_to_completion(engine, requests)
    agree = sum(tokens[k] == references[None if k.startswith("None") else k.split("|")[0]][int(k.split("|")[1])] for k in tokens)
    assert agree == len(tokens)
    assert torch.cuda.is_available()
