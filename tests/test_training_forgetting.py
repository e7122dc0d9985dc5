"""Forgetting is part of the promotion decision, on the real TinyStories model (../shared/models/stories260k):
an adapter trained on junk at a high rate beats the base on its own (junk) validation data but
multiplies the general-text perplexity far past `max_forgetting_ratio`, so it is not promoted and the
job says why; the same job with `force_promotion` is promoted."""
from __future__ import annotations

import json
import random

import pytest

from tests.shared_models import shared_model
from tests.worker_jobs import WorkerJobs

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_torch_thread")]
JUNK_HP = {"n_epochs": 4, "batch_size": 8, "learning_rate_multiplier": 10, "early_stopping_patience": 0}


def junk_rows(num: int, seed: int) -> bytes:
    rng = random.Random(seed)
    rows = [{"prompt": rng.choice(["Lily wanted to", "Once upon a time", "The dog", "Tom saw"]),
             "completion": " " + "".join(rng.choice("BE8$#@%&Q9Z") for _ in range(24))} for _ in range(num)]
    return "".join(json.dumps(row) + "\n" for row in rows).encode()


def test_a_job_that_wrecks_general_text_is_not_promoted_unless_forced(tmp_path):
    jobs = WorkerJobs(shared_model("stories260k"), tmp_path, max_lora_rank=8)
    try:
        train, valid = jobs.upload(junk_rows(32, 0)), jobs.upload(junk_rows(8, 1), "valid.jsonl")
        job = jobs.run(train, JUNK_HP, validation_file=valid, suffix="junk", seed=0)
        evaluation = job.evaluation
        assert job.status == "succeeded" and job.fine_tuned_model == "acme/junk@1", job.error
        assert evaluation["gain_ci"][0] > 0  # better than the base on its own validation data...
        assert evaluation["forgetting_ratio"] > evaluation["max_forgetting_ratio"] == 2.0  # ...but forgets
        assert evaluation["promoted"] is False and evaluation["blocked_by"] == ["forgetting"]
        assert "forgets general text" in evaluation["reason"]
        assert any(m.startswith("Evaluation: not promoted: it forgets general text") for m in jobs.messages(job.id))
        assert jobs.registry.list("acme") == []  # stored as a version only: the name serves nothing

        forced = jobs.run(train, JUNK_HP, validation_file=valid, suffix="junk", seed=0, force_promotion=True)
        assert forced.evaluation["promoted"] and forced.evaluation["forced"]
        assert forced.evaluation["forgetting_ratio"] == pytest.approx(evaluation["forgetting_ratio"], rel=1e-4)
        assert jobs.registry.get("acme", "junk").version == 2
        print(f"reference perplexity {evaluation['reference_perplexity_base']:.1f} -> "
              f"{evaluation['reference_perplexity_adapter']:.1f} (x{evaluation['forgetting_ratio']:.1f})")
    finally:
        jobs.close()
