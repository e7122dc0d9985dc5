"""Fine-tuning jobs: the record, its events, and two `JobStore`s that are also the durable queue.

Life of a job: `queued` (created by the API) -> `validating_files` (a worker claimed it) -> `running`
-> `succeeded` | `failed` | `cancelled`. Only the API creates jobs and only workers train them; they meet
in the store, so the API process never trains. A claimed job carries its worker's heartbeat; one whose
heartbeat is older than `stale_after_s` is failed by whoever reaps first (the server or another worker).

Local store (one machine; several processes agree through flock):

    <data_dir>/.jobs/jobs/<job id>.json       the record, replaced atomically
    <data_dir>/.jobs/events/<job id>.jsonl    events, appended
    <data_dir>/.jobs/queue/<order>-<job id>   one empty file per queued job; a claim removes the oldest
    <data_dir>/.jobs/.lock                    every write holds it

Redis store (replicas and workers on several machines): see `RedisJobStore`.
"""
from __future__ import annotations

import fcntl
import json
import os
import threading
import time
import uuid
from collections.abc import Collection, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any, Protocol

from loraplex.registry.adapter_config import RegistryError

QUEUED, VALIDATING_FILES, RUNNING = "queued", "validating_files", "running"
SUCCEEDED, FAILED, CANCELLED = "succeeded", "failed", "cancelled"
CLAIMED = (VALIDATING_FILES, RUNNING)  # a worker owns the job and must keep its heartbeat fresh
ACTIVE = (QUEUED, *CLAIMED)  # count against the tenant's concurrent-job limit
TERMINAL = (SUCCEEDED, FAILED, CANCELLED)
WORKER_LOST = "worker_lost"


class JobNotFound(RegistryError):
    """Missing and another tenant's jobs read the same."""

    status = 404
    code = "job_not_found"

    def __init__(self, job_id: str):
        super().__init__(f"No such fine-tuning job: {job_id}")
        self.param = "fine_tuning_job_id"


class TooManyJobs(RegistryError):
    status = 429
    code = "too_many_jobs"


class JobStoreUnavailable(RegistryError):
    status = 503
    code = "job_store_unavailable"


@dataclass(frozen=True)
class JobRecord:
    id: str
    tenant: str
    model: str
    training_file: str
    created_at: int
    order: int  # creation time in ns: newest-first listing and FIFO claims
    hyperparameters: dict[str, Any]  # as requested (OpenAI's three + the LoRA fields)
    validation_file: str | None = None
    suffix: str | None = None
    seed: int = 0
    status: str = QUEUED
    finished_at: int | None = None
    fine_tuned_model: str | None = None
    trained_tokens: int | None = None
    error: dict[str, Any] | None = None  # {code, message, param}
    estimated_finish: int | None = None
    resolved_hyperparameters: dict[str, Any] | None = None  # every "auto" replaced, once running
    cancel_requested: bool = False
    worker_id: str | None = None
    heartbeat_at: float | None = None
    step: int = 0
    num_steps: int | None = None
    checkpoints: list[dict[str, Any]] = field(default_factory=list)
    force_promotion: bool = False  # publish as the latest version even if it does not beat the base model
    evaluation: dict[str, Any] | None = None  # base vs adapter scores and the promotion decision (promotion.py)

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, raw: str | bytes) -> JobRecord:
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in json.loads(raw).items() if k in known})


def new_job_id() -> str:
    return f"ftjob-{uuid.uuid4().hex[:24]}"


def make_event(message: str, level: str = "info", data: dict[str, Any] | None = None) -> dict[str, Any]:
    return {"id": f"ftevent-{uuid.uuid4().hex[:24]}", "created_at": int(time.time()), "level": level,
            "message": message, "type": "metrics" if data else "message", "data": data}


