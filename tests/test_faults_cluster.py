"""Two replicas on one data volume, a Redis with an append-only file, an embedded worker: the durability
findings of issue 20 reproduced on these real processes, each now passing.

- 9: a writer SIGKILLed between the rename of a new version and its publish (failpoint
  `versioned_store.after_rename=kill`) left a version dir nobody acknowledged: it is never served, removed
  at the next start, and its number goes to the next upload.
- 10: Redis frozen (SIGSTOP) while a publish is on the wire (replica A stands at the failpoint
  `versioned_store.before_publish=block(...)` until the test has frozen Redis): the client gets 503, the
  files stay, and when Redis runs the buffered publish the version serves; no number is used twice.
- 12: Redis down 3 s while a job trains: the job succeeds, every step event arrives.
- 11: FLUSHALL: both replicas serve every adapter again (same versions, same sha256) within 10 s, no
  restart, and say so loudly in their logs.
- 15: SIGTERM with a stream open longer than the drain grace (replica A's frames are slowed by the
  failpoint `sse.before_frame=sleep(0.1)`): the stream ends with an error event and `[DONE]`, exit 0.
The servers start once for the module (each start costs seconds); the tests run in this order.
"""
from __future__ import annotations

import json
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest
import redis

from tests.server_process import REPO_ROOT, ServerProcess
from tests.test_faults import (  # noqa: F401  (adapter_bytes, persistent_redis: fixtures)
    SERVER_SETTINGS, TRAIN, adapter_bytes, auth, complete, eventually, upload_adapter, upload_file, PersistentRedis,
)
from tests.redis_server import require_redis_server

pytestmark = pytest.mark.redis

WRITER = """
import json, os, sys
from pathlib import Path
from loraplex.config import Settings
from loraplex.registry.auth import Principal
from loraplex.registry.factory import build_registry
from loraplex.registry.validation import module_shapes_from_hf_config

data_dir, redis_url, model_dir, plan = sys.argv[1:]
settings = Settings(data_dir=data_dir, redis_url=redis_url, max_lora_rank=8)
shapes = module_shapes_from_hf_config(json.loads((Path(model_dir) / "config.json").read_text()))
allowed = set(settings.lora_target_module_list)
registry = build_registry(settings, {k: v for k, v in shapes.items() if k[1] in allowed}).registry
for step in json.loads(plan):
    if step.get("failpoints"):
        os.environ["LORAPLEX_FAILPOINTS"] = step["failpoints"]
    files = {n: (Path(step["dir"]) / n).read_bytes() for n in ("adapter_config.json", "adapter_model.safetensors")}
    registry.upload(Principal(tenant=None, is_admin=True), step["name"], files, tenant=step["tenant"], shared=step["shared"])
"""


class Cluster:
    def __init__(self, tmp: Path, demo_model_dir: Path, redis_server: PersistentRedis):
        self.tmp, self.redis = tmp, redis_server
        self.data_dir = tmp / "data"
        self.marker = tmp / "publish-blocked"  # replica A waits at the publish failpoint while it exists
        common = dict(model=str(demo_model_dir), served_model_name="demo", redis_url=redis_server.url,
                      **{**SERVER_SETTINGS, "job_stale_after_s": 30})
        self.a = ServerProcess(self.data_dir, tmp / "a.log", start_local_worker="false",
                               failpoints=f"versioned_store.before_publish=block({self.marker});sse.before_frame=sleep(0.1)",
                               **{**common, "drain_grace_s": 1})
        self.b = ServerProcess(self.data_dir, tmp / "b.log", start_local_worker="true", **common)

    def wait_ready(self) -> None:
        for server in (self.a, self.b):
            server.wait_ready(timeout_s=300)  # two model loads at once on a busy 2-core machine

    def stop(self) -> None:
        for server in (self.a, self.b):
            server.stop()


def run_writer(data_dir: Path, redis_url: str, model_dir: Path, plan: list[dict]) -> int:
    env = {"PYTHONPATH": str(REPO_ROOT / "service"), "PATH": "/usr/bin:/bin"}
    done = subprocess.run([sys.executable, "-c", WRITER, str(data_dir), redis_url, str(model_dir), json.dumps(plan)],
                          env=env, capture_output=True, timeout=120)
    return done.returncode


