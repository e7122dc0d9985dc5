"""Load an HF Llama-family checkpoint (directory or hub id) into a LlamaForServing."""
from __future__ import annotations

import logging

import torch
from transformers import AutoConfig, AutoModelForCausalLM

from loraplex.engine.context_limit import resolve_max_model_len
from loraplex.engine.errors import EngineError
from loraplex.engine.model import LlamaForServing

log = logging.getLogger(__name__)

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2")


def load_model(model_path: str, dtype: torch.dtype, device: torch.device, max_model_len: int,
               allow_long_max_model_len: bool = False) -> LlamaForServing:
    """Raises EngineError for an unsupported architecture or a max_model_len past the model's limit."""
    config = AutoConfig.from_pretrained(model_path)
    if config.model_type not in SUPPORTED_MODEL_TYPES:
        raise EngineError(f"model type {config.model_type!r} is not supported (supported: {', '.join(SUPPORTED_MODEL_TYPES)})")
    resolve_max_model_len(config, max_model_len, allow_long_max_model_len)
    _check_sliding_window(config, max_model_len)
    hf_model = AutoModelForCausalLM.from_pretrained(model_path, dtype=dtype).to(device)
    hf_model.eval().requires_grad_(False)
    cos, sin = _rope_tables(hf_model, max_model_len, device)
    return LlamaForServing(hf_model, cos, sin).eval()


def _rope_tables(hf_model, max_model_len: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin for positions 0..max_model_len-1: [max_len, hd], from the model's own rotary module."""
    rotary = hf_model.model.rotary_emb
    positions = torch.arange(max_model_len, device=device)[None]  # [1, L]
    probe = torch.zeros(1, dtype=torch.float32, device=device)
    with torch.no_grad():
        cos, sin = rotary(probe, positions)  # [1, L, hd]
    return cos[0].float(), sin[0].float()


def _check_sliding_window(config, max_model_len: int) -> None:
    window = getattr(config, "sliding_window", None)
    if window and getattr(config, "use_sliding_window", True) and max_model_len > window:
        raise EngineError(f"max_model_len {max_model_len} exceeds the sliding window {window}; lower it")