class JobStore(Protocol):
    def create(self, job: JobRecord, max_active_per_tenant: int) -> JobRecord:
        """Store and enqueue; TooManyJobs when the tenant already has that many active jobs."""

    def get(self, job_id: str) -> JobRecord:
        """JobNotFound if absent."""

    def list(self, tenant: str | None) -> list[JobRecord]:
        """Jobs of `tenant` (None: all), newest first."""

    def update(self, job_id: str, expect: Collection[str] | None = None, **changes: Any) -> JobRecord | None:
        """Change fields atomically; None (and no change) if the status is not in `expect`."""

    def claim(self, worker_id: str) -> JobRecord | None:
        """The oldest queued job, now `validating_files` and owned by `worker_id`; None if none waits."""

    def requeue(self, job_id: str) -> None:
        """A claimed job its worker gives back (shutdown): queued again, at the front."""

    def heartbeat(self, job_id: str) -> None: ...

    def stale_jobs(self, stale_after_s: float) -> list[str]:
        """Claimed jobs whose heartbeat is older than `stale_after_s`."""

    def add_event(self, job_id: str, event: dict[str, Any]) -> None: ...

    def events(self, job_id: str) -> list[dict[str, Any]]:
        """Oldest first."""

    def close(self) -> None: ...


def request_cancel(store: JobStore, job_id: str) -> JobRecord:
    """A queued job is cancelled at once; a claimed one is flagged and its worker stops within a poll."""
    now = int(time.time())
    cancelled = store.update(job_id, expect=(QUEUED,), status=CANCELLED, finished_at=now)
    if cancelled is not None:
        store.add_event(job_id, make_event("Fine-tuning job cancelled."))
        return cancelled
    flagged = store.update(job_id, expect=CLAIMED, cancel_requested=True)
    return flagged or store.get(job_id)  # already finished: cancelling changes nothing


def reap_stale(store: JobStore, stale_after_s: float) -> list[JobRecord]:
    """Fail every claimed job whose worker stopped sending heartbeats; safe to run anywhere, any time."""
    reaped = []
    for job_id in store.stale_jobs(stale_after_s):
        message = f"The worker running this job stopped responding (no heartbeat for over {stale_after_s:g}s)."
        error = {"code": WORKER_LOST, "message": message, "param": None}
        job = store.update(job_id, expect=CLAIMED, status=FAILED, error=error, finished_at=int(time.time()))
        if job is not None:
            store.add_event(job_id, make_event(message, level="error"))
            reaped.append(job)
    return reaped


def has_pending_jobs(store: JobStore) -> bool:
    return any(job.status == QUEUED for job in store.list(None))


def build_job_store(settings) -> JobStore:
    if settings.redis_url:
        return RedisJobStore(settings.redis_url, settings.redis_namespace)
    return LocalJobStore(settings.data_dir)


