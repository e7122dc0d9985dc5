"""One validator for every adapter kind: real PEFT saves (tiny Llama built from a config, GQA) of LoRA,
DoRA, prompt tuning and prefix tuning (with and without projection) are accepted once the engine serves
the kind, and every other kind is refused with a 400 whose `param` names the field and whose message
says why."""
from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors

from loraplex.registry.adapter_config import CONFIG_FILE, WEIGHTS_FILE, load_lora_spec
from loraplex.registry.adapter_kinds import ALL_KINDS, SERVED_KINDS
from loraplex.registry.errors import InvalidAdapter, InvalidAdapterFile
from loraplex.registry.validation import model_dims_from_hf_config, module_shapes_from_hf_config, validate_adapter_files

HF_CONFIG = {"vocab_size": 64, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
             "num_attention_heads": 4, "num_key_value_heads": 2}
SHAPES = module_shapes_from_hf_config(HF_CONFIG)
DIMS = model_dims_from_hf_config(HF_CONFIG)


@pytest.fixture(scope="module")
def peft_saves(tmp_path_factory) -> dict[str, dict[str, bytes]]:
    """kind -> {file name: bytes}, each saved by PEFT's own save_pretrained."""
    from peft import IA3Config, LoHaConfig, LoraConfig, PrefixTuningConfig, PromptTuningConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    configs = {
        "lora": LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False),
        "dora": LoraConfig(r=4, target_modules=["q_proj", "down_proj"], use_dora=True, init_lora_weights=False,
                           rank_pattern={"down_proj": 2}, alpha_pattern={"q_proj": 16}),
        "prompt": PromptTuningConfig(num_virtual_tokens=5),
        "prefix": PrefixTuningConfig(num_virtual_tokens=3),
        "prefix_projection": PrefixTuningConfig(num_virtual_tokens=3, prefix_projection=True, encoder_hidden_size=8),
        "ia3": IA3Config(target_modules=["k_proj", "down_proj"], feedforward_modules=["down_proj"]),
        "loha": LoHaConfig(r=2, target_modules=["q_proj"]),
    }
    root, saves = tmp_path_factory.mktemp("peft-saves"), {}
    for name, config in configs.items():
        config.task_type = "CAUSAL_LM"
        torch.manual_seed(0)
        get_peft_model(LlamaForCausalLM(LlamaConfig(**HF_CONFIG)), config).save_pretrained(root / name)
        saves[name] = {f: (root / name / f).read_bytes() for f in (CONFIG_FILE, WEIGHTS_FILE)}
    return saves


def validate(files: dict[str, bytes], kinds=ALL_KINDS, dims=DIMS, shapes=SHAPES):
    return validate_adapter_files(files[CONFIG_FILE], files[WEIGHTS_FILE], shapes, max_rank=8, max_bytes=1 << 24,
                                  adapter_id="acme/x", dims=dims, kinds=kinds)


def refused(files: dict[str, bytes], match: str, param: str, **kwargs) -> None:
    with pytest.raises(InvalidAdapterFile, match=match) as caught:
        validate(files, **kwargs)
    assert caught.value.param == param


def edited(files: dict[str, bytes], config_fields: dict | None = None, tensors=None) -> dict[str, bytes]:
    config = {**json.loads(files[CONFIG_FILE]), **(config_fields or {})}
    weights = files[WEIGHTS_FILE]
    if tensors is not None:
        loaded = load_safetensors(weights)
        tensors(loaded)
        weights = save_safetensors(loaded)
    return {CONFIG_FILE: json.dumps(config).encode(), WEIGHTS_FILE: weights}


@pytest.mark.parametrize(("name", "kind", "num_virtual_tokens"), [
    ("lora", "lora", 0), ("dora", "dora", 0), ("prompt", "prompt_tuning", 5),
    ("prefix", "prefix_tuning", 3), ("prefix_projection", "prefix_tuning", 3),
])
def test_peft_saves_of_every_served_kind_are_accepted(peft_saves, name, kind, num_virtual_tokens):
    result = validate(peft_saves[name])
    assert (result.kind, result.num_virtual_tokens) == (kind, num_virtual_tokens)
    assert result.rank == (4 if kind in ("lora", "dora") else 0)


def test_dora_rank_and_alpha_patterns_are_read(peft_saves):
    result = validate(peft_saves["dora"])
    assert result.target_modules == ("down_proj", "q_proj") and result.layers == (0, 1)


