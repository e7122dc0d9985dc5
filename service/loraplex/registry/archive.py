"""Unpack an uploaded `.tar.gz`/`.tgz`/`.zip` of a PEFT adapter directory, in memory only.

Nothing is ever written to disk, so a hostile name (`../x`, `/etc/x`) or a link can do no harm, and they
are refused anyway so the uploader learns why. Bombs are stopped twice: by the sizes the archive
declares (before reading) and by counting the bytes that really come out of the decompressor (while
reading), which is what matters when the declared sizes lie or headers (pax, long names) are inflated.
"""
from __future__ import annotations

import gzip
import io
import re
import stat
import tarfile
import zipfile
import zlib
from dataclasses import dataclass

from loraplex.registry.adapter_config import CONFIG_FILE, WEIGHTS_FILE
from loraplex.registry.errors import AdapterTooLarge, InvalidAdapterFile

ADAPTER_FILES = (CONFIG_FILE, WEIGHTS_FILE)
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt")
MAX_COMPRESSION_RATIO = 200
RATIO_FLOOR_BYTES = 1 << 20  # below 1 MiB out, tar's zero padding alone may compress more than 200x
ARCHIVE_PARAM = "archive"
_GZIP_MAGIC = b"\x1f\x8b"
_ZIP_MAGICS = (b"PK\x03\x04", b"PK\x05\x06")  # local file header; end of central directory (empty zip)
_TAR_BYTES_PER_MEMBER = 4 * 512  # header, pax/long-name header, padding
_TAR_FIXED_BYTES = 20 * 512  # end-of-archive blocks and record padding
_READ_CHUNK_BYTES = 1 << 16
_WINDOWS_DRIVE = re.compile(r"^[A-Za-z]:")


def extract_adapter_archive(data: bytes, max_total_bytes: int, max_members: int = 16) -> dict[str, bytes]:
    """{CONFIG_FILE: bytes, WEIGHTS_FILE: bytes} from the archive's root or its one top-level folder."""
    budget = _Budget(max_total_bytes, max_members, num_compressed_bytes=len(data))
    if data.startswith(_ZIP_MAGICS):
        found = _read_zip(data, budget)
    elif data.startswith(_GZIP_MAGIC):
        found = _read_tar_gz(data, budget)
    else:
        raise InvalidAdapterFile("not a .tar.gz, .tgz or .zip archive", ARCHIVE_PARAM)
    return _pick_adapter_files(found)


@dataclass
class _Budget:
    """Member count and byte totals of one archive, checked as they grow."""

    max_total_bytes: int
    max_members: int
    num_compressed_bytes: int
    num_members: int = 0
    num_declared_bytes: int = 0
    num_read_bytes: int = 0

    def add_member(self, declared_size: int) -> None:
        self.num_members += 1
        if self.num_members > self.max_members:
            raise InvalidAdapterFile(f"holds more than {self.max_members} members", ARCHIVE_PARAM)
        self.num_declared_bytes += declared_size
        self._check_total(self.num_declared_bytes)

    def add_read(self, num_bytes: int) -> None:
        self.num_read_bytes += num_bytes
        self._check_total(self.num_read_bytes)

    def check_ratio(self, num_uncompressed_bytes: int, num_compressed_bytes: int) -> None:
        limit = max(RATIO_FLOOR_BYTES, MAX_COMPRESSION_RATIO * num_compressed_bytes)
        if num_uncompressed_bytes > limit:
            raise InvalidAdapterFile(f"compression ratio is above {MAX_COMPRESSION_RATIO}x (archive bomb?)", ARCHIVE_PARAM)

    def _check_total(self, num_bytes: int) -> None:
        if num_bytes > self.max_total_bytes:
            raise AdapterTooLarge(num_bytes, self.max_total_bytes, what="archive contents")


# --- zip -------------------------------------------------------------------------------------------


def _read_zip(data: bytes, budget: _Budget) -> dict[str, bytes]:
    try:
        with zipfile.ZipFile(io.BytesIO(data)) as archive:
            infos = archive.infolist()
            if len(infos) > budget.max_members:  # before looking at any of them
                raise InvalidAdapterFile(f"holds more than {budget.max_members} members", ARCHIVE_PARAM)
            names = [_check_zip_member(info, budget) for info in infos]
            _refuse_duplicates(names)
            return {name: _read_zip_member(archive, info, budget) for name, info in zip(names, infos) if _is_wanted(name, info.is_dir())}
    except (zipfile.BadZipFile, zlib.error, EOFError, NotImplementedError, ValueError) as exc:
        raise InvalidAdapterFile(f"corrupt or unsupported zip: {exc}", ARCHIVE_PARAM) from None


def _check_zip_member(info: zipfile.ZipInfo, budget: _Budget) -> str:
    name = _safe_member_name(info.filename)
    file_type = stat.S_IFMT(info.external_attr >> 16)  # unix mode, 0 when made on Windows
    if file_type not in (0, stat.S_IFREG, stat.S_IFDIR):
        raise InvalidAdapterFile(f"member {name!r} is a link or device; only files and folders are accepted", name)
    if info.flag_bits & 0x1:
        raise InvalidAdapterFile(f"member {name!r} is encrypted", name)
    budget.add_member(info.file_size)
    budget.check_ratio(info.file_size, info.compress_size)
    return name


