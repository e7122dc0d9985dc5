"""The Redis job store: jobs shared by every replica and worker (layout in `RedisJobStore`)."""
from __future__ import annotations

import json
import time
from collections.abc import Collection, Iterator
from contextlib import contextmanager
from dataclasses import replace
from typing import Any

from loraplex.training.errors import JobNotFound, JobStoreUnavailable, TooManyJobs
from loraplex.training.jobs import (
    CLAIMED, DEFAULT_MAX_FINISHED_PER_TENANT, QUEUED, TERMINAL, VALIDATING_FILES, JobRecord, finished_beyond, is_job_id,
)

# KEYS: queue, processing, heartbeats. ARGV: now. Move the oldest queued id to `processing` and stamp it
# in one step, so a worker that dies right after claiming still leaves a heartbeat to go stale.
_CLAIM = """
local job_id = redis.call('RPOPLPUSH', KEYS[1], KEYS[2])
if job_id then redis.call('HSET', KEYS[3], job_id, ARGV[1]) end
return job_id
"""

# KEYS: active set, job, all-jobs zset, tenant zset, queue. ARGV: limit, id, record, order.
_CREATE = """
if redis.call('SCARD', KEYS[1]) >= tonumber(ARGV[1]) then return 0 end
redis.call('SET', KEYS[2], ARGV[3])
redis.call('SADD', KEYS[1], ARGV[2])
redis.call('ZADD', KEYS[3], ARGV[4], ARGV[2])
redis.call('ZADD', KEYS[4], ARGV[4], ARGV[2])
redis.call('LPUSH', KEYS[5], ARGV[2])
return 1
"""


# A retried append whose first reply was lost (Redis stalled after running it) must not add the event twice:
# the worker's EventBuffer resends what it could not confirm. KEYS: events list, ids set; ARGV: id, JSON.
_APPEND_EVENT_ONCE = """
if redis.call('SADD', KEYS[2], ARGV[1]) == 1 then
  return redis.call('RPUSH', KEYS[1], ARGV[2])
end
return 0
"""


