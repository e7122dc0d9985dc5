"""The Redis index rebuilt from the data volume, so losing Redis's data (FLUSHALL, a restart without AOF, an
old snapshot) never empties the registry.

The volume is the truth: every version dir holds its `meta.json`, and each adapter dir's `newest` / `latest`
marks say which versions were published and which one the bare name serves (`versioned_store`). Publishing
the same record again is idempotent and the latest pointer only moves forward, so a rebuild may race with
uploads and with the other replicas' rebuilds.

`IndexGuard` runs on every replica with a Redis index: at start and every `full_check_s` it republishes
whatever the index lacks; every `check_s` it looks for the `complete` key, whose absence means Redis lost its
data, and rebuilds at once. While it knows the index is short, `is_consistent` is False (readiness 503).
"""
from __future__ import annotations

import logging
import threading
import time

from loraplex.registry.errors import RegistryError
from loraplex.registry.versioned_store import (
    LATEST_FILE, META_FILE, VersionedAdapterStore, _id_subdirs, _read_meta, _read_version, _version_dirs,
    published_mark,
)

log = logging.getLogger(__name__)

CHECK_S = 1.0
FULL_CHECK_S = 60.0


def republish_missing(store: VersionedAdapterStore) -> list[str]:
    """Publish every version the volume marks published that the index lacks; the versioned ids republished."""
    republished = []
    for tenant in _id_subdirs(store.data_dir):
        with store._tenant_lock(tenant):  # no put of this tenant is half way meanwhile
            for name in _id_subdirs(store.data_dir / tenant):
                republished += _republish_adapter(store, tenant, name)
    return republished


def _republish_adapter(store: VersionedAdapterStore, tenant: str, name: str) -> list[str]:
    adapter_dir = store.data_dir / tenant / name
    mark = published_mark(adapter_dir)  # None: from before marks, every whole version dir was published
    records = [r for v in _version_dirs(adapter_dir) if mark is None or v <= mark
               if (r := _read_meta(adapter_dir / f"v{v}" / META_FILE)) is not None]
    latest_version = _read_version(adapter_dir / LATEST_FILE) or max((r.version for r in records), default=None)
    current = store.index.get(tenant, name, None)
    done = []
    for record in records:  # the promoted one last: the pointer moves once, to it
        if record.version != latest_version and store.index.get(tenant, name, record.version) is None:
            store.index.publish(record, promote=False)
            done.append(record.versioned_id)
    latest = next((r for r in records if r.version == latest_version), None)
    if latest is not None and (current is None or current.version < latest.version
                               or store.index.get(tenant, name, latest.version) is None):
        store.index.publish(latest, promote=True)
        done.append(latest.versioned_id)
    return done


class IndexGuard:
    """Keeps a Redis index as complete as the volume; see the module doc."""

    def __init__(self, store: VersionedAdapterStore, check_s: float = CHECK_S, full_check_s: float = FULL_CHECK_S):
        self.store, self.index = store, store.index
        self.check_s, self.full_check_s = check_s, full_check_s
        self.is_consistent = True  # False only while known to be short: an unreachable Redis is not that
        self._next_full_check = 0.0
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None

    def check(self) -> None:
        """One round: rebuild if the index lost its data, or if a full check is due."""
        is_lost = not self.index.is_complete()
        if not is_lost and time.monotonic() < self._next_full_check:
            return
        if is_lost:
            self.is_consistent = False
            log.error("adapter index in Redis is empty or lost its data: rebuilding it from the meta.json files "
                      "on the data volume; not ready until done")
        started = time.monotonic()
        republished = republish_missing(self.store)
        self.index.mark_complete()
        self._next_full_check = time.monotonic() + self.full_check_s
        self.is_consistent = True
        if republished:
            log.error("adapter index rebuilt in %.2f s: %d versions published again from the data volume (%s)",
                      time.monotonic() - started, len(republished), ", ".join(republished[:20]))

    def start(self) -> None:
        self._try_check()
        self._thread = threading.Thread(target=self._run, name="loraplex-index-guard", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stopping.set()
        if self._thread is not None:
            self._thread.join(timeout=5)

    def _run(self) -> None:
        while not self._stopping.wait(self.check_s):
            self._try_check()

    def _try_check(self) -> None:
        try:
            self.check()
        except RegistryError as exc:  # Redis unreachable: the next round tries again
            log.warning("cannot check the adapter index now: %s", exc)
        except Exception:
            log.exception("checking the adapter index failed")

