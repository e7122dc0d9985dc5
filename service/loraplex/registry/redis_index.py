"""`AdapterIndex` in Redis, so that every replica over one shared data volume sees the same versions.

Redis holds only metadata (blobs stay on the shared filesystem, written by the store):

    <ns>:versions:<tenant>/<name>   HASH  version -> record JSON (every published version)
    <ns>:latest:<tenant>            HASH  name -> record JSON of the latest version (one read lists a tenant)
    <ns>:tenants                    SET   tenants with at least one adapter
    <ns>:seq:<tenant>/<name>        INT   last version number handed out by `next_version`
    <ns>:complete                   STR   set once the index holds everything on the volume (`index_repair`);
                                          its absence means Redis lost its data (FLUSHALL, a restart without AOF)
    <ns>:changes                    pub/sub channel of `change_feed` events

Publish and remove are Lua scripts: the records, the latest pointer and the change event move together or
not at all, and the latest pointer only moves forward, so a slow replica's older version never hides a
newer one. Id parts never contain ':' or '/', so keys cannot collide. Every Redis failure is a
`RegistryUnavailable` (503) after at most ~2 socket timeouts; the pool reconnects on the next call.
"""
from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from loraplex.registry.change_feed import channel_name, event_json
from loraplex.registry.errors import RegistryUnavailable
from loraplex.registry.versioned_store import AdapterVersion

log = logging.getLogger(__name__)

DEFAULT_TIMEOUT_S = 1.0

# KEYS: versions, latest, tenants. ARGV: tenant, name, version, record JSON, event JSON, channel, promote (1/0).
_PUBLISH = """
local current = redis.call('HGET', KEYS[2], ARGV[2])
local current_version = 0
if current then
  local ok, record = pcall(cjson.decode, current)
  if ok and type(record) == 'table' and tonumber(record['version']) then current_version = tonumber(record['version']) end
end
redis.call('HSET', KEYS[1], ARGV[3], ARGV[4])
if ARGV[7] ~= '1' or tonumber(ARGV[3]) <= current_version then return 0 end
redis.call('HSET', KEYS[2], ARGV[2], ARGV[4])
redis.call('SADD', KEYS[3], ARGV[1])
redis.call('PUBLISH', ARGV[6], ARGV[5])
return 1
"""

# KEYS: versions, latest, tenants, seq. ARGV: tenant, name, channel.
_REMOVE = """
local current = redis.call('HGET', KEYS[2], ARGV[2])
local event = {op = 'delete', tenant = ARGV[1], name = ARGV[2], version = cjson.null, sha256 = cjson.null}
if current then
  local ok, record = pcall(cjson.decode, current)
  if ok and type(record) == 'table' then event.version = record['version'] or cjson.null; event.sha256 = record['sha256'] or cjson.null end
end
redis.call('DEL', KEYS[1], KEYS[4])
redis.call('HDEL', KEYS[2], ARGV[2])
if redis.call('HLEN', KEYS[2]) == 0 then redis.call('SREM', KEYS[3], ARGV[1]) end
redis.call('PUBLISH', ARGV[3], cjson.encode(event))
return current and 1 or 0
"""

# KEYS: seq. ARGV: floor (the highest version already used, e.g. on disk).
_NEXT_VERSION = """
local version = redis.call('INCR', KEYS[1])
if version <= tonumber(ARGV[1]) then
  version = tonumber(ARGV[1]) + 1
  redis.call('SET', KEYS[1], version)
end
return version
"""


class CorruptIndexRecord(RegistryUnavailable):
    """A record in Redis is not a valid adapter record (hand-edited, or written by an incompatible
    version). 503 like any index failure, with the key named so an operator can fix or delete it."""


