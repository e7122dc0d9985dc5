"""The registry against crashes and Redis faults, on real processes (issue 20, findings 9-11): a server
SIGKILLed between the rename of a new version and its publish (a named failpoint, armed through
LORAPLEX_FAILPOINTS), Redis frozen (SIGSTOP) while a publish is on the wire, and Redis losing all of its data
(FLUSHALL) under two replicas."""
from __future__ import annotations

import json
import time
from pathlib import Path

import httpx
import pytest

from tests.redis_server import redis_server  # noqa: F401  (fixture)
from tests.server_process import ServerProcess
from tests.test_faults import SERVER_SETTINGS, adapter_bytes, auth, complete, eventually, upload_adapter  # noqa: F401

pytestmark = pytest.mark.redis


def start(tmp_path: Path, data_dir: Path, log_name: str, demo_model_dir: Path, **settings) -> ServerProcess:
    server = ServerProcess(data_dir, tmp_path / log_name, model=str(demo_model_dir), served_model_name="demo",
                           start_local_worker="false", **{**SERVER_SETTINGS, **settings})
    try:
        server.wait_ready()
    except BaseException:
        server.stop()
        raise
    return server


def text_of(client: httpx.Client, model: str) -> str:
    answer = complete(client, "acme", model)
    assert answer.status_code == 200, answer.text
    return answer.json()["choices"][0]["text"]


def test_an_upload_killed_between_rename_and_publish_is_never_served(tmp_path, demo_model_dir, adapter_bytes):
    data_dir = tmp_path / "data"
    first = start(tmp_path, data_dir, "first.log", demo_model_dir)
    try:
        with httpx.Client(base_url=first.url, timeout=30) as c:
            for seed in (1, 2):
                assert upload_adapter(c, "acme", "a", adapter_bytes(seed)).status_code == 201
    finally:
        first.stop()
    doomed = start(tmp_path, data_dir, "doomed.log", demo_model_dir, failpoints="versioned_store.after_rename=kill")
    try:
        with httpx.Client(base_url=doomed.url, timeout=30) as c, pytest.raises(httpx.HTTPError):
            upload_adapter(c, "acme", "a", adapter_bytes(3))  # the client sees a disconnect, no answer
        assert doomed.proc.wait(timeout=10) == -9
    finally:
        doomed.stop()
    assert (data_dir / "acme" / "a" / "v3" / "adapter_model.safetensors").is_file()  # renamed, never published
    killed_sha256 = json.loads((data_dir / "acme" / "a" / "v3" / "meta.json").read_text())["sha256"]

    second = start(tmp_path, data_dir, "second.log", demo_model_dir)
    try:
        with httpx.Client(base_url=second.url, timeout=30) as c:
            assert not (data_dir / "acme" / "a" / "v3").exists()  # swept at start
            assert c.get("/v1/adapters/acme/a", headers=auth("acme")).json()["version"] == 2
            assert c.get("/v1/adapters/acme/a@3", headers=auth("acme")).status_code == 404
            assert complete(c, "acme", "acme/a@3").status_code == 404
            made = upload_adapter(c, "acme", "a", adapter_bytes(4)).json()
            assert made["version"] == 3 and made["sha256"] != killed_sha256
            assert c.get("/v1/adapters/acme/a@3", headers=auth("acme")).json()["sha256"] == made["sha256"]
            assert text_of(c, "acme/a@3") == text_of(c, "acme/a")
    finally:
        second.stop()
