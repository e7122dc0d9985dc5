"""The loraplex section: the same burst through HTTP on the base model and on 16 adapters.

One server process serves every run. Warm-up bursts (2 tokens) come first, so the timed bursts see a
warm server with every adapter already resident (cold loads are a section of their own). Base and
adapter bursts alternate `repeats` times and each system reports its median run. Two dedicated base
bursts then give time-to-first-token (max_tokens=1) and, against a full burst, the decode step time.

TTFT is not taken from streaming: random weights mostly emit ids past the 1k-token tokenizer, which
decode to empty text, and the server sends no chunk for an empty delta.
"""
from __future__ import annotations

import statistics
from pathlib import Path

from loadtest.http_load import run_burst
from loadtest.metrics import RunResult, median_run
from loadtest.runtime import Runtime
from loadtest.server import BASE_MODEL_NAME, Server, ServerConfig
from loadtest.workload import TENANT, BuiltWorkload


def server_config(built: BuiltWorkload, rt: Runtime) -> ServerConfig:
    wl = built.workload
    return ServerConfig(
        model_dir=built.model_dir, data_dir=built.data_dir, device=rt.device.type, dtype=rt.dtype_name,
        max_loras=max(16, wl.num_adapters), max_lora_rank=wl.lora_rank, max_num_seqs=wl.num_requests,
        max_model_len=max(256, wl.prompt_len + wl.new_tokens),
    )


def run(built: BuiltWorkload, rt: Runtime, prompts: list[list[int]], repeats: int, log_path: Path,
        log=print) -> dict:
    wl = built.workload
    base_models = [BASE_MODEL_NAME] * len(prompts)
    adapter_models = [f"{TENANT}/{wl.adapter_for_request(i)}" for i in range(len(prompts))]
    config = server_config(built, rt)
    with Server(config, log_path) as server:
        log(f"server ready in {server.startup_s:.1f}s; warming up (loads every adapter)")
        for models in (base_models, adapter_models):
            run_burst(server.url, "warmup", models, prompts, max_tokens=2)
        base_runs: list[RunResult] = []
        adapter_runs: list[RunResult] = []
        for i in range(repeats):
            base_runs.append(run_burst(server.url, "loraplex_base", base_models, prompts, wl.new_tokens))
            adapter_runs.append(run_burst(server.url, "loraplex_adapters", adapter_models, prompts, wl.new_tokens))
            log(f"repeat {i + 1}/{repeats}: base {base_runs[-1].tokens_per_s:.1f} tok/s, "
                f"adapters {adapter_runs[-1].tokens_per_s:.1f} tok/s")
        first_token = run_burst(server.url, "loraplex_base_first_token", base_models, prompts, max_tokens=1)
        full = run_burst(server.url, "loraplex_base_dedicated", base_models, prompts, wl.new_tokens)
        startup_s = server.startup_s
    return {
        "server": {"startup_s": startup_s, "env": {k: v for k, v in config.env(0).items()
                                                   if k.startswith("LORAPLEX_") and k != "LORAPLEX_PORT"}},
        "runs": {"loraplex_base": median_run(base_runs), "loraplex_adapters": median_run(adapter_runs)},
        "first_token": first_token,
        "dedicated": full,
        "decode_step_s": decode_step_time(first_token, full, wl.new_tokens),
    }


def decode_step_time(first_token: RunResult, full: RunResult, new_tokens: int) -> float:
    """Median over requests of (latency - TTFT) / (new_tokens - 1): the time between tokens while the
    whole burst decodes together. Request i's TTFT is its latency in the 1-token burst."""
    if new_tokens < 2 or len(first_token.latencies_s) != len(full.latencies_s):
        raise ValueError("decode step time needs >= 2 new tokens and the same requests in both bursts")
    per_request = [(lat - ttft) / (new_tokens - 1) for lat, ttft in zip(full.latencies_s, first_token.latencies_s)]
    return statistics.median(per_request)
