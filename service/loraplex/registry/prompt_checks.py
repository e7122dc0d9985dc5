"""Prompt tuning and prefix tuning: one tensor, `prompt_embeddings`, whose shape the config and the model fix.

PEFT saves (peft 0.21, `BasePromptEncoder._get_adapter_state_dict`):
- PROMPT_TUNING: [num_virtual_tokens * num_transformer_submodules, token_dim], token_dim = hidden size;
  a decoder-only model has one transformer submodule.
- PREFIX_TUNING: [num_virtual_tokens, num_layers * 2 * token_dim], token_dim = num_key_value_heads *
  head_dim (PEFT sizes it from the key/value heads for GQA models). With `prefix_projection` PEFT saves
  the projection MLP's output, not the MLP, so both forms are this one shape and serve the same way.
"""
from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from loraplex.registry.adapter_files import WEIGHTS_FILE, AdapterRefused
from loraplex.registry.adapter_kinds import PREFIX_TUNING, PROMPT_TUNING, AdapterSpec, ServedModel

EMBEDDINGS = "prompt_embeddings"


def check_prompt_tuning(config: dict[str, Any], shapes: Mapping[str, tuple[int, ...]], served: ServedModel) -> AdapterSpec:
    num_virtual_tokens = _num_virtual_tokens(config, served.max_virtual_tokens)
    submodules = config.get("num_transformer_submodules")
    if submodules not in (None, 1):
        raise AdapterRefused(f"num_transformer_submodules must be 1 for a decoder-only model, got {submodules!r}",
                             "num_transformer_submodules")
    hidden = served.dims.hidden_size if served.dims else _positive_int(config, "token_dim")
    _check_matches(config, "token_dim", hidden, "the model's hidden size")
    _check_embeddings(shapes, (num_virtual_tokens, hidden), "[num_virtual_tokens, hidden_size]")
    return AdapterSpec(kind=PROMPT_TUNING, num_virtual_tokens=num_virtual_tokens)


def check_prefix_tuning(config: dict[str, Any], shapes: Mapping[str, tuple[int, ...]], served: ServedModel) -> AdapterSpec:
    num_virtual_tokens = _num_virtual_tokens(config, served.max_virtual_tokens)
    if served.dims:
        num_layers, kv_dim = served.dims.num_layers, served.dims.kv_dim
    else:
        num_layers, kv_dim = _positive_int(config, "num_layers"), _positive_int(config, "token_dim")
    width = num_layers * 2 * kv_dim
    _check_matches(config, "num_layers", num_layers, "the model's number of layers")
    _check_matches(config, "token_dim", kv_dim, "the model's key/value width (num_key_value_heads * head_dim)")
    _check_embeddings(shapes, (num_virtual_tokens, width), "[num_virtual_tokens, num_layers * 2 * kv_dim]")
    return AdapterSpec(kind=PREFIX_TUNING, num_virtual_tokens=num_virtual_tokens)


def _num_virtual_tokens(config: dict[str, Any], max_virtual_tokens: int) -> int:
    count = _positive_int(config, "num_virtual_tokens")
    if count > max_virtual_tokens:
        raise AdapterRefused(f"num_virtual_tokens {count} exceeds this server's limit of {max_virtual_tokens}",
                             "num_virtual_tokens")
    return count


def _positive_int(config: dict[str, Any], field: str) -> int:
    value = config.get(field)
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise AdapterRefused(f"{field} must be a positive integer, got {value!r}", field)
    return value


def _check_embeddings(shapes: Mapping[str, tuple[int, ...]], expected: tuple[int, int], meaning: str) -> None:
    others = sorted(set(shapes) - {EMBEDDINGS})
    if others:
        raise AdapterRefused(f"unsupported tensor {others[0]!r}: a prompt-learning adapter holds only {EMBEDDINGS}",
                             WEIGHTS_FILE)
    if EMBEDDINGS not in shapes:
        raise AdapterRefused(f"holds no {EMBEDDINGS} tensor", WEIGHTS_FILE)
    shape = tuple(shapes[EMBEDDINGS])
    if shape != expected:
        raise AdapterRefused(f"{EMBEDDINGS} is {list(shape)}, expected {list(expected)} {meaning}", WEIGHTS_FILE)


def _check_matches(config: dict[str, Any], field: str, expected: int, meaning: str) -> None:
    value = config.get(field)
    if value is not None and value != expected:
        raise AdapterRefused(f"{field} is {value!r}, but {meaning} is {expected}", field)
