"""Check an uploaded adapter (config bytes + safetensors bytes) before anything is stored.

Order matters: sizes first, then the safetensors header is parsed by hand (`safetensors_header`), then
the config and the tensor shapes go through the one validator for every adapter kind
(`adapter_kinds.check_adapter`, the same the read-only store runs), and only a file that passes is
handed to `safetensors.torch.load`, the one place tensor data is read (to refuse NaN/inf). Nothing here
ever unpickles.
"""
from __future__ import annotations

import hashlib
from collections.abc import Collection, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from safetensors.torch import load as load_safetensors

from loraplex.registry.adapter_files import CONFIG_FILE, WEIGHTS_FILE, AdapterRefused, field_of, parse_config
from loraplex.registry.adapter_kinds import SERVED_KINDS, ModelDims, ModuleShapes, ServedModel, check_adapter
from loraplex.registry.errors import AdapterTooLarge, InvalidAdapterFile
from loraplex.registry.safetensors_header import DTYPE_SIZES, MAX_HEADER_BYTES, TensorSpan, read_safetensors_header

__all__ = [
    "CONFIG_FILE", "DTYPE_SIZES", "MAX_HEADER_BYTES", "WEIGHTS_FILE", "ModelDims", "ModuleShapes", "TensorSpan",
    "ValidatedAdapter", "adapter_digest", "model_dims_from_hf_config", "module_shapes_from_hf_config",
    "read_safetensors_header", "validate_adapter_files",
]


@dataclass(frozen=True)
class ValidatedAdapter:
    rank: int  # largest rank over all modules (0 for prompt/prefix tuning)
    alpha: float
    target_modules: tuple[str, ...]  # leaf names, sorted
    num_bytes: int  # config + weights, what the store will hold
    sha256: str  # content digest of both files (see `adapter_digest`)
    weights_sha256: str  # hex sha256 of the safetensors file alone
    use_rslora: bool
    layers: tuple[int, ...]  # layer indices that carry LoRA weights, sorted
    kind: str = "lora"  # adapter_kinds.ALL_KINDS
    num_virtual_tokens: int = 0


def validate_adapter_files(
    config_bytes: bytes, weights_bytes: bytes, module_shapes: ModuleShapes, max_rank: int, max_bytes: int,
    adapter_id: str = "upload", *, dims: ModelDims | None = None, kinds: Collection[str] = SERVED_KINDS,
) -> ValidatedAdapter:
    """Raise AdapterTooLarge or InvalidAdapterFile (param = file or field) for the first problem found.
    `module_shapes`: the LoRA modules this server adapts; `dims`: the model's sizes (without them a
    prompt/prefix adapter is checked against its own config only); `kinds`: what the engine serves."""
    num_bytes = len(config_bytes) + len(weights_bytes)
    if num_bytes > max_bytes:
        raise AdapterTooLarge(num_bytes, max_bytes)
    served = ServedModel(allowed_modules=frozenset(m for _, m in module_shapes), max_lora_rank=max_rank,
                         module_shapes=dict(module_shapes), dims=dims, kinds=frozenset(kinds))
    try:
        return _validate(config_bytes, weights_bytes, served, num_bytes)
    except ValueError as exc:  # AdapterRefused, PatternError: both name their field
        raise InvalidAdapterFile(str(exc), field_of(exc), adapter_id) from None


def _validate(config_bytes: bytes, weights_bytes: bytes, served: ServedModel, num_bytes: int) -> ValidatedAdapter:
    config = parse_config(config_bytes)
    spans = read_safetensors_header(weights_bytes)
    spec = check_adapter(config, {name: span.shape for name, span in spans.items()}, served)
    _check_finite(weights_bytes)
    weights_sha256 = hashlib.sha256(weights_bytes).hexdigest()
    return ValidatedAdapter(
        rank=spec.rank, alpha=spec.alpha, target_modules=spec.target_modules, num_bytes=num_bytes,
        sha256=adapter_digest(config_bytes, weights_sha256), weights_sha256=weights_sha256,
        use_rslora=spec.use_rslora, layers=spec.layers, kind=spec.kind, num_virtual_tokens=spec.num_virtual_tokens,
    )


def adapter_digest(config_bytes: bytes, weights_sha256: str) -> str:
    """sha256 over both files: a config-only change (alpha, rslora) changes it, so an engine cache keyed
    by it never serves old scaling, even when a deleted adapter is re-uploaded with the same version."""
    return hashlib.sha256(hashlib.sha256(config_bytes).digest() + bytes.fromhex(weights_sha256)).hexdigest()


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


def model_dims_from_hf_config(hf_config: Mapping[str, Any]) -> ModelDims:
    """The sizes prompt and prefix tuning are checked against, from a Llama-family `config.json`."""
    hidden, num_heads = hf_config["hidden_size"], hf_config["num_attention_heads"]
    head_dim = hf_config.get("head_dim") or hidden // num_heads
    kv_dim = (hf_config.get("num_key_value_heads") or num_heads) * head_dim
    return ModelDims(hidden_size=hidden, num_layers=hf_config["num_hidden_layers"], kv_dim=kv_dim)


def _check_finite(weights: bytes) -> None:
    try:
        tensors = load_safetensors(weights)
    except Exception as exc:  # safetensors raises several types for corrupt data
        raise AdapterRefused(f"unreadable: {exc}", WEIGHTS_FILE) from None
    for name, tensor in tensors.items():
        if not torch.isfinite(tensor).all():
            raise AdapterRefused(f"tensor {name!r} holds NaN or inf", WEIGHTS_FILE)
