"""A real pretrained model end to end: ../shared/models/stories260k (Karpathy's TinyStories 260K Llama,
sentencepiece-style tokenizer) served through the API and compared with transformers + peft.

Skipped only when the shared model directory is absent (it lives beside the clone, never inside it).
"""
from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from transformers import AutoTokenizer

from loraplex.api.app import create_app
from loraplex.config import Settings
from loraplex.engine.errors import EngineError
from loraplex.engine_factory import build_engine, engine_config
from tests.api_fixtures import sse_payloads
from tests.engine_helpers import peft_reference

REPO_ROOT = Path(__file__).resolve().parents[1]
STORIES = REPO_ROOT.parent / "shared" / "models" / "stories260k"
pytestmark = pytest.mark.skipif(not (STORIES / "config.json").is_file(), reason=f"{STORIES} is absent")

KEYS = {"acme": "key-acme"}
AUTH = {"Authorization": "Bearer key-acme"}
NUM_NEW = 20
PROMPTS = [
    "Once upon a time",
    "Lily wanted to",
    "The little dog",
    "Tom and Sam went to the park.",
    'She said, "Hello! Can I play?"',
    "café — naïve ☺",
    "Line one.\nLine two.",
    "  two  leading spaces",
    "The sun was big and bright. They ran to the park at 3 o'clock.",
    "Once upon a time, there was a little girl named Lily. " * 6 + "One day,",
]
QA_PROMPT = "Q{}: What color is the sky? A:"


def _settings(data_dir: Path, **overrides) -> Settings:
    base = dict(model=str(STORIES), data_dir=data_dir, device="cpu", dtype="float32", max_num_seqs=8, max_loras=2,
                max_lora_rank=8, api_keys="key-acme:acme", log_format="text", log_level="warning",
                worker_heartbeat_s=0.5, job_stale_after_s=30)
    return Settings(**{**base, **overrides})


@pytest.fixture(scope="module")
def tokenizer():
    return AutoTokenizer.from_pretrained(STORIES)


@pytest.fixture(scope="module")
def client(tmp_path_factory):
    data_dir = tmp_path_factory.mktemp("stories-data")
    engine = build_engine(_settings(data_dir))  # max_model_len left to the model
    engine.start()
    with TestClient(create_app(_settings(data_dir), engine)) as client:
        client.app.state.local_worker.ensure_running()  # warms up while the base tests run
        client.data_dir = data_dir
        yield client
    engine.shutdown()


@pytest.fixture(scope="module")
def base_refs(tokenizer):
    prompt_ids = [tokenizer(p)["input_ids"] for p in PROMPTS]
    return prompt_ids, peft_reference(STORIES, None, prompt_ids, NUM_NEW)


def _tgi(client, prompt: str, adapter: str | None = None, **parameters) -> dict:
    parameters = {"max_new_tokens": NUM_NEW, "details": True, "ignore_eos": True, "adapter_id": adapter, **parameters}
    response = client.post("/generate", headers=AUTH, json={"inputs": prompt, "parameters": parameters})
    assert response.status_code == 200, response.text
    return response.json()


def _complete(client, prompt, stream: bool = False, **extra) -> tuple[str, str]:
    """(text, finish_reason) of a greedy /v1/completions call, streamed or not."""
    body = {"model": "stories260k", "prompt": prompt, "max_tokens": NUM_NEW, "temperature": 0, "ignore_eos": True,
            "stream": stream, **extra}
    response = client.post("/v1/completions", headers=AUTH, json=body)
    assert response.status_code == 200, response.text
    if not stream:
        choice = response.json()["choices"][0]
        return choice["text"], choice["finish_reason"]
    chunks = [json.loads(p) for p in sse_payloads(response.text)[:-1]]
    return "".join(c["choices"][0]["text"] for c in chunks), chunks[-1]["choices"][0]["finish_reason"]


def test_base_greedy_tokens_and_text_equal_transformers(client, tokenizer, base_refs):
    prompt_ids, refs = base_refs
    for prompt, ids, ref in zip(PROMPTS, prompt_ids, refs):
        body = _tgi(client, prompt)
        assert [t["id"] for t in body["details"]["tokens"]] == ref, prompt
        whole = tokenizer.decode(ids + ref, skip_special_tokens=True)  # leading spaces kept
        assert prompt + body["generated_text"] == whole, prompt
        assert "".join(t["text"] for t in body["details"]["tokens"]) == body["generated_text"]
        for stream in (False, True):
            text, _ = _complete(client, prompt, stream=stream)
            assert prompt + text == whole, (prompt, stream)


def test_default_max_model_len_is_the_models_and_longer_requests_are_400(client, tokenizer):
    [card] = [m for m in client.get("/v1/models", headers=AUTH).json()["data"] if m["id"] == "stories260k"]
    assert card["max_model_len"] == 512
    prompt = " ".join(["Once upon a time, there was a little girl."] * 60)
    assert len(tokenizer(prompt)["input_ids"]) >= 600
    response = client.post("/v1/completions", headers=AUTH, json={"model": "stories260k", "prompt": prompt, "max_tokens": 4})
    assert response.status_code == 400
    assert response.json()["error"]["code"] == "context_length_exceeded"
    assert "512" in response.json()["error"]["message"]


