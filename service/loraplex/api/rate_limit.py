"""Per-tenant request and token rate limits (token buckets refilled per minute) -> 429 + Retry-After."""
from __future__ import annotations

import math
import threading
import time

from loraplex.api.errors import RateLimited


class _Bucket:
    def __init__(self, per_minute: int):
        self.capacity = float(per_minute)
        self.level = float(per_minute)
        self.rate_per_s = per_minute / 60.0
        self.updated = time.monotonic()

    def seconds_until(self, amount: float) -> float:
        """0 if `amount` is available now (and refill first); else how long until it is."""
        now = time.monotonic()
        self.level = min(self.capacity, self.level + (now - self.updated) * self.rate_per_s)
        self.updated = now
        missing = min(amount, self.capacity) - self.level
        return 0.0 if missing <= 0 else missing / self.rate_per_s


class TenantRateLimiter:
    def __init__(self, requests_per_minute: int, tokens_per_minute: int):
        self.requests_per_minute, self.tokens_per_minute = requests_per_minute, tokens_per_minute
        self._buckets: dict[tuple[str, str], _Bucket] = {}
        self._lock = threading.Lock()

    def check(self, tenant: str, num_tokens: int) -> None:
        """Take one request and `num_tokens` from the tenant's buckets, or raise RateLimited (taking nothing)."""
        limits = [("requests", self.requests_per_minute, 1), ("tokens", self.tokens_per_minute, num_tokens)]
        limits = [(kind, per_minute, amount) for kind, per_minute, amount in limits if per_minute > 0]
        with self._lock:
            buckets = [(kind, self._bucket(tenant, kind, per_minute), amount) for kind, per_minute, amount in limits]
            waits = [(bucket.seconds_until(amount), kind) for kind, bucket, amount in buckets]
            wait, kind = max(waits, default=(0.0, ""))
            if wait > 0:
                raise RateLimited(f"Tenant {kind} per minute limit reached; retry in {math.ceil(wait)} s.",
                                  headers={"Retry-After": str(math.ceil(wait))}, code="tenant_rate_limited")
            for _, bucket, amount in buckets:
                bucket.level -= min(amount, bucket.capacity)

    def _bucket(self, tenant: str, kind: str, per_minute: int) -> _Bucket:
        key = (tenant, kind)
        if key not in self._buckets:
            self._buckets[key] = _Bucket(per_minute)
        return self._buckets[key]
