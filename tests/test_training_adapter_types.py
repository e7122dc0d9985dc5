"""Fine-tuning jobs of every adapter type (`hyperparameters.adapter_type`): a DoRA and a prompt-tuning run on
the README's keyword example set write an adapter that the registry's validator accepts, that plain PEFT
loads, and that beats the base model on the held-out set, measured by transformers + PEFT themselves."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from loraplex.engine.model import LORA_MODULES
from loraplex.registry.adapter_kinds import ALL_KINDS, ServedModel, check_adapter
from loraplex.registry.safetensors_header import read_safetensors_header_file
from loraplex.registry.validation import model_dims_from_hf_config
from loraplex.training import HyperparameterError, Hyperparameters, train_lora, validate_jsonl
from loraplex.training.datasets import tokenize_dataset
from loraplex.training.promotion import evaluate_result

EXAMPLES = Path(__file__).resolve().parents[1] / "adapters" / "examples"
MODULES = ("v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")  # as the LoRA keyword tests train
KINDS = [("dora", {}, "LORA"), ("prompt_tuning", {"num_virtual_tokens": 8}, "PROMPT_TUNING")]

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def keywords():
    return (validate_jsonl((EXAMPLES / "keywords_train.jsonl").read_bytes()),
            validate_jsonl((EXAMPLES / "keywords_valid.jsonl").read_bytes()))


def _hf_valid_loss(model, tokenizer, valid) -> float:
    """Mean loss over the held-out examples as transformers + PEFT compute it (`labels=`), one at a time."""
    examples = tokenize_dataset(tokenizer, valid, 256).examples
    with torch.no_grad():
        losses = [model(input_ids=torch.tensor([ids]), labels=torch.tensor([labels])).loss.item()
                  for ids, labels in examples]
    return sum(losses) / len(losses)


@pytest.mark.parametrize(("adapter_type", "extra", "peft_type"), KINDS, ids=[kind for kind, _, _ in KINDS])
def test_a_job_of_each_type_writes_a_valid_adapter_that_beats_the_base(demo_model_dir, keywords, tmp_path,
                                                                       adapter_type, extra, peft_type):
    from peft import PeftModel

    train, valid = keywords
    hp = Hyperparameters(n_epochs=2, batch_size=8, learning_rate_multiplier=10, target_modules=MODULES, seed=0,
                         adapter_type=adapter_type, **extra)
    out = tmp_path / adapter_type
    result = train_lora(demo_model_dir, train, hp, out, validation=valid)
    assert result.hyperparameters.adapter_type == adapter_type
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["peft_type"] == peft_type and config.get("use_dora", False) == (adapter_type == "dora")
    dims = model_dims_from_hf_config(AutoConfig.from_pretrained(demo_model_dir).to_dict())
    served = ServedModel(frozenset(LORA_MODULES), max_lora_rank=64, dims=dims, kinds=frozenset(ALL_KINDS))
    shapes = {name: span.shape for name, span in read_safetensors_header_file(out / "adapter_model.safetensors").items()}
    assert check_adapter(config, shapes, served).kind == adapter_type  # the registry's one validator
    evaluation = evaluate_result(result, force=False, incumbent_id=None, parent_model=None)
    assert evaluation["promoted"], evaluation["reason"]  # promoted as a LoRA job is: it beats the base

    tokenizer = AutoTokenizer.from_pretrained(demo_model_dir)
    base_loss = _hf_valid_loss(AutoModelForCausalLM.from_pretrained(demo_model_dir).eval(), tokenizer, valid)
    peft_model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(demo_model_dir), out).eval()
    adapter_loss = _hf_valid_loss(peft_model, tokenizer, valid)
    print(f"\n{adapter_type}: validation loss {adapter_loss:.3f} vs base {base_loss:.3f} (ours {result.valid_loss:.3f})")
    assert adapter_loss < base_loss - 1.0
    assert adapter_loss == pytest.approx(result.valid_loss, rel=0.05)  # our evaluation reads it as PEFT does


@pytest.mark.parametrize(("fields", "param"), [
    ({"adapter_type": "ia3"}, "adapter_type"), ({"adapter_type": 1}, "adapter_type"),
    ({"num_virtual_tokens": 8}, "num_virtual_tokens"),  # LoRA has no virtual tokens
    ({"adapter_type": "prompt_tuning", "num_virtual_tokens": 0}, "num_virtual_tokens"),
    ({"adapter_type": "prompt_tuning", "num_virtual_tokens": 10_000}, "num_virtual_tokens"),
])
def test_bad_adapter_types_name_the_field(fields, param):
    with pytest.raises(HyperparameterError) as refused:
        Hyperparameters.from_request(fields, seed=0).resolve(100)
    assert refused.value.param == param


def test_the_resolved_type_and_virtual_tokens_are_reported():
    resolved = Hyperparameters.from_request({"adapter_type": "prompt_tuning"}, seed=0).resolve(100)
    assert (resolved.adapter_type, resolved.num_virtual_tokens) == ("prompt_tuning", 8)
    assert Hyperparameters.from_request({}, seed=0).resolve(100).adapter_type == "lora"


def test_an_incumbent_of_another_type_is_scored_too(demo_model_dir, keywords, make_adapter, tmp_path):
    """A prompt-tuning job under a name that serves a LoRA version: the LoRA incumbent cannot sit in the same
    PEFT model, so it is scored on its own copy of the base; promotion then compares the two as usual."""
    train, valid = keywords
    incumbent = make_adapter("acme/incumbent-lora", r=4)
    hp = Hyperparameters(n_epochs=1, batch_size=8, learning_rate_multiplier=10, seed=0, adapter_type="prompt_tuning")
    result = train_lora(demo_model_dir, train, hp, tmp_path / "pt", validation=valid, incumbent=incumbent)
    evaluation = evaluate_result(result, force=False, incumbent_id="acme/incumbent-lora@1", parent_model=None)
    assert result.measurements.incumbent is not None and evaluation["incumbent_valid_loss"] > 0
