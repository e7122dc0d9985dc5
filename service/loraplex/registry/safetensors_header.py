"""The safetensors header, parsed by hand (lengths, offsets, dtypes, names, shapes) before any tensor is read.

Spans must tile the data section exactly (no overlap, no gap, no trailing bytes). Pickle and torch zip
checkpoints are recognised by their magic bytes and refused: nothing here ever unpickles. The same
parser serves uploads (all bytes in memory) and adapters on disk (only the header is read).
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from loraplex.registry.adapter_files import WEIGHTS_FILE, AdapterRefused

DTYPE_SIZES = {"F32": 4, "F16": 2, "BF16": 2}  # what the engine casts from; no ints, no F64
MAX_HEADER_BYTES = 16 << 20  # ~100k tensors; a real adapter header is a few hundred kB at most
_ZIP_MAGIC = b"PK\x03\x04"  # torch.save since 1.6
_PICKLE_PROTOCOL_OPCODE = 0x80  # first byte of pickle protocol >= 2 (older torch .bin files)


@dataclass(frozen=True)
class TensorSpan:
    """One safetensors header entry; `begin`/`end` are offsets into the data section after the header."""

    dtype: str
    shape: tuple[int, ...]
    begin: int
    end: int


def read_safetensors_header(weights: bytes, file_len: int | None = None) -> dict[str, TensorSpan]:
    """Tensor name -> span. `weights` holds the file, or at least its first 8 + header-length bytes
    when `file_len` gives the whole file's size."""
    file_len = len(weights) if file_len is None else file_len
    _refuse_non_safetensors(weights)
    header_len = int.from_bytes(weights[:8], "little")
    if not 2 <= header_len <= MAX_HEADER_BYTES or 8 + header_len > min(file_len, len(weights)):
        raise _weights_error(f"header length {header_len} does not fit a {file_len}-byte file (truncated?)")
    header = _header_json(weights[8 : 8 + header_len])
    metadata = header.pop("__metadata__", {})
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise _weights_error("__metadata__ must map strings to strings")
    data_len = file_len - 8 - header_len
    spans = {name: _tensor_span(name, entry, data_len) for name, entry in header.items()}
    _check_spans_tile(spans, data_len)
    return spans


def read_safetensors_header_file(path: Path) -> dict[str, TensorSpan]:
    """The header of a file on disk; tensor data is never read."""
    try:
        with path.open("rb") as handle:
            file_len = path.stat().st_size
            head = handle.read(8)
            header_len = int.from_bytes(head, "little")
            if len(head) == 8 and 2 <= header_len <= MAX_HEADER_BYTES:
                head += handle.read(header_len)
    except OSError as exc:
        raise _weights_error(f"cannot read it: {exc.strerror or 'I/O error'}") from None
    return read_safetensors_header(head, file_len)


def _refuse_non_safetensors(weights: bytes) -> None:
    if len(weights) > 8 and weights[8:9] == b"{":
        return  # a safetensors header starts right after its 8-byte length
    if weights.startswith(_ZIP_MAGIC):
        raise _weights_error("is a torch zip checkpoint (pickle inside), not safetensors; re-save with safe_serialization=True")
    if len(weights) > 1 and weights[0] == _PICKLE_PROTOCOL_OPCODE and 2 <= weights[1] <= 5:
        raise _weights_error("is a pickle file, not safetensors; re-save with safe_serialization=True")
    raise _weights_error("is not a safetensors file (no JSON header after the 8-byte length; truncated?)")


def _header_json(raw: bytes) -> dict[str, Any]:
    def refuse_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
        keys = [key for key, _ in pairs]
        if len(set(keys)) != len(keys):
            raise _weights_error("header repeats a key")
        return dict(pairs)

    try:
        header = json.loads(raw, object_pairs_hook=refuse_duplicates)
    except AdapterRefused:
        raise
    except (ValueError, RecursionError):
        raise _weights_error("header is not valid JSON (header length wrong?)") from None
    if not isinstance(header, dict):
        raise _weights_error("header must be a JSON object")
    return header


def _tensor_span(name: str, entry: Any, data_len: int) -> TensorSpan:
    if not isinstance(entry, dict) or set(entry) != {"dtype", "shape", "data_offsets"}:
        raise _weights_error(f"tensor {name!r}: header entry must hold exactly dtype, shape, data_offsets")
    dtype, shape, offsets = entry["dtype"], entry["shape"], entry["data_offsets"]
    if dtype not in DTYPE_SIZES:
        raise _weights_error(f"tensor {name!r}: dtype {dtype!r} is not one of {sorted(DTYPE_SIZES)}")
    if not _is_int_list(shape) or not _is_int_list(offsets) or len(offsets) != 2:
        raise _weights_error(f"tensor {name!r}: shape and data_offsets must be lists of non-negative integers")
    begin, end = offsets
    if not begin <= end <= data_len:
        raise _weights_error(f"tensor {name!r}: data_offsets {offsets} fall outside the {data_len}-byte data section")
    if end - begin != math.prod(shape) * DTYPE_SIZES[dtype]:
        raise _weights_error(f"tensor {name!r}: {end - begin} bytes do not hold a {dtype} tensor of shape {shape}")
    return TensorSpan(dtype, tuple(shape), begin, end)


def _is_int_list(value: Any) -> bool:
    return isinstance(value, list) and all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in value)


def _check_spans_tile(spans: dict[str, TensorSpan], data_len: int) -> None:
    """Overlapping spans alias one buffer; gaps or trailing bytes could smuggle unchecked data."""
    cursor = 0
    for name, span in sorted(spans.items(), key=lambda item: (item[1].begin, item[1].end)):
        if span.begin < cursor:
            raise _weights_error(f"tensor {name!r} overlaps the previous tensor's bytes")
        if span.begin > cursor:
            raise _weights_error(f"unreferenced bytes before tensor {name!r}")
        cursor = span.end
    if cursor != data_len:
        raise _weights_error(f"{data_len - cursor} bytes after the last tensor")


def _weights_error(reason: str) -> AdapterRefused:
    return AdapterRefused(reason, WEIGHTS_FILE)
