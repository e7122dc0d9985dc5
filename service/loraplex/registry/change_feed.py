"""Adapter change notifications, so every replica can drop what it cached about an adapter.

    {"op": "put" | "delete" | "pin" | ..., "tenant": ..., "name": ..., "version": n | null, "sha256": ... | null}
    {"op": "resync"}   (no other field) something may have been missed: forget everything

`ChangeFeed` carries them over Redis pub/sub (`<namespace>:changes`); `RedisAdapterIndex` publishes its
own put/delete events inside the same Lua script as the change, so an event is never lost by a crash
between the two. Pub/sub keeps no backlog, so the subscriber thread reconnects with backoff after any
failure and then delivers one `resync`. `LocalChangeFeed` is the embedded (single process, no Redis)
stand-in with the same `publish` / `start` / `stop`; `NotifyingIndex` makes an index such as
`LocalJsonIndex` announce its own changes on either feed.

Handlers run on the subscriber thread (Redis) or the publishing thread (local): keep them short and
thread-safe. A handler that raises is logged and the feed goes on.
"""
from __future__ import annotations

import contextlib
import json
import logging
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, NotRequired, Protocol, TypedDict

from loraplex.registry.errors import RegistryError, RegistryUnavailable

if TYPE_CHECKING:
    from loraplex.registry.versioned_store import AdapterIndex, AdapterVersion

log = logging.getLogger(__name__)

RESYNC = "resync"
_POLL_S = 0.25  # how often the subscriber looks at its stop flag
_MIN_BACKOFF_S = 0.05


class ChangeEvent(TypedDict):
    op: str
    tenant: NotRequired[str]
    name: NotRequired[str]
    version: NotRequired[int | None]
    sha256: NotRequired[str | None]


ChangeHandler = Callable[[ChangeEvent], None]


class AdapterChangeFeed(Protocol):
    def publish(self, op: str, tenant: str, name: str, version: int | None = None, sha256: str | None = None) -> None: ...

    def start(self, on_change: ChangeHandler) -> None: ...

    def stop(self) -> None: ...


def channel_name(namespace: str) -> str:
    return f"{namespace}:changes"


def make_event(op: str, tenant: str, name: str, version: int | None = None, sha256: str | None = None) -> ChangeEvent:
    return {"op": op, "tenant": tenant, "name": name, "version": version, "sha256": sha256}


def event_json(op: str, tenant: str, name: str, version: int | None = None, sha256: str | None = None) -> str:
    return json.dumps(make_event(op, tenant, name, version, sha256))


class LocalChangeFeed:
    """In-process feed: `publish` calls the handler right away, in the caller's thread."""

    def __init__(self) -> None:
        self._on_change: ChangeHandler | None = None

    def publish(self, op: str, tenant: str, name: str, version: int | None = None, sha256: str | None = None) -> None:
        on_change = self._on_change
        if on_change is not None:
            _deliver(on_change, make_event(op, tenant, name, version, sha256))

    def start(self, on_change: ChangeHandler) -> None:
        self._on_change = on_change

    def stop(self) -> None:
        self._on_change = None


