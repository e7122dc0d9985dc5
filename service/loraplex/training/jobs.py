"""Fine-tuning jobs: the record, its events, and two `JobStore`s that are also the durable queue.

Life of a job: `queued` (created by the API) -> `validating_files` (a worker claimed it) -> `running`
-> `succeeded` | `failed` | `cancelled`. Only the API creates jobs and only workers train them; they meet
in the store, so the API process never trains. A claimed job carries its worker's heartbeat; one whose
heartbeat is older than `stale_after_s` is failed by whoever reaps first (the server or another worker).

Stores: `local_jobs.LocalJobStore` (one machine, files + flock) and `redis_jobs.RedisJobStore`
(replicas and workers on several machines); `job_store.build_job_store` picks one from the settings.
"""
from __future__ import annotations

import json
import time
import uuid
from collections.abc import Collection
from dataclasses import asdict, dataclass, field, fields
from typing import Any, Protocol

QUEUED, VALIDATING_FILES, RUNNING = "queued", "validating_files", "running"
SUCCEEDED, FAILED, CANCELLED = "succeeded", "failed", "cancelled"
CLAIMED = (VALIDATING_FILES, RUNNING)  # a worker owns the job and must keep its heartbeat fresh
ACTIVE = (QUEUED, *CLAIMED)  # count against the tenant's concurrent-job limit
TERMINAL = (SUCCEEDED, FAILED, CANCELLED)
WORKER_LOST = "worker_lost"
SUPERVISED, DPO = "supervised", "dpo"


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
    method: str = SUPERVISED  # "supervised" | "dpo"
    parent_model: str | None = None  # continued training: the adapter version it starts from, `<t>/<n>@<v>`
    replay_file: str | None = None

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, raw: str | bytes) -> JobRecord:
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in json.loads(raw).items() if k in known})


DEFAULT_MAX_FINISHED_PER_TENANT = 100


def finished_beyond(jobs: list[JobRecord], keep: int) -> list[JobRecord]:
    """The finished jobs past the newest `keep` of them (retention: what a store deletes on create)."""
    finished = sorted((j for j in jobs if j.status in TERMINAL), key=lambda j: j.order, reverse=True)
    return finished[keep:]


def new_job_id() -> str:
    return f"ftjob-{uuid.uuid4().hex[:24]}"


def is_job_id(job_id: str) -> bool:
    return len(job_id) == 30 and job_id.startswith("ftjob-") and all(c in "0123456789abcdef" for c in job_id[6:])


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


def parent_job(store: JobStore, tenant: str, versioned_id: str) -> JobRecord | None:
    """The tenant's succeeded job that produced adapter version `versioned_id`, if it is still on record."""
    for job in store.list(tenant):
        if job.status == SUCCEEDED and job.fine_tuned_model == versioned_id:
            return job
    return None
