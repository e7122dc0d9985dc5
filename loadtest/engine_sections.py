"""In-process engine sections (same model, same run): merged serving (issue 4) and cold adapter loads
(issue 3). They drive LLMEngine step by step, without HTTP, so they time the engine alone."""
from __future__ import annotations

import random
import statistics
import time

from transformers import AutoTokenizer

from loadtest.runtime import Runtime
from loadtest.workload import BuiltWorkload
from loraplex.engine.config import EngineConfig
from loraplex.engine.llm_engine import LLMEngine
from loraplex.engine.model_loader import load_model
from loraplex.engine.types import LoraRequest, SamplingParams


def build_engine(built: BuiltWorkload, rt: Runtime, **limits) -> LLMEngine:
    config = EngineConfig(model=str(built.model_dir), device=rt.device.type, dtype=rt.dtype_name,
                          max_lora_rank=built.workload.lora_rank, max_model_len=256, **limits)
    model = load_model(config.model, config.torch_dtype, config.torch_device, config.max_model_len)
    return LLMEngine(config, model, AutoTokenizer.from_pretrained(built.model_dir))


def lora_for(built: BuiltWorkload, i: int) -> LoraRequest:
    name = built.workload.adapter_name(i)
    return LoraRequest(key=f"bench/{name}", path=str(built.adapter_dir(name)))


def run_burst(engine: LLMEngine, jobs: list[tuple[list[int], LoraRequest | None]], new_tokens: int) -> dict:
    """All jobs at once; returns tokens/s and the median per-token decode latency."""
    params = SamplingParams(max_tokens=new_tokens, temperature=0, ignore_eos=True)
    tag = f"{time.monotonic_ns()}"
    started = time.perf_counter()
    for i, (prompt, lora) in enumerate(jobs):
        engine.add_request(f"{tag}-{i}", prompt, params, lora)
    tpots, num_tokens = [], 0
    while engine.unfinished_request_ids():
        for _, out in engine.step():
            num_tokens += len(out.new_token_ids)
            if out.is_finished and "tpot_s" in out.metrics:
                tpots.append(out.metrics["tpot_s"])
        if not engine.scheduler.num_running:
            time.sleep(0.001)  # waiting for an adapter load
    wall = time.perf_counter() - started
    return {"tokens_per_s": num_tokens / wall, "wall_s": wall, "tpot_s": statistics.median(tpots)}


def wait_merged(engine: LLMEngine, key: str | None, timeout_s: float = 120) -> None:
    deadline = time.monotonic() + timeout_s
    while engine.merged_key != key and time.monotonic() < deadline:
        engine.step()
        time.sleep(0.001)


def merge_section(built: BuiltWorkload, rt: Runtime, prompts: list[list[int]], repeats: int = 3) -> dict:
    wl = built.workload
    engine = build_engine(built, rt, max_loras=16, max_num_seqs=wl.num_requests)
    hot = lora_for(built, 0)
    single = [(prompts[0][:16], None)]
    latency: dict[str, list[float]] = {"base": [], "unmerged": [], "merged": []}
    for _ in range(repeats):  # interleaved, so drift hits every system alike
        latency["base"].append(run_burst(engine, single, 32)["tpot_s"])
        latency["unmerged"].append(run_burst(engine, [(prompts[0][:16], hot)], 32)["tpot_s"])
        engine.set_merge_mode(hot, "merged")
        wait_merged(engine, hot.key)
        latency["merged"].append(run_burst(engine, [(prompts[0][:16], hot)], 32)["tpot_s"])
        engine.set_merge_mode(hot, "unmerged")
        wait_merged(engine, None)
    switch = _switch_times(engine, hot)
    engine.merging.policy.modes.clear()  # the mixes compare default modes; no adapter keeps an admin mode
    rng = random.Random(wl.seed)
    skewed = [(p, hot if rng.random() < 0.9 else lora_for(built, 1 + rng.randrange(8))) for p in prompts]
    uniform = [(p, lora_for(built, i % wl.num_adapters)) for i, p in enumerate(prompts)]
    mixes = {name: _auto_vs_unmerged(engine, jobs, wl.new_tokens, repeats) for name, jobs in
             (("skewed_90_10", skewed), ("uniform", uniform))}
    med = {k: statistics.median(v) for k, v in latency.items()}
    return {
        "notes": "in-process LLMEngine; per-token latency = median time per output token after the first, batch 1",
        "tpot_s": med,
        "ratios": {
            "merged_vs_base_latency": {"value": med["merged"] / med["base"], "target": 1.03, "passed": med["merged"] / med["base"] <= 1.03},
            "unmerged_vs_base_latency": {"value": med["unmerged"] / med["base"], "target": None, "passed": None},
            "auto_vs_unmerged_skewed": _ratio(mixes["skewed_90_10"], 1.0, strictly=True),
            "auto_vs_unmerged_uniform": _ratio(mixes["uniform"], 0.97),
        },
        "mixes": mixes,
        "switch_s": switch,
    }