def _read_zip_member(archive: zipfile.ZipFile, info: zipfile.ZipInfo, budget: _Budget) -> bytes:
    chunks = []
    with archive.open(info) as member:  # zipfile stops at the declared size and checks the CRC
        while chunk := member.read(_READ_CHUNK_BYTES):
            budget.add_read(len(chunk))
            chunks.append(chunk)
    return b"".join(chunks)


# --- tar.gz ----------------------------------------------------------------------------------------


class _BoundedGunzip(io.RawIOBase):
    """A gunzipped view of `data` that raises once more bytes come out than the budget allows."""

    def __init__(self, data: bytes, budget: _Budget):
        self._gzip = gzip.GzipFile(fileobj=io.BytesIO(data))
        self._budget = budget
        # Tar headers and padding come on top of the members' own bytes.
        self._max_output_bytes = budget.max_total_bytes + budget.max_members * _TAR_BYTES_PER_MEMBER + _TAR_FIXED_BYTES
        self.num_output_bytes = 0

    def readable(self) -> bool:
        return True

    def read(self, size: int = -1) -> bytes:
        chunk = self._gzip.read(size if size >= 0 else _READ_CHUNK_BYTES)  # gzip inflates at most `size`
        self.num_output_bytes += len(chunk)
        self._budget.check_ratio(self.num_output_bytes, self._budget.num_compressed_bytes)
        if self.num_output_bytes > self._max_output_bytes:
            raise AdapterTooLarge(self.num_output_bytes, self._max_output_bytes, what="decompressed archive")
        return chunk


def _read_tar_gz(data: bytes, budget: _Budget) -> dict[str, bytes]:
    found: dict[str, bytes] = {}
    names: list[str] = []
    try:
        with tarfile.open(fileobj=_BoundedGunzip(data, budget), mode="r|") as archive:  # stream: one pass
            for member in archive:
                names.append(_check_tar_member(member, budget))
                _refuse_duplicates(names)
                if _is_wanted(names[-1], member.isdir()):
                    found[names[-1]] = _read_tar_member(archive, member, budget)
    except (tarfile.TarError, gzip.BadGzipFile, zlib.error, EOFError) as exc:
        raise InvalidAdapterFile(f"corrupt tar.gz: {exc}", ARCHIVE_PARAM) from None
    return found


def _check_tar_member(member: tarfile.TarInfo, budget: _Budget) -> str:
    name = _safe_member_name(member.name)
    if not (member.isdir() or (member.isreg() and not member.issparse())):
        raise InvalidAdapterFile(f"member {name!r} is a link, device or sparse file; only files and folders are accepted", name)
    budget.add_member(member.size)
    return name


def _read_tar_member(archive: tarfile.TarFile, member: tarfile.TarInfo, budget: _Budget) -> bytes:
    handle = archive.extractfile(member)
    chunks = []
    while chunk := handle.read(_READ_CHUNK_BYTES):
        budget.add_read(len(chunk))
        chunks.append(chunk)
    return b"".join(chunks)


# --- names and layout ------------------------------------------------------------------------------


def _safe_member_name(raw_name: str) -> str:
    """`./folder/file` -> `folder/file`; absolute, `..`, backslash and control-character names are refused."""
    if raw_name.startswith("/") or _WINDOWS_DRIVE.match(raw_name) or "\\" in raw_name:
        raise InvalidAdapterFile(f"member {raw_name!r} has an absolute or Windows path", ARCHIVE_PARAM)
    if any(ord(char) < 32 for char in raw_name):
        raise InvalidAdapterFile(f"member {raw_name!r} has a control character in its name", ARCHIVE_PARAM)
    parts = [part for part in raw_name.split("/") if part not in ("", ".")]
    if ".." in parts:
        raise InvalidAdapterFile(f"member {raw_name!r} points outside the archive (..)", ARCHIVE_PARAM)
    name = "/".join(parts)
    if name.lower().endswith(PICKLE_SUFFIXES):
        raise InvalidAdapterFile(
            f"member {name!r} is a pickle-based checkpoint ({', '.join(PICKLE_SUFFIXES)} are refused); "
            f"upload {WEIGHTS_FILE} (save_pretrained with safe_serialization=True)", name)
    return name


def _refuse_duplicates(names: list[str]) -> None:
    """Two members with one name could make the checker and a later reader see different bytes."""
    if len(set(names)) != len(names):
        raise InvalidAdapterFile("two members have the same name", ARCHIVE_PARAM)


def _is_wanted(name: str, is_dir: bool) -> bool:
    parts = name.split("/")
    return not is_dir and len(parts) <= 2 and parts[-1] in ADAPTER_FILES


def _pick_adapter_files(found: dict[str, bytes]) -> dict[str, bytes]:
    config_paths = [name for name in found if name.split("/")[-1] == CONFIG_FILE]
    if len(config_paths) > 1:
        raise InvalidAdapterFile(f"holds {len(config_paths)} copies of {CONFIG_FILE}; upload one adapter", ARCHIVE_PARAM)
    if not config_paths:
        raise InvalidAdapterFile(f"has no {CONFIG_FILE} at its root or in one top-level folder", CONFIG_FILE)
    root = config_paths[0][: -len(CONFIG_FILE)]  # "" or "folder/"
    if root + WEIGHTS_FILE not in found:
        raise InvalidAdapterFile(f"has no {WEIGHTS_FILE} beside {CONFIG_FILE}", WEIGHTS_FILE)
    return {CONFIG_FILE: found[root + CONFIG_FILE], WEIGHTS_FILE: found[root + WEIGHTS_FILE]}
