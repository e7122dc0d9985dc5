"""Check an uploaded adapter (config bytes + safetensors bytes) before anything is stored.

Order matters: sizes first, then the safetensors header is parsed by hand from the bytes (lengths,
offsets, dtypes, names, shapes) and only a file that passes is handed to `safetensors.torch.load`, the
one place tensor data is read (to refuse NaN/inf). Pickle and torch zip checkpoints are recognised by
their magic bytes and refused: nothing here ever unpickles. Config checks are the read-only store's
(`adapter_config.check_adapter`), so an adapter accepted here is accepted by the store and the engine.
"""
from __future__ import annotations

import hashlib
import json
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from safetensors.torch import load as load_safetensors

from loraplex.engine.model import ATTN_MODULES
from loraplex.engine.module_patterns import PatternError, PatternTable
from loraplex.registry.adapter_config import CONFIG_FILE, MAX_CONFIG_BYTES, WEIGHTS_FILE, check_adapter
from loraplex.registry.errors import AdapterTooLarge, InvalidAdapterFile

ModuleShapes = Mapping[tuple[int, str], tuple[int, int]]  # (layer, module) -> (d_out, d_in)

DTYPE_SIZES = {"F32": 4, "F16": 2, "BF16": 2}  # what the engine casts from; no ints, no F64
MAX_HEADER_BYTES = 16 << 20  # ~100k tensors; a real adapter header is a few hundred kB at most
_ZIP_MAGIC = b"PK\x03\x04"  # torch.save since 1.6
_PICKLE_PROTOCOL_OPCODE = 0x80  # first byte of pickle protocol >= 2 (older torch .bin files)
# The engine's key format; layers without leading zeros so every name maps to one real module.
_TENSOR_KEY = re.compile(
    r"^(?:base_model\.model\.)?model\.layers\.(?P<layer>0|[1-9]\d{0,5})\."
    r"(?P<block>self_attn|mlp)\.(?P<module>\w+)\.lora_(?P<half>[AB])\.weight$"
)


@dataclass(frozen=True)
class TensorSpan:
    """One safetensors header entry; `begin`/`end` are offsets into the data section after the header."""

    dtype: str
    shape: tuple[int, ...]
    begin: int
    end: int


@dataclass(frozen=True)
class ValidatedAdapter:
    rank: int  # largest rank over all modules
    alpha: float
    target_modules: tuple[str, ...]  # leaf names, sorted
    num_bytes: int  # config + weights, what the store will hold
    sha256: str  # content digest of both files (see `adapter_digest`)
    weights_sha256: str  # hex sha256 of the safetensors file alone
    use_rslora: bool
    layers: tuple[int, ...]  # layer indices that carry LoRA weights, sorted


def validate_adapter_files(
    config_bytes: bytes, weights_bytes: bytes, module_shapes: ModuleShapes, max_rank: int, max_bytes: int,
    adapter_id: str = "upload",
) -> ValidatedAdapter:
    """Raise AdapterTooLarge or InvalidAdapterFile (param = file or field) for the first problem found."""
    num_bytes = len(config_bytes) + len(weights_bytes)
    if num_bytes > max_bytes:
        raise AdapterTooLarge(num_bytes, max_bytes)
    try:
        return _validate(config_bytes, weights_bytes, module_shapes, max_rank, num_bytes)
    except InvalidAdapterFile as exc:
        raise InvalidAdapterFile(exc.reason, exc.param, adapter_id) from None


def _validate(config_bytes: bytes, weights_bytes: bytes, module_shapes: ModuleShapes, max_rank: int, num_bytes: int) -> ValidatedAdapter:
    config = parse_config(config_bytes)
    spans = read_safetensors_header(weights_bytes)
    pairs = pair_lora_shapes(spans, module_shapes)  # (layer, module) -> (A shape, B shape)
    try:
        spec = check_adapter(config, {name: list(s.shape) for name, s in spans.items()}, max_rank, {m for _, m in module_shapes})
    except ValueError as exc:
        raise InvalidAdapterFile(str(exc), exc.field if isinstance(exc, PatternError) else CONFIG_FILE) from None
    _check_ranks_match_config(pairs, config)
    _check_finite(weights_bytes)
    weights_sha256 = hashlib.sha256(weights_bytes).hexdigest()
    return ValidatedAdapter(
        rank=spec.rank, alpha=spec.alpha, target_modules=spec.target_modules, num_bytes=num_bytes,
        sha256=adapter_digest(config_bytes, weights_sha256), weights_sha256=weights_sha256,
        use_rslora=spec.use_rslora, layers=tuple(sorted({layer for layer, _ in pairs})),
    )


def adapter_digest(config_bytes: bytes, weights_sha256: str) -> str:
    """sha256 over both files: a config-only change (alpha, rslora) changes it, so an engine cache keyed
    by it never serves old scaling, even when a deleted adapter is re-uploaded with the same version."""
    return hashlib.sha256(hashlib.sha256(config_bytes).digest() + bytes.fromhex(weights_sha256)).hexdigest()


def parse_config(config_bytes: bytes) -> dict[str, Any]:
    if len(config_bytes) > MAX_CONFIG_BYTES:
        raise InvalidAdapterFile(f"larger than {MAX_CONFIG_BYTES} bytes", CONFIG_FILE)
    try:
        config = json.loads(config_bytes)
    except (ValueError, RecursionError):  # UnicodeDecodeError and JSONDecodeError are ValueErrors; deep nesting is not
        raise InvalidAdapterFile("not valid JSON", CONFIG_FILE) from None
    if not isinstance(config, dict):
        raise InvalidAdapterFile("must hold a JSON object", CONFIG_FILE)
    return config


