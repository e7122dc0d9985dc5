"""Uploaded training files: validated JSONL kept per tenant, addressed only by server-made ids.

    <data_dir>/.files/<tenant>/<file-id>.jsonl   the bytes, exactly as uploaded
    <data_dir>/.files/<tenant>/<file-id>.json    the record (written last: a file exists once it is there)

Paths are built from the tenant (an id part) and an id matching `file-<24 hex>`, never from a name the
caller sent. Another tenant's file is reported exactly like a missing one. The directory sits on the
data volume the adapters use, so every replica and worker that sees the adapters sees the files.
"""
from __future__ import annotations

import fcntl
import json
import os
import re
import time
import uuid
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

from loraplex.registry.errors import QuotaExceeded
from loraplex.registry.versioned_store import is_id_part
from loraplex.training.datasets import ParsedDataset, validate_jsonl
from loraplex.training.errors import FileNotFound
from loraplex.training.example_tokens import CountTokens, check_example_tokens

FINE_TUNE = "fine-tune"
PURPOSES = (FINE_TUNE,)
_FILE_ID = re.compile(r"^file-[0-9a-f]{24}$")


@dataclass(frozen=True)
class FileRecord:
    id: str
    tenant: str
    filename: str
    purpose: str
    bytes: int
    created_at: int
    num_examples: int
    format: str  # "prompt_completion" | "chat"
    order: int = 0  # creation time in ns: newest-first listing


@dataclass(frozen=True)
class FileQuota:
    max_files: int = 100
    max_bytes: int = 1 << 30


class FileStore:
    def __init__(self, data_dir: Path, max_bytes: int, max_lines: int, quota: FileQuota = FileQuota(),
                 max_example_tokens: int = 0):
        self.root = Path(data_dir) / ".files"
        self.max_bytes, self.max_lines, self.quota = max_bytes, max_lines, quota
        self.max_example_tokens = max_example_tokens  # 0: no cap
        self.count_tokens: CountTokens | None = None  # the served base's tokenizer, once the server has it

    def create(self, tenant: str, filename: str, purpose: str, data: bytes) -> FileRecord:
        """Validate (DatasetError lists line-numbered problems, examples over the token cap too), check the
        tenant's quota (QuotaExceeded), then store bytes and record, under the tenant's lock (two uploads
        cannot both take the last room)."""
        parsed = validate_jsonl(data, max_bytes=self.max_bytes, max_lines=self.max_lines)
        if self.max_example_tokens and self.count_tokens is not None:
            check_example_tokens(parsed, self.count_tokens, self.max_example_tokens)
        directory = self._tenant_dir(tenant)
        directory.mkdir(parents=True, exist_ok=True)
        lock_fd = os.open(directory, os.O_RDONLY)  # flock on the tenant's directory: no lock file to leave behind
        try:
            fcntl.flock(lock_fd, fcntl.LOCK_EX)
            self._check_quota(tenant, len(data))
            return self._store(tenant, filename, purpose, data, parsed)
        finally:
            os.close(lock_fd)  # releases the lock

    def _check_quota(self, tenant: str, num_new_bytes: int) -> None:
        records = self.list(tenant)
        if len(records) + 1 > self.quota.max_files:
            raise QuotaExceeded(f"tenant {tenant!r} already has {len(records)} training files (quota "
                                f"{self.quota.max_files}); delete some first")
        num_bytes = sum(r.bytes for r in records)
        if num_bytes + num_new_bytes > self.quota.max_bytes:
            raise QuotaExceeded(f"tenant {tenant!r} would store {num_bytes + num_new_bytes} bytes of training files "
                                f"(quota {self.quota.max_bytes}); delete some first")

    def _store(self, tenant: str, filename: str, purpose: str, data: bytes, parsed: ParsedDataset) -> FileRecord:
        record = FileRecord(
            id=f"file-{uuid.uuid4().hex[:24]}", tenant=tenant, filename=_safe_filename(filename), purpose=purpose,
            bytes=len(data), created_at=int(time.time()), num_examples=len(parsed), format=parsed.format,
            order=time.time_ns(),
        )
        directory = self._tenant_dir(tenant)
        _write_atomically(directory / f"{record.id}.jsonl", data)
        try:
            _write_atomically(directory / f"{record.id}.json", json.dumps(asdict(record)).encode())
        except BaseException:
            (directory / f"{record.id}.jsonl").unlink(missing_ok=True)  # no record: the data must not linger
            raise
        return record

    def get(self, tenant: str | None, file_id: str, param: str | None = "file_id") -> FileRecord:
        """The file if `tenant` owns it (None: any tenant, for the admin); FileNotFound otherwise."""
        if not _FILE_ID.fullmatch(file_id):
            raise FileNotFound(file_id, param)
        for owner in [tenant] if tenant is not None else self._tenants():
            try:
                return FileRecord(**json.loads((self._tenant_dir(owner) / f"{file_id}.json").read_text()))
            except (FileNotFoundError, NotADirectoryError):
                continue
        raise FileNotFound(file_id, param)

    def list(self, tenant: str | None, purpose: str | None = None) -> list[FileRecord]:
        """Newest first."""
        records = []
        for owner in [tenant] if tenant is not None else self._tenants():
            for meta in sorted(self._tenant_dir(owner).glob("file-*.json")):
                try:
                    records.append(FileRecord(**json.loads(meta.read_text())))
                except (OSError, ValueError, TypeError):
                    continue  # deleted meanwhile, or not ours
        records = [r for r in records if purpose is None or r.purpose == purpose]
        return sorted(records, key=lambda r: r.order, reverse=True)

    def content(self, record: FileRecord) -> bytes:
        try:
            return (self._tenant_dir(record.tenant) / f"{record.id}.jsonl").read_bytes()
        except FileNotFoundError:
            raise FileNotFound(record.id) from None

    def dataset(self, record: FileRecord, should_stop: Callable[[], bool] | None = None) -> ParsedDataset:
        """Parse again for training (a file is validated at upload, so this fails only if the limits shrank);
        PreparationStopped when `should_stop()` says so (a cancel while the job is `validating_files`)."""
        return validate_jsonl(self.content(record), max_bytes=max(self.max_bytes, record.bytes),
                              max_lines=max(self.max_lines, record.num_examples), should_stop=should_stop)

    def delete(self, record: FileRecord) -> None:
        directory = self._tenant_dir(record.tenant)
        (directory / f"{record.id}.json").unlink(missing_ok=True)  # the record first: gone from this instant
        (directory / f"{record.id}.jsonl").unlink(missing_ok=True)

    def _tenant_dir(self, tenant: str) -> Path:
        if not is_id_part(tenant):
            raise FileNotFound("?")
        return self.root / tenant

    def _tenants(self) -> list[str]:
        if not self.root.is_dir():
            return []
        return sorted(p.name for p in self.root.iterdir() if p.is_dir() and is_id_part(p.name))


def _safe_filename(filename: str) -> str:
    """Kept only as a label: the last path part, printable, bounded."""
    name = (filename or "upload.jsonl").replace("\\", "/").rsplit("/", 1)[-1]
    return "".join(c for c in name if c.isprintable())[:255] or "upload.jsonl"


def _write_atomically(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{uuid.uuid4().hex}")
    try:
        with open(tmp, "wb") as out:
            out.write(data)
            out.flush()
            os.fsync(out.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
