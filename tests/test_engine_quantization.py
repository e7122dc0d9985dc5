"""A quantized base (int8, nf4): greedy tokens equal transformers + bitsandbytes + peft on the same quantized
weights (fp32 compute), for the base, one adapter, and four adapters + the base in one batch; a checkpoint
saved 4-bit by transformers is served with no flag; the bytes fall as promised; bad settings are refused."""
from __future__ import annotations

import json
import random

import pytest
import torch
from transformers import AutoTokenizer

from loraplex.engine.errors import EngineError
from loraplex.engine.model_loader import load_model
from loraplex.engine.quantization import Int8Weight, Nf4Weight
from loraplex.engine.quantized_layers import projection_bytes, weight_bytes
from tests.engine_helpers import build_llm_engine, greedy, lora, peft_reference, run_to_completion
from tests.quant_helpers import load_quantized_hf, quantized_reference
from tests.shared_models import shared_model
from tests.test_engine_parity import ADAPTERS

pytest.importorskip("bitsandbytes")
NUM_NEW = 8
METHODS = ("int8", "nf4")


@pytest.fixture(scope="module")
def prompts():
    rng = random.Random(0)
    return [[0] + [rng.randrange(3, 1000) for _ in range(n)] for n in (3, 17, 9)]


@pytest.fixture(scope="module")
def adapter_dirs(make_adapter):
    return {name: make_adapter(name, **kwargs) for name, kwargs in ADAPTERS.items()}


class References(dict):
    """(method, adapter) -> greedy tokens per prompt, computed on first use."""

    def __init__(self, model_dir, adapter_dirs, prompts):
        super().__init__()
        self.model_dir, self.adapter_dirs, self.prompts = model_dir, adapter_dirs, prompts

    def __missing__(self, key):
        method, adapter = key
        self[key] = quantized_reference(self.model_dir, method, self.adapter_dirs.get(adapter), self.prompts, NUM_NEW)
        return self[key]


@pytest.fixture(scope="module")
def references(demo_model_dir, adapter_dirs, prompts):
    return References(demo_model_dir, adapter_dirs, prompts)


def _engine(model_dir, method, **limits):
    return build_llm_engine(model_dir, max_loras=4, max_lora_rank=16, max_model_len=128, max_num_seqs=32,
                            quantization=method, **limits)


def test_quantized_codes_equal_transformers(demo_model_dir):
    """Same bytes as BitsAndBytesConfig: int8 rows and scales, nf4 codes and (double-quantized) scales."""
    for method in METHODS:
        model = load_model(str(demo_model_dir), torch.float32, torch.device("cpu"), 128, quantization=method)
        hf = load_quantized_hf(demo_model_dir, method)
        ours, theirs = model.layers[1].self_attn.o_proj.qweight, hf.model.layers[1].self_attn.o_proj.weight
        if method == "int8":
            assert isinstance(ours, Int8Weight) and torch.equal(ours.cb, theirs.data) and torch.equal(ours.scb, theirs.SCB)
        else:
            assert isinstance(ours, Nf4Weight) and torch.equal(ours.packed, theirs.data)
            assert torch.equal(ours.state.absmax, theirs.quant_state.absmax)
        assert len(model.layers[0].self_attn.qkv.weights) == 1, "the fused q/k/v GEMM stays one GEMM"


@pytest.mark.slow
@pytest.mark.quant
def test_quantization_changes_tokens_and_adapters_change_them_again(demo_model_dir, prompts, references):
    """Else the parity tests below could not tell a quantized base from a full-precision one."""
    assert references[("nf4", None)] != peft_reference(demo_model_dir, None, prompts, NUM_NEW)
    for method in METHODS:
        for name in ADAPTERS:
            assert references[(method, name)] != references[(method, None)], (method, name)


@pytest.mark.parametrize("method", METHODS)
def test_base_and_one_adapter_match_transformers(demo_model_dir, adapter_dirs, prompts, references, method):
    engine = _engine(demo_model_dir, method)
    adapter = "acme/all-r4-rslora"
    assert references[(method, adapter)] != references[(method, None)]
    for name in (None, adapter):
        requests = {f"r{i}": (p, greedy(NUM_NEW), lora(adapter_dirs.get(name))) for i, p in enumerate(prompts)}
        tokens = run_to_completion(engine, requests)
        assert [tokens[f"r{i}"] for i in range(len(prompts))] == references[(method, name)], name