def read_safetensors_header(weights: bytes) -> dict[str, TensorSpan]:
    """Tensor name -> span, checked so that spans exactly tile the data section (no overlap, no gap)."""
    _refuse_non_safetensors(weights)
    header_len = int.from_bytes(weights[:8], "little")
    if not 2 <= header_len <= MAX_HEADER_BYTES or 8 + header_len > len(weights):
        raise _weights_error(f"header length {header_len} does not fit a {len(weights)}-byte file (truncated?)")
    header = _header_json(weights[8 : 8 + header_len])
    metadata = header.pop("__metadata__", {})
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise _weights_error("__metadata__ must map strings to strings")
    data_len = len(weights) - 8 - header_len
    spans = {name: _tensor_span(name, entry, data_len) for name, entry in header.items()}
    _check_spans_tile(spans, data_len)
    return spans


def pair_lora_shapes(spans: dict[str, TensorSpan], module_shapes: ModuleShapes) -> dict[tuple[int, str], tuple[tuple[int, ...], tuple[int, ...]]]:
    """(layer, module) -> (A shape [r, d_in], B shape [d_out, r]), each pair complete and fitting its module."""
    halves: dict[tuple[int, str], dict[str, tuple[int, ...]]] = {}
    for name, span in spans.items():
        where, half = _module_of(name, module_shapes)
        halves.setdefault(where, {})[half] = span.shape
    if not halves:
        raise _weights_error("holds no LoRA weights")
    pairs = {}
    for (layer, module), found in sorted(halves.items()):
        missing = {"A", "B"} - found.keys()
        if missing:
            raise _weights_error(f"layer {layer} {module} has no lora_{missing.pop()} tensor")
        _check_pair_fits(layer, module, found["A"], found["B"], module_shapes[(layer, module)])
        pairs[(layer, module)] = (found["A"], found["B"])
    return pairs


def module_shapes_from_hf_config(hf_config: Mapping[str, Any]) -> dict[tuple[int, str], tuple[int, int]]:
    """(layer, module) -> (d_out, d_in) for a Llama-family `config.json`, when no engine is at hand."""
    hidden, inter = hf_config["hidden_size"], hf_config["intermediate_size"]
    num_heads = hf_config["num_attention_heads"]
    head_dim = hf_config.get("head_dim") or hidden // num_heads
    kv_dim = (hf_config.get("num_key_value_heads") or num_heads) * head_dim
    per_layer = {
        "q_proj": (num_heads * head_dim, hidden), "k_proj": (kv_dim, hidden), "v_proj": (kv_dim, hidden),
        "o_proj": (hidden, num_heads * head_dim),
        "gate_proj": (inter, hidden), "up_proj": (inter, hidden), "down_proj": (hidden, inter),
    }
    return {(layer, m): shape for layer in range(hf_config["num_hidden_layers"]) for m, shape in per_layer.items()}


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


def _module_of(name: str, module_shapes: ModuleShapes) -> tuple[tuple[int, str], str]:
    match = _TENSOR_KEY.match(name)
    if match is None:
        raise _weights_error(f"tensor {name!r} is not a LoRA weight the engine reads")
    layer, module = int(match["layer"]), match["module"]
    expected_block = "self_attn" if module in ATTN_MODULES else "mlp"
    if match["block"] != expected_block or (layer, module) not in module_shapes:
        raise _weights_error(f"tensor {name!r} names no module of the served model")
    return (layer, module), match["half"]


def _check_pair_fits(layer: int, module: str, a: tuple[int, ...], b: tuple[int, ...], module_shape: tuple[int, int]) -> None:
    d_out, d_in = module_shape
    fits = len(a) == 2 and len(b) == 2 and a[0] >= 1 and a[1] == d_in and b == (d_out, a[0])
    if not fits:
        raise _weights_error(f"layer {layer} {module}: lora_A {list(a)} / lora_B {list(b)} do not fit a [{d_out} x {d_in}] weight")


def _check_ranks_match_config(pairs: dict[tuple[int, str], tuple[tuple[int, ...], tuple[int, ...]]], config: dict[str, Any]) -> None:
    """The tensors' rank must be the one PEFT would scale with (r, or the rank_pattern entry that matches)."""
    rank_pattern = PatternTable("rank_pattern", config.get("rank_pattern"))  # compiled by check_adapter already
    for (layer, module), (a_shape, _) in pairs.items():
        module_path = f"model.layers.{layer}.{'self_attn' if module in ATTN_MODULES else 'mlp'}.{module}"
        expected = rank_pattern.lookup(module_path, config.get("r", 8))
        if a_shape[0] != expected:
            raise InvalidAdapterFile(f"layer {layer} {module} has rank {a_shape[0]}, config says {expected}", "r")


def _check_finite(weights: bytes) -> None:
    try:
        tensors = load_safetensors(weights)
    except Exception as exc:  # safetensors raises several types for corrupt data
        raise _weights_error(f"unreadable: {exc}") from None
    for name, tensor in tensors.items():
        if not torch.isfinite(tensor).all():
            raise _weights_error(f"tensor {name!r} holds NaN or inf")


def _weights_error(reason: str) -> InvalidAdapterFile:
    return InvalidAdapterFile(reason, WEIGHTS_FILE)
