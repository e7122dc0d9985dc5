"""The shared registry: `RedisAdapterIndex` and `ChangeFeed` against a real redis-server, as two replicas
would use them (two clients, one server), including a killed and a frozen server."""
from __future__ import annotations

import json
import os
import queue
import shutil
import threading
import time
from pathlib import Path

import pytest

from loraplex.registry.adapter_config import CONFIG_FILE, WEIGHTS_FILE
from loraplex.registry.change_feed import RESYNC, ChangeFeed, LocalChangeFeed, NotifyingIndex
from loraplex.registry.errors import AdapterNotFound, RegistryUnavailable
from loraplex.registry.validation import module_shapes_from_hf_config, validate_adapter_files
from loraplex.registry.versioned_store import AdapterVersion, LocalJsonIndex, VersionedAdapterStore
from tests.redis_server import REDIS_SERVER, redis_server, redis_url  # noqa: F401  (fixtures)

redis = pytest.importorskip("redis")  # the `redis` extra (in `dev`)
from loraplex.registry.redis_index import CorruptIndexRecord, RedisAdapterIndex  # noqa: E402

pytestmark = [pytest.mark.redis, pytest.mark.timeout(30)]
EVENT_TIMEOUT_S = 2.0


def record(tenant: str = "acme", name: str = "sql", version: int = 1, root: Path = Path("/data"), shared: bool = False) -> AdapterVersion:
    return AdapterVersion(
        id=f"{tenant}/{name}", tenant=tenant, name=name, version=version, sha256=f"{version:064x}", rank=8, alpha=16.0,
        target_modules=("q_proj", "v_proj"), size_bytes=1000, created_at=1_700_000_000, shared=shared,
        path=root / tenant / name / f"v{version}",
    )


class Events:
    """A change handler that queues what it gets, for waiting on."""

    def __init__(self):
        self.queue: queue.Queue = queue.Queue()

    def __call__(self, event) -> None:
        self.queue.put(event)

    def next(self, timeout_s: float = EVENT_TIMEOUT_S) -> dict:
        try:
            return self.queue.get(timeout=timeout_s)
        except queue.Empty:
            pytest.fail(f"no change event within {timeout_s} s")

    def next_of(self, op: str, timeout_s: float = EVENT_TIMEOUT_S) -> dict:
        deadline = time.monotonic() + timeout_s
        while (event := self.next(max(0.01, deadline - time.monotonic())))["op"] != op:
            pass
        return event


@pytest.fixture
def replicas(redis_url):
    a, b = RedisAdapterIndex(redis_url), RedisAdapterIndex(redis_url)
    yield a, b
    a.close()
    b.close()


@pytest.fixture
def feed(redis_url):
    """A subscribed feed on "replica B", with fast reconnects and liveness probes for the fault tests."""
    feed, events = ChangeFeed(redis_url, max_backoff_s=0.2, ping_interval_s=0.5), Events()
    feed.start(events)
    assert feed.wait_subscribed(5.0), "the change feed never subscribed"
    yield feed, events
    feed.stop()


def raw_client(url: str):
    return redis.Redis.from_url(url, socket_timeout=2)


def test_redis_server_is_installed_in_ci():
    if os.environ.get("CI"):
        assert shutil.which(REDIS_SERVER), "CI must install redis-server: the shared-registry tests need it"


# --- the index, shared by two replicas ---------------------------------------------------------------


def test_two_replicas_see_each_others_publish_and_remove(replicas):
    a, b = replicas
    assert b.get("acme", "sql", None) is None and b.latest_records(None) == []
    a.publish(record(version=1))
    assert b.get("acme", "sql", None) == record(version=1) == b.get("acme", "sql", 1)
    b.publish(record(version=2))
    b.publish(record("globex", "chat", shared=True))
    assert a.get("acme", "sql", None) == record(version=2) and a.get("acme", "sql", 1) == record(version=1)
    assert a.latest_records(None) == [record(version=2), record("globex", "chat", shared=True)]
    assert a.latest_records("acme") == [record(version=2)] and a.latest_records("nobody") == []
    b.remove("acme", "sql")
    assert a.get("acme", "sql", None) is None and a.get("acme", "sql", 1) is None
    assert [r.id for r in a.latest_records(None)] == ["globex/chat"]


