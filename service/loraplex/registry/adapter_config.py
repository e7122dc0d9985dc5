"""Check that an adapter on disk is one the engine can serve, before it is ever routed to.

Two sources are read: `adapter_config.json` (what PEFT says it trained) and the header of
`adapter_model.safetensors` (what tensors are really there: names and shapes, no data). The checks are
the upload validator's (`adapter_kinds.check_adapter`), with the same limits; only the model's module
shapes are unknown here, so tensors are checked against the allowed module names. Anything the engine
would ignore or apply wrongly is refused with a message saying why; there is no silent fallback to the
base model.
"""
from __future__ import annotations

from collections.abc import Collection
from pathlib import Path

from loraplex.errors import LoraplexError
from loraplex.registry.adapter_files import (
    CONFIG_FILE,
    MAX_CONFIG_BYTES,
    WEIGHTS_FILE,
    AdapterRefused,
    read_config_file,
    shown_reason,
)
from loraplex.registry.adapter_kinds import AdapterSpec, ServedModel, check_adapter
from loraplex.registry.safetensors_header import MAX_HEADER_BYTES, read_safetensors_header_file

__all__ = [
    "CONFIG_FILE", "MAX_CONFIG_BYTES", "MAX_HEADER_BYTES", "WEIGHTS_FILE", "AdapterRefused", "InvalidAdapter",
    "LoraSpec", "RegistryError", "load_lora_spec",
]

LoraSpec = AdapterSpec  # the name the store and its records have always used


class RegistryError(LoraplexError):
    """Base class for adapter store errors (status and code: see loraplex/errors.py)."""

    code = "registry_error"


class InvalidAdapter(RegistryError):
    """The adapter exists but cannot be served as it is (unsupported feature, rank too high...)."""

    status = 400
    code = "invalid_adapter"
    param = "model"

    def __init__(self, adapter_id: str, reason: str):
        super().__init__(f"adapter {adapter_id!r} cannot be served: {reason}")
        self.adapter_id = adapter_id
        self.reason = reason


def load_lora_spec(
    adapter_dir: Path, adapter_id: str, max_lora_rank: int, allowed_modules: Collection[str]
) -> AdapterSpec:
    """Read and check both adapter files; raises InvalidAdapter with the first problem found."""
    served = ServedModel(allowed_modules=frozenset(allowed_modules), max_lora_rank=max_lora_rank)
    try:
        config = read_config_file(adapter_dir / CONFIG_FILE)
        spans = read_safetensors_header_file(adapter_dir / WEIGHTS_FILE)
        return check_adapter(config, {name: span.shape for name, span in spans.items()}, served)
    except ValueError as exc:  # AdapterRefused, PatternError
        raise InvalidAdapter(adapter_id, shown_reason(exc)) from None
