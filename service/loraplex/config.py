"""One settings object for the whole service: env vars `LORAPLEX_*`, same names as CLI flags."""
from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Literal

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="LORAPLEX_", extra="ignore")

    # Server
    host: str = Field("127.0.0.1", description="Address to bind.")
    port: int = Field(8000, ge=1, le=65535, description="Port to bind.")
    metrics_port: int | None = Field(None, ge=1, le=65535, description="Serve `/metrics` on this port only, with no key (keep it out of the public Service); unset: `/metrics` on `port` needs the admin key or `metrics_token`.")
    log_level: str = Field("info", description="Log level (debug, info, warning, error).")
    log_format: Literal["json", "text"] = Field("json", description="Log lines as JSON objects (with request ids) or plain text.")
    console: bool = Field(True, description="Serve the web console at `/console` (static pages that call the public API with the caller's key); false: 404.")
    drain_grace_s: float = Field(30.0, ge=0, le=3600, description="After SIGTERM: how long in-flight requests may run before the server exits.")

    # Model
    model: str = Field("demo", description="`demo` (tiny Llama built offline), an HF model directory or a hub id.")
    served_model_name: str | None = Field(None, description="Name of the base model in the API; default: derived from `model`.")
    data_dir: Path = Field(Path("./adapters"), description="Adapter store: `<data_dir>/<tenant>/<name>/`; the demo model is built under `<data_dir>/.models/`.")
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="Where the model runs; auto picks cuda when available.")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field("auto", description="Weights/activations dtype; auto = float32 on CPU, bfloat16 on CUDA.")
    seed: int = Field(0, description="Seed for the demo model weights and for unseeded sampling.")
    quantization: Literal["none", "int8", "nf4"] = Field("none", description="Quantize the base's decoder projections at load (bitsandbytes, `pip install loraplex[quant]`): `int8` (LLM.int8) or `nf4` (4-bit NormalFloat, double quantization); embeddings, norms, LM head and adapters stay in `dtype`. A checkpoint saved quantized by transformers + bitsandbytes is served as saved with `none`. Merging is refused on a quantized base.")

    # Engine limits
    max_loras: int = Field(8, ge=1, le=256, description="Adapters resident on the device at once (slots).")
    max_lora_rank: int = Field(16, ge=1, le=256, description="Largest adapter rank accepted.")
    max_num_seqs: int = Field(256, ge=1, le=4096, description="Most sequences running at once (also bounded by free KV cache blocks).")
    max_model_len: int | None = Field(None, ge=16, description="Longest prompt + completion in tokens; default: the model's own limit (`max_position_embeddings`). A larger value is refused at start unless `allow_long_max_model_len`.")
    allow_long_max_model_len: bool = Field(False, description="Accept a `max_model_len` longer than the model's own limit (rope extrapolates: output quality is the operator's risk).")
    max_num_batched_tokens: int = Field(2048, ge=16, description="Most tokens computed in one step (decodes first, then prompt chunks); longer prompts are prefilled over several steps.")
    kv_block_size: int = Field(16, ge=1, le=1024, description="Tokens per KV cache block.")
    kv_cache_bytes: int = Field(0, ge=0, description="KV cache memory budget in bytes; 0: `kv_cache_memory_share` of the device's memory.")
    kv_cache_memory_share: float = Field(0.0, ge=0, le=0.95, description="Share of memory for the KV cache when `kv_cache_bytes` is 0 (0: 10% of host RAM on CPU, 80% of free GPU memory on CUDA); capped at what `max_num_seqs` full-length sequences need.")
    enable_prefix_caching: bool = Field(True, description="Reuse KV cache blocks of earlier prompts with the same prefix and the same adapter version.")
    max_queue: int = Field(256, ge=0, description="Requests waiting for a batch slot before 429; past it, a tenant below its fair share of batch + queue still gets in.")
    lora_target_modules: str = Field(
        "q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj",
        description="Comma-separated projections that adapters may target (pool buffers exist only for these).",
    )

    max_cpu_loras: int = Field(32, ge=0, le=4096, description="Parsed adapters kept in host memory (the tier between storage and device slots).")

    # Merged serving
    merged_adapter: str | None = Field(None, description="Adapter id (`tenant/name`) merged into the base weights from start: the dedicated low-latency case.")
    default_merge_mode: Literal["unmerged", "auto"] = Field("unmerged", description="Merge mode of adapters no admin has set; `auto` merges one that dominates traffic.")

    # Tenants, auth and the registry
    api_keys: str | None = Field(None, description="`key:tenant` pairs, comma-separated. No keys and no admin key = single-tenant dev mode.")
    api_keys_file: Path | None = Field(None, description="File with one `key:tenant` per line (alternative to api_keys).")
    admin_key: str | None = Field(None, description="Bearer key of the admin (pin/unpin/load/evict, shared adapters, every tenant).")
    metrics_token: str | None = Field(None, description="Bearer token that may read `/metrics` on the main port (a scraper's, instead of the admin key).")
    redis_url: str | None = Field(None, description="Redis for the adapter index and change feed shared by replicas; unset = local index.")
    redis_namespace: str = Field("loraplex", description="Prefix of every Redis key and channel.")
    max_adapter_bytes: int = Field(256 << 20, ge=1024, description="Largest adapter upload (config + weights, or the archive's content).")
    max_adapters_per_tenant: int = Field(100, ge=1, description="Adapters a tenant may own.")
    max_adapter_bytes_per_tenant: int = Field(10 << 30, ge=1024, description="Bytes of adapters (all versions) a tenant may store.")
    tenant_requests_per_minute: int = Field(0, ge=0, description="Per-tenant request rate limit (0 = unlimited); over it: 429 + Retry-After.")
    tenant_tokens_per_minute: int = Field(0, ge=0, description="Per-tenant limit on prompt + max tokens per minute (0 = unlimited).")

    # Fine-tuning
    start_local_worker: bool = Field(True, description="Start one `loraplex worker` process beside the server (the embedded default); false when workers run elsewhere.")
    max_file_bytes: int = Field(32 << 20, ge=1024, description="Largest training file upload (bytes); larger is 413.")
    max_file_lines: int = Field(100_000, ge=1, description="Most examples (non-blank lines) in one training file.")
    max_files_per_tenant: int = Field(100, ge=1, description="Training files a tenant may store; more is 403 `quota_exceeded`.")
    max_file_bytes_per_tenant: int = Field(1 << 30, ge=1024, description="Bytes of training files a tenant may store (they share the data volume with every tenant's adapters); more is 403.")
    max_finished_jobs_per_tenant: int = Field(100, ge=1, description="Finished fine-tuning jobs kept per tenant (records and events); creating a job deletes the oldest beyond it, so no listing or scan reads an ever-growing history.")
    max_jobs_per_tenant: int = Field(2, ge=1, description="Fine-tuning jobs a tenant may have queued or running at once; more is 429.")
    max_train_steps: int = Field(20_000, ge=1, description="Most optimizer steps one fine-tuning job may run (epochs x batches).")
    train_threads: int = Field(0, ge=0, le=1024, description="CPU threads a worker trains with; 0: half the cores (the embedded worker shares them with the server: oversubscribed threads make training many times slower).")
    worker_heartbeat_s: float = Field(2.0, gt=0, le=600, description="How often a worker records that its job is alive.")
    job_stale_after_s: float = Field(60.0, gt=0, description="A running job with no heartbeat for this long is marked failed (its worker died).")

    # Request limits
    max_prompt_chars: int = Field(200_000, ge=1, description="Largest prompt string accepted (characters).")
    max_stop_sequences: int = Field(8, ge=0, description="Most stop strings per request.")
    max_request_bytes: int = Field(4_000_000, ge=1024, description="Largest request body accepted.")

    # Engine: compiled decode step (kept at the end: several sessions add settings here)
    compile: Literal["auto", "on", "off"] = Field("auto", description="`torch.compile` the decode step (static shapes per batch-size bucket 1, 2, 4, ...; CUDA graphs on GPU); auto: on for CUDA, off on CPU, where it measured no faster than eager (README, Compiled decode step).")

    # Engine: the frozen GEMMs on oneDNN-packed weights (engine/frozen_gemm.py)
    pack_weights: Literal["auto", "on", "off"] = Field("auto", description="Run the base's frozen GEMMs (projections, LM head) on CPU through oneDNN with each weight reordered once instead of on every call (decode step 1.2-1.3x faster on the benchmark shape); costs a second copy of those weights in host memory. auto/on: wherever it applies (CPU, float32/bfloat16); off: plain F.linear. No effect on CUDA.")

    # Training files: the per-example token cap (issue #20 finding 2)
    max_example_tokens: int = Field(32_768, ge=0, description="Most tokens in one training example (the served base's tokenizer, over its texts without the chat template), checked at upload; longer is 400 naming the line. 0 = no cap.")

    @property
    def lora_target_module_list(self) -> list[str]:
        return [m.strip() for m in self.lora_target_modules.split(",") if m.strip()]


@lru_cache
def get_settings() -> Settings:
    return Settings()