@pytest.mark.slow  # ten transformers references
@pytest.mark.quant
@pytest.mark.parametrize("method", METHODS)
def test_four_adapters_and_the_base_in_one_batch(demo_model_dir, adapter_dirs, prompts, references, method):
    engine = _engine(demo_model_dir, method)
    requests = {f"{a}|{i}": (p, greedy(NUM_NEW), lora(adapter_dirs.get(a)))
                for a in [None, *ADAPTERS] for i, p in enumerate(prompts)}
    tokens = run_to_completion(engine, requests)
    for key, generated in tokens.items():
        name, i = key.split("|")
        assert generated == references[(method, None if name == "None" else name)][int(i)], (method, key)


@pytest.mark.parametrize("method", METHODS)
def test_a_checkpoint_saved_quantized_is_served_with_no_flag(demo_model_dir, tmp_path, prompts, references, method):
    """`save_pretrained` of a model loaded with BitsAndBytesConfig (4-bit or 8-bit): served as saved."""
    saved = tmp_path / f"demo-{method}"
    load_quantized_hf(demo_model_dir, method).save_pretrained(saved)
    AutoTokenizer.from_pretrained(demo_model_dir).save_pretrained(saved)
    engine = _engine(saved, "none")
    assert engine.model.quantization.method == method and engine.model.quantization.source == "checkpoint"
    tokens = run_to_completion(engine, {f"r{i}": (p, greedy(NUM_NEW), None) for i, p in enumerate(prompts)})
    assert [tokens[f"r{i}"] for i in range(len(prompts))] == references[(method, None)]
    other = "int8" if method == "nf4" else "nf4"
    with pytest.raises(EngineError, match="already quantized"):
        load_model(str(saved), torch.float32, torch.device("cpu"), 128, quantization=other)


def test_linear_weight_bytes_fall(demo_model_dir):
    full = load_model(str(demo_model_dir), torch.float32, torch.device("cpu"), 128)
    linear, rest = projection_bytes(full), weight_bytes(full) - projection_bytes(full)
    for method, most in (("int8", 0.30), ("nf4", 0.16)):
        quantized = load_model(str(demo_model_dir), torch.float32, torch.device("cpu"), 128, quantization=method)
        assert projection_bytes(quantized) / linear <= most, method
        assert weight_bytes(quantized) - projection_bytes(quantized) == rest  # embeddings, norms, head as they were


def test_bad_quantization_settings_are_refused_before_loading(demo_model_dir, tmp_path):
    with pytest.raises(EngineError, match="unknown quantization 'int4'.*none, int8, nf4"):
        load_model(str(demo_model_dir), torch.float32, torch.device("cpu"), 128, quantization="int4")
    for method in ("gptq", "awq", "compressed-tensors"):
        other = tmp_path / method
        other.mkdir()
        config = json.loads((demo_model_dir / "config.json").read_text())
        config["quantization_config"] = {"quant_method": method, "bits": 4}
        (other / "config.json").write_text(json.dumps(config))  # no weights: refused before reading any
        with pytest.raises(EngineError, match=f"quantized with '{method}'.*bitsandbytes"):
            load_model(str(other), torch.float32, torch.device("cpu"), 128)


@pytest.mark.slow  # ~30-90 s on a loaded 2-core box
@pytest.mark.quant
@pytest.mark.parametrize("method", METHODS)
def test_stories260k_text_equals_transformers(method, tmp_path):
    """The real model, base and an adapter, compared as text too. int8 rounds activations to 8 bits, which turns
    the last-bit float differences of the batched LoRA kernels into whole quantization steps: with this random
    adapter (near-tied logits), a two-request batch leaves transformers' tokens after ~6 tokens, so int8 +
    adapter requests run one at a time here (the demo model's batch test above holds in batches)."""
    from loraplex.models.demo import make_demo_adapter

    model_dir = shared_model("stories260k")
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    adapter = make_demo_adapter(model_dir, tmp_path / "acme" / "story", r=8, seed=5,
                                target_modules=("q_proj", "v_proj", "gate_proj", "down_proj"))
    prompts = [tokenizer("Once upon a time, there was a").input_ids, tokenizer("The little dog").input_ids]
    engine = build_llm_engine(model_dir, max_loras=2, max_lora_rank=16, max_model_len=256, quantization=method)
    for name in (None, adapter):
        refs = quantized_reference(model_dir, method, name, prompts, 16)
        if method == "int8" and name is not None:  # see the docstring
            got = [run_to_completion(engine, {"r": (p, greedy(16), lora(name))})["r"] for p in prompts]
        else:
            tokens = run_to_completion(engine, {f"r{i}": (p, greedy(16), lora(name)) for i, p in enumerate(prompts)})
            got = [tokens[f"r{i}"] for i in range(len(prompts))]
        assert [tokenizer.decode(g) for g in got] == [tokenizer.decode(r) for r in refs]
        assert got == refs
