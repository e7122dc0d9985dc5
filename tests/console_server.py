"""Fixtures of the console's browser tests (a pytest plugin, see conftest.py): one real `loraplex serve` for
the session (two tenants, an admin, the embedded training worker) and one Chromium per test module (Playwright's
sync API keeps its event loop marked running while it lives, so it must stop before other modules run).

Right after the server is ready, globex starts a job and deletes its training file before the worker
(started by that job) reads it: the job fails in the worker, so the tests have a failed job to show, and
the worker process is warm when a test starts a real job."""
from __future__ import annotations

from pathlib import Path

import httpx
import pytest

from loraplex.models.demo import make_demo_adapter
from tests.console_browser import launch_browser
from tests.server_process import REPO_ROOT, ServerProcess

KEYS = {"acme": "key-acme-console", "globex": "key-globex-console", "admin": "key-admin-console"}
MAX_FILE_BYTES = 64 * 1024  # small, so a too-large upload is cheap to make


def auth(who: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {KEYS[who]}"}


GONE = b'{"prompt": "Q", "completion": " A"}\n' * 12


@pytest.fixture(scope="session")
def console_server(tmp_path_factory, demo_model_dir):
    data_dir = tmp_path_factory.mktemp("console-data")
    server = ServerProcess(
        data_dir, data_dir / "server.log", model=str(demo_model_dir), served_model_name="demo", device="cpu",
        dtype="float32", api_keys=f"{KEYS['acme']}:acme,{KEYS['globex']}:globex", admin_key=KEYS["admin"],
        max_lora_rank=8, max_model_len=256, max_num_seqs=8, max_file_bytes=MAX_FILE_BYTES, train_threads=1,
        worker_heartbeat_s=0.5, log_level="warning", log_format="text",
    )
    try:
        server.wait_ready()
        server.failed_job_id = start_failing_job(server.url)
        yield server
    finally:
        server.stop()


def start_failing_job(url: str) -> str:
    files = {"file": ("gone.jsonl", GONE)}
    upload = httpx.post(f"{url}/v1/files", data={"purpose": "fine-tune"}, files=files, headers=auth("globex")).json()
    job = httpx.post(f"{url}/v1/fine_tuning/jobs", headers=auth("globex"),
                     json={"model": "demo", "training_file": upload["id"], "suffix": "gone"})
    assert job.status_code == 200, job.text
    assert httpx.delete(f"{url}/v1/files/{upload['id']}", headers=auth("globex")).status_code == 200
    return job.json()["id"]


@pytest.fixture(scope="module")
def console_browser():
    playwright, chromium = launch_browser()
    try:
        yield chromium
    finally:
        chromium.close()
        playwright.stop()


@pytest.fixture(scope="session")
def adapter_files(demo_model_dir, tmp_path_factory) -> dict[str, bytes]:
    """A PEFT folder's two files, as bytes."""
    out: Path = make_demo_adapter(demo_model_dir, tmp_path_factory.mktemp("console-adapter") / "a", r=4, seed=19)
    return {name: (out / name).read_bytes() for name in ("adapter_config.json", "adapter_model.safetensors")}
