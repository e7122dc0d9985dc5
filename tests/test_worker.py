"""Job stores (local files and Redis) as queue and record, and the worker's handling of a job."""
from __future__ import annotations

import time
from pathlib import Path

import pytest

from loraplex.config import Settings
from loraplex.models.demo import ensure_demo_model, make_demo_adapter
from loraplex.training.errors import JobNotFound, TooManyJobs
from loraplex.training.files import FileStore
from loraplex.training.jobs import (
    CANCELLED, FAILED, QUEUED, RUNNING, VALIDATING_FILES, JobRecord, make_event, new_job_id, reap_stale, request_cancel,
)
from loraplex.training.local_jobs import LocalJobStore
from loraplex.training.redis_jobs import RedisJobStore
from loraplex.training.supervisor import settings_env
from loraplex.training.worker import RegistryPublisher, Worker
from tests.redis_server import redis_server, redis_url  # noqa: F401  (fixtures)

TINY = b'{"prompt": "a", "completion": " b"}\n' * 4


def job(tenant: str = "acme", **fields) -> JobRecord:
    now = time.time_ns()
    fields = {"training_file": "file-" + "0" * 24, **fields}
    return JobRecord(id=new_job_id(), tenant=tenant, model="demo", created_at=now // 10**9, order=now,
                     hyperparameters={"n_epochs": 1}, **fields)


@pytest.fixture(params=["local", "redis"])
def make_store(request, tmp_path):
    """make_store() -> a new store instance over the same data (a restart, or a second replica)."""
    stores = []
    if request.param == "local":
        factory = lambda: LocalJobStore(tmp_path)  # noqa: E731
    else:
        url = request.getfixturevalue("redis_url")
        factory = lambda: RedisJobStore(url, "test")  # noqa: E731

    def make():
        stores.append(factory())
        return stores[-1]

    yield make
    for store in stores:
        store.close()


def test_claims_are_fifo_exclusive_and_survive_a_new_store(make_store):
    first, second = make_store(), make_store()
    a, b = first.create(job(), 5), first.create(job(), 5)
    claimed = second.claim("w1")
    assert claimed.id == a.id and claimed.status == VALIDATING_FILES and claimed.worker_id == "w1"
    assert first.claim("w2").id == b.id and first.claim("w3") is None
    first.add_event(a.id, make_event("hello"))
    restarted = make_store()
    assert {j.id: j.status for j in restarted.list("acme")} == {a.id: VALIDATING_FILES, b.id: VALIDATING_FILES}
    assert [j.id for j in restarted.list(None)] == [b.id, a.id]  # newest first
    assert [e["message"] for e in restarted.events(a.id)] == ["hello"]
    assert restarted.list("globex") == []


def test_update_is_check_and_set(make_store):
    store = make_store()
    created = store.create(job(), 5)
    assert store.update(created.id, expect=(RUNNING,), step=3) is None
    assert store.update(created.id, expect=(QUEUED,), step=3).step == 3
    with pytest.raises(JobNotFound):
        store.get("ftjob-" + "f" * 24)
    with pytest.raises(JobNotFound):
        store.get("../../x")


def test_concurrent_limit_counts_active_jobs_per_tenant(make_store):
    store = make_store()
    first = store.create(job(), 1)
    with pytest.raises(TooManyJobs):
        store.create(job(), 1)
    store.create(job("globex"), 1)
    assert request_cancel(store, first.id).status == CANCELLED  # queued: cancelled at once
    store.create(job(), 1)
    assert store.claim("w").tenant in ("acme", "globex")


def test_cancel_flags_a_claimed_job_and_requeue_gives_it_back(make_store):
    store = make_store()
    created = store.create(job(), 5)
    store.claim("w1")
    flagged = request_cancel(store, created.id)
    assert flagged.status == VALIDATING_FILES and flagged.cancel_requested
    other = store.create(job(), 5)
    store.claim("w1")
    store.requeue(other.id)
    assert store.get(other.id).status == QUEUED and store.claim("w2").id == other.id


def test_stale_claims_are_failed_fresh_ones_kept(make_store):
    store = make_store()
    stale, fresh = store.create(job(), 5), store.create(job(), 5)
    store.claim("dead")
    store.claim("alive")
    time.sleep(1.2)
    store.heartbeat(fresh.id)
    reaped = reap_stale(make_store(), stale_after_s=1.0)  # another replica notices
    assert [j.id for j in reaped] == [stale.id]
    failed = store.get(stale.id)
    assert failed.status == FAILED and failed.error["code"] == "worker_lost" and failed.finished_at
    assert store.get(fresh.id).status == VALIDATING_FILES
    assert reap_stale(store, stale_after_s=1.0) == []  # once only


@pytest.fixture
def worker_settings(tmp_path) -> Settings:
    return Settings(model="demo", data_dir=tmp_path, device="cpu", max_lora_rank=8, worker_heartbeat_s=0.2)


def test_publisher_adds_versions_under_the_jobs_tenant(worker_settings):
    model_dir = ensure_demo_model(worker_settings.data_dir)
    adapter = make_demo_adapter(model_dir, worker_settings.data_dir / "made", seed=1)
    publisher = RegistryPublisher(worker_settings, model_dir)
    try:
        named = job(suffix="mine")
        assert publisher(named, adapter) == "acme/mine@1"
        assert publisher(named, adapter) == "acme/mine@2"
        unnamed = job("globex")
        assert publisher(unnamed, adapter) == f"globex/ft-{unnamed.id[6:14]}@1"
    finally:
        publisher.close()


def test_a_job_whose_file_is_gone_fails_with_the_param(worker_settings):
    store = LocalJobStore(worker_settings.data_dir)
    files = FileStore(worker_settings.data_dir, 10_000, 100)
    record = files.create("acme", "t.jsonl", "fine-tune", TINY)
    created = store.create(job(training_file=record.id), 5)
    files.delete(record)
    worker = Worker(worker_settings, store, files, Path("unused"), publisher=lambda *a: pytest.fail("no publish"))
    worker.run_job(store.claim(worker.worker_id))
    failed = store.get(created.id)
    assert failed.status == FAILED and failed.error["code"] == "invalid_training_file"
    assert failed.error["param"] == "training_file" and "No such File" in failed.error["message"]
    assert not (worker_settings.data_dir / ".jobs" / "work" / created.id).exists()
    store.close()


def test_settings_env_rebuilds_the_settings_in_a_child(monkeypatch, worker_settings):
    for name, value in settings_env(worker_settings).items():
        monkeypatch.setenv(name, value)
    rebuilt = Settings()
    assert rebuilt == worker_settings
