"""Qwen3, Gemma 3 (text) and Llama with llama3 rope scaling: greedy tokens equal HF generate + PEFT (fp32)
for tiny random models built from their configs: base and adapters alone, mixed in one batch, and with
one adapter merged into the base weights."""
from __future__ import annotations

import json
import random
import time
from pathlib import Path

import pytest
import torch
from transformers import (
    AutoConfig, Gemma3ForCausalLM, Gemma3TextConfig, LlamaConfig, LlamaForCausalLM, Qwen3Config, Qwen3ForCausalLM,
)

from loraplex.engine.errors import EngineError
from loraplex.engine.family import family_spec
from loraplex.engine.rope import inverse_frequencies
from loraplex.models.demo import build_demo_tokenizer, make_demo_adapter
from tests.engine_helpers import build_llm_engine, greedy, lora, peft_reference, run_to_completion

NUM_NEW = 8
SHAPE = dict(vocab_size=1024, hidden_size=64, intermediate_size=160, num_hidden_layers=4, num_attention_heads=4,
             num_key_value_heads=2, head_dim=16, max_position_embeddings=256, initializer_range=0.05)
LLAMA3_ROPE = {"rope_type": "llama3", "rope_theta": 10000.0, "factor": 8.0, "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": 16}
FAMILIES = {
    "qwen3": lambda: Qwen3ForCausalLM(Qwen3Config(**SHAPE, tie_word_embeddings=False)),
    "gemma3": lambda: Gemma3ForCausalLM(Gemma3TextConfig(
        **SHAPE, sliding_window=6, query_pre_attn_scalar=24, final_logit_softcapping=20.0,
        layer_types=["sliding_attention", "sliding_attention", "full_attention", "sliding_attention"],
        rope_parameters={"sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
                         "full_attention": {"rope_type": "linear", "rope_theta": 1_000_000.0, "factor": 4.0}},
    )),
    # original length 16: every prompt below runs past it
    "llama3-rope": lambda: LlamaForCausalLM(LlamaConfig(**SHAPE, rope_parameters=LLAMA3_ROPE)),
}
ALL_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
ADAPTERS = {
    "acme/all": dict(r=4, alpha=8, target_modules=ALL_MODULES, seed=3),
    "acme/qv": dict(r=8, alpha=16, target_modules=("q_proj", "v_proj", "down_proj"), seed=4),
}


def _model_dir(family: str, root: Path) -> Path:
    out = root / family
    torch.manual_seed(0)
    model = FAMILIES[family]()
    with torch.no_grad():  # norms start at 1 (or 0 for Gemma's 1 + w): make them matter
        for name, param in model.named_parameters():
            if "norm" in name:
                param.add_(torch.randn_like(param) * 0.2)
    model.save_pretrained(out)
    build_demo_tokenizer().save_pretrained(out)
    return out


@pytest.fixture(scope="module", params=list(FAMILIES))
def family_setup(request, tmp_path_factory):
    root = tmp_path_factory.mktemp(request.param)
    model_dir = _model_dir(request.param, root)
    adapters = {name: make_demo_adapter(model_dir, root / name, **kw) for name, kw in ADAPTERS.items()}
    rng = random.Random(1)
    prompts = [[0] + [rng.randrange(3, 1000) for _ in range(n)] for n in (5, 19, 30)]
    refs = {name: peft_reference(model_dir, adapters.get(name), prompts, NUM_NEW) for name in [None, *ADAPTERS]}
    for name in ADAPTERS:
        assert refs[name] != refs[None], f"{name} is a no-op; parity would prove nothing"
    return model_dir, adapters, prompts, refs


def _mixed(adapters, prompts):
    return {f"{a}|{i}": (p, greedy(NUM_NEW), lora(adapters.get(a))) for a in [None, *ADAPTERS] for i, p in enumerate(prompts)}


def _check(tokens, refs):
    for key, generated in tokens.items():
        adapter, i = key.split("|")
        assert generated == refs[None if adapter == "None" else adapter][int(i)], key


def test_alone_and_mixed_batch_match_peft(family_setup):
    model_dir, adapters, prompts, refs = family_setup
    engine = build_llm_engine(model_dir, max_loras=2, max_lora_rank=8, max_model_len=64)
    for name in (None, "acme/all"):
        tokens = run_to_completion(engine, {f"r{i}": (p, greedy(NUM_NEW), lora(adapters.get(name))) for i, p in enumerate(prompts)})
        assert [tokens[f"r{i}"] for i in range(len(prompts))] == refs[name], name
    _check(run_to_completion(engine, _mixed(adapters, prompts)), refs)


def test_merged_adapter_matches_peft(family_setup):
    model_dir, adapters, prompts, refs = family_setup
    engine = build_llm_engine(model_dir, max_loras=3, max_lora_rank=8, max_model_len=64)
    merged = lora(adapters["acme/all"])
    engine.set_merge_mode(merged, "merged")
    deadline = time.monotonic() + 30
    while engine.merged_key != merged.key:  # loads on the loader thread, then merges
        assert time.monotonic() < deadline, "adapter never merged"
        engine.step()
        time.sleep(0.002)
    _check(run_to_completion(engine, _mixed(adapters, prompts)), refs)


def test_llama3_rope_frequencies_equal_transformers():
    config = LlamaConfig(**SHAPE, rope_parameters=LLAMA3_ROPE)
    hf_rotary = LlamaForCausalLM(config).model.rotary_emb
    ours = inverse_frequencies(family_spec(config).rope["default"], SHAPE["head_dim"])
    assert torch.equal(ours, hf_rotary.inv_freq)
    plain = inverse_frequencies({"rope_type": "default", "rope_theta": 10000.0}, SHAPE["head_dim"])
    assert not torch.equal(ours, plain)  # the scaling really changes the long wavelengths


def test_unsupported_architectures_and_rope_types_are_refused(tmp_path):
    config = AutoConfig.for_model("gpt2")
    with pytest.raises(EngineError, match="model type 'gpt2' is not supported.*llama, mistral, qwen2, qwen3, gemma3_text"):
        family_spec(config)
    with pytest.raises(EngineError, match="rope type 'dynamic' is not supported"):
        inverse_frequencies({"rope_type": "dynamic", "rope_theta": 1e4, "factor": 2.0}, 16)


@pytest.mark.slow  # about a minute per family on 2 cores: make test-slow
def test_trained_adapter_serves_like_peft(family_setup, tmp_path):
    """What a fine-tuning job runs (train_lora, peft on the HF model) works on the family, and its adapter
    serves with the same tokens as peft."""
    from loraplex.training.datasets import validate_jsonl
    from loraplex.training.hyperparams import Hyperparameters
    from loraplex.training.trainer import train_lora

    model_dir, _, prompts, refs = family_setup
    rows = "\n".join(json.dumps({"prompt": f"Q{i}: what color?", "completion": " zebra zebra"}) for i in range(12))
    hp = Hyperparameters(n_epochs=2, batch_size=4, lora_r=4, learning_rate_multiplier=10, seed=5)
    out = tmp_path / "acme" / "trained"
    train_lora(model_dir, validate_jsonl(rows.encode()), hp, out, validation=validate_jsonl(rows.encode()), device="cpu")
    expected = peft_reference(model_dir, out, prompts, NUM_NEW)
    assert expected != refs[None]
    engine = build_llm_engine(model_dir, max_loras=1, max_lora_rank=8, max_model_len=64)
    tokens = run_to_completion(engine, {f"r{i}": (p, greedy(NUM_NEW), lora(out)) for i, p in enumerate(prompts)})
    assert [tokens[f"r{i}"] for i in range(len(prompts))] == expected
