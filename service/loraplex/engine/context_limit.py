"""The context length a checkpoint supports, and the check of a requested `max_model_len` against it.

A model is only trained (or rope-scaled) for so many positions; past them rope extrapolates and the
output turns into quiet garbage. So the default `max_model_len` is the model's own limit and a larger
value is refused at start, unless the operator says they accept extrapolation.

The limit is `max_position_embeddings`. With the rope scalings the engine serves (`linear`, `llama3`;
engine/rope.py) that is already the scaled length (Llama 3.1: 131072 over an original 8192); the
per-sequence ones (`dynamic`, `longrope`), whose original length would be the exact limit of static
tables, are refused at load. Sliding windows are no limit: the engine applies them per layer.
"""
from __future__ import annotations

from dataclasses import dataclass

from loraplex.engine.errors import EngineError

ALLOW_LONG_SETTING = "LORAPLEX_ALLOW_LONG_MAX_MODEL_LEN"


@dataclass(frozen=True)
class ContextLimit:
    max_len: int
    reason: str  # where the number comes from, for messages


def model_context_limit(hf_config) -> ContextLimit | None:
    """The model's own limit; None when the config states none."""
    max_positions = getattr(hf_config, "max_position_embeddings", None)
    return ContextLimit(max_positions, f"max_position_embeddings = {max_positions}") if max_positions else None


def rope_parameter_sets(hf_config) -> list[dict]:
    """transformers 5 keeps rope settings in `rope_parameters`: one dict, or one per layer type (Gemma 3)."""
    params = getattr(hf_config, "rope_parameters", None) or {}
    if all(isinstance(value, dict) for value in params.values()) and params:
        return list(params.values())
    return [params]


def resolve_max_model_len(hf_config, requested: int | None, allow_long: bool) -> int:
    """`requested` when the model supports it (or extrapolation is allowed); the model's limit when None."""
    limit = model_context_limit(hf_config)
    if requested is None:
        if limit is None:
            raise EngineError("the model config states no context length (max_position_embeddings); "
                              "set max_model_len (LORAPLEX_MAX_MODEL_LEN)")
        return limit.max_len
    if limit is not None and requested > limit.max_len and not allow_long:
        raise EngineError(
            f"max_model_len {requested} is longer than this model supports ({limit.reason}); positions past "
            f"{limit.max_len} extrapolate rope and degrade output. Lower max_model_len, or set "
            f"{ALLOW_LONG_SETTING}=true to accept that"
        )
    return requested