@pytest.fixture(scope="module")
def adapter_dirs(demo_model_dir, tmp_path_factory):
    from loraplex.models.demo import make_demo_adapter

    root = tmp_path_factory.mktemp("cluster-adapters")
    for seed in range(1, 5):
        make_demo_adapter(demo_model_dir, root / f"a{seed}", r=4, seed=seed)
    return root


@pytest.fixture(scope="module")
def cluster(tmp_path_factory, demo_model_dir, adapter_dirs):
    tmp = tmp_path_factory.mktemp("cluster")
    server = PersistentRedis(require_redis_server(), tmp / "redis")
    server.start()
    data_dir = tmp / "data"
    plan = [dict(tenant="acme", name="a", dir=str(adapter_dirs / "a1"), shared=False),
            dict(tenant="acme", name="a", dir=str(adapter_dirs / "a2"), shared=False),
            dict(tenant="globex", name="tools", dir=str(adapter_dirs / "a3"), shared=True),
            dict(tenant="acme", name="a", dir=str(adapter_dirs / "a4"), shared=False,
                 failpoints="versioned_store.after_rename=kill")]
    assert run_writer(data_dir, server.url, demo_model_dir, plan) == -9  # killed at the failpoint
    killed = json.loads((data_dir / "acme" / "a" / "v3" / "meta.json").read_text())  # renamed, never published
    nodes = Cluster(tmp, demo_model_dir, server)
    try:
        started = time.monotonic()
        nodes.wait_ready()
        print(f"\ntwo replicas ready in {time.monotonic() - started:.1f} s")
        nodes.killed_sha256 = killed["sha256"]
        yield nodes
    finally:
        nodes.stop()
        server.stop()


def test_a_version_killed_before_its_publish_is_swept_and_never_served(cluster, adapter_bytes):
    with httpx.Client(base_url=cluster.b.url, timeout=30) as c:
        assert not (cluster.data_dir / "acme" / "a" / "v3").exists()  # removed at start
        assert c.get("/v1/adapters/acme/a", headers=auth("acme")).json()["version"] == 2
        assert c.get("/v1/adapters/acme/a@3", headers=auth("acme")).status_code == 404
        assert complete(c, "acme", "acme/a@3").status_code == 404
        made = upload_adapter(c, "acme", "a", adapter_bytes(5)).json()
        assert made["version"] == 4 and made["sha256"] != cluster.killed_sha256  # Redis gave 3 to the killed put
        assert c.get("/v1/adapters/acme/a@3", headers=auth("acme")).status_code == 404  # for good
        assert c.get("/v1/adapters/acme/a", headers=auth("acme")).json()["sha256"] == made["sha256"]
        assert complete(c, "acme", "acme/a@4").status_code == 200


def test_a_publish_stalled_by_a_frozen_redis_is_resolved_not_deleted(cluster, adapter_bytes):
    answer: dict = {}

    def upload() -> None:
        with httpx.Client(base_url=cluster.a.url, timeout=60) as c:
            answer["response"] = upload_adapter(c, "acme", "stalled", adapter_bytes(6))

    uploader = threading.Thread(target=upload)
    uploader.start()
    assert eventually(cluster.marker.exists, timeout_s=30, interval_s=0.01)  # A stands before its publish
    cluster.redis.pause()  # SIGSTOP: the publish goes out and is never answered
    try:
        cluster.marker.unlink()
        uploader.join(timeout=30)
    finally:
        cluster.redis.resume()
    refused = answer["response"]
    assert refused.status_code == 503 and refused.json()["error"]["code"] == "registry_unavailable", refused.text
    version_dir = cluster.data_dir / "acme" / "stalled" / "v1"
    assert (version_dir / "adapter_model.safetensors").is_file()  # kept: the index may point at it
    with httpx.Client(base_url=cluster.b.url, timeout=30) as c:
        # Redis runs the buffered publish once it wakes: the version serves, from files that exist
        assert eventually(lambda: c.get("/v1/adapters/acme/stalled", headers=auth("acme")).status_code == 200, 10)
        assert complete(c, "acme", "acme/stalled").status_code == 200
        assert upload_adapter(c, "acme", "stalled", adapter_bytes(7)).json()["version"] == 2  # no number reused


