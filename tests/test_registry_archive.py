"""extract_adapter_archive: each hostile archive is built in memory and refused; nothing touches disk."""
from __future__ import annotations

import functools
import gzip
import io
import random
import stat
import string
import tarfile
import warnings
import zipfile

import pytest

from loraplex.registry.adapter_config import CONFIG_FILE, WEIGHTS_FILE
from loraplex.registry.archive import extract_adapter_archive
from loraplex.registry.errors import AdapterTooLarge, InvalidAdapterFile

LIMIT = 1 << 20  # 1 MiB of uncompressed content
CONFIG = b'{"peft_type": "LORA"}'
WEIGHTS = b"\x10\x00\x00\x00\x00\x00\x00\x00{}" + bytes(range(256)) * 4
GOOD = [(CONFIG_FILE, CONFIG), (WEIGHTS_FILE, WEIGHTS)]


def make_tgz(members: list[tuple[str, bytes] | tarfile.TarInfo], tar_format: int = tarfile.PAX_FORMAT) -> bytes:
    """(name, data) for a regular file, or a ready TarInfo for links, devices and the like."""
    buffer = io.BytesIO()
    with gzip.GzipFile(fileobj=buffer, mode="wb", mtime=0) as gz, tarfile.open(fileobj=gz, mode="w", format=tar_format) as tar:
        for member in members:
            if isinstance(member, tarfile.TarInfo):
                tar.addfile(member)
            else:
                info = tarfile.TarInfo(member[0])
                info.size = len(member[1])
                tar.addfile(info, io.BytesIO(member[1]))
    return buffer.getvalue()


def make_zip(members: list[tuple[str | zipfile.ZipInfo, bytes]]) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", compression=zipfile.ZIP_DEFLATED) as archive:
        for name, data in members:
            archive.writestr(name, data)
    return buffer.getvalue()


def tar_entry(name: str, kind: bytes, linkname: str = "") -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type, info.linkname = kind, linkname
    return info


def refused(data: bytes, match: str, param: str | None = None, **limits) -> None:
    with pytest.raises(InvalidAdapterFile, match=match) as caught:
        extract_adapter_archive(data, max_total_bytes=limits.pop("max_total_bytes", LIMIT), **limits)
    if param is not None:
        assert caught.value.param == param


ARCHIVERS = pytest.mark.parametrize("make", [make_tgz, make_zip], ids=["tgz", "zip"])


# --- accepted ----------------------------------------------------------------------------------------


@ARCHIVERS
@pytest.mark.parametrize("prefix", ["", "./", "my-adapter/", "./my-adapter/"])
def test_adapter_at_root_or_in_one_folder(make, prefix):
    data = make([(prefix + name, body) for name, body in GOOD] + [(prefix + "README.md", b"# hi")])
    assert extract_adapter_archive(data, LIMIT) == {CONFIG_FILE: CONFIG, WEIGHTS_FILE: WEIGHTS}


def test_macos_junk_beside_the_adapter_is_ignored():
    data = make_zip([("a/" + CONFIG_FILE, CONFIG), ("a/" + WEIGHTS_FILE, WEIGHTS), ("__MACOSX/a/._" + CONFIG_FILE, b"x")])
    assert extract_adapter_archive(data, LIMIT)[CONFIG_FILE] == CONFIG


