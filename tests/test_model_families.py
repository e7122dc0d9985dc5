"""The engine serves Qwen2 (biased q/k/v, tied embeddings) and Mistral checkpoints, with adapters,
token for token like HF generate + PEFT."""
from __future__ import annotations

import random
from pathlib import Path

import pytest
import torch
from transformers import MistralConfig, MistralForCausalLM, Qwen2Config, Qwen2ForCausalLM

from loraplex.models.demo import build_demo_tokenizer, make_demo_adapter
from tests.engine_helpers import build_llm_engine, greedy, lora, peft_reference, run_to_completion

SHAPE = dict(vocab_size=1024, hidden_size=64, intermediate_size=160, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=256, initializer_range=0.05)
FAMILIES = {
    "qwen2": lambda: Qwen2ForCausalLM(Qwen2Config(**SHAPE, tie_word_embeddings=True)),
    "mistral": lambda: MistralForCausalLM(MistralConfig(**SHAPE, sliding_window=None)),
}


def _model_dir(family: str, root: Path) -> Path:
    out = root / family
    torch.manual_seed(0)
    FAMILIES[family]().save_pretrained(out)
    build_demo_tokenizer().save_pretrained(out)
    return out


@pytest.mark.parametrize("family", list(FAMILIES))
def test_family_matches_peft(family, tmp_path):
    model_dir = _model_dir(family, tmp_path)
    adapter = make_demo_adapter(model_dir, tmp_path / "acme" / f"{family}-lora", r=4, seed=3,
                                target_modules=("q_proj", "k_proj", "v_proj", "o_proj", "down_proj"))
    rng = random.Random(1)
    prompts = [[0] + [rng.randrange(3, 1000) for _ in range(n)] for n in (4, 11)]
    engine = build_llm_engine(model_dir, max_loras=2, max_lora_rank=8, max_model_len=64)
    for adapter_dir in (None, adapter):
        requests = {f"r{i}": (p, greedy(8), lora(adapter_dir)) for i, p in enumerate(prompts)}
        tokens = run_to_completion(engine, requests)
        assert [tokens[f"r{i}"] for i in range(len(prompts))] == peft_reference(model_dir, adapter_dir, prompts, 8)
