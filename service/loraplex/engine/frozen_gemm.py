"""The base model's frozen GEMMs on CPU through oneDNN with each weight reordered once.

`F.linear` on CPU hands the weight to oneDNN, which reorders it into its blocked layout on every call; for
decode batches (a few dozen rows against a 576 x 49152 LM head, say) that reorder costs as much as the
multiply. `FrozenGemm` keeps the reordered copy and calls oneDNN's linear on it directly, re-packing
after any write to the base weights: whoever writes them (merging, engine/merge.py) calls `weights_changed()`
(a fused projection's members are views whose writes never show in the fused weight's own version counter,
so that counter is not enough). The price is a second copy of every packed weight in host memory, hence a setting
(`LORAPLEX_PACK_WEIGHTS`). Anywhere else (CUDA, other dtypes, no oneDNN) it is plain `F.linear`.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

PACK_BATCH_HINT = 32  # oneDNN picks its blocking for this many rows; any row count works
PACKED_DTYPES = (torch.float32, torch.bfloat16)
_generation = [0]  # bumped on every in-place write to base weights; packs of an older generation are stale


def weights_changed() -> None:
    """Call after writing any base weight in place: every packed copy is re-made at its next use."""
    _generation[0] += 1


def can_pack(device: torch.device, dtype: torch.dtype) -> bool:
    return device.type == "cpu" and dtype in PACKED_DTYPES and torch.backends.mkldnn.is_available()


class FrozenGemm:
    """y = x W^T + b for one frozen weight W ([d_out, d_in]); packed only once `enabled`."""

    def __init__(self) -> None:
        self.enabled = False
        self._packed: torch.Tensor | None = None  # oneDNN's layout of W
        self._key: tuple[int, int, int] | None = None  # (data_ptr, version, generation) of the W packed

    def __call__(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        if not self.enabled or x.dtype != weight.dtype or x.device.type != "cpu":
            return F.linear(x, weight, bias)  # x: [T, d_in] -> [T, d_out]
        key = (weight.data_ptr(), weight._version, _generation[0])
        if key != self._key:
            self._packed = torch.ops.mkldnn._reorder_linear_weight(weight.detach(), PACK_BATCH_HINT)
            self._key = key
        return torch.ops.mkldnn._linear_pointwise(x, self._packed, bias, "none", [], "")  # [T, d_out]

    def release(self) -> None:
        self._packed, self._key = None, None
