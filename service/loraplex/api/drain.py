"""Graceful drain: after SIGTERM, refuse new work (readiness false, 503), let in-flight requests finish.
Streams still open when the grace period ends are ended in-band (`grace_over`: an error event, then the
stream's end frame) rather than cut mid-body."""
from __future__ import annotations

import asyncio
import logging
import time

log = logging.getLogger(__name__)

# Paths that keep answering while draining: probes must report the drain, scrapes must see it.
UNCOUNTED_PATHS = frozenset({"/healthz", "/readyz", "/startupz", "/metrics"})


class DrainState:
    def __init__(self) -> None:
        self.is_draining = False
        self.num_in_flight = 0
        self._idle = asyncio.Event()
        self._idle.set()
        self.grace_over = asyncio.Event()  # open streams end themselves when this is set

    def request_started(self) -> None:
        self.num_in_flight += 1
        self._idle.clear()

    def request_finished(self) -> None:
        self.num_in_flight -= 1
        if self.num_in_flight == 0:
            self._idle.set()

    def begin(self) -> None:
        if not self.is_draining:
            log.info("draining: refusing new requests", extra={"num_in_flight": self.num_in_flight})
        self.is_draining = True

    async def wait_idle(self, grace_s: float) -> bool:
        """True if every in-flight request finished within grace_s."""
        started = time.monotonic()
        try:
            await asyncio.wait_for(self._idle.wait(), timeout=grace_s)
        except TimeoutError:
            log.warning("drain grace period over: ending open streams", extra={"num_in_flight": self.num_in_flight})
            self.grace_over.set()
            return False
        log.info("drained", extra={"seconds": round(time.monotonic() - started, 3)})
        return True
