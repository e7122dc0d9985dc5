"""The machine's roofline, measured in this run, and where a decode step sits against it.

A decode step at batch B must read every weight once (bytes = params x dtype size) and do about
2 x params x B FLOPs, so its time is at least max(bytes / bandwidth, FLOPs / matmul peak). Both
limits are measured here on the run's device in the run's dtype: bandwidth with a large tensor
sum (read only, like weight streaming) and copy (read + write), matmul peak with a big square matmul.
"""
from __future__ import annotations

import torch

from loadtest.runtime import Runtime


def measure_bandwidth(rt: Runtime, num_bytes: int | None = None, repeats: int = 5) -> dict:
    """Best-of-N bytes/s for a read-only sum and a copy of a tensor much larger than the caches."""
    num_bytes = num_bytes or (2 << 30 if rt.device.type == "cuda" else 512 << 20)
    x = torch.ones(num_bytes // rt.dtype_bytes, dtype=rt.dtype, device=rt.device)
    y = torch.empty_like(x)
    x.sum(), y.copy_(x)  # warm-up: page faults, kernel selection
    sum_s = min(rt.timed(lambda: x.sum()) for _ in range(repeats))
    copy_s = min(rt.timed(lambda: y.copy_(x)) for _ in range(repeats))
    read_bw, copy_bw = x.nbytes / sum_s, 2 * x.nbytes / copy_s
    return {
        "tensor_bytes": x.nbytes,
        "sum_bytes_per_s": read_bw,
        "copy_bytes_per_s": copy_bw,
        "bytes_per_s": max(read_bw, copy_bw),  # the better one: the roofline stays a true lower bound
    }


def measure_matmul_peak(rt: Runtime, n: int | None = None, repeats: int = 5) -> dict:
    """Best-of-N FLOP/s of an n x n x n matmul."""
    n = n or (8192 if rt.device.type == "cuda" else 2048)
    a = torch.randn(n, n, device=rt.device).to(rt.dtype)
    b = torch.randn(n, n, device=rt.device).to(rt.dtype)
    a @ b  # warm-up
    best_s = min(rt.timed(lambda: a @ b) for _ in range(repeats))
    return {"n": n, "flops_per_s": 2 * n**3 / best_s}


def measure(rt: Runtime, quick: bool = False) -> dict:
    if quick:
        return {"bandwidth": measure_bandwidth(rt, 64 << 20, repeats=3),
                "matmul": measure_matmul_peak(rt, 512, repeats=3)}
    return {"bandwidth": measure_bandwidth(rt), "matmul": measure_matmul_peak(rt)}


def best_of(first: dict, second: dict) -> dict:
    """The machine at its best of two measurements (start and end of the run): the bound stays a lower
    bound even if other work slowed one of them; their spread shows how steady the machine was."""
    return {
        "bandwidth": max(first["bandwidth"], second["bandwidth"], key=lambda m: m["bytes_per_s"]),
        "matmul": max(first["matmul"], second["matmul"], key=lambda m: m["flops_per_s"]),
    }


def decode_step_bound(machine: dict, num_params: int, dtype_bytes: int, batch_size: int) -> dict:
    """Lower bound on one decode step of `batch_size` sequences (attention over the KV cache ignored)."""
    weight_bytes = num_params * dtype_bytes
    flops = 2 * num_params * batch_size
    memory_s = weight_bytes / machine["bandwidth"]["bytes_per_s"]
    compute_s = flops / machine["matmul"]["flops_per_s"]
    return {
        "batch_size": batch_size,
        "weight_bytes": weight_bytes,
        "flops_per_step": flops,
        "memory_bound_s": memory_s,
        "compute_bound_s": compute_s,
        "roofline_s": max(memory_s, compute_s),
        "bound_by": "memory" if memory_s >= compute_s else "compute",
    }


def efficiency(bound: dict, achieved_step_s: float) -> dict:
    """Achieved step time against the bound: 1.0 would be running at the roofline."""
    return {
        **bound,
        "achieved_step_s": achieved_step_s,
        "efficiency": bound["roofline_s"] / achieved_step_s,
        "achieved_tokens_per_s": bound["batch_size"] / achieved_step_s,
        "roofline_tokens_per_s": bound["batch_size"] / bound["roofline_s"],
    }
