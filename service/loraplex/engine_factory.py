"""Builds the engine from Settings: the one place that knows both the settings and the engine."""
from __future__ import annotations

import logging
from pathlib import Path

from transformers import AutoConfig, AutoTokenizer

from loraplex.config import Settings
from loraplex.engine.async_engine import AsyncEngine
from loraplex.engine.config import EngineConfig
from loraplex.engine.context_limit import resolve_max_model_len
from loraplex.engine.llm_engine import LLMEngine
from loraplex.engine.model_loader import load_model
from loraplex.engine.quantization import checkpoint_quantization

log = logging.getLogger(__name__)


def resolve_model_path(settings: Settings) -> str:
    if settings.model == "demo":
        from loraplex.models.demo import ensure_demo_model

        return str(ensure_demo_model(Path(settings.data_dir), seed=settings.seed))
    return settings.model


def served_model_name(settings: Settings) -> str:
    if settings.served_model_name:
        return settings.served_model_name
    return "demo" if settings.model == "demo" else Path(settings.model.rstrip("/")).name


def engine_config(settings: Settings, model_path: str) -> EngineConfig:
    """Raises EngineError for a max_model_len the model does not support."""
    hf_config = AutoConfig.from_pretrained(model_path)
    return EngineConfig(
        model=model_path,
        device=settings.device,
        dtype=settings.dtype,
        max_loras=settings.max_loras,
        max_cpu_loras=settings.max_cpu_loras,
        default_merge_mode=settings.default_merge_mode,
        max_lora_rank=settings.max_lora_rank,
        max_num_seqs=settings.max_num_seqs,
        max_model_len=resolve_max_model_len(hf_config, settings.max_model_len, settings.allow_long_max_model_len),
        allow_long_max_model_len=settings.allow_long_max_model_len,
        max_num_batched_tokens=settings.max_num_batched_tokens,
        kv_block_size=settings.kv_block_size,
        kv_cache_bytes=settings.kv_cache_bytes,
        kv_cache_memory_share=settings.kv_cache_memory_share,
        enable_prefix_caching=settings.enable_prefix_caching,
        max_queue=settings.max_queue,
        lora_target_modules=tuple(settings.lora_target_module_list),
        seed=settings.seed,
        compile=settings.compile,
        quantization=settings.quantization,
        pack_weights=settings.pack_weights,
    )


def check_model(settings: Settings) -> None:
    """Raises EngineError for settings this model cannot be served with (quantization, max_model_len),
    reading only its config."""
    model_path = resolve_model_path(settings)
    engine_config(settings, model_path)
    checkpoint_quantization(AutoConfig.from_pretrained(model_path), settings.quantization)


def build_engine(settings: Settings) -> AsyncEngine:
    model_path = resolve_model_path(settings)
    config = engine_config(settings, model_path)
    log.info("loading %s on %s (%s)", model_path, config.torch_device, config.torch_dtype)
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    model = load_model(model_path, config.torch_dtype, config.torch_device, config.max_model_len,
                       allow_long_max_model_len=config.allow_long_max_model_len, quantization=config.quantization)
    engine = LLMEngine(config, model, tokenizer)
    log.info(
        "engine ready: kv cache %.1f MiB (%d blocks of %d tokens), adapter pool %.1f MiB (%d slots, rank %d)",
        engine.kv_cache.num_bytes / 2**20, engine.kv_cache.num_blocks, engine.kv_cache.block_size, engine.lora_pool.num_bytes / 2**20,
        config.max_loras, config.max_lora_rank,
    )
    return AsyncEngine(engine, served_model_name(settings))
