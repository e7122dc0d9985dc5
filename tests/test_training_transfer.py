"""Transfer-learning jobs on the demo model: early stopping keeps the best epoch (on disk too), the
negative-transfer guard keeps a worse adapter off its name, and the layer/learning-rate/decay choices
do what they say, with the adapters they write served exactly as PEFT runs them."""
from __future__ import annotations

import json
import random
import shutil
from pathlib import Path

import pytest
import torch
from peft import PeftModel, get_peft_model
from safetensors import safe_open
from transformers import AutoModelForCausalLM, AutoTokenizer

from loraplex.config import Settings
from loraplex.training import Hyperparameters, train_lora, validate_jsonl
from loraplex.training.datasets import tokenize_dataset
from loraplex.training.evaluation import score
from loraplex.training.files import FileStore
from loraplex.training.hyperparams import MODULE_PRESETS
from loraplex.training.jobs import SUCCEEDED, JobRecord, new_job_id
from loraplex.training.local_jobs import LocalJobStore
from loraplex.training.promotion import evaluate_result
from loraplex.training.transfer import layer_of, lora_config, param_groups
from loraplex.training.worker import RegistryPublisher, Worker
from tests.engine_helpers import build_llm_engine, greedy, lora, peft_reference, run_to_completion

EXAMPLES = Path(__file__).resolve().parents[1] / "adapters" / "examples"
KEYWORD_HP = dict(batch_size=8, learning_rate_multiplier=10, seed=0,
                  target_modules=("v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"))
WORDS = [" positive", " negative", " good", " bad"]


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def random_labels(num_examples: int, first_item: int, seed: int):
    """Labels with no relation to the prompt: the model can only memorise them, so validation loss
    stops improving once the format is learned (the overfitting early stopping must catch)."""
    rng = random.Random(seed)
    lines = [{"prompt": f"Review: item {i} is here.\nSentiment:", "completion": rng.choice(WORDS)}
             for i in range(first_item, first_item + num_examples)]
    return validate_jsonl("".join(json.dumps(line) + "\n" for line in lines).encode())


def valid_loss_on_disk(model_dir: Path, adapter_dir: Path, dataset) -> float:
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32), adapter_dir)
    data = tokenize_dataset(tokenizer, dataset, 512)
    return score(model, data, tokenizer.pad_token_id or 0, torch.device("cpu")).loss


def test_early_stopping_stops_and_keeps_the_best_epoch(demo_model_dir, tmp_path):
    train, valid = random_labels(48, 0, seed=0), random_labels(24, 100, seed=1)
    hp = Hyperparameters(n_epochs=30, early_stopping_patience=2, **{**KEYWORD_HP, "target_modules": MODULE_PRESETS["all"]})
    seen = []
    result = train_lora(demo_model_dir, train, hp, tmp_path / "a", validation=valid, on_epoch=seen.append)

    assert seen == list(result.epochs) and result.validation_source == "file"
    best = min(result.epochs, key=lambda epoch: epoch.valid_loss)
    assert result.stopped_early and len(result.epochs) < 30
    assert result.best_epoch == best.epoch and len(result.epochs) == best.epoch + 2  # patience 2, then stop
    assert result.best_step == best.step and result.num_steps == result.epochs[-1].step
    assert result.epochs[-1].valid_loss > best.valid_loss  # the last epoch is not the one kept
    assert result.valid_loss == pytest.approx(best.valid_loss, rel=1e-6)
    assert valid_loss_on_disk(demo_model_dir, tmp_path / "a", valid) == pytest.approx(best.valid_loss, rel=1e-5)


def test_without_a_validation_file_a_share_is_held_out(demo_model_dir, tmp_path):
    hp = Hyperparameters(n_epochs=1, batch_size=8, validation_split=0.25, seed=3)
    result = train_lora(demo_model_dir, random_labels(40, 0, seed=2), hp, tmp_path / "a")
    assert (result.validation_source, result.num_valid_examples, result.num_examples) == ("split", 10, 30)
    assert result.measurements.base_valid_loss is not None and len(result.epochs) == 1
    none = train_lora(demo_model_dir, random_labels(8, 0, seed=2), Hyperparameters(n_epochs=1), tmp_path / "b")
    assert (none.validation_source, none.epochs, none.measurements.base) == ("none", (), None)  # too few to split
    assert evaluate_result(none, force=False)["promoted"] and "without a comparison" in evaluate_result(none, False)["reason"]


