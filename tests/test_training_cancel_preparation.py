"""Cancel during data preparation, through real HTTP and a real worker process: a job whose large training
file is still being parsed (`validating_files`) or tokenized ends `cancelled` within 2 s of the cancel
request, before any step."""
from __future__ import annotations

import json
import time

import pytest
from fastapi.testclient import TestClient

from loraplex.api.app import create_app
from loraplex.engine_factory import build_engine
from tests.test_fine_tuning_api import auth, create_job, make_settings, upload, wait_for

NUM_EXAMPLES = 60_000  # tokenizing them takes the worker many seconds; the file stays under 32 MB
NUM_SHORT_CHATS = 240_000  # ~31 MB; parsing them takes the worker ~5 s (~0.8 s per 32k lines, 2 cores under load)
STORY = "Once upon a time, a little fox found a shiny stone by the river and showed it to every friend"


@pytest.fixture(scope="module")
def client(tmp_path_factory):
    settings = make_settings(tmp_path_factory.mktemp("prep-cancel"), max_file_bytes=32 << 20,
                             max_file_lines=NUM_SHORT_CHATS)
    engine = build_engine(settings)
    engine.start()
    with TestClient(create_app(settings, engine)) as client:
        client.app.state.local_worker.ensure_running()
        yield client
    engine.shutdown()


def _large_file() -> bytes:
    lines = (json.dumps({"prompt": f"{STORY} ({i}). What did the fox find?", "completion": f" A stone, {i}."})
             for i in range(NUM_EXAMPLES))
    return "\n".join(lines).encode()


def _short_chats() -> bytes:
    chat = lambda i: [{"role": "user", "content": f"Where is the stone {i}?"},  # noqa: E731
                      {"role": "assistant", "content": f"By the river, {i}."}]
    return "\n".join(json.dumps({"messages": chat(i)}) for i in range(NUM_SHORT_CHATS)).encode()


def _events(client, job_id: str) -> list[dict]:
    return client.get(f"/v1/fine_tuning/jobs/{job_id}/events", headers=auth("acme"), params={"limit": 100}).json()["data"]


def test_cancel_during_data_preparation_ends_the_job_within_2s(client):
    job = create_job(client, "acme", upload(client, "acme", _large_file()), {"n_epochs": 1}, suffix="prep").json()
    wait_for(client, "acme", job["id"], ("running",), timeout_s=120)
    deadline = time.monotonic() + 60
    while not any(e["message"] == "Fine-tuning job started." for e in _events(client, job["id"])):
        assert time.monotonic() < deadline, _events(client, job["id"])
        time.sleep(0.1)
    time.sleep(1.0)  # the worker loads the tokenizer and tokenizes the 60k examples
    assert not [e for e in _events(client, job["id"]) if e["type"] == "metrics"], "training began: file too small"
    cancelled_at = time.monotonic()
    assert client.post(f"/v1/fine_tuning/jobs/{job['id']}/cancel", headers=auth("acme")).status_code == 200
    done = wait_for(client, "acme", job["id"], ("cancelled", "succeeded", "failed"), timeout_s=30)
    took_s = time.monotonic() - cancelled_at
    assert done["status"] == "cancelled" and took_s < 2.0, (done["status"], took_s)
    print(f"\ncancelled during data preparation after {took_s:.2f} s")
    assert not [e for e in _events(client, job["id"]) if e["type"] == "metrics"]  # stopped before any step
    assert client.get("/v1/adapters/acme/prep", headers=auth("acme")).status_code == 404


def test_cancel_while_the_worker_parses_the_training_file_ends_the_job_within_2s(client):
    """The worker parses the file again before the job runs (`validating_files`): the parse asks for cancel
    every LINES_PER_STOP_CHECK lines, so the job does not wait for the rest of a 31 MB file."""
    job = create_job(client, "acme", upload(client, "acme", _short_chats()), {"n_epochs": 1}, suffix="parse").json()
    wait_for(client, "acme", job["id"], ("validating_files",), timeout_s=60)
    time.sleep(0.5)  # reading the file takes milliseconds: the parse is under way (it takes seconds)
    cancelled_at = time.monotonic()
    assert client.post(f"/v1/fine_tuning/jobs/{job['id']}/cancel", headers=auth("acme")).status_code == 200
    done = wait_for(client, "acme", job["id"], ("cancelled", "succeeded", "failed"), timeout_s=30)
    took_s = time.monotonic() - cancelled_at
    assert done["status"] == "cancelled" and took_s < 2.0, (done["status"], took_s)
    print(f"\ncancelled while parsing the training file after {took_s:.2f} s")
    assert not any(e["message"] == "Fine-tuning job started." for e in _events(client, job["id"]))  # never ran