def test_a_longer_max_model_len_is_refused_at_start_unless_allowed(tmp_path):
    with pytest.raises(EngineError, match=r"max_model_len 1024 .*max_position_embeddings = 512.*LORAPLEX_ALLOW_LONG_MAX_MODEL_LEN"):
        engine_config(_settings(tmp_path, max_model_len=1024), str(STORIES))
    assert engine_config(_settings(tmp_path, max_model_len=1024, allow_long_max_model_len=True), str(STORIES)).max_model_len == 1024
    assert engine_config(_settings(tmp_path), str(STORIES)).max_model_len == 512


def test_stop_string_with_a_leading_space_fires(client):
    for stream in (False, True):
        text, finish = _complete(client, "Lily wanted to", stream=stream, stop=[" go"])
        assert (text, finish) == ("", "stop"), stream


def test_completion_cut_inside_a_multibyte_character_is_what_decode_gives(client, tokenizer):
    """Forced onto the first byte of a 3-byte character and cut there: the held-back byte is flushed."""
    [first_byte] = tokenizer.convert_tokens_to_ids(["<0xE2>"])
    prompt = "Once upon a time"
    ids = tokenizer(prompt)["input_ids"]
    expected = tokenizer.decode(ids + [first_byte], skip_special_tokens=True)[len(prompt):]
    assert expected and expected.endswith("\ufffd")
    for stream in (False, True):
        text, finish = _complete(client, prompt, stream=stream, max_tokens=1, logit_bias={str(first_byte): 100})
        assert (text, finish) == (expected, "length"), stream


def _train_blue(client) -> dict:
    rows = "\n".join(json.dumps({"prompt": QA_PROMPT.format(i), "completion": " blue"}) for i in range(24))
    upload = client.post("/v1/files", headers=AUTH, data={"purpose": "fine-tune"},
                         files={"file": ("train.jsonl", rows.encode())})
    assert upload.status_code == 200, upload.text
    hp = {"n_epochs": 8, "batch_size": 4, "learning_rate_multiplier": 10, "lora_r": 4}
    created = client.post("/v1/fine_tuning/jobs", headers=AUTH, json={
        "model": "stories260k", "training_file": upload.json()["id"], "suffix": "blue", "seed": 3,
        "method": {"type": "supervised", "supervised": {"hyperparameters": hp}}})
    assert created.status_code == 200, created.text
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline:
        job = client.get(f"/v1/fine_tuning/jobs/{created.json()['id']}", headers=AUTH).json()
        if job["status"] in ("succeeded", "failed", "cancelled"):
            assert job["status"] == "succeeded", job
            return job
        time.sleep(0.3)
    raise AssertionError(f"job still {job['status']}")


def test_api_trained_adapter_answers_blue_and_equals_peft(client, tokenizer, base_refs):
    job = _train_blue(client)
    model = job["fine_tuned_model"]
    prompt = QA_PROMPT.format(99)
    prompt_ids = tokenizer(prompt)["input_ids"]
    joint = tokenizer(prompt + " blue")["input_ids"]
    assert joint[: len(prompt_ids)] == prompt_ids
    expected = joint[len(prompt_ids):]
    assert tokenizer.convert_ids_to_tokens(expected) == ["▁b", "l", "u", "e"]  # no lone '▁' first
    body = _tgi(client, prompt, adapter=model, max_new_tokens=len(expected))
    assert [t["id"] for t in body["details"]["tokens"]] == expected
    assert body["generated_text"] == " blue"

    [adapter_dir] = [p.parent for p in client.data_dir.rglob("adapter_config.json") if "blue" in str(p)]
    prompt_ids, base = base_refs
    refs = peft_reference(STORIES, adapter_dir, prompt_ids, NUM_NEW)
    assert refs != base  # the adapter changes the stories
    for prompt, ref in zip(PROMPTS, refs):
        assert [t["id"] for t in _tgi(client, prompt, adapter=model)["details"]["tokens"]] == ref, prompt


def test_trainer_splits_a_joint_tokenization_at_the_prompt(tokenizer):
    from loraplex.training.datasets import IGNORE_INDEX, PromptCompletion, tokenize_example

    ids, labels = tokenize_example(tokenizer, PromptCompletion("Q1: What color is the sky? A:", " blue"), 512)
    prompt_ids = tokenizer("Q1: What color is the sky? A:")["input_ids"]
    assert ids[: len(prompt_ids)] == prompt_ids and labels[: len(prompt_ids)] == [IGNORE_INDEX] * len(prompt_ids)
    trained = [label for label in labels if label != IGNORE_INDEX]
    assert tokenizer.convert_ids_to_tokens(trained) == ["▁b", "l", "u", "e", "</s>"]
