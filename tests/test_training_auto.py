"""Default ("auto") hyperparameters only: a 3-topic classification set of 150 rows reaches held-out
accuracy >= 0.9 on the demo model (the base model scores at most 0.6) in under 3 minutes."""
from __future__ import annotations

import time

import pytest
from transformers import AutoTokenizer

from loraplex.engine.types import LoraRequest, SamplingParams
from loraplex.training import Hyperparameters, train_lora, validate_jsonl
from tests.engine_helpers import build_llm_engine, run_to_completion
from tests.topic_data import to_jsonl, topic_rows

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_torch_thread")]


def test_defaults_learn_a_150_row_topic_task(demo_model_dir, tmp_path):
    rows = topic_rows(150, seed=11)
    seen = {row["prompt"] for row in rows}
    held_out = [row for row in topic_rows(200, seed=12) if row["prompt"] not in seen][:60]  # unseen sentences
    started = time.monotonic()
    result = train_lora(demo_model_dir, validate_jsonl(to_jsonl(rows)), Hyperparameters(), tmp_path / "topics")
    elapsed = time.monotonic() - started

    tokenizer = AutoTokenizer.from_pretrained(demo_model_dir)
    engine = build_llm_engine(demo_model_dir)
    adapter = LoraRequest(key="t/topics@1", path=str(tmp_path / "topics"))
    params = SamplingParams(max_tokens=6, temperature=0.0)
    requests = {f"{kind}-{i}": (tokenizer(row["prompt"])["input_ids"], params, adapter if kind == "lora" else None)
                for i, row in enumerate(held_out) for kind in ("base", "lora")}
    outputs = run_to_completion(engine, requests)

    def accuracy(kind: str) -> float:
        answers = [tokenizer.decode(outputs[f"{kind}-{i}"], skip_special_tokens=True).split() for i in range(len(held_out))]
        return sum(bool(a) and a[0] == row["completion"].strip() for a, row in zip(answers, held_out)) / len(held_out)

    hp = result.hyperparameters
    print(f"auto: {hp.n_epochs} epochs, lr {hp.learning_rate:.1e}, {result.num_steps} steps, {elapsed:.0f}s; "
          f"held-out accuracy base {accuracy('base'):.2f} -> adapter {accuracy('lora'):.2f}")
    assert accuracy("base") <= 0.6 and accuracy("lora") >= 0.9
    assert elapsed < 180