class ChangeFeed:
    """Redis pub/sub feed. `start` returns at once (Redis may be down at startup); the thread keeps
    trying. `wait_subscribed` tells when events are being received."""

    def __init__(
        self, redis_url: str, namespace: str = "loraplex", *, timeout_s: float = 1.0,
        max_backoff_s: float = 2.0, ping_interval_s: float = 5.0,
    ):
        import redis  # the `redis` extra: only replicas sharing a registry need it
        from redis.backoff import NoBackoff
        from redis.retry import Retry

        self._redis_errors = redis.RedisError
        self._timeout_error = redis.TimeoutError
        # No retry inside redis-py: the subscriber must see every disconnect, or it could not resync.
        self._redis = redis.Redis.from_url(
            redis_url, socket_timeout=timeout_s, socket_connect_timeout=timeout_s, retry=Retry(NoBackoff(), 0),
        )
        self.channel = channel_name(namespace)
        self.timeout_s = timeout_s
        self.max_backoff_s = max_backoff_s
        self.ping_interval_s = ping_interval_s  # a silent connection is probed, so a hung Redis is noticed
        self._stopping = threading.Event()
        self._subscribed = threading.Event()
        self._thread: threading.Thread | None = None

    def publish(self, op: str, tenant: str, name: str, version: int | None = None, sha256: str | None = None) -> None:
        try:
            self._redis.publish(self.channel, event_json(op, tenant, name, version, sha256))
        except self._redis_errors as exc:
            raise RegistryUnavailable(f"cannot announce {op} of {tenant}/{name}: Redis unreachable ({exc})") from exc

    def start(self, on_change: ChangeHandler) -> None:
        if self._thread is not None:
            raise RuntimeError("change feed already started")
        self._stopping.clear()
        self._thread = threading.Thread(target=self._run, args=(on_change,), name="loraplex-change-feed", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stopping.set()
        if self._thread is not None:
            self._thread.join(timeout=self.timeout_s + 2 * _POLL_S + 1.0)
            self._thread = None
        self._subscribed.clear()
        self._redis.close()

    def wait_subscribed(self, timeout_s: float) -> bool:
        return self._subscribed.wait(timeout_s)

    @property
    def is_subscribed(self) -> bool:
        return self._subscribed.is_set()

    def _run(self, on_change: ChangeHandler) -> None:
        backoff_s = _MIN_BACKOFF_S
        is_resync_needed = False
        while not self._stopping.is_set():
            try:
                self._listen(on_change, is_resync_needed)
            except self._redis_errors as exc:
                if self._subscribed.is_set() or not is_resync_needed:  # a fresh failure: log it once, retry soon
                    log.warning("change feed cannot listen to Redis (%s); reconnecting", exc)
                    backoff_s = _MIN_BACKOFF_S
                self._subscribed.clear()
                is_resync_needed = True
                self._stopping.wait(backoff_s)
                backoff_s = min(2 * backoff_s, self.max_backoff_s)

    def _listen(self, on_change: ChangeHandler, is_resync_needed: bool) -> None:
        """Until stopped; raises the Redis error that ended the subscription."""
        pubsub = self._redis.pubsub()
        try:
            pubsub.subscribe(self.channel)
            last_heard = time.monotonic()
            ping_sent_at: float | None = None
            while not self._stopping.is_set():
                message = pubsub.get_message(timeout=_POLL_S)
                now = time.monotonic()
                if message is None:
                    if ping_sent_at is not None and now - ping_sent_at > self.timeout_s + _POLL_S:
                        raise self._timeout_error("Redis did not answer PING on the subscription")
                    if ping_sent_at is None and now - last_heard > self.ping_interval_s:
                        pubsub.ping()
                        ping_sent_at = now
                    continue
                last_heard, ping_sent_at = now, None
                if message["type"] == "subscribe":
                    self._subscribed.set()
                    if is_resync_needed:  # only now: events after this point are sure to arrive
                        _deliver(on_change, {"op": RESYNC})
                elif message["type"] == "message":
                    _deliver(on_change, _parse_event(message["data"]))
        finally:
            with contextlib.suppress(Exception):
                pubsub.close()


class NotifyingIndex:
    """An `AdapterIndex` that announces put/delete on `feed` after each change (for indexes that do not
    announce their own, like `LocalJsonIndex`). A failed announcement is logged: the change stands."""

    def __init__(self, index: AdapterIndex, feed: AdapterChangeFeed):
        self.index = index
        self.feed = feed

    def get(self, tenant: str, name: str, version: int | None) -> AdapterVersion | None:
        return self.index.get(tenant, name, version)

    def publish(self, record: AdapterVersion, promote: bool = True) -> None:
        self.index.publish(record, promote)
        if promote:  # an unpromoted version changes what no cached name resolves to
            self._announce("put", record.tenant, record.name, record)

    def remove(self, tenant: str, name: str) -> None:
        try:
            latest = self.index.get(tenant, name, None)
        except RegistryError:
            latest = None
        self.index.remove(tenant, name)
        self._announce("delete", tenant, name, latest)

    def latest_records(self, tenant: str | None) -> list[AdapterVersion]:
        return self.index.latest_records(tenant)

    def _announce(self, op: str, tenant: str, name: str, record: AdapterVersion | None) -> None:
        try:
            self.feed.publish(op, tenant, name, record and record.version, record and record.sha256)
        except RegistryUnavailable as exc:
            log.warning("%s of %s/%s not announced: %s", op, tenant, name, exc)


def _parse_event(data: bytes) -> ChangeEvent:
    """An event we cannot read may have been about anything: treat it as a resync."""
    try:
        event: Any = json.loads(data)
    except ValueError:
        event = None
    if not isinstance(event, dict) or not isinstance(event.get("op"), str):
        log.warning("unreadable change event %r; resyncing", data[:200])
        return {"op": RESYNC}
    return event


def _deliver(on_change: ChangeHandler, event: ChangeEvent) -> None:
    try:
        on_change(event)
    except Exception:
        log.exception("change handler failed on %s", event)
