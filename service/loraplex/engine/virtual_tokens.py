"""Virtual-token adapters (PEFT PROMPT_TUNING and PREFIX_TUNING): read, keep, and feed to the forward.

Both kinds put `n` virtual positions before the prompt, counted as PEFT counts them: the prompt starts
at position n. A sequence of such an adapter holds n placeholder token ids (-1..-n) in front of its
prompt, so block tables, chunked prefill and prefix-cache hashes (under the version's key) cover the
virtual positions like any others.
- prompt tuning: the virtual positions are computed like tokens whose input embedding is the
  adapter's `prompt_embeddings` row (not the embedding table's, and not scaled by Gemma's factor);
- prefix tuning: the virtual positions' per-layer K/V is given (written as-is: PEFT's prefix keys
  are never rotated), so no request computes it; engine/prefix_kv.py puts it in KV blocks.
PEFT saves a projected prefix (prefix_projection) already run through its MLP: `prompt_embeddings`
is the projection's output, so both prefix variants load the same way.
Neither occupies a LoRA slot: their sequences run in slot 0 (the base), batched with everyone.
"""
from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load as load_safetensors

from loraplex.engine.errors import AdapterError
from loraplex.engine.lora_weights import read_config_json

PROMPT_TUNING, PREFIX_TUNING = "PROMPT_TUNING", "PREFIX_TUNING"
VIRTUAL_TOKEN_TYPES = (PROMPT_TUNING, PREFIX_TUNING)
MAX_VIRTUAL_TOKENS = 1024


@dataclass(frozen=True)
class ModelDims:
    hidden_size: int
    num_layers: int
    num_kv_heads: int
    head_dim: int


@dataclass(eq=False)
class VirtualTokens:
    """One loaded adapter version. Sequences hold it, so it outlives its place in the store."""

    key: str
    peft_type: str  # PROMPT_TUNING | PREFIX_TUNING
    num_tokens: int
    embeds: torch.Tensor | None = None  # [n, hidden] (prompt tuning)
    kv: torch.Tensor | None = None  # [layers, 2, n, Hkv, hd] (prefix tuning)
    blocks: list[int] = field(default_factory=list)  # KV blocks this version owns: its prefix's full blocks

    @property
    def placeholder_ids(self) -> list[int]:
        return list(range(-1, -self.num_tokens - 1, -1))

    @property
    def is_prefix(self) -> bool:
        return self.peft_type == PREFIX_TUNING

    @property
    def num_precomputed(self) -> int:
        """Leading positions whose KV exists before any request runs (the prefix)."""
        return self.num_tokens if self.is_prefix else 0


def peft_type_of(path: str) -> str:
    """The adapter's PEFT type ("LORA" when the config does not say)."""
    return str(_read_config(Path(path)).get("peft_type") or "LORA").upper()


def read_virtual_tokens(key: str, path: str, dims: ModelDims, dtype: torch.dtype, device) -> VirtualTokens:
    """Read and check `prompt_embeddings` against the model; AdapterError (a client's fault) if unusable."""
    directory = Path(path)
    config = _read_config(directory)
    peft_type = str(config.get("peft_type", "")).upper()
    n = config.get("num_virtual_tokens")
    if not isinstance(n, int) or isinstance(n, bool) or not 1 <= n <= MAX_VIRTUAL_TOKENS:
        raise AdapterError(f"num_virtual_tokens must be an integer in [1, {MAX_VIRTUAL_TOKENS}]")
    if config.get("num_transformer_submodules", 1) != 1:
        raise AdapterError("num_transformer_submodules must be 1 (a decoder-only model)")
    weights = _read_prompt_embeddings(directory)
    if peft_type == PROMPT_TUNING:
        _expect_shape(weights, (n, dims.hidden_size))
        return VirtualTokens(key, peft_type, n, embeds=weights.to(device=device, dtype=dtype).contiguous())
    if peft_type == PREFIX_TUNING:
        _expect_shape(weights, (n, dims.num_layers * 2 * dims.num_kv_heads * dims.head_dim))
        kv = weights.view(n, dims.num_layers, 2, dims.num_kv_heads, dims.head_dim).permute(1, 2, 0, 3, 4)
        return VirtualTokens(key, peft_type, n, kv=kv.to(device=device, dtype=dtype).contiguous())
    raise AdapterError(f"peft_type {peft_type!r} is not a virtual-token adapter")


def _read_config(directory: Path) -> dict:
    return read_config_json(directory / "adapter_config.json")


