"""The local job store (one machine; several processes agree through flock):

    <data_dir>/.jobs/jobs/<job id>.json       the record, replaced atomically
    <data_dir>/.jobs/events/<job id>.jsonl    events, appended whole or not at all (a failed append is cut back)
    <data_dir>/.jobs/queue/<order>-<job id>   one empty file per queued job; a claim removes the oldest
    <data_dir>/.jobs/.lock                    every write holds it
"""
from __future__ import annotations

import errno
import fcntl
import json
import logging
import os
import threading
import time
import uuid
from collections.abc import Collection, Iterator
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path
from typing import Any

from loraplex.failpoints import failpoint
from loraplex.training.errors import JobNotFound, TooManyJobs
from loraplex.training.jobs import (
    ACTIVE, CLAIMED, DEFAULT_MAX_FINISHED_PER_TENANT, QUEUED, VALIDATING_FILES, JobRecord, finished_beyond, is_job_id,
)

log = logging.getLogger(__name__)


class LocalJobStore:
    def __init__(self, data_dir: Path, max_finished_per_tenant: int = DEFAULT_MAX_FINISHED_PER_TENANT):
        self.root = Path(data_dir) / ".jobs"
        self.max_finished_per_tenant = max_finished_per_tenant
        for sub in ("jobs", "events", "queue"):
            (self.root / sub).mkdir(parents=True, exist_ok=True)
        self._thread_lock = threading.Lock()  # flock excludes processes, not threads sharing one fd
        self._lock_fd = os.open(self.root / ".lock", os.O_RDWR | os.O_CREAT, 0o644)

    def create(self, job: JobRecord, max_active_per_tenant: int) -> JobRecord:
        """Also deletes the tenant's finished jobs beyond `max_finished_per_tenant` (oldest first), so the
        records every listing and scan reads stay bounded."""
        with self._locked():
            tenant_jobs = [j for j in self._all() if j.tenant == job.tenant]
            num_active = sum(1 for j in tenant_jobs if j.status in ACTIVE)
            if num_active >= max_active_per_tenant:
                raise TooManyJobs(f"tenant {job.tenant} already has {num_active} active fine-tuning jobs "
                                  f"(limit {max_active_per_tenant}); wait for one to finish or cancel one")
            self._write(job)
            (self.root / "queue" / f"{job.order:020d}-{job.id}").touch()
            for old in finished_beyond(tenant_jobs, self.max_finished_per_tenant):
                (self.root / "jobs" / f"{old.id}.json").unlink(missing_ok=True)
                (self.root / "events" / f"{old.id}.jsonl").unlink(missing_ok=True)
        return job

    def get(self, job_id: str) -> JobRecord:
        if not is_job_id(job_id):
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
        """The record is written before the queue entry goes: a claim that fails (a full disk) leaves the
        job queued and claimable, never `queued` with no entry (which no worker would ever find)."""
        with self._locked():
            for entry in sorted((self.root / "queue").iterdir()):
                job_id = entry.name.partition("-")[2]
                try:
                    job = self.get(job_id)
                except JobNotFound:
                    entry.unlink(missing_ok=True)
                    continue
                if job.status == QUEUED:
                    job = replace(job, status=VALIDATING_FILES, worker_id=worker_id, heartbeat_at=time.time())
                    failpoint("local_jobs.before_claim_write")
                    self._write(job)
                    entry.unlink(missing_ok=True)
                    return job
                entry.unlink(missing_ok=True)  # cancelled while queued
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
        """One write of the whole line; if it fails part way (a full disk) the file is cut back to where it
        was, so no half line is left for readers."""
        line = (json.dumps(event) + "\n").encode()
        with self._locked():
            fd = os.open(self.root / "events" / f"{job_id}.jsonl", os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o644)
            try:
                size = os.fstat(fd).st_size
                if size and os.pread(fd, 1, size - 1) != b"\n":  # a torn line left by a crash: end it first
                    line = b"\n" + line
                try:
                    failpoint("local_jobs.before_event_write")
                    if os.write(fd, line) != len(line):
                        raise OSError(errno.ENOSPC, "No space left on device (short write)")
                except OSError:
                    os.ftruncate(fd, size)
                    raise
            finally:
                os.close(fd)

    def events(self, job_id: str) -> list[dict[str, Any]]:
        """Every readable event; a torn line (a crash mid-append by an older version) is skipped, logged."""
        try:
            lines = (self.root / "events" / f"{job_id}.jsonl").read_bytes().split(b"\n")
        except FileNotFoundError:
            return []
        events = []
        for line in filter(bytes.strip, lines):
            try:
                events.append(json.loads(line))
            except ValueError:
                log.warning("job %s: skipping an unreadable event line (%d bytes)", job_id, len(line))
        return events

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
