"""Check that a PEFT LoRA adapter on disk is one the engine can serve, before it is ever routed to.

Two sources are read: `adapter_config.json` (what PEFT says it trained) and the header of
`adapter_model.safetensors` (what tensors are really there: names and shapes, no data). Anything the
engine would ignore or apply wrongly is refused with a message saying why; there is no silent
fallback to the base model.
"""
from __future__ import annotations

import json
import re
from collections.abc import Collection
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from loraplex.engine.module_patterns import ModuleRegex, PatternTable

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
MAX_CONFIG_BYTES = 1_000_000
MAX_HEADER_BYTES = 100_000_000  # safetensors' own limit on the JSON header

# `base_model.model.model.layers.3.self_attn.q_proj.lora_A.weight` -> module path, leaf name, half
_TENSOR_KEY = re.compile(
    r"^(?:base_model\.model\.)?(?P<module>(?:[\w-]+\.)*(?P<leaf>[\w-]+))\.lora_(?P<half>[AB])\.weight$"
)
# Flags whose truthy value changes the forward pass in a way the engine does not implement.
_REFUSED_FLAGS = {
    "use_dora": "DoRA adapters (use_dora: true) are not supported",
    "lora_bias": "adapters with a LoRA bias (lora_bias: true) are not supported",
    "fan_in_fan_out": "fan_in_fan_out adapters (Conv1D models) are not supported",
    "modules_to_save": "adapters with modules_to_save (fully trained extra modules) are not supported",
    "layer_replication": "adapters with layer_replication are not supported",
    "trainable_token_indices": "adapters with trainable_token_indices are not supported",
    "target_parameters": "adapters with target_parameters are not supported",
}


class RegistryError(Exception):
    """Base class for adapter store errors."""


class InvalidAdapter(RegistryError):
    """The adapter exists but cannot be served as it is (unsupported feature, rank too high...)."""

    def __init__(self, adapter_id: str, reason: str):
        super().__init__(f"adapter {adapter_id!r} cannot be served: {reason}")
        self.adapter_id = adapter_id
        self.reason = reason


@dataclass(frozen=True)
class LoraSpec:
    """What the engine needs to know about an adapter, checked against the server's limits."""

    rank: int  # the largest rank over all modules (rank_pattern included)
    alpha: float
    target_modules: tuple[str, ...]  # leaf names, e.g. ("q_proj", "v_proj")
    use_rslora: bool


def load_lora_spec(
    adapter_dir: Path, adapter_id: str, max_lora_rank: int, allowed_modules: Collection[str]
) -> LoraSpec:
    """Read and check both adapter files; raises InvalidAdapter with the first problem found."""
    try:
        config = read_config(adapter_dir / CONFIG_FILE)
        shapes = read_tensor_shapes(adapter_dir / WEIGHTS_FILE)
        return check_adapter(config, shapes, max_lora_rank, set(allowed_modules))
    except ValueError as exc:
        raise InvalidAdapter(adapter_id, str(exc)) from None


def read_config(path: Path) -> dict[str, Any]:
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise ValueError(f"cannot read {CONFIG_FILE}: {exc.strerror}") from None
    if len(raw) > MAX_CONFIG_BYTES:
        raise ValueError(f"{CONFIG_FILE} is larger than {MAX_CONFIG_BYTES} bytes")
    try:
        config = json.loads(raw)
    except ValueError:
        raise ValueError(f"{CONFIG_FILE} is not valid JSON") from None
    if not isinstance(config, dict):
        raise ValueError(f"{CONFIG_FILE} must hold a JSON object")
    return config


def read_tensor_shapes(path: Path) -> dict[str, list[int]]:
    """Tensor name -> shape, from the safetensors header only (8-byte length, then JSON)."""
    try:
        with path.open("rb") as handle:
            header_len = int.from_bytes(handle.read(8), "little")
            if not 2 <= header_len <= MAX_HEADER_BYTES:
                raise ValueError(f"{WEIGHTS_FILE} has no valid safetensors header")
            header = json.loads(handle.read(header_len))
    except OSError as exc:
        raise ValueError(f"cannot read {WEIGHTS_FILE}: {exc.strerror}") from None
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise ValueError(f"{WEIGHTS_FILE} has a corrupt safetensors header") from None
    if not isinstance(header, dict):
        raise ValueError(f"{WEIGHTS_FILE} has a corrupt safetensors header")
    header.pop("__metadata__", None)
    try:
        return {name: list(info["shape"]) for name, info in header.items()}
    except (TypeError, KeyError):
        raise ValueError(f"{WEIGHTS_FILE} has a corrupt safetensors header") from None