def test_nothing_is_written_to_disk(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    extract_adapter_archive(make_tgz(GOOD), LIMIT)
    with pytest.raises(InvalidAdapterFile):
        extract_adapter_archive(make_zip([("../" + CONFIG_FILE, CONFIG), *GOOD]), LIMIT)
    assert list(tmp_path.iterdir()) == [] and not (tmp_path.parent / CONFIG_FILE).exists()


# --- refused: names and member types -----------------------------------------------------------------


@ARCHIVERS
@pytest.mark.parametrize("name", ["../" + CONFIG_FILE, "a/../../" + CONFIG_FILE, "a/../" + CONFIG_FILE])
def test_zip_slip_is_refused(make, name):
    refused(make([(name, CONFIG), (WEIGHTS_FILE, WEIGHTS)]), r"outside the archive \(\.\.\)")


@ARCHIVERS
@pytest.mark.parametrize("name", ["/etc/" + CONFIG_FILE, "C:/x/" + CONFIG_FILE, "a\\" + CONFIG_FILE])
def test_absolute_and_windows_paths_are_refused(make, name):
    refused(make([(name, CONFIG), (WEIGHTS_FILE, WEIGHTS)]), "absolute or Windows")


@pytest.mark.parametrize("entry", [
    tar_entry(WEIGHTS_FILE, tarfile.SYMTYPE, "/etc/passwd"),
    tar_entry(WEIGHTS_FILE, tarfile.LNKTYPE, CONFIG_FILE),
    tar_entry("tty", tarfile.CHRTYPE),
    tar_entry("disk", tarfile.BLKTYPE),
    tar_entry("pipe", tarfile.FIFOTYPE),
], ids=["symlink", "hardlink", "chardev", "blockdev", "fifo"])
def test_tar_links_and_devices_are_refused(entry):
    refused(make_tgz([(CONFIG_FILE, CONFIG), entry]), "link, device")


def test_zip_symlink_is_refused():
    link = zipfile.ZipInfo(WEIGHTS_FILE)
    link.create_system = 3  # unix, so external_attr holds a mode
    link.external_attr = (stat.S_IFLNK | 0o777) << 16
    refused(make_zip([(CONFIG_FILE, CONFIG), (link, b"/etc/passwd")]), "link or device")


@ARCHIVERS
@pytest.mark.parametrize("name", ["adapter_model.bin", "sub/pytorch_model.pt", "training_args.bin", "opt.PKL", "x.ckpt"])
def test_pickle_members_are_refused_with_a_clear_message(make, name):
    refused(make([*GOOD, (name, b"\x80\x04")]), "pickle-based checkpoint.*safe_serialization", param=name)


@ARCHIVERS
def test_duplicate_names_are_refused(make):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # zipfile warns about the duplicate it was asked to write
        data = make([*GOOD, (CONFIG_FILE, b"{}")])
    refused(data, "same name")


# --- refused: sizes, counts, bombs -------------------------------------------------------------------


@ARCHIVERS
def test_too_many_members_are_refused(make):
    files = [*GOOD] + [(f"extra{i}.txt", b"x") for i in range(15)]
    refused(make(files), "more than 16 members")
    assert extract_adapter_archive(make(files[:16]), LIMIT)[CONFIG_FILE] == CONFIG


@functools.cache
def zero_bomb(make) -> bytes:
    """The adapter plus a 50 MB file of zeros, which squeezes to ~50 kB (built once per format)."""
    return make([*GOOD, ("zeros.txt", bytes(50 << 20))])


@ARCHIVERS
def test_bomb_is_refused_by_compression_ratio(make):
    assert len(zero_bomb(make)) < 200_000
    refused(zero_bomb(make), "compression ratio", max_total_bytes=100 << 20)


@ARCHIVERS
def test_bomb_is_refused_by_total_size(make):
    with pytest.raises(AdapterTooLarge):
        extract_adapter_archive(zero_bomb(make), max_total_bytes=10 << 20)


def test_oversized_archive_is_refused_even_when_it_compresses_badly():
    noise = bytes((i * 7919) % 251 for i in range(2 * LIMIT))
    with pytest.raises(AdapterTooLarge):
        extract_adapter_archive(make_zip([*GOOD, ("noise.bin.txt", noise)]), LIMIT)


def pax_padded_tgz(comment: str) -> bytes:
    """A pax header is no member and declares no member size: only counting inflated bytes can stop it."""
    padding = tarfile.TarInfo("padding.txt")
    padding.pax_headers = {"comment": comment}
    return make_tgz([*GOOD, padding])


def test_inflated_bytes_are_counted_not_only_declared_sizes():
    noise = "".join(random.Random(0).choices(string.ascii_letters, k=1 << 20))  # barely compressible
    with pytest.raises(AdapterTooLarge, match="decompressed archive"):
        extract_adapter_archive(pax_padded_tgz(noise), max_total_bytes=64 << 10)


def test_inflated_header_bomb_is_refused_by_ratio():
    refused(pax_padded_tgz("x" * (50 << 20)), "compression ratio", max_total_bytes=100 << 20)


# --- refused: content --------------------------------------------------------------------------------


@ARCHIVERS
def test_missing_weights_are_refused(make):
    refused(make([(CONFIG_FILE, CONFIG)]), f"no {WEIGHTS_FILE}", param=WEIGHTS_FILE)


@ARCHIVERS
def test_missing_config_is_refused(make):
    refused(make([(WEIGHTS_FILE, WEIGHTS)]), f"no {CONFIG_FILE}", param=CONFIG_FILE)


@ARCHIVERS
def test_files_in_different_folders_are_refused(make):
    refused(make([("a/" + CONFIG_FILE, CONFIG), ("b/" + WEIGHTS_FILE, WEIGHTS)]), f"no {WEIGHTS_FILE} beside")


@ARCHIVERS
def test_two_adapters_in_one_archive_are_refused(make):
    refused(make([*GOOD, ("other/" + CONFIG_FILE, CONFIG), ("other/" + WEIGHTS_FILE, WEIGHTS)]), "2 copies")


@ARCHIVERS
def test_files_nested_too_deep_are_not_found(make):
    refused(make([("a/b/" + name, body) for name, body in GOOD]), f"no {CONFIG_FILE}")


@pytest.mark.parametrize("data", [b"", b"plain text", b"\x1f\x8bnot gzip at all", make_tgz(GOOD)[:60], make_zip(GOOD)[:60]],
                         ids=["empty", "text", "bad-gzip", "truncated-tgz", "truncated-zip"])
def test_garbage_is_refused(data):
    refused(data, "archive|corrupt", param="archive")
