"""Rotary position tables (cos/sin per position), computed once at load for positions 0..max_len-1.

Supported rope types are those whose frequencies do not depend on the sequence: `default`, `linear`
(positions divided by a factor) and `llama3` (Llama 3.x: long wavelengths divided by the factor, short
ones kept, a smooth blend between). Types that rescale per sequence (`dynamic`, `longrope`) or change
attention magnitude (`yarn`) are refused at start rather than served approximately.
"""
from __future__ import annotations

import math

import torch

from loraplex.engine.errors import EngineError

SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3")


def rope_tables(rope: dict, head_dim: int, max_len: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """rope: one `rope_parameters` dict (rope_type, rope_theta, scaling fields) -> cos, sin: [max_len, hd]."""
    inv_freq = inverse_frequencies(rope, head_dim).to(device)  # [hd/2]
    positions = torch.arange(max_len, device=device, dtype=torch.float32)  # [L]
    angles = positions[:, None] * inv_freq[None, :]  # [L, hd/2]
    angles = torch.cat((angles, angles), dim=-1)  # [L, hd]: the rotate-half layout (pairs i, i + hd/2)
    return angles.cos(), angles.sin()


def inverse_frequencies(rope: dict, head_dim: int) -> torch.Tensor:
    """[hd/2] angle per position of each rotated pair, float32."""
    rope_type = rope.get("rope_type", "default")
    if rope_type not in SUPPORTED_ROPE_TYPES:
        raise EngineError(f"rope type {rope_type!r} is not supported (supported: {', '.join(SUPPORTED_ROPE_TYPES)})")
    exponents = torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim
    inv_freq = 1.0 / (rope["rope_theta"] ** exponents)  # [hd/2]
    if rope_type == "linear":
        return inv_freq / rope["factor"]
    if rope_type == "llama3":
        return _llama3_scaled(inv_freq, rope)
    return inv_freq


def _llama3_scaled(inv_freq: torch.Tensor, rope: dict) -> torch.Tensor:
    """Wavelengths longer than original_len / low_freq_factor are stretched by `factor`, those shorter than
    original_len / high_freq_factor kept; in between, a linear blend in original_len / wavelength."""
    factor, original_len = rope["factor"], rope["original_max_position_embeddings"]
    low, high = rope["low_freq_factor"], rope["high_freq_factor"]
    wavelength = 2 * math.pi / inv_freq  # [hd/2]
    blend = ((original_len / wavelength - low) / (high - low)).clamp(0.0, 1.0)  # 0: stretched, 1: kept
    scaled = (1 - blend) * inv_freq / factor + blend * inv_freq
    scaled = torch.where(wavelength > original_len / low, inv_freq / factor, scaled)
    return torch.where(wavelength < original_len / high, inv_freq, scaled)