class RedisAdapterIndex:
    """The four `AdapterIndex` verbs over Redis, plus `next_version` (atomic INCR) and `ping`.

    `data_dir`: where this replica mounts the shared volume; record paths are rebuilt under it, so
    replicas may mount it at different paths. Without it, the path the publishing replica saw is used.
    """

    def __init__(
        self, redis_url: str, namespace: str = "loraplex", *, data_dir: Path | None = None,
        timeout_s: float = DEFAULT_TIMEOUT_S,
    ):
        self.namespace = namespace
        self.data_dir = Path(data_dir) if data_dir is not None else None
        self.channel = channel_name(namespace)
        # One immediate retry, on connection errors only, covers a pooled connection that died with a
        # restarted server; a timeout is not retried, so a hung Redis costs one `timeout_s`. redis-py's
        # default (10 retries with backoff) would hold a request for many seconds.
        self._redis = redis.Redis.from_url(
            redis_url, socket_timeout=timeout_s, socket_connect_timeout=timeout_s,
            retry=Retry(NoBackoff(), 1, supported_errors=(redis.ConnectionError,)), health_check_interval=30,
        )
        kwargs = self._redis.connection_pool.connection_kwargs
        self._where = f"{kwargs.get('host', kwargs.get('path', '?'))}:{kwargs.get('port', '')}/{kwargs.get('db', 0)}"
        self._publish = self._redis.register_script(_PUBLISH)
        self._remove = self._redis.register_script(_REMOVE)
        self._next_version = self._redis.register_script(_NEXT_VERSION)

    def get(self, tenant: str, name: str, version: int | None) -> AdapterVersion | None:
        if version is None:
            key, field = self._latest_key(tenant), name
        else:
            key, field = self._versions_key(tenant, name), str(version)
        with self._errors(f"get {tenant}/{name}"):
            raw = self._redis.hget(key, field)
        return None if raw is None else self._decode(raw, tenant, name, version, where=f"{key}[{field}]")

    def publish(self, record: AdapterVersion, promote: bool = True) -> None:
        keys = [self._versions_key(record.tenant, record.name), self._latest_key(record.tenant), self._tenants_key()]
        event = event_json("put", record.tenant, record.name, record.version, record.sha256)
        args = [record.tenant, record.name, record.version, _encode(record), event, self.channel, int(promote)]
        with self._errors(f"publish {record.versioned_id}"):
            is_latest = self._publish(keys=keys, args=args)
        if not is_latest and promote:
            log.warning("%s published behind a newer version; the latest pointer was kept", record.versioned_id)

    def remove(self, tenant: str, name: str) -> None:
        keys = [self._versions_key(tenant, name), self._latest_key(tenant), self._tenants_key(), self._seq_key(tenant, name)]
        with self._errors(f"remove {tenant}/{name}"):
            self._remove(keys=keys, args=[tenant, name, self.channel])

    def latest_records(self, tenant: str | None) -> list[AdapterVersion]:
        with self._errors("list"):
            tenants = [tenant] if tenant is not None else sorted(t.decode() for t in self._redis.smembers(self._tenants_key()))
            pipe = self._redis.pipeline(transaction=False)
            for owner in tenants:
                pipe.hgetall(self._latest_key(owner))
            by_tenant = dict(zip(tenants, pipe.execute()))
        records = []
        for owner, raw_by_name in by_tenant.items():
            for raw_name, raw in raw_by_name.items():
                name = raw_name.decode()
                try:
                    records.append(self._decode(raw, owner, name, None, where=f"{self._latest_key(owner)}[{name}]"))
                except CorruptIndexRecord as exc:  # one bad record must not hide every other adapter
                    log.error("%s", exc)
        return sorted(records, key=lambda record: record.id)

    def next_version(self, tenant: str, name: str, floor: int = 0) -> int:
        """A version number no other caller (any replica) gets: one above the last one handed out, and
        above `floor` (the highest version already on disk). Numbers start over after `remove`."""
        with self._errors(f"allocate a version of {tenant}/{name}"):
            return int(self._next_version(keys=[self._seq_key(tenant, name)], args=[floor]))

    def is_complete(self) -> bool:
        with self._errors("check the index"):
            return bool(self._redis.exists(self._complete_key()))

    def mark_complete(self) -> None:
        with self._errors("mark the index complete"):
            self._redis.set(self._complete_key(), "1")

    def ping(self) -> None:
        """RegistryUnavailable unless Redis answers (for readiness probes)."""
        with self._errors("ping"):
            self._redis.ping()

    def close(self) -> None:
        self._redis.close()

    def _decode(self, raw: bytes, tenant: str, name: str, version: int | None, where: str) -> AdapterVersion:
        try:
            meta = json.loads(raw)
            stored_path = Path(meta.pop("path"))
            record = AdapterVersion.from_meta(meta, stored_path)
            if (record.tenant, record.name) != (tenant, name) or not isinstance(record.version, int):
                raise ValueError(f"holds {record.tenant}/{record.name}@{record.version!r}")
            if version is not None and record.version != version:
                raise ValueError(f"holds version {record.version}")
        except (ValueError, TypeError, KeyError, AttributeError) as exc:
            raise CorruptIndexRecord(f"corrupt adapter record in Redis at {self._where}, {where}: {exc}") from None
        if self.data_dir is None:
            return record
        return AdapterVersion.from_meta(record.to_meta(), self.data_dir / tenant / name / f"v{record.version}")

    @contextmanager
    def _errors(self, action: str) -> Iterator[None]:
        try:
            yield
        except (redis.ConnectionError, redis.TimeoutError) as exc:
            raise RegistryUnavailable(f"adapter index unavailable: cannot {action}, Redis at {self._where} unreachable ({exc})") from exc
        except redis.RedisError as exc:
            raise RegistryUnavailable(f"adapter index unavailable: cannot {action}, Redis at {self._where} failed ({exc})") from exc

    def _versions_key(self, tenant: str, name: str) -> str:
        return f"{self.namespace}:versions:{tenant}/{name}"

    def _latest_key(self, tenant: str) -> str:
        return f"{self.namespace}:latest:{tenant}"

    def _tenants_key(self) -> str:
        return f"{self.namespace}:tenants"

    def _complete_key(self) -> str:
        return f"{self.namespace}:complete"

    def _seq_key(self, tenant: str, name: str) -> str:
        return f"{self.namespace}:seq:{tenant}/{name}"


def _encode(record: AdapterVersion) -> str:
    return json.dumps({**record.to_meta(), "path": str(record.path)}, sort_keys=True)

