"""Weighted composition of LoRA adapters per request: one new adapter built from the components' host
weights on the loader thread, then cached (host tier) and loaded into a device slot like any adapter.

The methods are PEFT `add_weighted_adapter`'s (peft/tuners/lora/model.py, peft/utils/merge_utils.py):
- `linear` is PEFT's `cat`: A = cat_i(w_i A_i), B = cat_i(s_i B_i), so B A = sum_i w_i s_i B_i A_i exactly
  (s_i: component i's LoRA scale); the rank is the sum of the components' ranks at each module.
- `ties`, `dare_linear`, `dare_ties` are PEFT's methods of those names: applied to the A's and to the
  B's separately, with A-side weights sign(w s) sqrt|w s| and B-side weights sqrt|w s|; every component
  must have the same rank at a module; the rank is unchanged.
- dare masks come from a CPU generator seeded with `seed`, drawn in PEFT's order (modules in model
  order; per module the A of every component that has it, then their B; nothing drawn at density 1):
  they are the masks PEFT draws when torch's RNG holds `seed` as its merge loop starts. Everything is
  computed in fp32 (bf16 host weights are widened first), so the masks do not depend on the device.
A single component is always `linear` (as in PEFT). The result's scale is 1, as PEFT's new adapter's.
"""
from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal, get_args

import torch

from loraplex.engine.errors import AdapterError
from loraplex.engine.lora_weights import HostLora
from loraplex.engine.model import LORA_MODULES
from loraplex.engine.types import LoraRequest

MergeMethod = Literal["linear", "ties", "dare_linear", "dare_ties"]
SignMethod = Literal["total", "frequency"]
METHODS: tuple[str, ...] = get_args(MergeMethod)
SIGN_METHODS: tuple[str, ...] = get_args(SignMethod)
MAX_COMPONENTS = 8
MAX_WEIGHT = 100.0  # |weight|; beyond it a bf16 delta overflows long before it means anything
MAX_SEED = 2**63 - 1  # dare masks' seed (as the sampling seed: a JSON-safe non-negative int64)


class CompositionError(AdapterError):
    """A composition that cannot be built (ranks): a 400 naming the request field given as `param`."""


@dataclass(frozen=True)
class MergeSpec:
    method: str = "linear"
    density: float | None = None  # ties, dare_*: the fraction of entries kept, in (0, 1]
    seed: int = 0  # dare_*: the masks' seed
    majority_sign_method: str = "total"  # ties, dare_ties

    def parameters(self) -> dict:
        """Only what the method reads: the cache key must not split on an unused field."""
        params: dict = {"method": self.method}
        if self.method != "linear":
            params["density"] = repr(float(self.density))
        if self.method.startswith("dare"):
            params["seed"] = self.seed
        if self.method.endswith("ties"):
            params["majority_sign_method"] = self.majority_sign_method
        return params


@dataclass(frozen=True)
class ComposedLora(LoraRequest):
    """A composition as the engine runs it: `key` holds every component's version key, the weights and
    the method's parameters (see composed_lora); `path` is unused."""

    components: tuple[LoraRequest, ...] = ()
    weights: tuple[float, ...] = ()
    merge: MergeSpec = field(default_factory=MergeSpec)
    param: str = "adapters"  # the request field that errors name (not part of the key)


def composed_lora(components: list[LoraRequest], weights: list[float], merge: MergeSpec,
                  param: str = "adapters") -> ComposedLora:
    _check(components, weights, merge, param)
    weights = [float(w) for w in weights]
    if len(components) == 1:
        merge = MergeSpec()  # PEFT: one adapter is always a linear merge
    canonical = json.dumps({"components": [c.key for c in components], "weights": [repr(w) for w in weights],
                            **merge.parameters()}, sort_keys=True)
    digest = hashlib.sha256(canonical.encode()).hexdigest()[:20]
    # Before the "@": what metrics show (api/metrics.py keeps a key's part before its first "@").
    label = "+".join(f"{w:g}*{c.key.split('@', 1)[0]}" for c, w in zip(components, weights))
    return ComposedLora(f"{merge.method}({label})@mix:{digest}", "", tuple(components), tuple(weights), merge, param)


def _check(components: list[LoraRequest], weights: list[float], merge: MergeSpec, param: str) -> None:
    """The API checks all of this first and names the exact field; this guards direct engine callers."""
    if not 1 <= len(components) <= MAX_COMPONENTS or len(weights) != len(components):
        raise CompositionError(f"a composition takes 1 to {MAX_COMPONENTS} adapters, one weight each", param)
    if not all(math.isfinite(w) and abs(w) <= MAX_WEIGHT for w in weights):
        raise CompositionError(f"weights must be finite numbers in [-{MAX_WEIGHT:g}, {MAX_WEIGHT:g}]", param)
    if merge.method not in METHODS or merge.majority_sign_method not in SIGN_METHODS:
        raise CompositionError(f"method must be one of {METHODS}, majority_sign_method one of {SIGN_METHODS}", param)
    if merge.method != "linear" and not (merge.density is not None and 0.0 < merge.density <= 1.0):
        raise CompositionError(f"{merge.method} needs a density in (0, 1]", param)