def test_latest_only_moves_forward(replicas):
    """A replica that publishes an older version late (it was slow) must not hide the newer one."""
    a, b = replicas
    a.publish(record(version=3))
    b.publish(record(version=2))
    assert a.get("acme", "sql", None).version == 3 and a.get("acme", "sql", 2) == record(version=2)


def test_paths_are_rebuilt_under_each_replicas_mount(redis_url, tmp_path):
    """Replicas may mount the shared volume at different paths."""
    writer = RedisAdapterIndex(redis_url, data_dir=tmp_path / "mnt-a")
    reader = RedisAdapterIndex(redis_url, data_dir=tmp_path / "mnt-b")
    writer.publish(record(root=tmp_path / "mnt-a"))
    assert reader.get("acme", "sql", None).path == tmp_path / "mnt-b" / "acme" / "sql" / "v1"
    assert reader.latest_records(None)[0].path == tmp_path / "mnt-b" / "acme" / "sql" / "v1"


def test_namespaces_do_not_see_each_other(redis_url):
    RedisAdapterIndex(redis_url, namespace="blue").publish(record())
    assert RedisAdapterIndex(redis_url, namespace="green").latest_records(None) == []


def test_concurrent_version_allocation_is_distinct_and_consecutive(replicas):
    a, b = replicas
    got: list[int] = []
    lock = threading.Lock()

    def allocate(index):
        versions = [index.next_version("acme", "sql") for _ in range(25)]
        with lock:
            got.extend(versions)

    threads = [threading.Thread(target=allocate, args=(index,)) for index in (a, a, b, b)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sorted(got) == list(range(1, 101))
    assert a.next_version("acme", "sql", floor=200) == 201  # never at or below what is already on disk
    assert b.next_version("acme", "other") == 1  # per adapter
    a.remove("acme", "sql")
    assert b.next_version("acme", "sql") == 1  # starts over, like the directory layout


# --- the change feed -----------------------------------------------------------------------------------


def test_subscriber_receives_the_other_replicas_put_and_delete(replicas, feed):
    a, _ = replicas
    _, events = feed
    a.publish(record(version=1))
    assert events.next() == {"op": "put", "tenant": "acme", "name": "sql", "version": 1, "sha256": record().sha256}
    a.remove("acme", "sql")
    assert events.next() == {"op": "delete", "tenant": "acme", "name": "sql", "version": 1, "sha256": record().sha256}
    a.remove("acme", "gone")  # nothing was published: still announced, with what is known
    assert events.next() == {"op": "delete", "tenant": "acme", "name": "gone", "version": None, "sha256": None}


def test_other_ops_and_unreadable_events(redis_url, feed):
    feed_b, events = feed
    other = ChangeFeed(redis_url)
    other.publish("pin", "acme", "sql", 3, "ab" * 32)
    assert events.next() == {"op": "pin", "tenant": "acme", "name": "sql", "version": 3, "sha256": "ab" * 32}
    raw_client(redis_url).publish(feed_b.channel, b"{not json")
    assert events.next() == {"op": RESYNC}  # it may have been about anything
    other.stop()


def test_a_failing_handler_does_not_stop_the_feed(replicas, redis_url):
    events = Events()

    def handler(event):
        events(event)
        raise RuntimeError("cache bug")

    feed = ChangeFeed(redis_url)
    feed.start(handler)
    assert feed.wait_subscribed(5.0)
    replicas[0].publish(record(version=1))
    replicas[0].publish(record(version=2))
    assert [events.next()["version"], events.next()["version"]] == [1, 2]
    feed.stop()


# --- faults --------------------------------------------------------------------------------------------


def assert_unavailable_quickly(call, max_s: float = 2.5) -> RegistryUnavailable:
    started = time.monotonic()
    with pytest.raises(RegistryUnavailable) as caught:
        call()
    assert time.monotonic() - started < max_s, f"took {time.monotonic() - started:.1f} s"
    assert caught.value.status == 503 and "Redis at 127.0.0.1:" in str(caught.value)
    return caught.value


def test_killed_redis_is_503_at_once_and_everything_recovers(redis_server, replicas, feed):
    a, b = replicas
    _, events = feed
    a.publish(record(version=1))
    assert events.next()["op"] == "put"
    redis_server.stop()
    assert_unavailable_quickly(lambda: b.get("acme", "sql", None))
    assert_unavailable_quickly(lambda: a.publish(record(version=2)))
    assert_unavailable_quickly(lambda: a.remove("acme", "sql"))
    assert_unavailable_quickly(lambda: b.latest_records(None))
    assert_unavailable_quickly(lambda: a.next_version("acme", "sql"))
    assert_unavailable_quickly(b.ping)
    redis_server.start()  # empty: no persistence in tests
    assert events.next_of(RESYNC, timeout_s=5.0) == {"op": RESYNC}
    assert b.get("acme", "sql", None) is None  # the same clients reconnect on their own
    a.publish(record(version=2))
    assert b.get("acme", "sql", None) == record(version=2)
    assert events.next() == {"op": "put", "tenant": "acme", "name": "sql", "version": 2, "sha256": record(version=2).sha256}


def test_frozen_redis_times_out_instead_of_hanging(redis_server, replicas, feed):
    a, _ = replicas
    _, events = feed
    a.publish(record(version=1))
    assert events.next()["op"] == "put"
    redis_server.pause()
    try:
        error = assert_unavailable_quickly(lambda: a.get("acme", "sql", None), max_s=1.8)  # one 1 s timeout
        assert "unreachable" in str(error)
        time.sleep(2.0)  # long enough for the subscriber's probe to go unanswered
    finally:
        redis_server.resume()
    assert events.next_of(RESYNC, timeout_s=5.0) == {"op": RESYNC}
    assert a.get("acme", "sql", None) == record(version=1)


def test_a_feed_started_while_redis_is_down_connects_later(redis_server):
    redis_server.stop()
    feed, events = ChangeFeed(redis_server.url, max_backoff_s=0.2), Events()
    feed.start(events)
    try:
        assert not feed.wait_subscribed(0.5)
        redis_server.start()
        assert feed.wait_subscribed(5.0)
        assert events.next() == {"op": RESYNC}  # the caches may hold what changed meanwhile
    finally:
        feed.stop()


def test_malformed_records_are_a_clear_error_not_a_crash(redis_url, replicas, caplog):
    a, b = replicas
    a.publish(record(version=1))
    a.publish(record("acme", "chat"))
    client = raw_client(redis_url)
    client.hset("loraplex:latest:acme", "sql", b"{not json")
    client.hset("loraplex:versions:acme/chat", "1", json.dumps({"id": "acme/chat", "version": 1}))
    client.hset("loraplex:versions:acme/chat", "2", json.dumps({**record("acme", "other").to_meta(), "path": "/x"}))
    with pytest.raises(CorruptIndexRecord) as caught:
        b.get("acme", "sql", None)
    assert caught.value.status == 503 and "loraplex:latest:acme[sql]" in str(caught.value)
    with pytest.raises(CorruptIndexRecord, match=r"loraplex:versions:acme/chat\[1\]"):
        b.get("acme", "chat", 1)
    with pytest.raises(CorruptIndexRecord, match="holds acme/other"):
        b.get("acme", "chat", 2)
    assert [r.id for r in b.latest_records(None)] == ["acme/chat"]  # the bad one is skipped, and logged
    assert "loraplex:latest:acme[sql]" in caplog.text
    a.publish(record(version=2))  # a new version replaces the unreadable pointer
    assert b.get("acme", "sql", None) == record(version=2)


# --- the versioned store on a shared volume --------------------------------------------------------------


@pytest.fixture(scope="module")
def uploads(make_adapter, demo_model_dir):
    """Two real PEFT adapters as (files, validated)."""
    module_shapes = module_shapes_from_hf_config(json.loads((demo_model_dir / "config.json").read_text()))

    def load(directory: Path):
        files = {name: (directory / name).read_bytes() for name in (CONFIG_FILE, WEIGHTS_FILE)}
        return files, validate_adapter_files(files[CONFIG_FILE], files[WEIGHTS_FILE], module_shapes, max_rank=16, max_bytes=1 << 24)

    return load(make_adapter("redis/one", r=8)), load(make_adapter("redis/two", r=4, seed=1))


def test_versioned_store_over_redis_index(redis_url, tmp_path, uploads, feed):
    upload, upload2 = uploads
    shared_volume = tmp_path / "shared"
    store_a = VersionedAdapterStore(shared_volume, index=RedisAdapterIndex(redis_url, data_dir=shared_volume))
    store_b = VersionedAdapterStore(shared_volume, index=RedisAdapterIndex(redis_url, data_dir=shared_volume))
    _, events = feed

    first = store_a.put("acme", "sql", *upload)
    assert store_b.get("acme", "sql") == first and store_b.get_by_id("acme/sql@1") == first
    assert (Path(store_b.get("acme", "sql").path) / WEIGHTS_FILE).read_bytes() == upload[0][WEIGHTS_FILE]
    assert events.next() == {"op": "put", "tenant": "acme", "name": "sql", "version": 1, "sha256": first.sha256}

    second = store_b.put("acme", "sql", *upload2, shared=True)
    assert second.version == 2 and store_a.get("acme", "sql") == second
    assert store_a.get("acme", "sql", 1).shared  # sharing follows the latest version, on every replica
    assert [r.versioned_id for r in store_a.list("globex")] == ["acme/sql@2"]
    assert events.next()["version"] == 2

    store_a.delete("acme", "sql")
    with pytest.raises(AdapterNotFound):
        store_b.get("acme", "sql")
    assert store_b.list(None) == [] and events.next()["op"] == "delete"


def test_local_feed_announces_a_local_index(tmp_path, uploads):
    """The embedded default: no Redis, same events, delivered in the writer's thread."""
    feed, events = LocalChangeFeed(), Events()
    store = VersionedAdapterStore(tmp_path, index=NotifyingIndex(LocalJsonIndex(tmp_path, 256, ("q_proj", "v_proj")), feed))
    store.put("acme", "sql", *uploads[0])  # not started: nobody listens, nothing fails
    feed.start(events)
    second = store.put("acme", "sql", *uploads[1])
    assert events.queue.get_nowait() == {"op": "put", "tenant": "acme", "name": "sql", "version": 2, "sha256": second.sha256}
    store.delete("acme", "sql")
    assert events.queue.get_nowait() == {"op": "delete", "tenant": "acme", "name": "sql", "version": 2, "sha256": second.sha256}
    feed.stop()
    feed.publish("pin", "acme", "sql", 2)
    assert events.queue.empty()


def test_an_unpromoted_version_keeps_the_latest_pointer(replicas):
    a, b = replicas
    a.publish(record(name="guarded", version=1))
    b.publish(record(name="guarded", version=2), promote=False)
    assert a.get("acme", "guarded", None).version == 1 and a.get("acme", "guarded", 2) == record(name="guarded", version=2)
    assert [r.versioned_id for r in b.latest_records("acme") if r.name == "guarded"] == ["acme/guarded@1"]
