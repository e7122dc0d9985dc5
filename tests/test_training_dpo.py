"""DPO on a LoRA, run by the real worker on the demo model. The rejected answers are the base model's own
greedy answers, so the base prefers them; the preferred answer is a fixed short style ("Sure!"). After
training, held-out pairs are ranked right, greedy answers take the preferred style, the job is guarded
and promoted like a supervised one, and the adapter loads in PEFT with the engine's greedy tokens."""
from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from loraplex.training import validate_jsonl
from loraplex.training.dpo import sequence_logps, tokenize_pairs
from tests.engine_helpers import build_llm_engine, greedy, lora, peft_reference, run_to_completion
from tests.worker_jobs import WorkerJobs

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_torch_thread")]  # about 25 s alone, 50 s on a loaded box
THINGS = ["apples", "rivers", "trains", "music", "cats", "winter", "books", "gardens", "stars", "bread", "boats", "tea"]
PREFERRED = "Sure!"


def chat_ids(tokenizer, messages: list[dict]) -> list[int]:
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def preference_rows(model_dir, num: int) -> list[dict]:
    """Pairs whose rejected answer is the base model's first 3 greedy tokens: it gives them a higher summed
    log-probability than the preferred answer (checked in the test), i.e. the base prefers the rejected one."""
    tokenizer, model = AutoTokenizer.from_pretrained(model_dir), AutoModelForCausalLM.from_pretrained(model_dir)
    rows = []
    for i in range(num):
        messages = [{"role": "user", "content": f"Question {i}: what about {THINGS[i % len(THINGS)]}?"}]
        ids = torch.tensor([chat_ids(tokenizer, messages)])
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=3, do_sample=False)
        rejected = tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)
        rows.append({"input": {"messages": messages}, "preferred_output": [{"role": "assistant", "content": PREFERRED}],
                     "non_preferred_output": [{"role": "assistant", "content": rejected}]})
    return rows


def to_jsonl(rows: list[dict]) -> bytes:
    return "".join(json.dumps(row) + "\n" for row in rows).encode()


def test_dpo_adapter_ranks_held_out_pairs_takes_the_preferred_style_and_serves_like_peft(demo_model_dir, tmp_path):
    rows = preference_rows(demo_model_dir, 48)
    train, held_out = rows[:36], rows[36:]
    tokenizer = AutoTokenizer.from_pretrained(demo_model_dir)
    base = AutoModelForCausalLM.from_pretrained(demo_model_dir).eval()
    pairs = tokenize_pairs(tokenizer, validate_jsonl(to_jsonl(held_out)), 512)
    with torch.no_grad():
        logps = sequence_logps(base, list(pairs), tokenizer.pad_token_id or 0, torch.device("cpu"))  # [2P]
    assert bool((logps[: len(pairs)] < logps[len(pairs):]).all())  # the base prefers every rejected answer

    jobs = WorkerJobs(demo_model_dir, tmp_path)
    try:
        job = jobs.run(jobs.upload(to_jsonl(train)), {"n_epochs": 8, "batch_size": 8, "beta": 0.1}, method="dpo",
                       validation_file=jobs.upload(to_jsonl(held_out), "valid.jsonl"), suffix="polite", seed=0)
        evaluation = job.evaluation
        assert job.status == "succeeded" and job.fine_tuned_model == "acme/polite@1", job.error
        assert evaluation["method"] == "dpo" and evaluation["adapter_valid_preference_accuracy"] >= 0.9
        assert evaluation["base_valid_loss"] == pytest.approx(0.6931, abs=1e-3)  # the reference itself: log 2
        assert evaluation["adapter_valid_reward_margin"] > 0 and evaluation["promoted"] and evaluation["gain_ci"][0] > 0
        epochs = [e["data"] for e in jobs.store.events(job.id) if e["data"] and "valid_preference_accuracy" in e["data"]]
        assert [e["epoch"] for e in epochs] == list(range(1, len(epochs) + 1)) and all("valid_reward_margin" in e for e in epochs)

        adapter_dir = jobs.registry.get("acme", "polite").path
        prompts = [chat_ids(tokenizer, row["input"]["messages"]) for row in held_out]
        engine = build_llm_engine(demo_model_dir)
        served = run_to_completion(engine, {f"p{i}": (ids, greedy(6), lora(adapter_dir)) for i, ids in enumerate(prompts)})
        answers = [tokenizer.decode(served[f"p{i}"], skip_special_tokens=True) for i in range(len(prompts))]
        assert sum(answer.startswith(PREFERRED) for answer in answers) >= 0.9 * len(answers), answers
        assert [served[f"p{i}"] for i in range(len(prompts))] == peft_reference(demo_model_dir, adapter_dir, prompts, 6)
    finally:
        jobs.close()
