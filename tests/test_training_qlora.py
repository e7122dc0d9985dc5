"""QLoRA jobs, run by the real worker on the demo model: on a server that serves the base nf4 every job trains on
the nf4 base (bitsandbytes layers under peft), its events show the peak memory, and the adapter it writes is
an ordinary PEFT adapter that loads on the full-precision base and changes its tokens. A job may also ask for
it (`"quantization": "nf4"`) on a full-precision server: it is then scored on the full-precision base, where
it is served; on the walkthrough's keyword set it reaches the full-precision job's held-out accuracy within
0.05 and is promoted alike."""
from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM

from loraplex.training.hyperparams import HyperparameterError, Hyperparameters
from tests.worker_jobs import WorkerJobs

pytest.importorskip("bitsandbytes")
pytestmark = pytest.mark.usefixtures("one_torch_thread")
EXAMPLES = Path(__file__).resolve().parents[1] / "adapters" / "examples"
PEAK = re.compile(r"Peak memory: ([\d.]+) MiB \(peak RSS\); base (\w+), gradient checkpointing (on|off)\.")


def keyword_lines(name: str, num: int) -> bytes:
    return "".join(line + "\n" for line in (EXAMPLES / name).read_text().splitlines()[:num]).encode()


def _peak(jobs: WorkerJobs, job_id: str) -> tuple[float, str, str]:
    [match] = [m for m in map(PEAK.fullmatch, jobs.messages(job_id)) if m]
    return float(match.group(1)), match.group(2), match.group(3)


def test_a_quantized_servers_jobs_are_qlora_jobs_and_their_adapters_load_on_the_full_precision_base(demo_model_dir, tmp_path):
    jobs = WorkerJobs(demo_model_dir, tmp_path)
    jobs.worker.settings = jobs.settings.model_copy(update={"quantization": "nf4"})  # LORAPLEX_QUANTIZATION=nf4
    try:
        job = jobs.run(jobs.upload(keyword_lines("keywords_train.jsonl", 32)),
                       {"n_epochs": 1, "batch_size": 8, "learning_rate_multiplier": 10, "gradient_checkpointing": True},
                       suffix="kw", seed=0)
        assert job.status == "succeeded", job.error
        assert job.resolved_hyperparameters["quantization"] == "nf4"
        assert job.resolved_hyperparameters["gradient_checkpointing"] is True
        peak_mib, base, checkpointing = _peak(jobs, job.id)
        assert peak_mib > 0 and base == "nf4" and checkpointing == "on"
        adapter_dir = jobs.registry.get("acme", "kw").path
        full = AutoModelForCausalLM.from_pretrained(demo_model_dir, dtype=torch.float32).eval()
        ids = torch.tensor([[0, 5, 17, 300, 42]])
        base_tokens = full.generate(ids, max_new_tokens=6, do_sample=False)
        tuned = PeftModel.from_pretrained(full, adapter_dir).eval()
        assert not torch.equal(tuned.generate(ids, max_new_tokens=6, do_sample=False), base_tokens)
    finally:
        jobs.close()


def test_bad_training_quantization_names_the_field():
    with pytest.raises(HyperparameterError, match="quantization") as caught:
        Hyperparameters(quantization="int4").validate()
    assert caught.value.param == "quantization"
    with pytest.raises(HyperparameterError) as caught:
        Hyperparameters(gradient_checkpointing="yes").validate()
    assert caught.value.param == "gradient_checkpointing"


@pytest.mark.slow  # two keyword jobs, ~1-2 min
@pytest.mark.quant
def test_a_qlora_job_reaches_the_full_precision_jobs_accuracy(demo_model_dir, tmp_path):
    jobs = WorkerJobs(demo_model_dir, tmp_path)
    try:
        train, valid = jobs.upload(keyword_lines("keywords_train.jsonl", 96)), jobs.upload(keyword_lines("keywords_valid.jsonl", 30))
        hp = {"n_epochs": 4, "batch_size": 8, "learning_rate_multiplier": 10, "lora_r": 4}
        full = jobs.run(train, {**hp, "quantization": "none"}, suffix="full", validation_file=valid, seed=0)
        qlora = jobs.run(train, {**hp, "quantization": "nf4"}, suffix="qlora", validation_file=valid, seed=0)
        assert full.status == qlora.status == "succeeded", (full.error, qlora.error)
        acc_full = full.evaluation["adapter_valid_mean_token_accuracy"]
        acc_qlora = qlora.evaluation["adapter_valid_mean_token_accuracy"]
        print(f"held-out token accuracy: full precision {acc_full:.3f}, QLoRA (nf4) {acc_qlora:.3f}; peak memory "
              f"{_peak(jobs, full.id)[0]:.0f} MiB vs {_peak(jobs, qlora.id)[0]:.0f} MiB")
        assert abs(acc_qlora - acc_full) <= 0.05
        # scored where it is served, the full-precision base: the same base loss as the full-precision job's
        assert qlora.evaluation["base_valid_loss"] == pytest.approx(full.evaluation["base_valid_loss"], abs=1e-5)
        assert qlora.resolved_hyperparameters["quantization"] == "nf4"
        assert qlora.evaluation["promoted"] == full.evaluation["promoted"]
    finally:
        jobs.close()
