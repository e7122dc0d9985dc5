"""Every served adapter kind in one batch (issue #15 must-show 1): prompt tuning, prefix tuning with and
without projection, DoRA, plain LoRA and base requests share the same forwards, and each request's greedy
tokens equal its own PEFT reference (fp32). The kinds' own test files cover each kind alone."""
from __future__ import annotations

import random

import pytest

from tests.dora_adapters import make_dora_adapter
from tests.engine_helpers import build_llm_engine, greedy, lora, peft_reference, run_to_completion
from tests.virtual_token_adapters import make_virtual_adapter

pytestmark = pytest.mark.usefixtures("one_torch_thread")

NUM_NEW = 8
VIRTUAL = {  # name -> (peft_type, num_virtual_tokens, prefix_projection)
    "acme/mix-prompt-4": ("PROMPT_TUNING", 4, False),
    "acme/mix-prefix-6": ("PREFIX_TUNING", 6, False),
    "globex/mix-prefix-proj-9": ("PREFIX_TUNING", 9, True),
}
DORA = "acme/mix-dora"
LORA = "globex/mix-lora"


@pytest.fixture(scope="module")
def kinds(demo_model_dir, demo_data_dir, make_adapter):
    dirs = {LORA: make_adapter(LORA, r=4, alpha=8, target_modules=("q_proj", "v_proj", "down_proj"), seed=301),
            DORA: make_dora_adapter(demo_model_dir, demo_data_dir / DORA, r=8, alpha=16,
                                    target_modules=("q_proj", "v_proj", "o_proj"), seed=302)}
    for seed, (name, (peft_type, n, projection)) in enumerate(VIRTUAL.items()):
        dirs[name] = make_virtual_adapter(demo_model_dir, demo_data_dir / name, peft_type, n, projection,
                                          seed=seed + 310)
    rng = random.Random(5)
    prompts = [[0] + [rng.randrange(3, 1000) for _ in range(n)] for n in (5, 14, 23)]
    refs = {None: peft_reference(demo_model_dir, None, prompts, NUM_NEW)}
    refs.update({name: peft_reference(demo_model_dir, d, prompts, NUM_NEW) for name, d in dirs.items()})
    for name in dirs:  # a no-op adapter would make the parity below prove nothing
        assert refs[name] != refs[None], name
    return dirs, prompts, refs


@pytest.mark.parametrize("block_size, chunk_tokens", [(16, 2048), (4, 16)])
def test_every_kind_in_one_batch_matches_peft(demo_model_dir, kinds, block_size, chunk_tokens):
    """Small blocks and a 16-token budget split prompts and virtual tokens over chunks and steps."""
    dirs, prompts, refs = kinds
    engine = build_llm_engine(demo_model_dir, max_loras=3, max_lora_rank=8, max_model_len=128, max_num_seqs=32,
                              kv_block_size=block_size, max_num_batched_tokens=chunk_tokens)
    requests = {f"{name}|{i}": (prompt, greedy(NUM_NEW), lora(dirs.get(name)))
                for name in [None, LORA, DORA, *VIRTUAL] for i, prompt in enumerate(prompts)}
    tokens = run_to_completion(engine, requests)
    for key, generated in tokens.items():
        name, i = key.split("|")
        assert generated == refs[None if name == "None" else name][int(i)], key
    stats = engine.stats()
    assert sorted(stats["virtual_token_adapters"]) == sorted(VIRTUAL)
