"""Request fields of a weighted composition of adapters: `adapters` + `merge` in the OpenAI bodies,
LoRAX's `parameters.merged_adapters` in the TGI body (see api/serving/compositions.py for how they
combine with `model` / `adapter_id`, and engine/composition.py for the methods)."""
from __future__ import annotations

from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field

from loraplex.engine.composition import MAX_COMPONENTS, MAX_SEED, MAX_WEIGHT, MergeMethod, SignMethod


class _Request(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


class AdapterComponent(_Request):
    id: str = Field(min_length=1, max_length=256, description="An adapter id (`tenant/name` or `tenant/name@version`).")
    weight: float = Field(1.0, ge=-MAX_WEIGHT, le=MAX_WEIGHT, allow_inf_nan=False)


class MergeOptions(_Request):
    """How `adapters` are composed (PEFT `add_weighted_adapter`; `linear` is its exact `cat`)."""

    method: MergeMethod = "linear"
    density: float | None = Field(None, gt=0.0, le=1.0, description="ties, dare_*: fraction of entries kept (required).")
    seed: int | None = Field(None, ge=0, le=MAX_SEED, description="dare_*: the masks' seed (default 0).")
    majority_sign_method: SignMethod | None = Field(None, description="ties, dare_ties (default `total`).")


class MergedAdapters(_Request):
    """LoRAX's per-request merge (its field names). LoRAX clients always send a density (0.0 by default),
    so `linear` accepts one and, as LoRAX does, does not use it; dare_* masks use seed 0 (LoRAX has no
    seed field)."""

    ids: list[Annotated[str, Field(min_length=1, max_length=256)]] = Field(min_length=1, max_length=MAX_COMPONENTS)
    weights: list[Annotated[float, Field(ge=-MAX_WEIGHT, le=MAX_WEIGHT, allow_inf_nan=False)]] | None = Field(
        None, max_length=MAX_COMPONENTS, description="One per id; default 1 each.")
    merge_strategy: MergeMethod | None = Field(None, description="Default `linear` (PEFT's exact `cat`).")
    density: float | None = Field(None, ge=0.0, le=1.0,
                                  description="ties, dare_*: fraction of entries kept, > 0 (required).")
    majority_sign_method: SignMethod | None = Field(None, description="ties, dare_ties (default `total`).")
