"""train_lora end to end on the demo model: a learnable task really gets learned, the adapter it writes is
served by the engine exactly as PEFT runs it, runs are reproducible, and cancelling is prompt."""
from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
from transformers import AutoTokenizer

from loraplex.engine.model import LORA_MODULES
from loraplex.engine.types import LoraRequest, SamplingParams
from loraplex.registry.adapter_config import load_lora_spec
from loraplex.training import Hyperparameters, TrainingCancelled, train_lora, validate_jsonl
from tests.engine_helpers import build_llm_engine, greedy, peft_reference, run_to_completion

EXAMPLES = Path(__file__).resolve().parents[1] / "adapters" / "examples"
# Tuned on the demo model (see adapters/examples/README.md): 250 steps, held-out accuracy 0.92-1.00 on seeds 0-5.
KEYWORD_HP = Hyperparameters(
    n_epochs=10,
    batch_size=8,
    learning_rate_multiplier=10,
    target_modules=("v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"),
    seed=0,
)


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def keywords():
    train = validate_jsonl((EXAMPLES / "keywords_train.jsonl").read_bytes())
    valid = validate_jsonl((EXAMPLES / "keywords_valid.jsonl").read_bytes())
    return train, valid


@pytest.fixture(scope="module")
def tokenizer(demo_model_dir):
    return AutoTokenizer.from_pretrained(demo_model_dir)


def small_dataset(num_examples: int = 8):
    lines = [{"prompt": f"Count {i}:", "completion": f" {i % 3}"} for i in range(num_examples)]
    return validate_jsonl("".join(json.dumps(line) + "\n" for line in lines).encode())


def test_short_run_writes_a_servable_adapter_reproducibly(demo_model_dir, tmp_path):
    hp = Hyperparameters(n_epochs=3, batch_size=4, lora_r=4, target_modules=("q_proj", "down_proj"), seed=7)
    events = []
    result = train_lora(demo_model_dir, small_dataset(), hp, tmp_path / "a", on_event=events.append,
                        validation=small_dataset(4), checkpoint_every_epochs=1)
    assert result.num_steps == 6 and [e.step for e in events] == list(range(1, 7))
    assert [e.epoch for e in events] == [1, 1, 2, 2, 3, 3] and {e.num_steps_total for e in events} == {6}
    assert result.valid_loss is not None and 0 <= result.valid_token_accuracy <= 1
    assert result.train_tokens > 0 and result.final_loss == pytest.approx((events[-2].loss + events[-1].loss) / 2)
    assert sorted(p.name for p in (tmp_path / "a").iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]
    assert result.checkpoints == (tmp_path / "a.ckpt" / "epoch-1", tmp_path / "a.ckpt" / "epoch-2")
    assert all((ckpt / "adapter_model.safetensors").is_file() for ckpt in result.checkpoints)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no staging leftovers

    spec = load_lora_spec(tmp_path / "a", "test/a", max_lora_rank=16, allowed_modules=LORA_MODULES)
    assert (spec.rank, spec.alpha, spec.target_modules) == (4, 8.0, ("down_proj", "q_proj"))

    again = train_lora(demo_model_dir, small_dataset(), hp, tmp_path / "b")
    assert again.final_loss == result.final_loss
    weights = [(tmp_path / name / "adapter_model.safetensors").read_bytes() for name in ("a", "b")]
    assert weights[0] == weights[1]
    with pytest.raises(FileExistsError):
        train_lora(demo_model_dir, small_dataset(), hp, tmp_path / "a")


def test_cancel_stops_within_two_seconds_and_writes_nothing(demo_model_dir, tmp_path):
    stop_requested_at = []

    def on_event(event):
        if event.step == 3:
            stop_requested_at.append(time.monotonic())

    with pytest.raises(TrainingCancelled) as info:
        train_lora(demo_model_dir, small_dataset(64), Hyperparameters(n_epochs=50, batch_size=8), tmp_path / "out",
                   on_event=on_event, should_stop=lambda: bool(stop_requested_at))
    assert time.monotonic() - stop_requested_at[0] < 2.0
    assert info.value.step == 3
    assert list(tmp_path.iterdir()) == []


def label_of(tokenizer, token_ids: list[int]) -> str:
    words = tokenizer.decode(token_ids, skip_special_tokens=True).split()
    return words[0] if words else ""


def test_keyword_adapter_learns_held_out_labels_and_serves_like_peft(demo_model_dir, keywords, tokenizer, tmp_path):
    train, valid = keywords
    adapter_dir = tmp_path / "ft" / "keywords"
    result = train_lora(demo_model_dir, train, KEYWORD_HP, adapter_dir, validation=valid)
    assert result.valid_token_accuracy > 0.9

    engine = build_llm_engine(demo_model_dir)
    adapter = LoraRequest(key="ft/keywords@1", path=str(adapter_dir))
    until_eos = SamplingParams(max_tokens=6, temperature=0.0)
    prompts = [tokenizer(example.prompt)["input_ids"] for example in valid.examples]
    requests = {}
    for i, ids in enumerate(prompts):  # base and adapter rows batched together
        requests[f"base-{i}"] = (ids, until_eos, None)
        requests[f"lora-{i}"] = (ids, until_eos, adapter)
    outputs = run_to_completion(engine, requests)
    labels = [example.completion.strip() for example in valid.examples]

    def accuracy(prefix: str) -> float:
        hits = [label_of(tokenizer, outputs[f"{prefix}-{i}"]) == label for i, label in enumerate(labels)]
        return sum(hits) / len(hits)

    base_accuracy, adapter_accuracy = accuracy("base"), accuracy("lora")
    print(f"train {result.elapsed_s:.1f}s, {result.num_steps} steps; held-out accuracy base "
          f"{base_accuracy:.2f} -> adapter {adapter_accuracy:.2f}")
    assert base_accuracy <= 0.6
    assert adapter_accuracy >= 0.9

    # The directory as written loads in PEFT and gives the engine's greedy tokens.
    some = prompts[:6]
    expected = peft_reference(demo_model_dir, adapter_dir, some, max_tokens=6)
    served = run_to_completion(engine, {f"p{i}": (ids, greedy(6), adapter) for i, ids in enumerate(some)})
    assert [served[f"p{i}"] for i in range(len(some))] == expected
