"""Who may open one more request: a bounded share of the waiting room per tenant.

The room holds `max_queue` waiting requests for everyone. One shared limit lets a single tenant's
flood fill it, and then every other tenant gets 429 (`queue_full`) while the flooder holds the room.
So a request is let in when either

- the room has space (`num_waiting < max_queue`): work-conserving, a lone tenant may use all of it; or
- its tenant holds fewer open requests (waiting + running) than its fair share of the whole capacity,
  `(max_num_seqs + max_queue) // tenants with open requests` (itself included).

A newcomer is therefore always under its share of a full room and gets in, while the tenant that
filled it is held at its share until its requests drain. Requests let in past a full room number at
most one capacity in all (each tenant only up to its share), so the room never holds more than twice
`max_queue`. Which waiting request runs next is the scheduler's fair order (a virtual token counter
per tenant); this module decides only who may wait. Not thread-safe: the caller holds its lock.
"""
from __future__ import annotations

from collections import Counter

from loraplex.engine.errors import QueueFullError


class WaitingRoom:
    def __init__(self, max_queue: int, max_num_seqs: int):
        self.max_queue = max_queue
        self.capacity = max_num_seqs + max_queue  # open requests the engine is sized for (running + waiting)
        self.open_by_tenant: Counter[str] = Counter()

    def fair_share(self, tenant: str) -> int:
        num_tenants = len(self.open_by_tenant) + (tenant not in self.open_by_tenant)
        return max(1, self.capacity // num_tenants)

    def enter(self, tenant: str, num_waiting: int) -> None:
        """Count one more open request for `tenant`, or raise QueueFullError (429) leaving nothing counted."""
        if num_waiting >= self.max_queue and self.open_by_tenant[tenant] >= self.fair_share(tenant):
            raise QueueFullError(
                f"{num_waiting} requests are already waiting and this tenant holds its share "
                f"({self.open_by_tenant[tenant]} open); retry shortly", retry_after_s=1,
            )
        self.open_by_tenant[tenant] += 1

    def leave(self, tenant: str) -> None:
        self.open_by_tenant[tenant] -= 1
        if self.open_by_tenant[tenant] <= 0:
            del self.open_by_tenant[tenant]
