"""Job records are kept per tenant up to LORAPLEX_MAX_FINISHED_JOBS_PER_TENANT finished ones (issue 20,
finding 4): creating a job deletes the tenant's oldest finished jobs beyond it (record and events), so
create, list, the stale scan and the metrics scrape read a bounded number of records. Active jobs and other
tenants' jobs are never touched. Both stores: local files and a real Redis."""
from __future__ import annotations

import time

import pytest

from loraplex.training.errors import JobNotFound
from loraplex.training.jobs import FAILED, SUCCEEDED, JobRecord, make_event, new_job_id
from loraplex.training.local_jobs import LocalJobStore
from tests.redis_server import redis_server, redis_url  # noqa: F401  (fixtures)


def job(tenant: str) -> JobRecord:
    now = time.time_ns()
    return JobRecord(id=new_job_id(), tenant=tenant, model="demo", training_file="file-" + "0" * 24,
                     created_at=now // 10**9, order=now, hyperparameters={})


@pytest.fixture(params=["local", pytest.param("redis", marks=pytest.mark.redis)])
def store(request, tmp_path):
    if request.param == "local":
        made = LocalJobStore(tmp_path, max_finished_per_tenant=2)
    else:
        from loraplex.training.redis_jobs import RedisJobStore

        made = RedisJobStore(request.getfixturevalue("redis_url"), max_finished_per_tenant=2)
    yield made
    made.close()


def test_creating_a_job_forgets_the_oldest_finished_ones_beyond_the_limit(store):
    finished = []
    for status in (SUCCEEDED, FAILED, SUCCEEDED, FAILED):
        created = store.create(job("acme"), max_active_per_tenant=5)
        store.add_event(created.id, make_event("done"))
        store.update(created.id, status=status)
        finished.append(created.id)
    other = store.create(job("globex"), max_active_per_tenant=5)
    store.update(other.id, status=SUCCEEDED)
    active = store.create(job("acme"), max_active_per_tenant=5)  # retention runs here
    kept = {j.id for j in store.list("acme")}
    assert kept == {active.id, *finished[-2:]}, (kept, finished)
    for gone in finished[:2]:
        with pytest.raises(JobNotFound):
            store.get(gone)
        assert store.events(gone) == []
    assert store.get(other.id).status == SUCCEEDED and len(store.list(None)) == 4


@pytest.mark.redis
def test_a_resent_event_is_appended_once_in_redis(redis_url):  # noqa: F811
    """The worker resends an event whose reply it never got (Redis stalled after running the append):
    the job's events and its loss curve must not show it twice."""
    from loraplex.training.redis_jobs import RedisJobStore

    store = RedisJobStore(redis_url)
    try:
        created = store.create(job("acme"), max_active_per_tenant=5)
        first, second = make_event("step 1"), make_event("step 2")
        for event in (first, first, second, first, second):
            store.add_event(created.id, event)
        assert [e["id"] for e in store.events(created.id)] == [first["id"], second["id"]]
    finally:
        store.close()