def test_top_k_layers_rslora_attention_only_adapter_serves_like_peft(demo_model_dir, tmp_path):
    hp = Hyperparameters(n_epochs=2, batch_size=4, learning_rate_multiplier=10, lora_r=4, top_k_layers=2,
                         use_rslora=True, target_modules=MODULE_PRESETS["attention"], validation_split=0, seed=5)
    train_lora(demo_model_dir, random_labels(16, 0, seed=4), hp, tmp_path / "top2")
    with safe_open(tmp_path / "top2" / "adapter_model.safetensors", "pt") as weights:
        keys = list(weights.keys())
    assert {layer_of(key) for key in keys} == {2, 3}  # the demo model has layers 0..3
    assert {key.split(".")[-3] for key in keys} == {"q_proj", "k_proj", "v_proj", "o_proj"}
    config = json.loads((tmp_path / "top2" / "adapter_config.json").read_text())
    assert config["layers_to_transform"] == [2, 3] and config["use_rslora"] is True

    tokenizer = AutoTokenizer.from_pretrained(demo_model_dir)
    prompts = [tokenizer(f"Review: item {i} is here.\nSentiment:")["input_ids"] for i in (1, 7, 30)]
    engine = build_llm_engine(demo_model_dir)
    requests = {f"{kind}-{i}": (ids, greedy(8), lora(tmp_path / "top2" if kind == "lora" else None))
                for i, ids in enumerate(prompts) for kind in ("lora", "base")}
    served = run_to_completion(engine, requests)
    reference = peft_reference(demo_model_dir, tmp_path / "top2", prompts, 8)
    assert [served[f"lora-{i}"] for i in range(len(prompts))] == reference
    assert any(served[f"lora-{i}"] != served[f"base-{i}"] for i in range(len(prompts)))


def lora_b_norm_by_layer(adapter_dir: Path) -> dict[int, float]:
    norms: dict[int, float] = {}
    with safe_open(adapter_dir / "adapter_model.safetensors", "pt") as weights:
        for key in weights.keys():
            if "lora_B" in key:
                norms[layer_of(key)] = norms.get(layer_of(key), 0.0) + float(weights.get_tensor(key).norm())
    return norms


def test_layer_lr_decay_and_weight_decay_shape_the_update(demo_model_dir, tmp_path):
    assert Hyperparameters(layers_to_transform=[2, 0, 2]).resolve(10, num_layers=4).layers_to_transform == (0, 2)
    assert Hyperparameters(top_k_layers=3).resolve(10, num_layers=4).layers_to_transform == (1, 2, 3)
    hp = Hyperparameters(layer_lr_decay=0.5, weight_decay=0.1).resolve(10, num_layers=4)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(demo_model_dir), lora_config(hp))
    scales = {group["layer"]: group["lr_scale"] for group in param_groups(model, hp, num_layers=4)}
    assert scales == {0: 0.125, 1: 0.25, 2: 0.5, 3: 1.0}  # eta_l = eta_0 * 0.5 ** (3 - l)

    data = random_labels(24, 0, seed=6)
    common = dict(n_epochs=2, batch_size=8, learning_rate_multiplier=10, validation_split=0, seed=1)
    runs = {name: tmp_path / name for name in ("plain", "llrd", "decay")}
    train_lora(demo_model_dir, data, Hyperparameters(**common), runs["plain"])
    train_lora(demo_model_dir, data, Hyperparameters(**common, layer_lr_decay=0.1), runs["llrd"])
    train_lora(demo_model_dir, data, Hyperparameters(**common, weight_decay=1.0), runs["decay"])
    plain, llrd, decay = (lora_b_norm_by_layer(path) for path in runs.values())
    # B starts at zero, so its norm is the update: layer 0 trains at 1/1000 of the top layer's rate
    assert llrd[0] / llrd[3] < 0.05 < plain[0] / plain[3]
    assert sum(decay.values()) < sum(plain.values())  # decay pulls B·A, hence W', towards the pre-trained W


