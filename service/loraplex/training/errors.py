"""Errors of fine-tuning jobs and training files. They derive from the service's one base class
(loraplex/errors.py), not from the registry's: a missing job is not an adapter store failure."""
from __future__ import annotations

from loraplex.errors import LoraplexError


class JobNotFound(LoraplexError):
    """Missing and another tenant's jobs read the same."""

    status = 404
    code = "job_not_found"
    param = "fine_tuning_job_id"

    def __init__(self, job_id: str):
        super().__init__(f"No such fine-tuning job: {job_id}")


class TooManyJobs(LoraplexError):
    """The tenant's concurrent-job limit. 429 but not a `rate_limit_error`: it lasts until a job ends."""

    status = 429
    code = "too_many_jobs"


class JobStoreUnavailable(LoraplexError):
    """Redis (or the job directory) failed; the request may succeed if retried."""

    status = 503
    code = "job_store_unavailable"


class FileNotFound(LoraplexError):
    """404 for a missing file, a malformed id and another tenant's file alike (no existence oracle)."""

    status = 404
    code = "file_not_found"

    def __init__(self, file_id: str, param: str | None = "file_id"):
        super().__init__(f"No such File object: {file_id}", param)
        self.file_id = file_id
        self.param = param  # None too: a file named by no request field
