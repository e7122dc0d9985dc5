"""LoRA and DoRA (`peft_type: LORA`): the config's fields against the tensors really stored.

Tensors are the truth: every module needs lora_A [r, d_in] and lora_B [d_out, r], plus a DoRA magnitude
[d_out] exactly when `use_dora` is true. With the served model's module shapes (uploads) each module must
be one of its layers' projections and fit it; without them (the read-only store) names are checked
against the allowed leaf names only.
"""
from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

from loraplex.engine.model import ATTN_MODULES
from loraplex.engine.module_patterns import ModuleRegex, PatternTable
from loraplex.registry.adapter_files import WEIGHTS_FILE, AdapterRefused
from loraplex.registry.adapter_kinds import DORA, LORA, AdapterSpec, ModuleShapes, ServedModel

# `base_model.model.model.layers.3.self_attn.q_proj.lora_A.weight` -> module path, leaf, part
_TENSOR_KEY = re.compile(
    r"^(?:base_model\.model\.)?(?P<module>(?:[\w-]+\.)*(?P<leaf>[\w-]+))\."
    r"(?:lora_(?P<half>[AB])\.weight|(?P<magnitude>lora_magnitude_vector))$"
)
# The engine's module paths; layers without leading zeros so every name maps to one real module.
_LAYER_PATH = re.compile(r"^model\.layers\.(?P<layer>0|[1-9]\d{0,5})\.(?P<block>self_attn|mlp)\.(?P<leaf>\w+)$")
# Flags whose truthy value changes the forward pass in a way the engine does not implement.
_REFUSED_FLAGS = {
    "lora_bias": "adapters with a LoRA bias (lora_bias: true) are not supported",
    "fan_in_fan_out": "fan_in_fan_out adapters (Conv1D models) are not supported",
    "modules_to_save": "adapters with modules_to_save (fully trained extra modules) are not supported",
    "layer_replication": "adapters with layer_replication are not supported",
    "trainable_token_indices": "adapters with trainable_token_indices are not supported",
    "target_parameters": "adapters with target_parameters are not supported",
}

Parts = dict[str, dict[str, tuple[str, tuple[int, ...]]]]  # module path -> {"A"|"B"|"M": (tensor name, shape)}


def check_lora(config: dict[str, Any], shapes: Mapping[str, tuple[int, ...]], served: ServedModel) -> AdapterSpec:
    parts = lora_parts(shapes)
    if served.module_shapes is not None:
        layers = fit_modules(parts, served.module_shapes)
    else:
        _check_pairs(parts)
        layers = ()
    _check_refused_flags(config)
    use_dora = _check_dora(config, parts)
    rank = _check_rank(config, parts, served.max_lora_rank)
    alpha = _check_alpha(config)
    modules = _check_target_modules(config, parts, set(served.allowed_modules))
    if served.module_shapes is not None:
        _check_ranks_match_config(parts, config)
    return AdapterSpec(kind=DORA if use_dora else LORA, rank=rank, alpha=alpha, target_modules=modules,
                       use_rslora=bool(config.get("use_rslora")), layers=layers)


def lora_parts(shapes: Mapping[str, tuple[int, ...]]) -> Parts:
    """Group tensors by module; any tensor that is not lora_A/lora_B/magnitude is refused."""
    parts: Parts = {}
    for name, shape in shapes.items():
        match = _TENSOR_KEY.match(name)
        if match is None:
            raise AdapterRefused(f"unsupported tensor {name!r}: not a LoRA weight the engine reads", WEIGHTS_FILE)
        part = match["half"] or "M"
        parts.setdefault(match["module"], {})[part] = (name, tuple(shape))
    if not parts:
        raise AdapterRefused("holds no LoRA weights", WEIGHTS_FILE)
    return parts


def _check_pairs(parts: Parts) -> None:
    for module, found in sorted(parts.items()):
        for half in ("A", "B"):
            if half not in found:
                raise AdapterRefused(f"{_where(module)} has no lora_{half} tensor", WEIGHTS_FILE)


def fit_modules(parts: Parts, module_shapes: ModuleShapes) -> tuple[int, ...]:
    """Each module must be a projection of the served model and its tensors must fit it; -> layers."""
    served = {}
    for module, found in sorted(parts.items()):
        match = _LAYER_PATH.match(module)
        layer, leaf = (int(match["layer"]), match["leaf"]) if match else (-1, "")
        expected_block = "self_attn" if leaf in ATTN_MODULES else "mlp"
        if match is None or match["block"] != expected_block or (layer, leaf) not in module_shapes:
            name = next(iter(found.values()))[0]
            raise AdapterRefused(f"tensor {name!r} names no module of the served model", WEIGHTS_FILE)
        served[module] = (layer, leaf)
    _check_pairs(parts)
    for module, where in served.items():
        _check_fits(module, parts[module], module_shapes[where])
    return tuple(sorted({layer for layer, _ in served.values()}))


def _check_fits(module: str, found: dict[str, tuple[str, tuple[int, ...]]], module_shape: tuple[int, int]) -> None:
    d_out, d_in = module_shape
    a, b = found["A"][1], found["B"][1]
    if not (len(a) == 2 and len(b) == 2 and a[0] >= 1 and a[1] == d_in and b == (d_out, a[0])):
        raise AdapterRefused(
            f"{_where(module)}: lora_A {list(a)} / lora_B {list(b)} do not fit a [{d_out} x {d_in}] weight", WEIGHTS_FILE
        )


