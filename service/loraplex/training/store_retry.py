"""Job-store writes that outlive a short store outage (Redis restarting, a disk being cleared), so a job that
trains fine is never failed by its bookkeeping, and a job that fails is recorded with its true reason.

`retry_store(call)` retries a write for up to `retry_for_s`; `EventBuffer` keeps a job's events in order
while the store is unreachable and sends them when it answers again (nothing lost, nothing reordered).
"""
from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from typing import Any, TypeVar

from loraplex.registry.errors import RegistryUnavailable
from loraplex.training.errors import JobStoreUnavailable

log = logging.getLogger(__name__)

T = TypeVar("T")
STORE_ERRORS = (JobStoreUnavailable, RegistryUnavailable, OSError)  # Redis or a disk failing: may pass
RETRY_FOR_S = 60.0
MAX_PAUSE_S = 2.0
MAX_PENDING_EVENTS = 10_000  # a day of steps at 1/10 s; older ones are dropped beyond it (and counted)


def retry_store(call: Callable[[], T], what: str, retry_for_s: float = RETRY_FOR_S,
                stop: threading.Event | None = None) -> T:
    """`call()`, retried on store errors with backoff until it answers or `retry_for_s` passes."""
    deadline = time.monotonic() + retry_for_s
    pause_s = 0.1
    while True:
        try:
            return call()
        except STORE_ERRORS as exc:
            if time.monotonic() + pause_s > deadline or (stop is not None and stop.is_set()):
                raise
            log.warning("cannot %s (%s); retrying", what, exc)
        time.sleep(pause_s)
        pause_s = min(2 * pause_s, MAX_PAUSE_S)


class EventBuffer:
    """One job's events: `add` sends now if it can, else keeps them (in order) for the next `add`/`drain`."""

    def __init__(self, store: Any, job_id: str):
        self.store, self.job_id = store, job_id
        self._pending: deque[dict[str, Any]] = deque()
        self._num_dropped = 0
        self._last_error: Exception | None = None  # set while the store does not answer
        self._lock = threading.Lock()

    def add(self, event: dict[str, Any]) -> None:
        with self._lock:
            if len(self._pending) >= MAX_PENDING_EVENTS:
                self._pending.popleft()
                self._num_dropped += 1
            self._pending.append(event)
            self._flush()

    def drain(self, retry_for_s: float = RETRY_FOR_S) -> None:
        """Send everything kept, waiting for the store up to `retry_for_s`; raises the last store error."""
        def flushed() -> None:
            with self._lock:
                if not self._flush():
                    raise self._last_error

        retry_store(flushed, f"send the events of job {self.job_id}", retry_for_s)

    @property
    def num_pending(self) -> int:
        return len(self._pending)

    def _flush(self) -> bool:
        while self._pending:
            try:
                self.store.add_event(self.job_id, self._pending[0])
            except STORE_ERRORS as exc:
                if self._last_error is None:
                    log.warning("job %s: events kept until the job store answers (%s)", self.job_id, exc)
                self._last_error = exc
                return False
            self._pending.popleft()
        self._last_error = None
        if self._num_dropped:
            log.warning("job %s: %d events dropped while the job store was unreachable", self.job_id, self._num_dropped)
            self._num_dropped = 0
        return True