@pytest.mark.parametrize(("name", "param"), [("dora", "use_dora"), ("prompt", "peft_type"), ("prefix", "peft_type")])
def test_a_kind_the_engine_does_not_serve_is_refused(peft_saves, name, param):
    refused(peft_saves[name], "are not served by this server yet", param, kinds=("lora",))


@pytest.mark.parametrize(("name", "reason"), [("ia3", "IA3 rescales activations"), ("loha", "LoHa")])
def test_unsupported_peft_kinds_are_refused_with_the_reason(peft_saves, name, reason):
    refused(peft_saves[name], f"peft_type '{name.upper()}' is not supported: {reason}", "peft_type")


@pytest.mark.parametrize(("peft_type", "match"), [
    ("ADAPTION_PROMPT", "Adapter modules"), ("BOFT", "orthogonal"), ("P_TUNING", "prompt encoder"),
    ("SOMETHING_NEW", "peft_type must be one of"), (None, "peft_type must be one of"),
])
def test_other_kinds_are_refused_naming_peft_type(peft_saves, peft_type, match):
    refused(edited(peft_saves["lora"], {"peft_type": peft_type}), match, "peft_type")


def test_dora_magnitudes_must_match_the_config_and_the_model(peft_saves):
    magnitude = "base_model.model.model.layers.0.self_attn.q_proj.lora_magnitude_vector"
    refused(edited(peft_saves["dora"], tensors=lambda t: t.pop(magnitude)), "has no lora_magnitude_vector for layer 0 q_proj", "use_dora")
    refused(edited(peft_saves["dora"], tensors=lambda t: t.update({magnitude: torch.ones(31)})),
            r"lora_magnitude_vector \[31\] does not match", WEIGHTS_FILE)
    refused(edited(peft_saves["dora"], {"use_dora": False}), "a DoRA magnitude vector, but use_dora is not true", WEIGHTS_FILE)
    refused(edited(peft_saves["dora"], {"use_dora": "yes"}), "use_dora must be true or false", "use_dora")


@pytest.mark.parametrize(("name", "fields", "match", "param"), [
    ("prompt", {"token_dim": 48}, "token_dim is 48, but the model's hidden size is 32", "token_dim"),
    ("prompt", {"num_virtual_tokens": 6}, r"prompt_embeddings is \[5, 32\], expected \[6, 32\]", WEIGHTS_FILE),
    ("prompt", {"num_virtual_tokens": 0}, "num_virtual_tokens must be a positive integer", "num_virtual_tokens"),
    ("prompt", {"num_virtual_tokens": 10_000}, "exceeds this server's limit", "num_virtual_tokens"),
    ("prompt", {"num_transformer_submodules": 2}, "num_transformer_submodules must be 1", "num_transformer_submodules"),
    ("prefix", {"num_layers": 3}, "num_layers is 3, but the model's number of layers is 2", "num_layers"),
    ("prefix", {"token_dim": 32}, r"key/value width \(num_key_value_heads \* head_dim\) is 16", "token_dim"),
])
def test_prompt_learning_shapes_must_fit_the_model(peft_saves, name, fields, match, param):
    refused(edited(peft_saves[name], fields), match, param)


def test_prompt_adapter_for_another_model_is_refused(peft_saves):
    other = model_dims_from_hf_config({**HF_CONFIG, "hidden_size": 64})
    refused(peft_saves["prompt"], "token_dim is 32, but the model's hidden size is 64", "token_dim", dims=other)
    extra = edited(peft_saves["prefix"], tensors=lambda t: t.update(other_tensor=torch.zeros(2)))
    refused(extra, "unsupported tensor 'other_tensor'", WEIGHTS_FILE)


def test_read_only_store_runs_the_same_validator(peft_saves, tmp_path):
    for name in ("dora", "ia3"):
        (tmp_path / name).mkdir()
        for file, data in peft_saves[name].items():
            (tmp_path / name / file).write_bytes(data)
    assert "dora" in SERVED_KINDS
    assert load_lora_spec(tmp_path / "dora", "t/dora", 8, ("q_proj", "down_proj")).kind == "dora"
    with pytest.raises(InvalidAdapter, match="IA3"):
        load_lora_spec(tmp_path / "ia3", "t/ia3", 8, ("q_proj",))
