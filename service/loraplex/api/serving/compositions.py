"""Which adapter a generation request runs with: `model` alone (the base or one adapter), or a weighted
composition: `adapters` + `merge` in the OpenAI bodies, `parameters.merged_adapters` in TGI's.

With `adapters`, `model` may be omitted or be the base model's name (what responses echo); an adapter id
there too would say two things at once, so it is a 400 naming `model`. Every component is resolved as
`model` is, for the caller: another tenant's private adapter is the same 404 as a missing one.
"""
from __future__ import annotations

import asyncio

from loraplex.api.errors import InvalidParameter, ModelNotFound
from loraplex.api.schemas.openai import MergeOptions, SamplingRequest
from loraplex.api.schemas.tgi import GenerateParameters, MergedAdapters
from loraplex.api.serving.context import GenerationContext
from loraplex.api.serving.prompts import resolve_model
from loraplex.engine.composition import MergeSpec, composed_lora
from loraplex.engine.types import LoraRequest
from loraplex.registry.local_store import AdapterNotFound

_DENSITY_METHODS = ("ties", "dare_linear", "dare_ties")
_SEED_METHODS = ("dare_linear", "dare_ties")
_SIGN_METHODS = ("ties", "dare_ties")


async def openai_adapter(ctx: GenerationContext, body: SamplingRequest) -> tuple[str, LoraRequest | None]:
    """(the model name responses echo, the adapter to run: None for the base model)."""
    if body.adapters is None:
        if body.merge is not None:
            raise InvalidParameter("merge applies to a composition: list its adapters in `adapters`.", param="merge")
        if body.model is None:
            raise InvalidParameter("model: Field required (or list `adapters` to compose).", param="model")
        return body.model, await resolve_model(ctx, body.model)
    base = ctx.engine.model_name
    if body.model is not None and body.model != base:
        raise InvalidParameter(f"With `adapters`, model must be the base model (`{base}`) or omitted: `model` runs "
                               "one adapter, `adapters` a composition.", param="model")
    merge = _openai_merge(body.merge or MergeOptions())
    ids = [c.id for c in body.adapters]
    components = await _components(ctx, ids, [f"adapters.{i}.id" for i in range(len(ids))])
    return base, composed_lora(components, [c.weight for c in body.adapters], merge, param="adapters")


def _openai_merge(options: MergeOptions) -> MergeSpec:
    method = options.method
    if options.density is None and method in _DENSITY_METHODS:
        raise InvalidParameter(f"merge.density is required by {method} (the fraction of entries kept).",
                               param="merge.density")
    for name, value, methods in (("density", options.density, _DENSITY_METHODS), ("seed", options.seed, _SEED_METHODS),
                                 ("majority_sign_method", options.majority_sign_method, _SIGN_METHODS)):
        if value is not None and method not in methods:
            raise InvalidParameter(f"merge.{name} applies to {', '.join(methods)}, not {method}.", param=f"merge.{name}")
    return MergeSpec(method, options.density, options.seed or 0, options.majority_sign_method or "total")


async def tgi_adapter(ctx: GenerationContext, parameters: GenerateParameters) -> tuple[str, LoraRequest | None]:
    merged = parameters.merged_adapters
    if merged is None:
        model = parameters.adapter_id or ctx.engine.model_name
        return model, await resolve_model(ctx, model)
    if parameters.adapter_id is not None:
        raise InvalidParameter("adapter_id and merged_adapters cannot be combined (one adapter, or a composition).",
                               param="parameters.adapter_id")
    prefix = "parameters.merged_adapters"
    weights = [1.0] * len(merged.ids) if merged.weights is None else merged.weights
    if len(weights) != len(merged.ids):
        raise InvalidParameter(f"{prefix}: ids ({len(merged.ids)}) and weights ({len(weights)}) must have the same "
                               "length.", param=f"{prefix}.weights")
    merge = _tgi_merge(merged, prefix)
    components = await _components(ctx, merged.ids, [f"{prefix}.ids.{i}" for i in range(len(merged.ids))])
    return ctx.engine.model_name, composed_lora(components, weights, merge, param=prefix)


def _tgi_merge(merged: MergedAdapters, prefix: str) -> MergeSpec:
    method = merged.merge_strategy or "linear"
    if not merged.density and method in _DENSITY_METHODS:
        raise InvalidParameter(f"{prefix}.density in (0, 1] is required by {method}.", param=f"{prefix}.density")
    if merged.majority_sign_method is not None and method not in _SIGN_METHODS:
        raise InvalidParameter(f"majority_sign_method applies to {', '.join(_SIGN_METHODS)}, not {method}.",
                               param=f"{prefix}.majority_sign_method")
    density = merged.density if method in _DENSITY_METHODS else None  # LoRAX clients always send one
    return MergeSpec(method, density, 0, merged.majority_sign_method or "total")


async def _components(ctx: GenerationContext, ids: list[str], params: list[str]) -> list[LoraRequest]:
    """Each id resolved for the caller, in order; the first that is not usable is the 404."""
    seen: dict[str, int] = {}
    components = []
    for i, (adapter_id, param) in enumerate(zip(ids, params)):
        if adapter_id == ctx.engine.model_name:
            raise InvalidParameter(f"{param}: the base model is not an adapter; compose adapters only.", param=param)
        try:
            lora = ctx.registry.cached_lora_request(ctx.principal, adapter_id)
            if lora is None:
                lora = await asyncio.to_thread(ctx.registry.lora_request, ctx.principal, adapter_id)
        except AdapterNotFound:
            raise ModelNotFound(f"The model `{adapter_id}` does not exist.", param=param) from None
        if lora.key in seen:
            raise InvalidParameter(f"{param} names the same adapter version as {params[seen[lora.key]]}; give it "
                                   "one weight.", param=param)
        seen[lora.key] = i
        components.append(lora)
    return components
