"""adapter_config.json + safetensors header checks: what the engine can serve is accepted, the rest refused
with a reason (never served as the base model). Synthetic files, no model needed."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from loraplex.registry.adapter_config import InvalidAdapter, load_lora_spec

ALLOWED = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
HIDDEN = 32


def lora_tensors(modules=("q_proj", "v_proj"), rank=4, layers=(0, 1), extra: dict | None = None) -> dict:
    tensors = {}
    for layer in layers:
        for module in modules:
            block = "self_attn" if module in ("q_proj", "k_proj", "v_proj", "o_proj") else "mlp"
            prefix = f"base_model.model.model.layers.{layer}.{block}.{module}"
            tensors[f"{prefix}.lora_A.weight"] = torch.zeros(rank, HIDDEN)
            tensors[f"{prefix}.lora_B.weight"] = torch.zeros(HIDDEN, rank)
    return {**tensors, **(extra or {})}


def write_adapter(directory: Path, config: dict | None = None, tensors: dict | None = None, **fields) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    base = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": 4, "lora_alpha": 8,
            "target_modules": ["q_proj", "v_proj"], "bias": "none", "use_dora": False, "modules_to_save": None}
    (directory / "adapter_config.json").write_text(json.dumps(config if config is not None else {**base, **fields}))
    save_file(tensors if tensors is not None else lora_tensors(), directory / "adapter_model.safetensors")
    return directory


def spec(directory: Path, max_rank: int = 16, allowed=ALLOWED):
    return load_lora_spec(directory, "t/a", max_rank, allowed)


def test_plain_lora_is_accepted(tmp_path):
    result = spec(write_adapter(tmp_path, use_rslora=True, layers_to_transform=[0, 1], layers_pattern="layers"))
    assert result.rank == 4 and result.alpha == 8.0 and result.use_rslora
    assert result.target_modules == ("q_proj", "v_proj")


def test_task_type_may_be_absent(tmp_path):
    assert spec(write_adapter(tmp_path, task_type=None)).rank == 4


@pytest.mark.parametrize(
    ("fields", "reason"),
    [
        ({"use_dora": True}, "DoRA"),
        ({"peft_type": "LOHA"}, "peft_type"),
        ({"task_type": "SEQ_CLS"}, "task_type"),
        ({"bias": "lora_only"}, "biases"),
        ({"bias": "all"}, "biases"),
        ({"modules_to_save": ["lm_head"]}, "modules_to_save"),
        ({"lora_bias": True}, "lora_bias"),
        ({"lora_alpha": 0}, "lora_alpha"),
        ({"lora_alpha": -4}, "lora_alpha"),
        ({"r": 32}, "max_lora_rank"),
        ({"rank_pattern": {"q_proj": 64}}, "max_lora_rank"),
        ({"target_modules": ["q_proj", "v_proj", "lm_head"]}, "lm_head"),
        ({"target_modules": "model.layers.0.self_attn.q_proj"}, "does not match"),
        ({"target_modules": "(unclosed"}, "regex"),
        ({"target_modules": None}, "target_modules"),
    ],
)
def test_unservable_configs_are_refused(tmp_path, fields, reason):
    with pytest.raises(InvalidAdapter, match=reason):
        spec(write_adapter(tmp_path, **fields))


def test_regex_target_modules_resolving_to_allowed_names(tmp_path):
    directory = write_adapter(tmp_path, target_modules=r".*\.(q_proj|v_proj)")
    assert spec(directory).target_modules == ("q_proj", "v_proj")
    assert spec(write_adapter(tmp_path / "b", target_modules="all-linear")).target_modules == ("q_proj", "v_proj")
    # A pattern naming a module the weights do not hold still resolves to the stored, allowed modules.
    wide = write_adapter(tmp_path / "c", target_modules=".*(q_proj|v_proj|embed_tokens)")
    assert spec(wide).target_modules == ("q_proj", "v_proj")


def test_stored_tensors_are_the_truth(tmp_path):
    dora = lora_tensors(extra={"base_model.model.model.layers.0.self_attn.q_proj.lora_magnitude_vector": torch.ones(HIDDEN)})
    with pytest.raises(InvalidAdapter, match="unsupported tensor"):
        spec(write_adapter(tmp_path / "dora", tensors=dora))  # DoRA weights under a config that hides it
    with pytest.raises(InvalidAdapter, match="max_lora_rank"):
        spec(write_adapter(tmp_path / "rank", tensors=lora_tensors(rank=32)))  # config says r=4
    with pytest.raises(InvalidAdapter, match="not listed"):
        spec(write_adapter(tmp_path / "extra", tensors=lora_tensors(modules=("q_proj", "v_proj", "k_proj"))))
    with pytest.raises(InvalidAdapter, match="not served here"):
        spec(write_adapter(tmp_path / "narrow"), allowed=("q_proj",))
    with pytest.raises(InvalidAdapter, match="no LoRA weights"):
        spec(write_adapter(tmp_path / "empty", tensors={}))


def test_corrupt_files_are_refused(tmp_path):
    directory = write_adapter(tmp_path)
    (directory / "adapter_model.safetensors").write_bytes(b"\x00" * 4)
    with pytest.raises(InvalidAdapter, match="safetensors"):
        spec(directory)
    (directory / "adapter_config.json").write_text("{not json")
    with pytest.raises(InvalidAdapter, match="not valid JSON"):
        spec(directory)
    (directory / "adapter_config.json").write_text("[1, 2]")
    with pytest.raises(InvalidAdapter, match="JSON object"):
        spec(directory)