def _read_prompt_embeddings(directory: Path) -> torch.Tensor:
    try:
        tensors = load_safetensors((directory / "adapter_model.safetensors").read_bytes())
    except OSError as exc:
        raise AdapterError(f"unreadable adapter_model.safetensors: {exc.strerror or 'I/O error'}") from None
    except Exception:  # safetensors raises its own error types for malformed files
        raise AdapterError("adapter_model.safetensors is not a valid safetensors file") from None
    weights = tensors.get("prompt_embeddings")
    if weights is None or set(tensors) != {"prompt_embeddings"}:
        raise AdapterError("a prompt/prefix-tuning adapter holds exactly one tensor, prompt_embeddings")
    if not weights.is_floating_point() or not torch.isfinite(weights).all():
        raise AdapterError("prompt_embeddings must be finite floating-point values")
    return weights.float()


def _expect_shape(weights: torch.Tensor, shape: tuple[int, ...]) -> None:
    if tuple(weights.shape) != shape:
        raise AdapterError(f"prompt_embeddings has shape {list(weights.shape)}; this model needs {list(shape)}")


class VirtualTokenStore:
    """Loaded virtual-token adapters by version key (LRU, `capacity` of them), and which keys are LoRA.

    `on_load(entry)` / `on_drop(entry)` let prefix_kv own and free the prefix's KV blocks."""

    def __init__(self, dims: ModelDims, dtype: torch.dtype, device, capacity: int, on_load=None, on_drop=None):
        self.dims, self.dtype, self.device, self.capacity = dims, dtype, device, max(1, capacity)
        self.on_load, self.on_drop = on_load, on_drop
        self._entries: OrderedDict[str, VirtualTokens] = OrderedDict()
        self._lora_keys: OrderedDict[str, None] = OrderedDict()  # keys known to be LoRA (no config re-read)
        self.pinned: set[str] = set()  # loaded versions the LRU bound never drops (admin pins)
        self.num_loads = 0

    def lookup(self, key: str, path: str) -> VirtualTokens | None:
        """The loaded adapter for this version, loading it on first use; None for a LoRA adapter."""
        if key in self._entries:
            self._entries.move_to_end(key)
            return self._entries[key]
        if key in self._lora_keys:
            return None
        try:
            peft_type = peft_type_of(path)
        except AdapterError:
            return None  # the LoRA loader reports unreadable adapters as it always has
        if peft_type not in VIRTUAL_TOKEN_TYPES:
            self._remember_lora(key)
            return None
        entry = read_virtual_tokens(key, path, self.dims, self.dtype, self.device)
        self._insert(entry)
        return entry

    def keys(self) -> list[str]:
        return list(self._entries)

    def __contains__(self, key: str) -> bool:
        return key in self._entries

    def pin(self, key: str, is_pinned: bool) -> None:
        (self.pinned.add if is_pinned else self.pinned.discard)(key)

    def drop(self, key: str) -> bool:
        self.pinned.discard(key)
        entry = self._entries.pop(key, None)
        if entry is not None and self.on_drop is not None:
            self.on_drop(entry)
        return entry is not None

    def drop_versions(self, prefix: str) -> None:
        """A deleted adapter: every loaded version whose key starts with `prefix`."""
        for key in [k for k in self._entries if k.startswith(prefix)]:
            self.drop(key)
        for key in [k for k in self._lora_keys if k.startswith(prefix)]:
            del self._lora_keys[key]

    def _insert(self, entry: VirtualTokens) -> None:
        unpinned = [k for k in self._entries if k not in self.pinned]  # least recently used first
        for key in unpinned[: max(0, len(self._entries) + 1 - self.capacity)]:
            self.drop(key)  # its running sequences keep their reference (and their blocks)
        self._entries[entry.key] = entry
        self.num_loads += 1
        if self.on_load is not None:
            self.on_load(entry)

    def _remember_lora(self, key: str) -> None:
        self._lora_keys[key] = None
        while len(self._lora_keys) > 4096:
            self._lora_keys.popitem(last=False)


def virtual_inputs(num_decode: int, chunks, token_ids: list[int]) -> tuple[torch.Tensor, torch.Tensor] | None:
    """For the forward's flat batch (decodes first, then `chunks` in order): replace the placeholder ids
    of prompt-tuning positions by 0 in `token_ids` (in place) and return (flat indices [k], embeddings
    [k, hidden]) to put in their place after the embedding lookup. None when no chunk has any."""
    indices, rows, start = [], [], num_decode
    for chunk in chunks:
        virtual = chunk.seq.virtual
        if virtual is not None and virtual.embeds is not None and chunk.start < virtual.num_tokens:
            end = min(chunk.start + chunk.num_tokens, virtual.num_tokens)
            indices.extend(range(start, start + end - chunk.start))
            rows.append(virtual.embeds[chunk.start:end])  # [end - start, hidden]
        start += chunk.num_tokens
    if not indices:
        return None
    for i in indices:
        token_ids[i] = 0
    values = rows[0] if len(rows) == 1 else torch.cat(rows)
    return torch.tensor(indices, dtype=torch.long).to(values.device, non_blocking=True), values