def _check_dora(config: dict[str, Any], parts: Parts) -> bool:
    """A magnitude [d_out] for every module exactly when use_dora is true."""
    use_dora = config.get("use_dora") or False
    if not isinstance(use_dora, bool):
        raise AdapterRefused(f"use_dora must be true or false, got {use_dora!r}", "use_dora")
    for module, found in sorted(parts.items()):
        if not use_dora and "M" in found:
            raise AdapterRefused(
                f"unsupported tensor {found['M'][0]!r}: a DoRA magnitude vector, but use_dora is not true", WEIGHTS_FILE
            )
        if use_dora and "M" not in found:
            raise AdapterRefused(f"DoRA adapter (use_dora: true) has no lora_magnitude_vector for {_where(module)}", "use_dora")
        if use_dora and found["M"][1] != found["B"][1][:1]:
            raise AdapterRefused(
                f"{_where(module)}: lora_magnitude_vector {list(found['M'][1])} does not match lora_B's "
                f"{found['B'][1][:1]} output features", WEIGHTS_FILE
            )
    return use_dora


def _check_refused_flags(config: dict[str, Any]) -> None:
    for flag, reason in _REFUSED_FLAGS.items():
        if config.get(flag):
            raise AdapterRefused(reason, flag)
    if config.get("bias", "none") != "none":
        raise AdapterRefused(f"adapters with trained biases (bias: {config.get('bias')!r}) are not supported", "bias")


def _check_rank(config: dict[str, Any], parts: Parts, max_lora_rank: int) -> int:
    PatternTable("rank_pattern", config.get("rank_pattern"))  # every key must compile for linear-time matching
    declared = [config.get("r", 8), *(config.get("rank_pattern") or {}).values()]
    if not all(isinstance(r, int) and not isinstance(r, bool) and r >= 1 for r in declared):
        raise AdapterRefused("r and rank_pattern values must be positive integers")
    stored = [found["A"][1][0] for found in parts.values() if found["A"][1]]  # lora_A is [r, d_in]
    rank = max(declared + stored)
    if rank > max_lora_rank:
        raise AdapterRefused(f"rank {rank} exceeds this server's max_lora_rank {max_lora_rank}")
    return rank


def _check_alpha(config: dict[str, Any]) -> float:
    PatternTable("alpha_pattern", config.get("alpha_pattern"))  # the engine matches these on every load
    alphas = [config.get("lora_alpha", 8), *(config.get("alpha_pattern") or {}).values()]
    if not all(isinstance(a, int | float) and not isinstance(a, bool) and a > 0 for a in alphas):
        raise AdapterRefused("lora_alpha and alpha_pattern values must be positive numbers")
    return float(alphas[0])


def _check_target_modules(config: dict[str, Any], parts: Parts, allowed: set[str]) -> tuple[str, ...]:
    leaves = {module.rsplit(".", 1)[-1] for module in parts}
    declared = config.get("target_modules")
    if isinstance(declared, list | tuple):
        declared_leaves = {str(entry).rsplit(".", 1)[-1] for entry in declared}
        _require_allowed(declared_leaves, allowed)
        if not leaves <= declared_leaves:
            raise AdapterRefused(f"weights adapt {sorted(leaves - declared_leaves)}, not listed in target_modules")
    elif isinstance(declared, str):
        _check_pattern(declared, set(parts), allowed)
    else:
        raise AdapterRefused("target_modules must be a list of module names or a regex string")
    _require_allowed(leaves, allowed)
    return tuple(sorted(leaves))


def _check_pattern(pattern: str, modules: set[str], allowed: set[str]) -> None:
    """PEFT's string form is a regex matched against full module paths; accept it only if it resolves
    to allowed leaf names on the modules the weights really hold."""
    if pattern in allowed or pattern == "all-linear":
        return  # a bare name, or PEFT's shorthand; the stored leaves are checked against `allowed` next
    regex = ModuleRegex("target_modules", pattern)  # PatternError (a ValueError) names the field
    unmatched = sorted(module for module in modules if not regex.fullmatch(module))
    if unmatched:
        raise AdapterRefused(f"target_modules regex {pattern!r} does not match stored module {unmatched[0]!r}")


def _require_allowed(leaves: set[str], allowed: set[str]) -> None:
    refused = sorted(leaves - allowed)
    if refused:
        raise AdapterRefused(f"target modules {refused} are not served here (allowed: {sorted(allowed)})")


def _check_ranks_match_config(parts: Parts, config: dict[str, Any]) -> None:
    """The tensors' rank must be the one PEFT would scale with (r, or the rank_pattern entry that matches)."""
    rank_pattern = PatternTable("rank_pattern", config.get("rank_pattern"))
    for module, found in sorted(parts.items()):
        expected = rank_pattern.lookup(module, config.get("r", 8))
        if found["A"][1][0] != expected:
            raise AdapterRefused(f"{_where(module)} has rank {found['A'][1][0]}, config says {expected}", "r")


def _where(module: str) -> str:
    """`model.layers.3.self_attn.q_proj` -> `layer 3 q_proj`, as messages have always said."""
    match = _LAYER_PATH.match(module)
    return f"layer {match['layer']} {match['leaf']}" if match else module
