"""The offline demo model: deterministic, complete-or-absent on disk, loadable by plain transformers/peft."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer

import loraplex
from loraplex.models import demo
from loraplex.models.demo import MODEL_FILES, ensure_demo_model, ensure_example_adapter, make_demo_adapter

PROMPTS = ["The river ran", "A server is a program that", "Once upon a time"]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    return ensure_demo_model(tmp_path_factory.mktemp("data"))


@pytest.fixture(scope="module")
def tokenizer(model_dir):
    return AutoTokenizer.from_pretrained(model_dir, local_files_only=True)


@pytest.fixture(scope="module")
def base_model(model_dir):
    return AutoModelForCausalLM.from_pretrained(model_dir, local_files_only=True).eval()


def greedy(model, tokenizer, prompt: str, num_tokens: int = 12) -> list[int]:
    inputs = tokenizer(prompt, return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=num_tokens, min_new_tokens=num_tokens, do_sample=False)
    return out[0, inputs["input_ids"].shape[1]:].tolist()


def test_layout(model_dir):
    assert model_dir.name == "demo" and model_dir.parent.name == ".models"
    assert all((model_dir / name).is_file() for name in MODEL_FILES)
    assert not list(model_dir.parent.glob(".demo.tmp-*"))


def test_build_is_deterministic_across_processes(model_dir, tmp_path):
    # A fresh interpreter with another hash seed: catches any dict/set-order dependence in training.
    service_dir = Path(loraplex.__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONHASHSEED": "12345", "PYTHONPATH": str(service_dir)}
    code = "import sys; from pathlib import Path; from loraplex.models import ensure_demo_model; ensure_demo_model(Path(sys.argv[1]))"
    subprocess.run([sys.executable, "-c", code, str(tmp_path)], check=True, env=env, timeout=240)
    other = tmp_path / ".models" / "demo"
    for name in ("model.safetensors", "tokenizer.json", "config.json", "tokenizer_config.json"):
        assert (other / name).read_bytes() == (model_dir / name).read_bytes(), name


def test_second_call_reuses_the_directory(model_dir):
    before = (model_dir / "model.safetensors").stat().st_mtime_ns
    assert ensure_demo_model(model_dir.parent.parent) == model_dir
    assert (model_dir / "model.safetensors").stat().st_mtime_ns == before


def test_other_seed_rebuilds_in_place(tmp_path):
    first = (ensure_demo_model(tmp_path, seed=0, num_hidden_layers=1) / "model.safetensors").read_bytes()
    second_dir = ensure_demo_model(tmp_path, seed=1, num_hidden_layers=1)
    assert second_dir == tmp_path / ".models" / "demo"
    assert (second_dir / "model.safetensors").read_bytes() != first
    assert not [p for p in (tmp_path / ".models").iterdir() if p.name.startswith(".demo.") and p.is_dir()]


def test_overrides_and_out_dir(tmp_path):
    out = ensure_demo_model(tmp_path, out_dir=tmp_path / "big", hidden_size=64, num_attention_heads=2, vocab_size=1100)
    assert out == tmp_path / "big"
    model = AutoModelForCausalLM.from_pretrained(out, local_files_only=True)
    assert model.config.hidden_size == 64 and model.config.vocab_size == 1100
    with pytest.raises(ValueError, match="vocab_size"):
        ensure_demo_model(tmp_path, out_dir=tmp_path / "tiny", vocab_size=100)


def test_never_replaces_a_directory_it_did_not_build(tmp_path):
    precious = tmp_path / "my-model"
    precious.mkdir()
    (precious / "config.json").write_text("{}")
    with pytest.raises(FileExistsError):
        ensure_demo_model(tmp_path, out_dir=precious)
    assert (precious / "config.json").read_text() == "{}"


def test_crash_leaves_no_half_model(tmp_path, monkeypatch):
    def crash(out_dir, seed, config_fields):
        (out_dir / "config.json").write_text("{}")
        raise RuntimeError("disk full")

    monkeypatch.setattr(demo, "_build_model_dir", crash)
    with pytest.raises(RuntimeError):
        ensure_demo_model(tmp_path)
    models = tmp_path / ".models"
    assert sorted(p.name for p in models.iterdir()) == [".demo.lock"]


@pytest.mark.parametrize("text", ["Hello, world!", "  two  spaces\tand\nlines ", "Grüße, naïve café — 東京 🙂🚀", ""])
def test_tokenizer_round_trips(tokenizer, text):
    ids = tokenizer.encode(text, add_special_tokens=False)
    assert tokenizer.decode(ids) == text
    with_bos = tokenizer.encode(text)
    assert with_bos[0] == tokenizer.bos_token_id and with_bos[1:] == ids


def test_tokenizer_vocab_and_special_tokens(tokenizer, model_dir):
    assert len(tokenizer) == demo.TOKENIZER_VOCAB_SIZE
    assert (tokenizer.bos_token, tokenizer.eos_token, tokenizer.pad_token) == (
        "<|begin_of_text|>", "<|end_of_text|>", "<|pad|>",
    )
    for token in demo.SPECIAL_TOKENS:  # each marker is one id, never split into bytes
        assert tokenizer.encode(token, add_special_tokens=False) == [tokenizer.convert_tokens_to_ids(token)]
    # Real merges were learned: common words are a single token.
    assert len(tokenizer.encode(" the", add_special_tokens=False)) == 1


def test_chat_template(tokenizer):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi!"}]
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert text == (
        "<|begin_of_text|><|system|>\nBe brief.<|end_of_turn|>\n<|user|>\nHi!<|end_of_turn|>\n<|assistant|>\n"
    )
    no_prompt = tokenizer.apply_chat_template(messages, tokenize=False)
    assert no_prompt == text.removesuffix("<|assistant|>\n")
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_dict=False)
    assert ids[0] == tokenizer.bos_token_id and ids.count(tokenizer.bos_token_id) == 1
    with pytest.raises(Exception, match="Unknown chat role"):
        tokenizer.apply_chat_template([{"role": "robot", "content": "x"}], tokenize=False)


def test_generate_gives_varied_tokens(base_model, tokenizer):
    outputs = [greedy(base_model, tokenizer, p) for p in PROMPTS]
    assert all(len(tokens) == 12 for tokens in outputs)
    assert all(len(set(tokens)) > 1 for tokens in outputs), outputs  # not one token repeated
    assert len({tuple(tokens) for tokens in outputs}) == len(PROMPTS)  # the prompt matters
    assert base_model.generation_config.eos_token_id == [
        tokenizer.eos_token_id, tokenizer.convert_tokens_to_ids("<|end_of_turn|>"),
    ]


def test_adapter_changes_greedy_tokens(model_dir, tokenizer, tmp_path):
    adapter_dir = make_demo_adapter(model_dir, tmp_path / "acme" / "polite", seed=3)
    assert (adapter_dir / "adapter_config.json").is_file() and (adapter_dir / "adapter_model.safetensors").is_file()
    base = AutoModelForCausalLM.from_pretrained(model_dir, local_files_only=True).eval()
    base_tokens = [greedy(base, tokenizer, p) for p in PROMPTS]
    lora_model = PeftModel.from_pretrained(base, adapter_dir).eval()
    lora_tokens = [greedy(lora_model, tokenizer, p) for p in PROMPTS]
    assert lora_tokens != base_tokens


def test_adapter_options_are_saved_and_deterministic(model_dir, tmp_path):
    kwargs = dict(
        r=4, alpha=8, target_modules=("q_proj", "o_proj", "down_proj"), seed=7, use_rslora=True,
        rank_pattern={"o_proj": 2}, alpha_pattern={"o_proj": 4}, layers_to_transform=[0, 2],
    )
    first = make_demo_adapter(model_dir, tmp_path / "a", **kwargs)
    second = make_demo_adapter(model_dir, tmp_path / "b", **kwargs)
    assert (first / "adapter_model.safetensors").read_bytes() == (second / "adapter_model.safetensors").read_bytes()
    config = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(model_dir, local_files_only=True), first
    ).peft_config["default"]
    assert (config.r, config.lora_alpha, config.use_rslora) == (4, 8, True)
    assert config.rank_pattern == {"o_proj": 2} and config.layers_to_transform == [0, 2]
    assert set(config.target_modules) == {"q_proj", "o_proj", "down_proj"}


def test_example_adapter_is_seeded_once(model_dir):
    data_dir = model_dir.parent.parent
    adapter_dir = ensure_example_adapter(data_dir)
    assert adapter_dir == data_dir / "demo" / "example"
    before = (adapter_dir / "adapter_model.safetensors").stat().st_mtime_ns
    ensure_example_adapter(data_dir)
    assert (adapter_dir / "adapter_model.safetensors").stat().st_mtime_ns == before
