"""Device KV cache tensors (static, one row per running sequence) and row bookkeeping."""
from __future__ import annotations

import torch


class KVCache:
    """Per layer k/v: [max_rows, num_kv_heads, max_model_len, head_dim]. Memory fixed at start."""

    def __init__(self, num_layers, max_rows, num_kv_heads, max_model_len, head_dim, dtype, device):
        shape = (max_rows, num_kv_heads, max_model_len, head_dim)
        self.k = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.v = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.max_rows, self.max_model_len, self.num_kv_heads = max_rows, max_model_len, num_kv_heads

    @property
    def num_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.k + self.v)

    def move_row(self, src: int, dst: int, length: int) -> None:
        """Copy the first `length` positions of row src into row dst, in every layer."""
        for cache in self.k + self.v:
            cache[dst, :, :length] = cache[src, :, :length]


class RowAllocator:
    """Pure bookkeeping: rows 0..num_used-1 are in use; freeing moves the last row into the hole.

    Keeping used rows compact lets decode attention read a view of the cache instead of a gather.
    """

    def __init__(self, max_rows: int):
        self.max_rows = max_rows
        self.num_used = 0

    @property
    def num_free(self) -> int:
        return self.max_rows - self.num_used

    def can_allocate(self) -> bool:
        return self.num_used < self.max_rows

    def allocate(self) -> int:
        assert self.can_allocate(), "no free KV cache row"
        self.num_used += 1
        return self.num_used - 1

    def deallocate(self, row: int) -> int | None:
        """Free `row`. Returns the row whose contents must move into it (the last one), if any."""
        assert 0 <= row < self.num_used
        self.num_used -= 1
        last = self.num_used
        return last if last != row else None