class RedisJobStore:
    """Jobs shared by every replica and worker:

        <ns>:ftjob:<id>             STRING record JSON (changed with WATCH/MULTI: check-and-set)
        <ns>:ftjob-events:<id>      LIST   event JSON, oldest first
        <ns>:ftjob-event-ids:<id>   SET    ids of the events in that list (an append happens once)
        <ns>:ftjobs / :ftjobs:<t>   ZSET   ids by creation order (all / per tenant)
        <ns>:ftjob-active:<t>       SET    the tenant's queued + claimed ids (the concurrency limit)
        <ns>:ftjob-queue            LIST   queued ids; a claim RPOPLPUSHes the oldest into...
        <ns>:ftjob-processing       LIST   ...claimed ids, until the job ends
        <ns>:ftjob-heartbeats       HASH   id -> unix time of its worker's last heartbeat

    Short socket timeouts: a Redis failure is a 503 after about a second, not a hung request.
    """

    def __init__(self, redis_url: str, namespace: str = "loraplex", timeout_s: float = 1.0,
                 max_finished_per_tenant: int = DEFAULT_MAX_FINISHED_PER_TENANT):
        import redis
        from redis.backoff import NoBackoff
        from redis.retry import Retry

        self._redis_errors = (redis.ConnectionError, redis.TimeoutError, redis.ResponseError)
        self._watch_error = redis.WatchError
        self._redis = redis.Redis.from_url(
            redis_url, socket_timeout=timeout_s, socket_connect_timeout=timeout_s,
            retry=Retry(NoBackoff(), 1, supported_errors=(redis.ConnectionError,)),
        )
        self.ns = namespace
        self.max_finished_per_tenant = max_finished_per_tenant
        self._claim = self._redis.register_script(_CLAIM)
        self._create = self._redis.register_script(_CREATE)

    def create(self, job: JobRecord, max_active_per_tenant: int) -> JobRecord:
        keys = [self._active(job.tenant), self._job(job.id), f"{self.ns}:ftjobs", f"{self.ns}:ftjobs:{job.tenant}", self._queue]
        with self._errors("create a job"):
            created = self._create(keys=keys, args=[max_active_per_tenant, job.id, job.to_json(), job.order])
        if not created:
            raise TooManyJobs(f"tenant {job.tenant} already has {max_active_per_tenant} active fine-tuning jobs "
                              f"(the limit); wait for one to finish or cancel one")
        self._forget_old_finished(job.tenant)
        return job

    def _forget_old_finished(self, tenant: str) -> None:
        """Retention: the tenant's finished jobs beyond `max_finished_per_tenant` go, record and events."""
        old = [j.id for j in finished_beyond(self.list(tenant), self.max_finished_per_tenant)]
        if old:
            with self._errors("forget old jobs"):
                pipe = self._redis.pipeline(transaction=False)
                pipe.delete(*[self._job(i) for i in old], *[f"{self.ns}:ftjob-events:{i}" for i in old],
                            *[f"{self.ns}:ftjob-event-ids:{i}" for i in old])
                pipe.zrem(f"{self.ns}:ftjobs", *old)
                pipe.zrem(f"{self.ns}:ftjobs:{tenant}", *old)
                pipe.execute()

    def get(self, job_id: str) -> JobRecord:
        if not is_job_id(job_id):
            raise JobNotFound(job_id)
        with self._errors("read a job"):
            raw = self._redis.get(self._job(job_id))
        if raw is None:
            raise JobNotFound(job_id)
        return JobRecord.from_json(raw)

    def list(self, tenant: str | None) -> list[JobRecord]:
        key = f"{self.ns}:ftjobs" if tenant is None else f"{self.ns}:ftjobs:{tenant}"
        with self._errors("list jobs"):
            ids = [i.decode() for i in self._redis.zrevrange(key, 0, -1)]
            raws = self._redis.mget([self._job(i) for i in ids]) if ids else []
        return [JobRecord.from_json(raw) for raw in raws if raw is not None]

    def update(self, job_id: str, expect: Collection[str] | None = None, **changes: Any) -> JobRecord | None:
        key = self._job(job_id)
        with self._errors("update a job"), self._redis.pipeline() as pipe:
            while True:
                try:
                    pipe.watch(key)
                    raw = pipe.get(key)
                    if raw is None:
                        raise JobNotFound(job_id)
                    job = JobRecord.from_json(raw)
                    if expect is not None and job.status not in expect:
                        pipe.unwatch()
                        return None
                    job = replace(job, **changes)
                    pipe.multi()
                    pipe.set(key, job.to_json())
                    if job.status in TERMINAL:
                        pipe.srem(self._active(job.tenant), job_id)
                        pipe.lrem(self._processing, 0, job_id)
                        pipe.hdel(self._heartbeats, job_id)
                    pipe.execute()
                    return job
                except self._watch_error:
                    continue  # changed under us: read again

    def claim(self, worker_id: str) -> JobRecord | None:
        for _ in range(100):  # skip ids of jobs cancelled while queued
            with self._errors("claim a job"):
                raw_id = self._claim(keys=[self._queue, self._processing, self._heartbeats], args=[time.time()])
            if raw_id is None:
                return None
            job_id = raw_id.decode()
            try:
                job = self.update(job_id, expect=(QUEUED,), status=VALIDATING_FILES, worker_id=worker_id,
                                  heartbeat_at=time.time())
            except JobNotFound:
                job = None
            if job is not None:
                return job
            with self._errors("drop a claim"):
                self._redis.lrem(self._processing, 0, job_id)
                self._redis.hdel(self._heartbeats, job_id)
        return None

    def requeue(self, job_id: str) -> None:
        job = self.update(job_id, expect=CLAIMED, status=QUEUED, worker_id=None, heartbeat_at=None, step=0)
        if job is not None:
            with self._errors("requeue a job"), self._redis.pipeline() as pipe:
                pipe.lrem(self._processing, 0, job_id).hdel(self._heartbeats, job_id).rpush(self._queue, job_id)
                pipe.execute()  # RPUSH: the claim end, so it runs next

    def heartbeat(self, job_id: str) -> None:
        with self._errors("heartbeat"):
            self._redis.hset(self._heartbeats, job_id, time.time())

    def stale_jobs(self, stale_after_s: float) -> list[str]:
        with self._errors("look for stale jobs"):
            claimed = [i.decode() for i in self._redis.lrange(self._processing, 0, -1)]
            beats = self._redis.hmget(self._heartbeats, claimed) if claimed else []
        now = time.time()
        stale = [job_id for job_id, beat in zip(claimed, beats) if now - float(beat or 0) > stale_after_s]
        return [job_id for job_id in stale if self._still_claimed(job_id)]

    def _still_claimed(self, job_id: str) -> bool:
        """Tidy a stale `processing` entry: a claim whose worker died before taking the job goes back to
        the queue, a finished job's entry is dropped; only truly claimed jobs are left to fail."""
        try:
            status = self.get(job_id).status
        except JobNotFound:
            status = None
        if status in CLAIMED:
            return True
        with self._errors("tidy the processing list"), self._redis.pipeline() as pipe:
            pipe.lrem(self._processing, 0, job_id).hdel(self._heartbeats, job_id)
            if status == QUEUED:
                pipe.rpush(self._queue, job_id)
            pipe.execute()
        return False

    def add_event(self, job_id: str, event: dict[str, Any]) -> None:
        with self._errors("add an event"):
            self._redis.eval(_APPEND_EVENT_ONCE, 2, f"{self.ns}:ftjob-events:{job_id}",
                             f"{self.ns}:ftjob-event-ids:{job_id}", event["id"], json.dumps(event))

    def events(self, job_id: str) -> list[dict[str, Any]]:
        with self._errors("read events"):
            return [json.loads(raw) for raw in self._redis.lrange(f"{self.ns}:ftjob-events:{job_id}", 0, -1)]

    def close(self) -> None:
        self._redis.close()

    @property
    def _queue(self) -> str:
        return f"{self.ns}:ftjob-queue"

    @property
    def _processing(self) -> str:
        return f"{self.ns}:ftjob-processing"

    @property
    def _heartbeats(self) -> str:
        return f"{self.ns}:ftjob-heartbeats"

    def _job(self, job_id: str) -> str:
        return f"{self.ns}:ftjob:{job_id}"

    def _active(self, tenant: str) -> str:
        return f"{self.ns}:ftjob-active:{tenant}"

    @contextmanager
    def _errors(self, action: str) -> Iterator[None]:
        try:
            yield
        except self._redis_errors as exc:
            raise JobStoreUnavailable(f"job store unavailable: cannot {action} ({exc})") from exc
