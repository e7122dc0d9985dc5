"""Which `JobStore` a process uses: Redis when `redis_url` is set, else the local files under `data_dir`.

Its own module so that `jobs` (the record and the protocol) imports neither store and neither store
imports back through it: `jobs` <- `local_jobs` / `redis_jobs` <- `job_store`, one way.
"""
from __future__ import annotations

from loraplex.training.jobs import JobStore


def build_job_store(settings) -> JobStore:
    if settings.redis_url:
        from loraplex.training.redis_jobs import RedisJobStore

        return RedisJobStore(settings.redis_url, settings.redis_namespace,
                             max_finished_per_tenant=settings.max_finished_jobs_per_tenant)
    from loraplex.training.local_jobs import LocalJobStore

    return LocalJobStore(settings.data_dir, max_finished_per_tenant=settings.max_finished_jobs_per_tenant)
