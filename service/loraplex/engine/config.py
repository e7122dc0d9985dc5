"""Engine configuration: one validated dataclass (the API layer builds it from Settings)."""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from loraplex.engine.frozen_gemm import can_pack

from loraplex.engine.model import LORA_MODULES


@dataclass(frozen=True)
class EngineConfig:
    model: str  # HF model directory or hub id
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    dtype: str = "auto"  # auto | float32 | bfloat16 | float16
    max_loras: int = 8
    max_cpu_loras: int = 32
    default_merge_mode: str = "unmerged"  # unmerged | auto: the merge mode of adapters no admin has set  # parsed adapters kept in host memory (0: always read from storage)
    max_lora_rank: int = 16
    max_num_seqs: int = 256  # sequences running at once (also bounded by free KV blocks)
    max_model_len: int = 1024  # engine_factory derives the default from the model (engine/context_limit.py)
    allow_long_max_model_len: bool = False  # accept a max_model_len past the model's own limit
    max_num_batched_tokens: int = 2048  # tokens computed per step; longer prompts are prefilled in chunks
    chunk_by_compute: bool = True  # size prompt chunks by compute (attention to the context included), not tokens
    kv_block_size: int = 16  # tokens per KV cache block
    kv_cache_bytes: int = 0  # KV cache budget; 0: kv_cache_memory_share of the device's memory
    kv_cache_memory_share: float = 0.0  # 0: the default share (see kv_cache.py)
    enable_prefix_caching: bool = True
    max_queue: int = 256
    lora_target_modules: tuple[str, ...] = LORA_MODULES
    seed: int = 0
    extra_eos_token_ids: tuple[int, ...] = field(default=())
    compile: str = "auto"  # auto | on | off: torch.compile the decode step (auto: on for CUDA, off on CPU)
    quantization: str = "none"  # none | int8 | nf4: the base's projections (engine/quantization.py)
    pack_weights: str = "auto"  # auto | on | off: frozen GEMMs on oneDNN-packed weights (engine/frozen_gemm.py)

    def __post_init__(self):
        unknown = set(self.lora_target_modules) - set(LORA_MODULES)
        if unknown:
            raise ValueError(f"unknown lora target modules {sorted(unknown)}; choose from {LORA_MODULES}")
        if self.kv_block_size < 1 or self.max_num_seqs < 1 or self.max_num_batched_tokens < 1:
            raise ValueError("kv_block_size, max_num_seqs and max_num_batched_tokens must be positive")
        if self.compile not in ("auto", "on", "off"):
            raise ValueError(f"compile must be auto, on or off, not {self.compile!r}")
        if self.pack_weights not in ("auto", "on", "off"):
            raise ValueError(f"pack_weights must be auto, on or off, not {self.pack_weights!r}")

    @property
    def torch_device(self) -> torch.device:
        if self.device == "auto":
            return torch.device("cuda" if torch.cuda.is_available() else "cpu")
        return torch.device(self.device)

    @property
    def compile_decode(self) -> bool:
        """auto: CUDA only; on CPU the compiled step measured no faster than eager (README, configuration)."""
        return self.compile == "on" or (self.compile == "auto" and self.torch_device.type == "cuda")

    @property
    def packed_gemms(self) -> bool:
        """auto and on alike: wherever oneDNN can run them (CPU, fp32/bf16); elsewhere plain F.linear."""
        return self.pack_weights != "off" and can_pack(self.torch_device, self.torch_dtype)

    @property
    def torch_dtype(self) -> torch.dtype:
        if self.dtype == "auto":
            return torch.bfloat16 if self.torch_device.type == "cuda" else torch.float32
        return getattr(torch, self.dtype)
