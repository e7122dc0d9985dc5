"""Load an HF checkpoint of a supported family (directory or hub id) into a LlamaForServing."""
from __future__ import annotations

import torch
from transformers import AutoConfig, AutoModelForCausalLM

from loraplex.engine.context_limit import resolve_max_model_len
from loraplex.engine.family import FamilySpec, family_spec
from loraplex.engine.model import LlamaForServing
from loraplex.engine.rope import rope_tables


def load_model(model_path: str, dtype: torch.dtype, device: torch.device, max_model_len: int,
               allow_long_max_model_len: bool = False) -> LlamaForServing:
    """Raises EngineError for an unsupported architecture or a max_model_len past the model's limit,
    before reading any weights."""
    config = AutoConfig.from_pretrained(model_path)
    spec = family_spec(config)
    resolve_max_model_len(config, max_model_len, allow_long_max_model_len)
    rope = _rope_tables(spec, max_model_len, device)
    hf_model = AutoModelForCausalLM.from_pretrained(model_path, dtype=dtype).to(device)
    hf_model.eval().requires_grad_(False)
    return LlamaForServing(hf_model, spec, rope).eval()


def _rope_tables(spec: FamilySpec, max_model_len: int, device) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Rope key -> cos, sin for positions 0..max_model_len-1: [max_len, hd] each, float32."""
    return {key: rope_tables(params, spec.head_dim, max_model_len, device) for key, params in spec.rope.items()}
