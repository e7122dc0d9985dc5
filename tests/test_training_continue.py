"""Continued training of a served adapter, run by the real worker on the demo model: the child starts
from the parent's weights (its step-0 validation loss is the parent's), learns the new task, is
published as the next version of the same name, and replay of the parent's training data measurably
reduces forgetting of the parent's task (same seeds, with vs without)."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.topic_data import to_jsonl, topic_rows
from tests.worker_jobs import WorkerJobs

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_torch_thread")]
EXAMPLES = Path(__file__).resolve().parents[1] / "adapters" / "examples"
PARENT_HP = {"n_epochs": 4, "batch_size": 8, "learning_rate_multiplier": 10, "lora_r": 4}  # the child's default is 8
CHILD_HP = {"n_epochs": 3, "batch_size": 8, "learning_rate_multiplier": 10}


def keyword_lines(path: Path, num: int) -> bytes:
    return "".join(line + "\n" for line in path.read_text().splitlines()[:num]).encode()


def test_a_child_starts_from_its_parent_learns_new_data_and_replay_reduces_forgetting(demo_model_dir, tmp_path):
    jobs = WorkerJobs(demo_model_dir, tmp_path)
    try:
        parent = jobs.run(jobs.upload(keyword_lines(EXAMPLES / "keywords_train.jsonl", 96)), PARENT_HP, suffix="kw",
                          validation_file=jobs.upload(keyword_lines(EXAMPLES / "keywords_valid.jsonl", 30)), seed=0)
        assert parent.fine_tuned_model == "acme/kw@1" and parent.evaluation["promoted"], parent.evaluation
        rows = topic_rows(90, seed=3)
        new_train, new_valid = jobs.upload(to_jsonl(rows[:60])), jobs.upload(to_jsonl(rows[60:]), "valid.jsonl")

        plain = jobs.run(new_train, {**CHILD_HP, "replay_fraction": 0}, validation_file=new_valid,
                         parent_model="acme/kw@1", seed=1)
        evaluation = plain.evaluation
        assert plain.status == "succeeded" and plain.fine_tuned_model == "acme/kw@2", plain.error
        # step 0 is the parent: on the parent's validation data, and as the incumbent on the new data
        assert evaluation["parent_valid_loss_before"] == pytest.approx(parent.evaluation["adapter_valid_loss"], abs=1e-4)
        assert evaluation["initial_valid_loss"] == pytest.approx(evaluation["incumbent_valid_loss"], abs=1e-4)
        assert evaluation["incumbent"] == "acme/kw@1" and evaluation["parent_model"] == "acme/kw@1"
        assert evaluation["adapter_valid_loss"] < evaluation["initial_valid_loss"] - 0.5  # learned the new task
        assert evaluation["promoted"] and jobs.registry.get("acme", "kw").version == 2  # acme/kw serves @2
        assert evaluation["replay_fraction"] == 0 and evaluation["num_replayed_per_epoch"] == 0
        parent_config = json.loads((jobs.registry.get("acme", "kw", 1).path / "adapter_config.json").read_text())
        child_config = json.loads((jobs.registry.get("acme", "kw", 2).path / "adapter_config.json").read_text())
        assert (child_config["r"], sorted(child_config["target_modules"])) == (parent_config["r"], sorted(parent_config["target_modules"]))
        assert plain.resolved_hyperparameters["lora_r"] == 4  # the job reports the shape it trained with

        replayed = jobs.run(new_train, {**CHILD_HP, "replay_fraction": 0.5}, validation_file=new_valid,
                            parent_model="acme/kw@1", seed=1)
        with_replay = replayed.evaluation
        assert with_replay["replay_file"] == parent.training_file and with_replay["num_replayed_per_epoch"] == 30
        assert with_replay["parent_valid_loss_before"] == pytest.approx(evaluation["parent_valid_loss_before"], abs=1e-6)
        print(f"forgetting of the parent's task (validation loss increase): without replay "
              f"{evaluation['parent_forgetting']:+.3f}, with replay {with_replay['parent_forgetting']:+.3f}")
        assert evaluation["parent_forgetting"] > 0.1
        assert with_replay["parent_forgetting"] < 0.5 * evaluation["parent_forgetting"]
        assert any(m.startswith("Forgetting: the parent's validation loss went") for m in jobs.messages(replayed.id))
    finally:
        jobs.close()