def test_a_3s_redis_outage_does_not_fail_a_running_job(cluster):
    with httpx.Client(base_url=cluster.b.url, timeout=30) as c:
        file_id = upload_file(c, "acme", TRAIN * 4).json()["id"]
        job = c.post("/v1/fine_tuning/jobs", headers=auth("acme"), json={
            "model": "demo", "training_file": file_id, "suffix": "steady",
            "hyperparameters": {"n_epochs": 2, "batch_size": 1, "lora_r": 4}}).json()

        def status() -> dict:
            return c.get(f"/v1/fine_tuning/jobs/{job['id']}", headers=auth("acme")).json()

        def steps() -> list[int]:
            events = c.get(f"/v1/fine_tuning/jobs/{job['id']}/events", headers=auth("acme"), params={"limit": 100})
            return [e["data"]["step"] for e in events.json()["data"] if e["data"] and "learning_rate" in e["data"]]

        assert eventually(lambda: len(steps()) >= 2, 120, 0.1), status()
        cluster.redis.stop()  # SIGKILL; the append-only file keeps the data
        time.sleep(3.0)
        cluster.redis.start()
        done = eventually(lambda: status() if status()["status"] in ("succeeded", "failed", "cancelled") else None,
                          180, 0.5)
        assert done and done["status"] == "succeeded", done
        report = c.get(f"/v1/fine_tuning/jobs/{job['id']}/report", headers=auth("acme"))
        assert report.status_code == 200, report.text
        curve = [point["step"] for point in report.json()["train_curve"]]
        num_steps = report.json()["hyperparameters"]["num_steps"]
        assert curve == list(range(1, num_steps + 1)), curve  # none lost in the outage: kept, then sent


def test_after_flushall_both_replicas_serve_every_adapter_again(cluster):
    clients = [httpx.Client(base_url=s.url, timeout=30) for s in (cluster.a, cluster.b)]
    try:
        def served(c: httpx.Client) -> dict:
            return {(a["id"], a["version"], a["sha256"]) for a in _all_adapters(c)}

        before = [served(c) for c in clients]
        assert before[0] == before[1] and len(before[0]) >= 3, before
        texts = {a[0]: complete(clients[0], "acme", f"{a[0]}@{a[1]}").json()["choices"][0]["text"] for a in before[0]
                 if a[0].startswith("acme/") or a[0] == "globex/tools"}
        redis.Redis.from_url(cluster.redis.url).flushall()
        lost_at = time.monotonic()
        assert eventually(lambda: all(served(c) == before[0] for c in clients), timeout_s=10, interval_s=0.1)
        recovered_s = time.monotonic() - lost_at
        for c in clients:
            for adapter_id, text in texts.items():
                assert complete(c, "acme", adapter_id).json()["choices"][0]["text"] == text, adapter_id
            assert c.get("/readyz").status_code == 200
        assert cluster.a.proc.poll() is None and cluster.b.proc.poll() is None  # no restart
        logs = [s.log_path.read_text() for s in (cluster.a, cluster.b)]
        assert any("rebuilding it from the meta.json files" in log for log in logs), logs
        print(f"\nFLUSHALL: both replicas serve all {len(before[0])} adapters again after {recovered_s:.2f} s")
    finally:
        for c in clients:
            c.close()


def _all_adapters(c: httpx.Client) -> list[dict]:
    response = c.get("/v1/adapters", headers=auth("admin"), params={"limit": 100})
    return response.json()["data"] if response.status_code == 200 else []


def test_a_stream_open_when_the_drain_grace_ends_gets_an_error_event_and_done(cluster):
    body = {"model": "demo", "prompt": "Once", "max_tokens": 200, "temperature": 0, "ignore_eos": True, "stream": True}
    with httpx.Client(base_url=cluster.a.url, timeout=60) as c, \
            c.stream("POST", "/v1/completions", headers=auth("acme"), json=body) as response:
        frames = (line for line in response.iter_lines() if line.startswith("data:"))
        assert json.loads(next(frames)[len("data: "):])["choices"]  # streaming; 200 frames would take 20 s
        cluster.a.proc.send_signal(signal.SIGTERM)  # drain grace: 1 s
        rest = list(frames)
    assert rest[-1] == "data: [DONE]", rest[-3:]
    error = json.loads(rest[-2][len("data: "):])["error"]
    assert error["code"] == "server_shutting_down" and error["message"], error
    assert all(json.loads(f[len("data: "):])["choices"] for f in rest[:-2])  # whole chunks up to the end
    assert len(rest) < 100 and cluster.a.proc.wait(timeout=30) == 0  # ended early, exit 0