def _auto_vs_unmerged(engine: LLMEngine, jobs, new_tokens: int, repeats: int) -> dict:
    runs: dict[str, list[float]] = {"unmerged": [], "auto": []}
    switches_before = engine.num_merge_switches
    for _ in range(repeats):
        for mode in ("unmerged", "auto"):
            engine.merging.policy.default_mode = mode
            if mode == "unmerged":
                wait_merged(engine, None)
            run = run_burst(engine, jobs, new_tokens)
            runs[mode].append(run["tokens_per_s"])
    engine.merging.policy.default_mode = "unmerged"
    wait_merged(engine, None)
    return {mode: statistics.median(v) for mode, v in runs.items()} | {"switches": engine.num_merge_switches - switches_before}


def _ratio(mix: dict, target: float, strictly: bool = False) -> dict:
    value = mix["auto"] / mix["unmerged"]
    return {"value": value, "target": target, "passed": value > target if strictly else value >= target}


def _switch_times(engine: LLMEngine, lora: LoraRequest, cycles: int = 5) -> dict:
    merges, unmerges = [], []
    for _ in range(cycles):
        engine.set_merge_mode(lora, "merged")
        wait_merged(engine, lora.key)
        merges.append(engine.merge.last_switch_s)
        engine.set_merge_mode(lora, "unmerged")
        wait_merged(engine, None)
        unmerges.append(engine.merge.last_switch_s)
    return {"merge_p50": statistics.median(merges), "unmerge_p50": statistics.median(unmerges)}


def cold_load_section(built: BuiltWorkload, rt: Runtime, prompts: list[list[int]]) -> dict:
    """Storage -> device load latency while 8 base requests decode; step time with and without loads."""
    wl = built.workload
    engine = build_engine(built, rt, max_loras=4, max_cpu_loras=0, max_num_seqs=16)
    load_s: list[float] = []
    engine.residency_control.on_loaded = lambda key, seconds: load_s.append(seconds)
    params = SamplingParams(max_tokens=200, temperature=0, ignore_eos=True)
    for i in range(8):
        engine.add_request(f"bg{i}", prompts[i % len(prompts)][:32], params, None)
    quiet, loading = [], []
    for step in range(40 + 4 * wl.num_adapters):
        if step >= 20 and step % 4 == 0 and (step - 20) // 4 < wl.num_adapters:
            engine.add_request(f"cold{step}", prompts[0][:8], SamplingParams(max_tokens=1), lora_for(built, (step - 20) // 4))
        busy = engine.slots.num_loading() > 0
        started = time.perf_counter()
        engine.step()
        rt.sync()
        (loading if busy else quiet).append(time.perf_counter() - started)
    load_s.sort()
    return {
        "notes": "in-process LLMEngine; max_cpu_loras=0 so every load reads storage; 8 base requests decode meanwhile",
        "num_loads": len(load_s),
        "load_s": {"p50": _pct(load_s, 50), "p95": _pct(load_s, 95)},
        "decode_step_s": {"without_loads_p50": _pct(sorted(quiet[5:]), 50), "during_loads_p50": _pct(sorted(loading), 50)},
    }


def _pct(values: list[float], q: int) -> float | None:
    if not values:
        return None
    return values[min(len(values) - 1, round(q / 100 * (len(values) - 1)))]
