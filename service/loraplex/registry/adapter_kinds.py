"""One validator for every adapter kind: `check_adapter` reads `peft_type` and hands the config and the
stored tensor shapes to that kind's checks.

Kinds (the names training's `adapter_type` uses too):
- `lora`: PEFT `LORA` (rank/alpha patterns, rsLoRA); `dora` is a LORA config with `use_dora: true`.
- `prompt_tuning`: PEFT `PROMPT_TUNING`, `prompt_embeddings` [num_virtual_tokens, hidden].
- `prefix_tuning`: PEFT `PREFIX_TUNING`, `prompt_embeddings` [num_virtual_tokens, num_layers * 2 * kv_dim]
  (PEFT saves the projection MLP's output, so with and without `prefix_projection` look the same).
A kind is accepted only while the engine serves it (`ServedModel.kinds`, default `SERVED_KINDS`): an upload
the engine would refuse later is refused now. Every other `peft_type` is refused with the reason.
"""
from __future__ import annotations

from collections.abc import Collection, Mapping
from dataclasses import dataclass
from typing import Any

from loraplex.registry.adapter_files import AdapterRefused

LORA, DORA, PROMPT_TUNING, PREFIX_TUNING = "lora", "dora", "prompt_tuning", "prefix_tuning"
ALL_KINDS = (LORA, DORA, PROMPT_TUNING, PREFIX_TUNING)
SERVED_KINDS = frozenset({LORA, DORA, PROMPT_TUNING, PREFIX_TUNING})  # what the engine serves today; add a kind here when the engine serves it

_SHOWN = {LORA: "LoRA", DORA: "DoRA (use_dora: true)", PROMPT_TUNING: "prompt tuning (PROMPT_TUNING)",
          PREFIX_TUNING: "prefix tuning (PREFIX_TUNING)"}
ModuleShapes = Mapping[tuple[int, str], tuple[int, int]]  # (layer, module) -> (d_out, d_in)

# peft_type -> why it cannot be served; anything neither here nor handled below is "unknown".
_UNSUPPORTED_KINDS = {
    "ADAPTION_PROMPT": "Adapter modules (bottleneck adapters / LLaMA-Adapter) add layers the engine does not run",
    "BOFT": "orthogonal fine-tuning multiplies the weights; only additive low-rank deltas are batched",
    "OFT": "orthogonal fine-tuning multiplies the weights; only additive low-rank deltas are batched",
    "IA3": "IA3 rescales activations inside the model; only additive low-rank deltas are batched",
    "LOHA": "LoHa (Hadamard-product factors) has no low-rank A/B form the engine batches",
    "LOKR": "LoKr (Kronecker-product factors) has no low-rank A/B form the engine batches",
    "ADALORA": "AdaLoRA's SVD form (lora_E) is not served; merge or convert it to LoRA first",
    "VERA": "VeRA's shared random projections are not served",
    "P_TUNING": "P-tuning's prompt encoder is not served; prompt tuning (PROMPT_TUNING) is",
    "MULTITASK_PROMPT_TUNING": "multitask prompt tuning is not served; prompt tuning (PROMPT_TUNING) is",
    "POLY": "Polytropon's routed adapters are not served",
    "LN_TUNING": "LayerNorm tuning changes model weights the engine shares between tenants",
    "FOURIERFT": "FourierFT's spectral deltas are not served",
    "HRA": "Householder reflection adapters multiply the weights; only additive deltas are batched",
    "VBLORA": "VB-LoRA's shared vector bank is not served",
    "BONE": "Bone adapters are not served",
    "XLORA": "X-LoRA's learned mixing of adapters is not served",
}


@dataclass(frozen=True)
class ModelDims:
    """The base model's sizes that prompt and prefix tuning must match."""

    hidden_size: int
    num_layers: int
    kv_dim: int  # num_key_value_heads * head_dim: one layer's key (or value) width


@dataclass(frozen=True)
class ServedModel:
    """What this server can serve. Without `module_shapes`/`dims` (the read-only store) only names,
    limits and the tensors' own consistency are checked."""

    allowed_modules: frozenset[str]
    max_lora_rank: int
    module_shapes: ModuleShapes | None = None
    dims: ModelDims | None = None
    kinds: frozenset[str] = SERVED_KINDS
    max_virtual_tokens: int = 256


@dataclass(frozen=True)
class AdapterSpec:
    """What the engine needs to know about an accepted adapter."""

    kind: str = LORA  # one of ALL_KINDS
    rank: int = 0  # LoRA/DoRA: the largest rank over all modules (rank_pattern included)
    alpha: float = 0.0
    target_modules: tuple[str, ...] = ()  # leaf names, e.g. ("q_proj", "v_proj")
    use_rslora: bool = False
    layers: tuple[int, ...] = ()  # layers with LoRA weights (known when module shapes are)
    num_virtual_tokens: int = 0  # prompt/prefix tuning


def check_adapter(config: dict[str, Any], shapes: Mapping[str, tuple[int, ...]], served: ServedModel) -> AdapterSpec:
    """Validate a parsed config against the stored tensor shapes; raises AdapterRefused naming the field."""
    from loraplex.registry.lora_checks import check_lora  # kind modules import the types above
    from loraplex.registry.prompt_checks import check_prefix_tuning, check_prompt_tuning

    peft_type = config.get("peft_type")
    checks = {"LORA": check_lora, "PROMPT_TUNING": check_prompt_tuning, "PREFIX_TUNING": check_prefix_tuning}
    if peft_type in _UNSUPPORTED_KINDS:
        raise AdapterRefused(f"peft_type {peft_type!r} is not supported: {_UNSUPPORTED_KINDS[peft_type]}", "peft_type")
    if peft_type not in checks:
        raise AdapterRefused(f"peft_type must be one of {sorted(checks)}, got {peft_type!r}", "peft_type")
    if config.get("task_type") not in (None, "CAUSAL_LM"):
        raise AdapterRefused(f"task_type must be 'CAUSAL_LM', got {config.get('task_type')!r}", "task_type")
    spec = checks[peft_type](config, shapes, served)
    require_served(spec.kind, served.kinds)
    return spec


def require_served(kind: str, kinds: Collection[str]) -> None:
    if kind not in kinds:
        field_name = "use_dora" if kind == DORA else "peft_type"
        raise AdapterRefused(f"{_SHOWN[kind]} adapters are not served by this server yet (served: {sorted(kinds)})", field_name)