@pytest.fixture(scope="module")
def skilled_base(demo_model_dir, tmp_path_factory) -> tuple[Path, Path]:
    """A base model that already does the keyword task: the demo model with a keyword adapter merged in.
    Returns (that model dir, the adapter). Training the keyword adapter also shows a positive gain."""
    root = tmp_path_factory.mktemp("skilled")
    train = validate_jsonl((EXAMPLES / "keywords_train.jsonl").read_bytes())
    valid = validate_jsonl((EXAMPLES / "keywords_valid.jsonl").read_bytes())
    result = train_lora(demo_model_dir, train, Hyperparameters(n_epochs=5, **KEYWORD_HP), root / "kw", validation=valid)
    evaluation = evaluate_result(result, force=False)
    assert evaluation["gain"] > 1.0 and evaluation["promoted"], evaluation
    assert evaluation["adapter_valid_mean_token_accuracy"] > evaluation["base_valid_mean_token_accuracy"] + 0.5
    merged = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(demo_model_dir), root / "kw").merge_and_unload()
    shutil.copytree(demo_model_dir, root / "model", ignore=shutil.ignore_patterns("*.safetensors"))
    merged.save_pretrained(root / "model")
    return root / "model", root / "kw"


def shuffled_keywords() -> bytes:
    """The keyword set with its labels permuted across examples: the prompts no longer predict them."""
    lines = [json.loads(line) for line in (EXAMPLES / "keywords_train.jsonl").read_text().splitlines()]
    labels = [line["completion"] for line in lines]
    random.Random(0).shuffle(labels)
    return "".join(json.dumps({"prompt": line["prompt"], "completion": label}) + "\n" for line, label in zip(lines, labels)).encode()


def test_negative_transfer_guard_keeps_a_worse_adapter_off_its_name(skilled_base, tmp_path):
    model_dir, keyword_adapter = skilled_base
    settings = Settings(model=str(model_dir), data_dir=tmp_path, device="cpu", dtype="float32", max_lora_rank=16,
                        log_format="text")
    files = FileStore(tmp_path, 1 << 20, 10_000)
    shuffled = files.create("acme", "shuffled.jsonl", "fine-tune", shuffled_keywords())
    clean = files.create("acme", "valid.jsonl", "fine-tune", (EXAMPLES / "keywords_valid.jsonl").read_bytes())
    store, publisher = LocalJobStore(tmp_path), RegistryPublisher(settings, model_dir)
    worker = Worker(settings, store, files, model_dir, publisher)
    registry = publisher.runtime.registry.store
    try:
        first = publisher(job_record(shuffled.id, clean.id), keyword_adapter)
        assert first == "acme/kw@1" and registry.get("acme", "kw").version == 1

        job = run(worker, store, job_record(shuffled.id, clean.id, hyperparameters={"n_epochs": 2, **KEYWORD_HP}))
        assert job.status == SUCCEEDED and job.fine_tuned_model == "acme/kw@2"
        evaluation = job.evaluation
        assert evaluation["gain"] <= 0 and evaluation["promoted"] is False and evaluation["forced"] is False
        assert evaluation["adapter_valid_loss"] > evaluation["base_valid_loss"]
        assert "not promoted" in evaluation["reason"]
        assert registry.get("acme", "kw").version == 1  # the name still serves the good adapter
        assert registry.get("acme", "kw", 2).version == 2  # the new one is there, by its version
        messages = [event["message"] for event in store.events(job.id)]
        assert any(message.startswith("Evaluation: not promoted") for message in messages)

        forced = run(worker, store, job_record(shuffled.id, clean.id, force_promotion=True,
                                               hyperparameters={"n_epochs": 1, **KEYWORD_HP}))
        assert forced.evaluation["promoted"] and forced.evaluation["forced"] and forced.evaluation["gain"] <= 0
        assert forced.fine_tuned_model == "acme/kw@3" and registry.get("acme", "kw").version == 3
    finally:
        publisher.close()
        store.close()


def job_record(training_file: str, validation_file: str, **fields) -> JobRecord:
    fields = {"hyperparameters": {"n_epochs": 1}, **fields}
    return JobRecord(id=new_job_id(), tenant="acme", model="demo", created_at=0, order=0, training_file=training_file,
                     validation_file=validation_file, suffix="kw", **fields)


def run(worker: Worker, store: LocalJobStore, job: JobRecord) -> JobRecord:
    store.create(job, max_active_per_tenant=5)
    worker.run_job(store.claim(worker.worker_id))
    return store.get(job.id)
