"""What distinguishes the supported model families, read once from an HF config.

All are Llama-shaped decoders (pre-norm, rotary attention with q/k/v/o projections, a gated MLP with
gate/up/down projections); the differences are data, not code paths:

| family       | extra                                                                                 |
| llama        | `llama3` rope scaling (Llama 3.x)                                                     |
| mistral      | an optional sliding window on every layer                                             |
| qwen2        | q/k/v biases; sliding windows on upper layers when enabled                            |
| qwen3        | RMSNorm over each head's q and k before rope                                          |
| gemma3_text  | embeddings * sqrt(hidden), (1 + w) RMSNorm, GeGLU (tanh gelu), norms after attention |
|              | and around the MLP, sliding and global layers with their own rope, query_pre_attn_scalar |
"""
from __future__ import annotations

from dataclasses import dataclass

from loraplex.engine.context_limit import rope_parameter_sets
from loraplex.engine.errors import EngineError

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3", "gemma3_text")
ACTIVATIONS = ("silu", "gelu", "gelu_pytorch_tanh")
GEMMA_TYPES = ("gemma3_text",)
QK_NORM_TYPES = ("qwen3", "gemma3_text")
DEFAULT_ROPE_KEY = "default"


@dataclass(frozen=True)
class LayerSpec:
    rope_key: str  # which rope table this layer uses (Gemma 3: per layer type)
    sliding_window: int | None  # attend to the last `sliding_window` positions (self included); None: all


@dataclass(frozen=True)
class FamilySpec:
    model_type: str
    head_dim: int
    activation: str
    norm_unit_offset: bool  # RMSNorm scales by (1 + w) (Gemma) instead of w
    has_qk_norm: bool  # RMSNorm over head_dim on q and k before rope
    has_sandwich_norms: bool  # norms on the attention output and around the MLP (Gemma 3)
    embed_scale: float | None  # embeddings multiplied by this (Gemma: sqrt(hidden_size))
    attn_scale: float | None  # softmax scale; None: 1 / sqrt(head_dim)
    final_logit_softcap: float | None  # logits = cap * tanh(logits / cap)
    rope: dict[str, dict]  # rope key -> rope_parameters
    layers: tuple[LayerSpec, ...]


def family_spec(config) -> FamilySpec:
    """Raises EngineError for an architecture or a feature the engine does not implement."""
    model_type = config.model_type
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise EngineError(f"model type {model_type!r} is not supported (supported: {', '.join(SUPPORTED_MODEL_TYPES)})")
    if getattr(config, "attn_logit_softcapping", None):
        raise EngineError("attention logit softcapping is not supported")
    is_gemma = model_type in GEMMA_TYPES
    activation = getattr(config, "hidden_activation", None) if is_gemma else config.hidden_act
    if activation not in ACTIVATIONS:
        raise EngineError(f"activation {activation!r} is not supported (supported: {', '.join(ACTIVATIONS)})")
    return FamilySpec(
        model_type=model_type,
        head_dim=getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads,
        activation=activation,
        norm_unit_offset=is_gemma,
        has_qk_norm=model_type in QK_NORM_TYPES,
        has_sandwich_norms=is_gemma,
        embed_scale=config.hidden_size**0.5 if is_gemma else None,
        attn_scale=config.query_pre_attn_scalar**-0.5 if is_gemma else None,
        final_logit_softcap=getattr(config, "final_logit_softcapping", None),
        rope=_rope_by_key(config),
        layers=tuple(_layer_spec(config, i) for i in range(config.num_hidden_layers)),
    )


def _rope_by_key(config) -> dict[str, dict]:
    params = getattr(config, "rope_parameters", None) or {}
    if getattr(config, "layer_types", None) and all(isinstance(v, dict) for v in params.values()) and params:
        return dict(params)  # one rope per layer type
    return {DEFAULT_ROPE_KEY: rope_parameter_sets(config)[0]}


def _layer_spec(config, index: int) -> LayerSpec:
    layer_types = getattr(config, "layer_types", None)
    layer_type = layer_types[index] if layer_types else None
    rope = _rope_by_key(config)
    rope_key = layer_type if layer_type in rope else DEFAULT_ROPE_KEY
    window = getattr(config, "sliding_window", None)
    if layer_types is not None:
        window = window if layer_type == "sliding_attention" else None
    elif getattr(config, "use_sliding_window", True) is False:
        window = None
    return LayerSpec(rope_key=rope_key, sliding_window=window or None)
