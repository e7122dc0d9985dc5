"""Fine-tuning jobs through real HTTP: the adapter a job trains serves at once, cancel, limits, restarts,
a worker killed mid-job, and the `openai` SDK. Training always runs in a worker process, never here."""
from __future__ import annotations

import io
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import openai
import pytest
from fastapi.testclient import TestClient

from loraplex import cli
from loraplex.api.app import create_app
from loraplex.config import Settings
from loraplex.engine_factory import build_engine
from loraplex.registry.adapter_kinds import SERVED_KINDS
from loraplex.training.supervisor import settings_env
from tests.shared_models import shared_model

KEYS = {"acme": "key-acme", "globex": "key-globex", "admin": "key-admin"}
REPO_ROOT = Path(__file__).resolve().parents[1]
GREEDY = {"max_tokens": 8, "temperature": 0, "ignore_eos": True}
TINY = "\n".join(json.dumps({"prompt": f"Q{i}: what color?", "completion": " zebra zebra zebra"}) for i in range(16)).encode()
LONG = (REPO_ROOT / "adapters/examples/keywords_train.jsonl").read_bytes()  # 200 examples: slow at batch 1
SLOW_HP = {"n_epochs": 50, "batch_size": 1}


def auth(who: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {KEYS[who]}"}


def make_settings(data_dir: Path, **overrides) -> Settings:
    base = dict(
        model="demo", data_dir=data_dir, device="cpu", dtype="float32", max_model_len=512, max_num_seqs=8,
        max_loras=2, max_lora_rank=8, api_keys=f"{KEYS['acme']}:acme,{KEYS['globex']}:globex", admin_key=KEYS["admin"],
        worker_heartbeat_s=0.5, job_stale_after_s=30, max_train_steps=100_000, log_format="text", log_level="warning",
    )
    return Settings(**{**base, **overrides})


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("ft-data")


@pytest.fixture(scope="module")
def engine(data_dir):
    engine = build_engine(make_settings(data_dir))
    engine.start()
    yield engine
    engine.shutdown()


@pytest.fixture(scope="module")
def client(data_dir, engine):
    """The embedded default: the app starts one local `loraplex worker` process with the first job."""
    with TestClient(create_app(make_settings(data_dir), engine)) as client:
        client.app.state.local_worker.ensure_running()  # what the first job does; started early, it warms up meanwhile
        yield client


def upload(client, who: str, data: bytes, name: str = "train.jsonl") -> str:
    response = client.post("/v1/files", headers=auth(who), data={"purpose": "fine-tune"}, files={"file": (name, data)})
    assert response.status_code == 200, response.text
    return response.json()["id"]


def create_job(client, who: str, file_id: str, hyperparameters: dict | None = None, **extra):
    method = {"type": "supervised", "supervised": {"hyperparameters": hyperparameters or {}}}
    return client.post("/v1/fine_tuning/jobs", headers=auth(who),
                       json={"model": "demo", "training_file": file_id, "method": method, **extra})


def wait_for(client, who: str, job_id: str, statuses: tuple[str, ...], timeout_s: float = 120) -> dict:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        job = client.get(f"/v1/fine_tuning/jobs/{job_id}", headers=auth(who)).json()
        if job["status"] in statuses:
            return job
        time.sleep(0.2)
    raise AssertionError(f"job {job_id} still {job['status']} after {timeout_s}s: {job}")


def complete(client, who: str, model: str, prompt: str):
    return client.post("/v1/completions", headers=auth(who), json={"model": model, "prompt": prompt, **GREEDY})


def test_finished_job_serves_its_adapter_without_restart(client):
    file_id = upload(client, "acme", TINY)
    hp = {"n_epochs": 4, "batch_size": 4, "learning_rate_multiplier": 10, "lora_r": 4}
    created = create_job(client, "acme", file_id, hp, suffix="zebra", seed=7)
    assert created.status_code == 200, created.text
    job = created.json()
    assert job["object"] == "fine_tuning.job" and job["status"] == "queued" and job["id"].startswith("ftjob-")
    assert job["hyperparameters"]["lora_r"] == 4 and job["seed"] == 7

    done = wait_for(client, "acme", job["id"], ("succeeded", "failed", "cancelled"))
    assert done["status"] == "succeeded", done
    assert done["fine_tuned_model"] == "acme/zebra@1" and done["trained_tokens"] > 0 and done["finished_at"]
    assert done["hyperparameters"]["n_epochs"] == 4 and done["hyperparameters"]["batch_size"] == 4

    tuned = complete(client, "acme", done["fine_tuned_model"], "Q3: what color?")
    base = complete(client, "acme", "demo", "Q3: what color?")
    assert tuned.status_code == 200, tuned.text
    assert tuned.json()["choices"][0]["text"] != base.json()["choices"][0]["text"]
    assert complete(client, "globex", done["fine_tuned_model"], "Q3").status_code == 404  # the tenant's own

    # trained in another process: the API process only enqueued
    worker_id = client.app.state.job_store.get(job["id"]).worker_id
    assert worker_id and int(worker_id.rsplit(":", 1)[1]) != os.getpid()

    events = client.get(f"/v1/fine_tuning/jobs/{job['id']}/events", headers=auth("acme"), params={"limit": 100}).json()
    metrics = [e["data"] for e in events["data"] if e["type"] == "metrics"]
    assert metrics and metrics[0]["step"] == metrics[0]["total_steps"] == 16  # newest first
    assert all("train_loss" in m and 0 < m["progress"] <= 1 for m in metrics)
    assert any(e["message"].startswith("Validation: 2 of the 16 training examples held out") for e in events["data"])
    first_page = client.get(f"/v1/fine_tuning/jobs/{job['id']}/events", headers=auth("acme"), params={"limit": 2}).json()
    after = client.get(f"/v1/fine_tuning/jobs/{job['id']}/events", headers=auth("acme"),
                       params={"limit": 2, "after": first_page["data"][-1]["id"]}).json()
    assert first_page["has_more"] and [e["id"] for e in after["data"]] == [e["id"] for e in events["data"][2:4]]
    checkpoints = client.get(f"/v1/fine_tuning/jobs/{job['id']}/checkpoints", headers=auth("acme")).json()["data"]
    assert checkpoints[0]["fine_tuned_model_checkpoint"] == "acme/zebra@1" and checkpoints[0]["step_number"] == 16


def test_jobs_watch_shows_progress_until_the_end(client, monkeypatch):
    zebra = [j for j in client.get("/v1/fine_tuning/jobs", headers=auth("acme")).json()["data"] if j["user_provided_suffix"] == "zebra"]
    job = zebra[0]
    monkeypatch.setattr(httpx, "Client", borrowed_client(client))
    out = io.StringIO()
    assert cli.watch_job("http://testserver", KEYS["acme"], job["id"], poll_s=0.05, out=out) == 0
    assert "16/16" in out.getvalue() and "loss" in out.getvalue() and "succeeded: acme/zebra@1" in out.getvalue()
    assert cli.watch_job("http://testserver", KEYS["globex"], job["id"], out=io.StringIO()) == 2  # not theirs


def test_cancel_stops_a_running_job_and_publishes_nothing(client):
    job = create_job(client, "acme", upload(client, "acme", LONG), SLOW_HP, suffix="never").json()
    wait_for(client, "acme", job["id"], ("running",))
    time.sleep(0.5)
    cancelled_at = time.monotonic()
    response = client.post(f"/v1/fine_tuning/jobs/{job['id']}/cancel", headers=auth("acme"))
    assert response.status_code == 200 and response.json()["id"] == job["id"]
    done = wait_for(client, "acme", job["id"], ("cancelled", "succeeded", "failed"), timeout_s=10)
    assert done["status"] == "cancelled" and done["fine_tuned_model"] is None
    assert time.monotonic() - cancelled_at < 5
    assert client.get("/v1/adapters/acme/never", headers=auth("acme")).status_code == 404
    # cancelling a finished job changes nothing
    assert client.post(f"/v1/fine_tuning/jobs/{job['id']}/cancel", headers=auth("acme")).json()["status"] == "cancelled"


KEYWORD_HP = {"n_epochs": 3, "batch_size": 8, "learning_rate_multiplier": 10, "target_modules": "mlp"}
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def test_keyword_job_beats_the_base_is_promoted_and_reports(client, monkeypatch, tmp_path):
    train = upload(client, "acme", LONG)
    valid = upload(client, "acme", (REPO_ROOT / "adapters/examples/keywords_valid.jsonl").read_bytes(), "valid.jsonl")
    job = create_job(client, "acme", train, KEYWORD_HP, suffix="keywords", validation_file=valid).json()
    done = wait_for(client, "acme", job["id"], ("succeeded", "failed", "cancelled"), timeout_s=120)
    assert done["status"] == "succeeded", done
    evaluation = done["evaluation"]
    assert evaluation["promoted"] and evaluation["gain"] > 1.0 and evaluation["validation_source"] == "file"
    assert evaluation["num_valid_examples"] == 60 and evaluation["reference_perplexity_adapter"] > 0
    latest = client.get("/v1/adapters/acme/keywords", headers=auth("acme")).json()
    assert f"acme/keywords@{latest['version']}" == done["fine_tuned_model"]  # the bare name serves it

    report = client.get(f"/v1/fine_tuning/jobs/{job['id']}/report", headers=auth("acme")).json()
    events = client.get(f"/v1/fine_tuning/jobs/{job['id']}/events", headers=auth("acme"), params={"limit": 1000}).json()
    data = [event["data"] for event in reversed(events["data"]) if event["data"]]  # oldest first
    steps = [{k: d[k] for k in ("step", "epoch", "train_loss", "learning_rate")} for d in data if "learning_rate" in d]
    epochs = [{k: d[k] for k in ("epoch", "step", "train_loss", "valid_loss", "valid_mean_token_accuracy")}
              for d in data if "valid_loss" in d]
    assert report["train_curve"] == steps and len(steps) == done["hyperparameters"]["n_epochs"] * 25
    assert report["valid_curve"] == epochs and [e["epoch"] for e in epochs] == [1, 2, 3]
    assert report["evaluation"] == evaluation and report["fine_tuned_model"] == done["fine_tuned_model"]
    best = min(epochs, key=lambda e: e["valid_loss"])
    assert (evaluation["best_epoch"], round(evaluation["adapter_valid_loss"], 6)) == (best["epoch"], best["valid_loss"])
    checkpoint = client.get(f"/v1/fine_tuning/jobs/{job['id']}/checkpoints", headers=auth("acme")).json()["data"][0]
    assert checkpoint["step_number"] == best["step"] and checkpoint["metrics"]["valid_loss"] == evaluation["adapter_valid_loss"]

    png = client.get(f"/v1/fine_tuning/jobs/{job['id']}/report", headers=auth("acme"), params={"format": "png"})
    assert png.status_code == 200 and png.headers["content-type"] == "image/png"
    assert png.content.startswith(PNG_SIGNATURE) and len(png.content) > 20_000
    for who, route in (("globex", "/report"), ("acme", "/report?format=svg")):
        refused = client.get(f"/v1/fine_tuning/jobs/{job['id']}{route}", headers=auth(who))
        assert refused.status_code == (404 if who == "globex" else 400) and "error" in refused.json()

    monkeypatch.setattr(httpx, "Client", borrowed_client(client))
    out = io.StringIO()
    assert cli.job_report("http://testserver", KEYS["acme"], job["id"], str(tmp_path / "r.png"), out=out) == 0
    assert (tmp_path / "r.png").read_bytes() == png.content
    if os.environ.get("LORAPLEX_KEEP_REPORT"):  # to look at it
        Path(os.environ["LORAPLEX_KEEP_REPORT"]).write_bytes(png.content)
    assert "promoted: the adapter beats the base model" in out.getvalue() and "epoch   3" in out.getvalue()
    assert cli.job_report("http://testserver", KEYS["globex"], job["id"], None, out=io.StringIO()) == 2


@pytest.mark.parametrize("adapter_type", ["dora", "prompt_tuning"])
def test_dora_and_prompt_tuning_jobs_beat_the_base_and_serve_at_once(client, adapter_type):
    """#15 must-show 3: the keyword set through the API with `adapter_type`; promoted as a LoRA job is, and
    the name answers completions as soon as the job succeeds, unlike the base."""
    if adapter_type not in SERVED_KINDS:
        pytest.skip(f"this server does not serve {adapter_type} adapters yet")
    valid_lines = (REPO_ROOT / "adapters/examples/keywords_valid.jsonl").read_bytes()
    hyperparameters = {"n_epochs": 3, "batch_size": 8, "learning_rate_multiplier": 10, "adapter_type": adapter_type}
    if adapter_type == "dora":
        hyperparameters["target_modules"] = "mlp"
    name = f"kw-{adapter_type.replace('_', '-')}"
    job = create_job(client, "acme", upload(client, "acme", LONG), hyperparameters, suffix=name,
                     validation_file=upload(client, "acme", valid_lines, "valid.jsonl")).json()
    done = wait_for(client, "acme", job["id"], ("succeeded", "failed", "cancelled"), timeout_s=240)
    assert done["status"] == "succeeded", done
    assert done["hyperparameters"]["adapter_type"] == adapter_type
    evaluation = done["evaluation"]
    assert evaluation["promoted"] and evaluation["gain"] > 0.5, evaluation
    print(f"\n{adapter_type} job: valid loss {evaluation['adapter_valid_loss']:.3f} vs base {evaluation['base_valid_loss']:.3f}")
    prompts = [json.loads(line)["prompt"] for line in valid_lines.decode().splitlines()[:4]]
    tuned = [complete(client, "acme", f"acme/{name}", prompt) for prompt in prompts]
    assert all(response.status_code == 200 for response in tuned), [r.text for r in tuned]
    base = [complete(client, "acme", "demo", prompt).json()["choices"][0]["text"] for prompt in prompts]
    assert [r.json()["choices"][0]["text"] for r in tuned] != base


def shuffled_labels(data: bytes) -> bytes:
    """The same prompts with their labels permuted across examples: only the answer format is learnable."""
    lines = [json.loads(line) for line in data.decode().splitlines()]
    labels = [line["completion"] for line in lines]
    random.Random(0).shuffle(labels)
    return "".join(json.dumps({**line, "completion": label}) + "\n" for line, label in zip(lines, labels)).encode()


def test_a_worse_job_under_the_same_name_is_not_promoted_and_the_name_keeps_serving(client):
    """Champion vs challenger over HTTP with the real worker: the keyword adapter (the test above) is the
    incumbent; a job on the same prompts with shuffled labels beats the base (it learns the format) but
    not the incumbent, so it is stored unpromoted and `acme/keywords` keeps serving the good version."""
    good = client.get("/v1/adapters/acme/keywords", headers=auth("acme")).json()
    good_id = f"acme/keywords@{good['version']}"
    prompt = "Review: The staff were friendly.\nSentiment:"
    before = complete(client, "acme", "acme/keywords", prompt).json()["choices"][0]["text"]
    train = upload(client, "acme", shuffled_labels(LONG))
    valid = upload(client, "acme", (REPO_ROOT / "adapters/examples/keywords_valid.jsonl").read_bytes(), "valid.jsonl")
    job = create_job(client, "acme", train, {**KEYWORD_HP, "n_epochs": 2}, suffix="keywords", validation_file=valid).json()
    done = wait_for(client, "acme", job["id"], ("succeeded", "failed", "cancelled"), timeout_s=180)
    assert done["status"] == "succeeded", done
    evaluation = done["evaluation"]
    assert evaluation["promoted"] is False and evaluation["blocked_by"] == ["incumbent"], evaluation
    assert evaluation["incumbent"] == good_id and done["fine_tuned_model"] == f"acme/keywords@{good['version'] + 1}"
    assert evaluation["gain_ci"][0] > 0  # it does beat the base model...
    assert evaluation["incumbent_gain_ci"][1] < 0  # ...but is surely worse than the incumbent
    assert evaluation["base_valid_loss"] > evaluation["adapter_valid_loss"] > evaluation["incumbent_valid_loss"]
    assert f"not better than the incumbent {good_id}" in evaluation["reason"]

    assert client.get("/v1/adapters/acme/keywords", headers=auth("acme")).json()["version"] == good["version"]
    assert complete(client, "acme", "acme/keywords", prompt).json()["choices"][0]["text"] == before
    report = client.get(f"/v1/fine_tuning/jobs/{job['id']}/report", headers=auth("acme")).json()["evaluation"]
    for field in ("base_valid_loss", "incumbent_valid_loss", "adapter_valid_loss", "gain_ci", "incumbent_gain_ci"):
        assert report[field] == evaluation[field]
    assert report["confidence_level"] == 0.95 and report["num_bootstrap_samples"] == 1000
    events = client.get(f"/v1/fine_tuning/jobs/{job['id']}/events", headers=auth("acme"), params={"limit": 100}).json()
    warnings = [e["message"] for e in events["data"] if e["level"] == "warn"]
    assert any(m.startswith(f"Evaluation: not promoted: not better than the incumbent {good_id}") for m in warnings)
    assert any(e["message"].startswith("Contamination audit: 0 of 60 validation examples") for e in events["data"])

    # continuing the adapter: the tenant's own may, another tenant may not, and the parent's shape is kept
    for who, model, extra, param in (("globex", "acme/keywords", {}, "model"), ("acme", "acme/nothing", {}, "model"),
                                     ("acme", good_id, {"lora_r": 4}, "lora_r"), ("acme", "gpt-4o", {}, "model")):
        refused = client.post("/v1/fine_tuning/jobs", headers=auth(who), json={
            "model": model, "training_file": upload(client, who, TINY),
            "method": {"type": "supervised", "supervised": {"hyperparameters": extra}}})
        assert refused.status_code == 400 and refused.json()["error"]["param"] == param, refused.text


def borrowed_client(client):
    class Borrowed:  # the test app's client, without running its lifespan a second time
        def __init__(self, headers, **_):
            self.headers = headers

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return None

        def get(self, url, params=None):
            return client.get(url, params=params, headers=self.headers)

    return Borrowed


def test_tenants_see_only_their_jobs(client):
    job = create_job(client, "globex", upload(client, "globex", TINY), {"n_epochs": 1}).json()
    for route in ("", "/events", "/checkpoints", "/report"):
        assert client.get(f"/v1/fine_tuning/jobs/{job['id']}{route}", headers=auth("acme")).status_code == 404
    assert client.post(f"/v1/fine_tuning/jobs/{job['id']}/cancel", headers=auth("acme")).status_code == 404
    missing = client.get("/v1/fine_tuning/jobs/ftjob-000000000000000000000000", headers=auth("acme"))
    assert missing.status_code == 404 and missing.json()["error"]["code"] == "job_not_found"
    assert job["id"] not in [j["id"] for j in client.get("/v1/fine_tuning/jobs", headers=auth("acme")).json()["data"]]
    assert job["id"] in [j["id"] for j in client.get("/v1/fine_tuning/jobs", headers=auth("admin")).json()["data"]]
    assert client.get("/v1/fine_tuning/jobs").status_code == 401
    wait_for(client, "globex", job["id"], ("succeeded", "failed"))


@pytest.fixture(scope="module")
def queue_only(tmp_path_factory, engine):
    """No worker at all: jobs stay queued, so limits and validation can be checked without training."""
    data_dir = tmp_path_factory.mktemp("ft-queue")
    settings = make_settings(data_dir, start_local_worker=False, max_jobs_per_tenant=1, max_train_steps=500)
    with TestClient(create_app(settings, engine)) as client:
        yield client


@pytest.mark.parametrize(("hyperparameters", "param"), [
    ({"n_epochs": 0}, "n_epochs"), ({"batch_size": "big"}, "batch_size"), ({"learning_rate_multiplier": -1}, "learning_rate_multiplier"),
    ({"lora_r": 64}, "lora_r"), ({"lora_dropout": 0.9}, "lora_dropout"), ({"target_modules": ["lm_head"]}, "target_modules"),
    ({"n_epochs": 50, "batch_size": 1}, "n_epochs"),  # 16 * 50 steps > max_train_steps
    ({"epochs": 3}, "method.supervised.hyperparameters.epochs"),
    ({"top_k_layers": 5}, "top_k_layers"),  # the demo model has 4 layers
    ({"layers_to_transform": [0, 4]}, "layers_to_transform"), ({"layers_to_transform": [1], "top_k_layers": 1}, "layers_to_transform"),
    ({"layer_lr_decay": 0}, "layer_lr_decay"), ({"weight_decay": 2}, "weight_decay"), ({"use_rslora": "yes"}, "use_rslora"),
    ({"early_stopping_patience": -1}, "early_stopping_patience"), ({"validation_split": 0.9}, "validation_split"),
    ({"target_modules": "ffn"}, "target_modules"),
    ({"adapter_type": "ia3"}, "adapter_type"), ({"num_virtual_tokens": 8}, "num_virtual_tokens"),  # LoRA: no virtual tokens
    ({"adapter_type": "prompt_tuning", "num_virtual_tokens": 0}, "num_virtual_tokens"),
])
def test_bad_hyperparameters_are_400_naming_the_param(queue_only, hyperparameters, param):
    response = create_job(queue_only, "acme", upload(queue_only, "acme", TINY), hyperparameters)
    assert response.status_code == 400, response.text
    assert response.json()["error"]["param"] == param


def test_bad_requests_name_what_is_wrong(queue_only):
    c = queue_only
    acme_file, globex_file = upload(c, "acme", TINY), upload(c, "globex", TINY)
    assert create_job(c, "acme", acme_file, model="gpt-4o").json()["error"]["param"] == "model"
    for file_id in (globex_file, "file-000000000000000000000000", "../../etc/passwd"):
        response = create_job(c, "acme", file_id)
        assert response.status_code == 404 and response.json()["error"]["param"] == "training_file"
    response = create_job(c, "acme", acme_file, validation_file=globex_file)
    assert response.status_code == 404 and response.json()["error"]["param"] == "validation_file"
    assert create_job(c, "acme", acme_file, suffix="../x").json()["error"]["param"] == "suffix"
    for field, value in (("seed", True), ("force_promotion", 0), ("suffix", 5)):  # no coercion
        response = create_job(c, "acme", acme_file, **{field: value})
        assert response.status_code == 400 and response.json()["error"]["param"] == field, response.text
    legacy = c.post("/v1/fine_tuning/jobs", headers=auth("acme"),
                    json={"model": "demo", "training_file": acme_file, "hyperparameters": {"n_epochs": 0}})
    assert legacy.status_code == 400 and legacy.json()["error"]["param"] == "n_epochs"


@pytest.mark.parametrize(("body", "param"), [
    ({"lora_r": 16}, "lora_r"), ({"bogus": 1}, "bogus"),
    ({"method": {"type": "supervised", "bogus": 1}}, "method.bogus"),
    ({"method": {"type": "supervised", "supervised": {"hyperparameters": {}, "epochs": 2}}}, "method.supervised.epochs"),
    ({"method": {"type": "dpo", "dpo": {"hyperparameters": {"beta": 0.1, "gamma": 1}}}}, "method.dpo.hyperparameters.gamma"),
    ({"method": {"type": "supervised", "supervised": {"hyperparameters": {"beta": 0.1}}}}, "method.supervised.hyperparameters.beta"),
    ({"method": {"type": "supervised", "dpo": {}}}, "method.dpo"),
    ({"method": {"type": "dpo", "dpo": {}}}, "training_file"),  # a prompt/completion file cannot train DPO
    ({"method": {"type": "reinforcement"}}, "method.type"),
])
def test_unknown_or_misplaced_fields_are_400_naming_them_and_queue_nothing(queue_only, body, param):
    file_id = upload(queue_only, "globex", TINY)
    before = queue_only.get("/v1/fine_tuning/jobs", headers=auth("globex")).json()["data"]
    response = queue_only.post("/v1/fine_tuning/jobs", headers=auth("globex"),
                               json={"model": "demo", "training_file": file_id, **body})
    assert response.status_code == 400, response.text
    assert response.json()["error"]["param"] == param and response.json()["error"]["type"] == "invalid_request_error"
    assert queue_only.get("/v1/fine_tuning/jobs", headers=auth("globex")).json()["data"] == before


def test_a_chat_file_on_a_model_without_chat_template_is_400_at_creation(tmp_path):
    settings = make_settings(tmp_path, model=str(shared_model("stories260k")), start_local_worker=False, max_lora_rank=8)
    engine = build_engine(settings)
    engine.start()
    try:
        with TestClient(create_app(settings, engine)) as c:
            chat = json.dumps({"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]})
            file_id = upload(c, "acme", ((chat + "\n") * 4).encode(), "chat.jsonl")
            response = c.post("/v1/fine_tuning/jobs", headers=auth("acme"),
                              json={"model": engine.model_name, "training_file": file_id})
            assert response.status_code == 400 and response.json()["error"]["param"] == "training_file", response.text
            assert "no chat template" in response.json()["error"]["message"]
            assert c.get("/v1/fine_tuning/jobs", headers=auth("acme")).json()["data"] == []
    finally:
        engine.shutdown()


def test_concurrent_job_limit_is_429_per_tenant(queue_only):
    c = queue_only
    first = create_job(c, "acme", upload(c, "acme", TINY), {"n_epochs": 1})
    assert first.status_code == 200
    over = create_job(c, "acme", upload(c, "acme", TINY))
    assert over.status_code == 429 and over.json()["error"]["code"] == "too_many_jobs"
    other = create_job(c, "globex", upload(c, "globex", TINY))
    assert other.status_code == 200  # the limit is per tenant
    # cancelling a queued job is immediate and frees its place
    assert c.post(f"/v1/fine_tuning/jobs/{first.json()['id']}/cancel", headers=auth("acme")).json()["status"] == "cancelled"
    assert create_job(c, "acme", upload(c, "acme", TINY)).status_code == 200


def test_jobs_and_files_survive_a_restart(tmp_path, engine):
    settings = make_settings(tmp_path, start_local_worker=False, max_jobs_per_tenant=5)
    with TestClient(create_app(settings, engine)) as before:
        file_id = upload(before, "acme", TINY)
        queued = create_job(before, "acme", file_id, {"n_epochs": 1}).json()
        cancelled = create_job(before, "acme", file_id).json()
        before.post(f"/v1/fine_tuning/jobs/{cancelled['id']}/cancel", headers=auth("acme"))
    with TestClient(create_app(settings, engine)) as after:
        jobs = after.get("/v1/fine_tuning/jobs", headers=auth("acme")).json()
        assert [(j["id"], j["status"]) for j in jobs["data"]] == [(cancelled["id"], "cancelled"), (queued["id"], "queued")]
        assert jobs["has_more"] is False
        page = after.get("/v1/fine_tuning/jobs", headers=auth("acme"), params={"limit": 1}).json()
        assert page["has_more"] and page["data"][0]["id"] == cancelled["id"]
        assert after.get(f"/v1/files/{file_id}/content", headers=auth("acme")).content == TINY


def test_a_killed_worker_fails_its_job_instead_of_leaving_it_running(tmp_path, engine):
    """`loraplex worker` in its own process, kill -9 mid-job: the server's reaper fails the job."""
    settings = make_settings(tmp_path, start_local_worker=False, job_stale_after_s=3)
    env = {**os.environ, **settings_env(settings), "PYTHONPATH": str(REPO_ROOT / "service")}
    with TestClient(create_app(settings, engine)) as c:
        job = create_job(c, "acme", upload(c, "acme", LONG), SLOW_HP).json()
        worker = subprocess.Popen([sys.executable, "-m", "loraplex", "worker"], env=env)
        try:
            wait_for(c, "acme", job["id"], ("running",), timeout_s=90)  # a worker starting on a loaded box
            os.kill(worker.pid, signal.SIGKILL)
            worker.wait()
            killed_at = time.monotonic()
            assert c.get(f"/v1/fine_tuning/jobs/{job['id']}", headers=auth("acme")).json()["status"] == "running"
            failed = wait_for(c, "acme", job["id"], ("failed", "succeeded", "cancelled"), timeout_s=15)
        finally:
            worker.kill()
            worker.wait()
        assert failed["status"] == "failed" and failed["error"]["code"] == "worker_lost"
        assert "heartbeat" in failed["error"]["message"] and time.monotonic() - killed_at >= 2


def test_openai_sdk_drives_files_and_jobs(queue_only):
    sdk = openai.OpenAI(base_url=f"{queue_only.base_url}/v1", api_key=KEYS["globex"], http_client=queue_only, max_retries=0)
    uploaded = sdk.files.create(file=("sdk.jsonl", TINY), purpose="fine-tune")
    assert uploaded.id.startswith("file-") and uploaded.bytes == len(TINY)
    with pytest.raises(openai.BadRequestError):
        sdk.fine_tuning.jobs.create(model="demo", training_file=uploaded.id,
                                    method={"type": "supervised", "supervised": {"hyperparameters": {"n_epochs": 0}}})
    for job in sdk.fine_tuning.jobs.list():  # the limit is 1: cancel anything left from other tests
        if job.status == "queued":
            sdk.fine_tuning.jobs.cancel(job.id)
    job = sdk.fine_tuning.jobs.create(model="demo", training_file=uploaded.id, suffix="sdk",
                                      method={"type": "supervised", "supervised": {"hyperparameters": {"n_epochs": 2}}})
    assert job.status == "queued" and job.method.type == "supervised"
    assert sdk.fine_tuning.jobs.retrieve(job.id).id == job.id
    assert job.id in [j.id for j in sdk.fine_tuning.jobs.list(limit=5)]
    assert sdk.fine_tuning.jobs.cancel(job.id).status == "cancelled"
    assert [e.message for e in sdk.fine_tuning.jobs.list_events(job.id)] == ["Fine-tuning job cancelled."]
    with pytest.raises(openai.NotFoundError):
        sdk.fine_tuning.jobs.retrieve("ftjob-000000000000000000000000")