def read_components(lora: ComposedLora, read: Callable[[LoraRequest], HostLora]) -> list[HostLora]:
    """Each component's host weights, read by `read`; a component that is not a servable LoRA adapter (a
    prompt-tuning one, an unreadable one) is refused naming the composition's field and the adapter."""
    hosts = []
    for component in lora.components:
        try:
            hosts.append(read(component))
        except AdapterError as exc:
            name = component.key.split(":", 1)[0]  # `tenant/name@version`, without the content digest
            raise CompositionError(f"adapter {name} cannot be composed: {exc}", lora.param) from None
    return hosts


def compose(lora: ComposedLora, hosts: list[HostLora], max_rank: int, dtype: torch.dtype) -> HostLora:
    """hosts: the components' host weights, in `lora.components` order."""
    if any(h.magnitudes for h in hosts):  # PEFT's add_weighted_adapter refuses DoRA too; its deltas are not additive
        raise CompositionError("DoRA adapters cannot be composed (a DoRA output is scaled, not a sum of deltas)", lora.param)
    modules = sorted(set().union(*(h.weights for h in hosts)), key=lambda where: (where[0], LORA_MODULES.index(where[1])))
    generator = torch.Generator(device="cpu").manual_seed(lora.merge.seed) if lora.merge.method.startswith("dare") else None
    weights = {}
    for where in modules:
        present = [(h, w) for h, w in zip(hosts, lora.weights) if where in h.weights]
        if lora.merge.method == "linear":
            a, b = _concatenate(present, where)
        else:
            a, b = _task_arithmetic(present, where, lora, generator)
        if a.shape[0] > max_rank:
            raise CompositionError(
                f"the composed adapter's rank at layer {where[0]} {where[1]} is {a.shape[0]} (linear adds the "
                f"components' ranks); this server's max_lora_rank is {max_rank}", lora.param)
        weights[where] = (a.to(dtype).contiguous(), b.to(dtype).contiguous())
    return HostLora(lora.key, weights, max(a.shape[0] for a, _ in weights.values()), dict.fromkeys(weights, 1.0))


def _concatenate(present: list[tuple[HostLora, float]], where) -> tuple[torch.Tensor, torch.Tensor]:
    a = torch.cat([h.weights[where][0].float() * w for h, w in present])  # [sum r, d_in]
    b = torch.cat([h.weights[where][1].float() for h, _ in present], dim=1)  # [d_out, sum r], scale folded in
    return a, b


def _task_arithmetic(present, where, lora: ComposedLora, generator) -> tuple[torch.Tensor, torch.Tensor]:
    """PEFT's _generalized_task_arithmetic_weighted_adapter for one module: A's first, then B's."""
    a_tasks = [h.weights[where][0].float() for h, _ in present]  # each [r, d_in]
    if len({t.shape for t in a_tasks}) > 1:
        ranks = [t.shape[0] for t in a_tasks]
        raise CompositionError(f"{lora.merge.method} needs the same rank in every adapter at layer {where[0]} "
                               f"{where[1]} (got {ranks}); linear composes any ranks", lora.param)
    scales = [h.scales[where] for h, _ in present]
    b_tasks = [h.weights[where][1].float() / s if s else h.weights[where][1].float()  # B as PEFT holds it: unscaled
               for (h, _), s in zip(present, scales)]
    scaled = [w * s for (_, w), s in zip(present, scales)]
    a_weights = torch.tensor([math.sqrt(abs(x)) * (1 if x >= 0 else -1) for x in scaled])  # [n] fp32
    b_weights = torch.tensor([math.sqrt(abs(x)) for x in scaled])
    return _merge(a_tasks, a_weights, lora.merge, generator), _merge(b_tasks, b_weights, lora.merge, generator)


def _merge(tasks: list[torch.Tensor], weights: torch.Tensor, merge: MergeSpec, generator) -> torch.Tensor:
    if merge.method == "ties":
        tasks = [_keep_largest(t, merge.density) for t in tasks]
    else:
        tasks = [_keep_random(t, merge.density, generator) for t in tasks]
    stacked = torch.stack(tasks)  # [n, *shape]
    weighted = stacked * weights.view(-1, *[1] * (stacked.dim() - 1))
    if merge.method == "dare_linear":
        return weighted.sum(dim=0)
    agrees = _majority_sign_mask(stacked, merge.majority_sign_method)  # [n, *shape] bool
    return (weighted * agrees).sum(dim=0) / torch.clamp(agrees.sum(dim=0), min=1.0)


def _keep_largest(t: torch.Tensor, density: float) -> torch.Tensor:
    if density >= 1:
        return t
    mask = torch.zeros(t.numel(), dtype=t.dtype)
    # PEFT's top-k set; unsorted selects the same set ~3.5x faster (the order is never used)
    mask[torch.topk(t.abs().reshape(-1), k=int(density * t.numel()), largest=True, sorted=False).indices] = 1
    return t * mask.reshape(t.shape)


def _keep_random(t: torch.Tensor, density: float, generator: torch.Generator) -> torch.Tensor:
    if density >= 1:
        return t  # PEFT draws no mask then: the generator stays where it was
    return t * torch.bernoulli(torch.full_like(t, density), generator=generator) / density


def _majority_sign_mask(stacked: torch.Tensor, method: str) -> torch.Tensor:
    signs = stacked.sign()
    magnitude = stacked.sum(dim=0) if method == "total" else signs.sum(dim=0)
    return signs == torch.where(magnitude >= 0, 1, -1)
