"""Load an HF checkpoint of a supported family (directory or hub id) into a LlamaForServing."""
from __future__ import annotations

import torch
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM

from loraplex.engine.context_limit import resolve_max_model_len
from loraplex.engine.family import FamilySpec, family_spec
from loraplex.engine.model import ATTN_MODULES, MLP_MODULES, LlamaForServing
from loraplex.engine.quantization import QuantConfig, checkpoint_quantization, take_quantized
from loraplex.engine.quantized_layers import install
from loraplex.engine.rope import rope_tables


def load_model(model_path: str, dtype: torch.dtype, device: torch.device, max_model_len: int,
               allow_long_max_model_len: bool = False, quantization: str = "none") -> LlamaForServing:
    """Raises EngineError for an unsupported architecture, a max_model_len past the model's limit or a
    quantization it cannot serve, before reading any weights. quantization: none | int8 | nf4; a checkpoint
    saved quantized by transformers + bitsandbytes is served as saved."""
    config = AutoConfig.from_pretrained(model_path)
    spec = family_spec(config)
    resolve_max_model_len(config, max_model_len, allow_long_max_model_len)
    quant = checkpoint_quantization(config, quantization)
    rope = _rope_tables(spec, max_model_len, device)
    hf_model = _load_hf(model_path, dtype, device, quant)
    quantized = _take_projections(hf_model, quant, dtype) if quant is not None else None
    model = LlamaForServing(hf_model, spec, rope).eval()
    if quantized is not None:
        install(model, quantized, dtype, device)
    model.quantization = quant  # None: full precision
    return model


def _load_hf(model_path: str, dtype: torch.dtype, device: torch.device, quant: QuantConfig | None) -> nn.Module:
    if quant is not None and quant.source == "checkpoint":  # transformers loads the bitsandbytes layers
        hf_model = AutoModelForCausalLM.from_pretrained(model_path, dtype=dtype, device_map={"": device})
    else:
        hf_model = AutoModelForCausalLM.from_pretrained(model_path, dtype=dtype).to(device)
    return hf_model.eval().requires_grad_(False)


def _take_projections(hf_model: nn.Module, quant: QuantConfig, dtype: torch.dtype) -> dict[tuple[int, str], nn.Module]:
    """Quantize (or take the saved quantized form of) each projection, one at a time, leaving a meta-device
    stand-in (bias kept) so LlamaForServing can be built without the full-precision weights."""
    out = {}
    for i, layer in enumerate(hf_model.model.layers):
        for block, names in ((layer.self_attn, ATTN_MODULES), (layer.mlp, MLP_MODULES)):
            for name in names:
                linear = getattr(block, name)
                out[(i, name)] = take_quantized(linear, quant, dtype)
                stub = nn.Linear(linear.in_features, linear.out_features, bias=False, device="meta")
                if linear.bias is not None:
                    stub.bias = nn.Parameter(linear.bias.detach().to(dtype), requires_grad=False)
                setattr(block, name, stub)
    return out


def _rope_tables(spec: FamilySpec, max_model_len: int, device) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Rope key -> cos, sin for positions 0..max_model_len-1: [max_len, hd] each, float32."""
    return {key: rope_tables(params, spec.head_dim, max_model_len, device) for key, params in spec.rope.items()}