class LocalJobStore:
    def __init__(self, data_dir: Path):
        self.root = Path(data_dir) / ".jobs"
        for sub in ("jobs", "events", "queue"):
            (self.root / sub).mkdir(parents=True, exist_ok=True)
        self._thread_lock = threading.Lock()  # flock excludes processes, not threads sharing one fd
        self._lock_fd = os.open(self.root / ".lock", os.O_RDWR | os.O_CREAT, 0o644)

    def create(self, job: JobRecord, max_active_per_tenant: int) -> JobRecord:
        with self._locked():
            num_active = sum(1 for j in self._all() if j.tenant == job.tenant and j.status in ACTIVE)
            if num_active >= max_active_per_tenant:
                raise TooManyJobs(f"tenant {job.tenant} already has {num_active} active fine-tuning jobs "
                                  f"(limit {max_active_per_tenant}); wait for one to finish or cancel one")
            self._write(job)
            (self.root / "queue" / f"{job.order:020d}-{job.id}").touch()
        return job

    def get(self, job_id: str) -> JobRecord:
        if not _is_job_id(job_id):
            raise JobNotFound(job_id)
        try:
            return JobRecord.from_json((self.root / "jobs" / f"{job_id}.json").read_bytes())
        except FileNotFoundError:
            raise JobNotFound(job_id) from None

    def list(self, tenant: str | None) -> list[JobRecord]:
        jobs = [j for j in self._all() if tenant is None or j.tenant == tenant]
        return sorted(jobs, key=lambda j: j.order, reverse=True)

    def update(self, job_id: str, expect: Collection[str] | None = None, **changes: Any) -> JobRecord | None:
        with self._locked():
            job = self.get(job_id)
            if expect is not None and job.status not in expect:
                return None
            job = replace(job, **changes)
            self._write(job)
            return job

    def claim(self, worker_id: str) -> JobRecord | None:
        with self._locked():
            for entry in sorted((self.root / "queue").iterdir()):
                entry.unlink(missing_ok=True)
                job_id = entry.name.partition("-")[2]
                try:
                    job = self.get(job_id)
                except JobNotFound:
                    continue
                if job.status == QUEUED:
                    job = replace(job, status=VALIDATING_FILES, worker_id=worker_id, heartbeat_at=time.time())
                    self._write(job)
                    return job
        return None

    def requeue(self, job_id: str) -> None:
        with self._locked():
            job = self.get(job_id)
            if job.status in CLAIMED:
                self._write(replace(job, status=QUEUED, worker_id=None, heartbeat_at=None, step=0))
                (self.root / "queue" / f"{0:020d}-{job_id}").touch()  # order 0: claimed before newer jobs

    def heartbeat(self, job_id: str) -> None:
        self.update(job_id, expect=CLAIMED, heartbeat_at=time.time())

    def stale_jobs(self, stale_after_s: float) -> list[str]:
        now = time.time()
        return [j.id for j in self._all() if j.status in CLAIMED and now - (j.heartbeat_at or 0) > stale_after_s]

    def add_event(self, job_id: str, event: dict[str, Any]) -> None:
        with self._locked(), open(self.root / "events" / f"{job_id}.jsonl", "a") as out:
            out.write(json.dumps(event) + "\n")

    def events(self, job_id: str) -> list[dict[str, Any]]:
        try:
            lines = (self.root / "events" / f"{job_id}.jsonl").read_text().splitlines()
        except FileNotFoundError:
            return []
        return [json.loads(line) for line in lines if line.strip()]

    def close(self) -> None:
        os.close(self._lock_fd)

    def _all(self) -> Iterator[JobRecord]:
        for path in (self.root / "jobs").glob("ftjob-*.json"):
            try:
                yield JobRecord.from_json(path.read_bytes())
            except (OSError, ValueError, TypeError):
                continue

    def _write(self, job: JobRecord) -> None:
        path = self.root / "jobs" / f"{job.id}.json"
        tmp = path.with_name(f".{path.name}.tmp-{uuid.uuid4().hex}")
        try:
            with open(tmp, "w") as out:
                out.write(job.to_json())
                out.flush()
                os.fsync(out.fileno())
            os.replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)

    @contextmanager
    def _locked(self) -> Iterator[None]:
        with self._thread_lock:
            fcntl.flock(self._lock_fd, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(self._lock_fd, fcntl.LOCK_UN)


def _is_job_id(job_id: str) -> bool:
    return len(job_id) == 30 and job_id.startswith("ftjob-") and all(c in "0123456789abcdef" for c in job_id[6:])


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


class RedisJobStore:
    """Jobs shared by every replica and worker:

        <ns>:ftjob:<id>             STRING record JSON (changed with WATCH/MULTI: check-and-set)
        <ns>:ftjob-events:<id>      LIST   event JSON, oldest first
        <ns>:ftjobs / :ftjobs:<t>   ZSET   ids by creation order (all / per tenant)
        <ns>:ftjob-active:<t>       SET    the tenant's queued + claimed ids (the concurrency limit)
        <ns>:ftjob-queue            LIST   queued ids; a claim RPOPLPUSHes the oldest into...
        <ns>:ftjob-processing       LIST   ...claimed ids, until the job ends
        <ns>:ftjob-heartbeats       HASH   id -> unix time of its worker's last heartbeat

    Short socket timeouts: a Redis failure is a 503 after about a second, not a hung request.
    """

    def __init__(self, redis_url: str, namespace: str = "loraplex", timeout_s: float = 1.0):
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
        self._claim = self._redis.register_script(_CLAIM)
        self._create = self._redis.register_script(_CREATE)

    def create(self, job: JobRecord, max_active_per_tenant: int) -> JobRecord:
        keys = [self._active(job.tenant), self._job(job.id), f"{self.ns}:ftjobs", f"{self.ns}:ftjobs:{job.tenant}", self._queue]
        with self._errors("create a job"):
            created = self._create(keys=keys, args=[max_active_per_tenant, job.id, job.to_json(), job.order])
        if not created:
            raise TooManyJobs(f"tenant {job.tenant} already has {max_active_per_tenant} active fine-tuning jobs "
                              f"(the limit); wait for one to finish or cancel one")
        return job

    def get(self, job_id: str) -> JobRecord:
        if not _is_job_id(job_id):
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
            self._redis.rpush(f"{self.ns}:ftjob-events:{job_id}", json.dumps(event))

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
