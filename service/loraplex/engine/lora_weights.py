"""Read a PEFT LoRA or DoRA adapter (safetensors only) into host tensors shaped for the slot pool."""
from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load as load_safetensors

from loraplex.engine.errors import AdapterError
from loraplex.engine.model import ATTN_MODULES
from loraplex.engine.module_patterns import PatternError, PatternTable

_KEY_RE = re.compile(
    r"^(?:base_model\.model\.)?model\.layers\.(\d+)\.(self_attn|mlp)\.(\w+)\.(?:lora_([AB])\.weight|lora_magnitude_vector)$"
)
_UNSUPPORTED_FLAGS = ("lora_bias",)


@dataclass
class HostLora:
    """One adapter version on the host: per (layer, module), A [r, d_in] and B*scale [d_out, r]."""

    key: str
    weights: dict[tuple[int, str], tuple[torch.Tensor, torch.Tensor]]
    max_rank: int
    scales: dict[tuple[int, str], float] = field(default_factory=dict)  # the scale folded into B (composition needs it)
    magnitudes: dict[tuple[int, str], torch.Tensor] = field(default_factory=dict)  # DoRA: m [d_out], fp32

    @property
    def num_bytes(self) -> int:
        pairs = sum(a.numel() * a.element_size() + b.numel() * b.element_size() for a, b in self.weights.values())
        return pairs + sum(m.numel() * m.element_size() for m in self.magnitudes.values())


def read_adapter(key: str, path: str, max_rank: int, shapes: dict[tuple[int, str], tuple[int, int]], dtype) -> HostLora:
    """shapes: (layer, module) -> (d_out, d_in) of every module the pool can serve."""
    directory = Path(path)
    config = _read_config(directory / "adapter_config.json")
    alpha_pattern = _alpha_pattern(config)
    tensors = _read_tensors(directory / "adapter_model.safetensors")
    pairs, magnitudes = _pair_tensors(tensors)
    _check_magnitudes(config, pairs, magnitudes)
    weights, scales = {}, {}
    for (layer, module), (a, b) in pairs.items():
        _check_shapes(layer, module, a, b, shapes, max_rank)
        name = f"model.layers.{layer}.{'self_attn' if module in ATTN_MODULES else 'mlp'}.{module}"
        scale = _scaling(config, alpha_pattern, name, rank=a.shape[0])
        weights[(layer, module)] = (a.to(dtype).contiguous(), (b.float() * scale).to(dtype).contiguous())
        scales[(layer, module)] = scale
    if not weights:
        raise AdapterError(f"adapter {key!r} holds no LoRA weights for a supported module")
    return HostLora(key, weights, max(a.shape[0] for a, _ in weights.values()), scales,
                    {where: m.float().contiguous() for where, m in magnitudes.items()})


def read_config_json(path: Path) -> dict:
    """An adapter_config.json as a dict, any PEFT type. Messages reach clients: the OS error's text only,
    never the server's path."""
    try:
        config = json.loads(path.read_bytes())
    except OSError as exc:
        raise AdapterError(f"unreadable adapter_config.json: {exc.strerror or 'I/O error'}") from None
    except (ValueError, RecursionError):
        raise AdapterError("unreadable adapter_config.json: not valid JSON") from None
    if not isinstance(config, dict):
        raise AdapterError("adapter_config.json must hold a JSON object")
    return config


def _read_config(path: Path) -> dict:
    config = read_config_json(path)
    if config.get("peft_type", "LORA") != "LORA":
        raise AdapterError(f"peft_type {config.get('peft_type')!r} is not supported, only LORA")
    for flag in _UNSUPPORTED_FLAGS:
        if config.get(flag):
            raise AdapterError(f"adapters with {flag}=true are not supported")
    if config.get("bias", "none") != "none" or config.get("modules_to_save"):
        raise AdapterError("adapters with trained biases or modules_to_save are not supported")
    return config


def _read_tensors(path: Path) -> dict[str, torch.Tensor]:
    # From the bytes, not `safe_open(...).get_tensor`: that path keeps about 60 bytes per tensor alive for
    # good (safetensors 0.8), i.e. ~25 KB per cold load of a 7B-sized adapter (found by loadtest/soak.py).
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise AdapterError(f"unreadable adapter_model.safetensors: {exc.strerror or 'I/O error'}") from None
    try:
        return load_safetensors(raw)
    except Exception as exc:  # safetensors raises several types for corrupt files
        raise AdapterError(f"unreadable adapter_model.safetensors: {exc}") from None


def _pair_tensors(tensors: dict[str, torch.Tensor]) -> tuple[dict, dict]:
    """-> (layer, module) -> (A, B), and (layer, module) -> DoRA magnitude."""
    halves: dict[tuple[int, str], dict[str, torch.Tensor]] = {}
    for name, tensor in tensors.items():
        match = _KEY_RE.match(name)
        if not match:
            raise AdapterError(f"unsupported tensor {name!r} in adapter")
        layer, _, module, half = match.groups()
        if not torch.isfinite(tensor).all():
            raise AdapterError(f"tensor {name!r} holds NaN or inf")
        halves.setdefault((int(layer), module), {})[half or "M"] = tensor
    pairs, magnitudes = {}, {}
    for where, found in halves.items():
        if not {"A", "B"} <= set(found):
            raise AdapterError(f"layer {where[0]} {where[1]} lacks lora_A or lora_B")
        pairs[where] = (found["A"], found["B"])
        if "M" in found:
            magnitudes[where] = found["M"]
    return pairs, magnitudes


def _check_magnitudes(config: dict, pairs: dict, magnitudes: dict) -> None:
    """DoRA: a magnitude [d_out] for every module exactly when use_dora is true."""
    use_dora = config.get("use_dora") is True
    for (layer, module), (_, b) in pairs.items():
        magnitude = magnitudes.get((layer, module))
        if use_dora and (magnitude is None or tuple(magnitude.shape) != (b.shape[0],)):
            raise AdapterError(f"DoRA adapter (use_dora: true) lacks a [{b.shape[0]}] lora_magnitude_vector at layer {layer} {module}")
        if not use_dora and magnitude is not None:
            raise AdapterError(f"layer {layer} {module} has a DoRA magnitude vector, but use_dora is not true")


def _check_shapes(layer, module, a, b, shapes, max_rank) -> None:
    if (layer, module) not in shapes:
        raise AdapterError(f"layer {layer} {module} is not a module this server can adapt")
    d_out, d_in = shapes[(layer, module)]
    rank = a.shape[0]
    if a.dim() != 2 or b.dim() != 2 or a.shape[1] != d_in or b.shape != (d_out, rank):
        raise AdapterError(
            f"layer {layer} {module}: lora_A {tuple(a.shape)} / lora_B {tuple(b.shape)} do not fit "
            f"a [{d_out} x {d_in}] weight"
        )
    if rank > max_rank:
        raise AdapterError(f"rank {rank} at layer {layer} {module} exceeds max_lora_rank {max_rank}")


def _alpha_pattern(config: dict) -> PatternTable:
    try:
        return PatternTable("alpha_pattern", config.get("alpha_pattern"))
    except PatternError as exc:
        raise AdapterError(str(exc)) from None


def _scaling(config: dict, alpha_pattern: PatternTable, module_name: str, rank: int) -> float:
    alpha = alpha_pattern.lookup(module_name, config.get("lora_alpha", 8))
    if config.get("use_rslora"):
        return alpha / math.sqrt(rank)
    return alpha / rank