def check_adapter(
    config: dict[str, Any], shapes: dict[str, list[int]], max_lora_rank: int, allowed: set[str]
) -> LoraSpec:
    """Validate a parsed config against the stored tensor shapes; raises ValueError with the reason."""
    _check_kind(config)
    _check_refused_flags(config)
    rank = _check_rank(config, shapes, max_lora_rank)
    alpha = _check_alpha(config)
    modules = _check_target_modules(config, shapes, allowed)
    return LoraSpec(rank=rank, alpha=alpha, target_modules=modules, use_rslora=bool(config.get("use_rslora")))


def _check_kind(config: dict[str, Any]) -> None:
    if config.get("peft_type") != "LORA":
        raise ValueError(f"peft_type must be 'LORA', got {config.get('peft_type')!r}")
    if config.get("task_type") not in (None, "CAUSAL_LM"):
        raise ValueError(f"task_type must be 'CAUSAL_LM', got {config.get('task_type')!r}")


def _check_refused_flags(config: dict[str, Any]) -> None:
    for flag, reason in _REFUSED_FLAGS.items():
        if config.get(flag):
            raise ValueError(reason)
    if config.get("bias", "none") != "none":
        raise ValueError(f"adapters with trained biases (bias: {config.get('bias')!r}) are not supported")


def _check_rank(config: dict[str, Any], shapes: dict[str, list[int]], max_lora_rank: int) -> int:
    PatternTable("rank_pattern", config.get("rank_pattern"))  # every key must compile for linear-time matching
    pattern_ranks = list((config.get("rank_pattern") or {}).values())
    declared = [config.get("r", 8), *pattern_ranks]
    if not all(isinstance(r, int) and not isinstance(r, bool) and r >= 1 for r in declared):
        raise ValueError("r and rank_pattern values must be positive integers")
    # The tensors are the truth: lora_A is [r, d_in] for each module.
    stored = [shape[0] for name, shape in shapes.items() if name.endswith(".lora_A.weight") and shape]
    rank = max(declared + stored)
    if rank > max_lora_rank:
        raise ValueError(f"rank {rank} exceeds this server's max_lora_rank {max_lora_rank}")
    return rank


def _check_alpha(config: dict[str, Any]) -> float:
    PatternTable("alpha_pattern", config.get("alpha_pattern"))  # the engine matches these on every load
    alphas = [config.get("lora_alpha", 8), *(config.get("alpha_pattern") or {}).values()]
    if not all(isinstance(a, int | float) and not isinstance(a, bool) and a > 0 for a in alphas):
        raise ValueError("lora_alpha and alpha_pattern values must be positive numbers")
    return float(alphas[0])


def _check_target_modules(config: dict[str, Any], shapes: dict[str, list[int]], allowed: set[str]) -> tuple[str, ...]:
    stored = _stored_modules(shapes)
    leaves = {leaf for _, leaf in stored}
    declared = config.get("target_modules")
    if isinstance(declared, list | tuple):
        declared_leaves = {str(entry).rsplit(".", 1)[-1] for entry in declared}
        _require_allowed(declared_leaves, allowed)
        if not leaves <= declared_leaves:
            raise ValueError(f"weights adapt {sorted(leaves - declared_leaves)}, not listed in target_modules")
    elif isinstance(declared, str):
        _check_pattern(declared, stored, allowed)
    else:
        raise ValueError("target_modules must be a list of module names or a regex string")
    _require_allowed(leaves, allowed)
    return tuple(sorted(leaves))


def _stored_modules(shapes: dict[str, list[int]]) -> set[tuple[str, str]]:
    """(module path, leaf) of every LoRA pair; any other tensor (DoRA magnitudes, biases, embeddings) is refused."""
    found = set()
    for name in shapes:
        match = _TENSOR_KEY.match(name)
        if match is None:
            raise ValueError(f"unsupported tensor {name!r} in {WEIGHTS_FILE}")
        found.add((match["module"], match["leaf"]))
    if not found:
        raise ValueError(f"{WEIGHTS_FILE} holds no LoRA weights")
    return found


def _check_pattern(pattern: str, stored: set[tuple[str, str]], allowed: set[str]) -> None:
    """PEFT's string form is a regex matched against full module paths; accept it only if it resolves
    to allowed leaf names on the modules the weights really hold."""
    if pattern in allowed or pattern == "all-linear":
        return  # a bare name, or PEFT's shorthand; the stored leaves are checked against `allowed` next
    regex = ModuleRegex("target_modules", pattern)  # PatternError (a ValueError) names the field
    unmatched = sorted(module for module, _ in stored if not regex.fullmatch(module))
    if unmatched:
        raise ValueError(f"target_modules regex {pattern!r} does not match stored module {unmatched[0]!r}")


def _require_allowed(leaves: set[str], allowed: set[str]) -> None:
    refused = sorted(leaves - allowed)
    if refused:
        raise ValueError(f"target modules {refused} are not served here (allowed: {sorted(allowed)})")
