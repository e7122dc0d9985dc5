"""Device KV cache: a pool of fixed-size blocks per layer, sized by a memory budget.

Which sequence holds which block is `BlockManager`'s business; this module owns the tensors only.
"""
from __future__ import annotations

import os

import torch

CPU_DEFAULT_SHARE = 0.10  # of host memory, when no budget is given
CUDA_DEFAULT_SHARE = 0.80  # of the device memory left free after the weights


class KVCache:
    """Per layer k/v: [num_blocks, block_size, num_kv_heads, head_dim] (zeros, so padding reads are finite)."""

    def __init__(self, num_layers, num_blocks, block_size, num_kv_heads, head_dim, dtype, device):
        shape = (num_blocks, block_size, num_kv_heads, head_dim)
        self.k = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.v = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.num_blocks, self.block_size, self.num_kv_heads = num_blocks, block_size, num_kv_heads

    @property
    def num_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.k + self.v)


def bytes_per_token(num_layers: int, num_kv_heads: int, head_dim: int, dtype: torch.dtype) -> int:
    return 2 * num_layers * num_kv_heads * head_dim * torch.empty((), dtype=dtype).element_size()


def kv_budget_bytes(budget_bytes: int, share: float, device: torch.device) -> int:
    """An explicit byte budget wins; else `share` (or the default share) of the device's memory."""
    if budget_bytes > 0:
        return budget_bytes
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free * (share or CUDA_DEFAULT_SHARE))
    total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    return int(total * (share or CPU_DEFAULT_SHARE))


def num_blocks_for(budget: int, token_bytes: int, block_size: int, max_useful_tokens: int, max_model_len: int) -> int:
    """Blocks that fit the budget, capped at what max_num_seqs full sequences could ever use; at least
    one full-length sequence must fit."""
    num_blocks = min(budget // (token_bytes * block_size), -(-max_useful_tokens // block_size))
    needed = -(-max_model_len // block_size)
    if num_blocks < needed:
        raise ValueError(
            f"the KV cache budget ({budget} bytes) holds {num_blocks} blocks of {block_size} tokens; "
            f"one sequence of max_model_len={max_model_len} needs {needed}: raise the budget or lower max_model_len"
        )
    return num_blocks
