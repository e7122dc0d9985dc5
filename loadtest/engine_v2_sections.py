"""The engine v2 benchmarks, in-process on one LLMEngine (no HTTP: these measure the engine's features).

(a) shared prefixes, prefix caching on vs off; (b) a long prompt chunked while 16 streams decode;
(c) peak running sequences with the KV bytes of 32 static rows x 1024 tokens.
"""
from __future__ import annotations

import random
import statistics
import time

from transformers import AutoTokenizer

from loadtest.workload import BuiltWorkload
from loraplex.engine.config import EngineConfig
from loraplex.engine.kv_cache import bytes_per_token
from loraplex.engine.llm_engine import LLMEngine
from loraplex.engine.model_loader import load_model
from loraplex.engine.types import LoraRequest, SamplingParams


class EngineFactory:
    """One model load, a fresh engine (fresh KV pool and caches) per run."""

    def __init__(self, built: BuiltWorkload, device: str, dtype: str, max_model_len: int):
        self.built, self.device, self.dtype, self.max_model_len = built, device, dtype, max_model_len
        config = self.config()
        self.model = load_model(config.model, config.torch_dtype, config.torch_device, max_model_len)
        self.tokenizer = AutoTokenizer.from_pretrained(built.model_dir)

    def config(self, **limits) -> EngineConfig:
        return EngineConfig(model=str(self.built.model_dir), device=self.device, dtype=self.dtype, max_loras=8,
                            max_lora_rank=self.built.workload.lora_rank, max_model_len=self.max_model_len, **limits)

    def engine(self, **limits) -> LLMEngine:
        """A fresh engine; its KV pool holds 40 full-length sequences unless `kv_cache_bytes` is given."""
        limits.setdefault("kv_cache_bytes", 40 * self.max_model_len * self.token_bytes())
        return LLMEngine(self.config(**limits), self.model, self.tokenizer)

    def token_bytes(self) -> int:
        mc = self.model.config
        num_kv = getattr(mc, "num_key_value_heads", None) or mc.num_attention_heads
        return bytes_per_token(mc.num_hidden_layers, num_kv, self.model.head_dim, self.config().torch_dtype)

    def lora(self, i: int) -> LoraRequest:
        name = self.built.workload.adapter_name(i)
        return LoraRequest(key=f"bench/{name}@1:{name}", path=str(self.built.adapter_dir(name)))


def greedy(max_tokens: int) -> SamplingParams:
    return SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True)


def _ids(rng: random.Random, n: int) -> list[int]:
    return [rng.randrange(3, 1000) for _ in range(n)]


# --- (a) shared prefixes ------------------------------------------------------------------------
def shared_prefix_run(factory: EngineFactory, caching: bool, num_tenants=8, system_len=512, user_len=32,
                      num_requests=128, new_tokens=32, concurrency=16) -> dict:
    rng = random.Random(1)
    systems = [_ids(rng, system_len) for _ in range(num_tenants)]
    jobs = [(systems[i % num_tenants] + _ids(rng, user_len), factory.lora(i % num_tenants)) for i in range(num_requests)]
    engine = factory.engine(enable_prefix_caching=caching)
    _warm_adapters(engine, factory, num_tenants)
    ttfts, num_tokens, next_job, in_flight = [], 0, 0, 0
    started = time.perf_counter()
    while next_job < len(jobs) or in_flight:
        while in_flight < concurrency and next_job < len(jobs):
            prompt, lora = jobs[next_job]
            engine.add_request(f"a{next_job}", prompt, greedy(new_tokens), lora)
            next_job, in_flight = next_job + 1, in_flight + 1
        for _, out in engine.step():
            num_tokens += len(out.new_token_ids)
            if out.is_finished:
                ttfts.append(out.metrics["ttft_s"])
                in_flight -= 1
    wall = time.perf_counter() - started
    stats = engine.stats()
    return {"caching": caching, "wall_s": wall, "tokens_per_s": num_tokens / wall,
            "ttft_p50_s": statistics.median(ttfts), "ttft_p90_s": _quantile(ttfts, 0.9),
            "prefix_cache_hits": stats["prefix_cache_hits"], "prefix_cache_queries": stats["prefix_cache_queries"]}


def _warm_adapters(engine: LLMEngine, factory: EngineFactory, num_adapters: int) -> None:
    for i in range(num_adapters):
        engine.ensure_resident(factory.lora(i))
    deadline = time.monotonic() + 120
    while len(engine.slots.resident_keys()) < num_adapters and time.monotonic() < deadline:
        engine.step()
        time.sleep(0.01)


# --- (b) chunked prefill --------------------------------------------------------------------------
def chunked_prefill_run(factory: EngineFactory, max_num_batched_tokens: int, long_prompt: list[int],
                        num_streams=16, long_new_tokens=8, clock=time.perf_counter, **limits) -> dict:
    """16 streams decode; the long prompt arrives; the streams' longest gap until its second token.
    `clock`: wall time, or this thread's CPU time (with 1 torch thread: the engine's own work, whatever
    else runs on the machine)."""
    rng = random.Random(2)
    engine = factory.engine(max_num_batched_tokens=max_num_batched_tokens, **limits)
    for i in range(num_streams):
        engine.add_request(f"s{i}", _ids(rng, 32), greedy(1000 - 40), None)
    for _ in range(3):  # all streams admitted and decoding
        engine.step()
    last_token_at = {f"s{i}": clock() for i in range(num_streams)}
    engine.add_request("long", long_prompt, greedy(long_new_tokens), None)
    arrived, max_gap, first_token_s, long_tokens, chunks = clock(), 0.0, None, [], []
    long_seq = engine._seqs["long"]
    while len(long_tokens) < long_new_tokens:
        computed = long_seq.num_computed_tokens
        results = engine.step()
        if first_token_s is None:
            chunks.append(long_seq.num_computed_tokens - computed)
        now = clock()
        for request_id, out in results:
            if request_id == "long":
                long_tokens += out.new_token_ids
                first_token_s = first_token_s or now - arrived
            elif first_token_s is None or len(long_tokens) <= 1:
                max_gap = max(max_gap, now - last_token_at[request_id])
                last_token_at[request_id] = now
    return {"max_num_batched_tokens": max_num_batched_tokens, **limits, "max_stream_gap_s": max_gap,
            "long_ttft_s": first_token_s, "long_chunk_tokens": chunks, "long_tokens": long_tokens}


def prefill_alone_s(factory: EngineFactory, long_prompt: list[int], clock=time.perf_counter) -> tuple[float, list[int]]:
    """The whole prompt prefilled in one step with nothing else running."""
    engine = factory.engine(max_num_batched_tokens=len(long_prompt), enable_prefix_caching=False, chunk_by_compute=False)
    engine.add_request("alone", long_prompt, greedy(8), None)
    started = clock()
    first = engine.step()
    elapsed = clock() - started
    return elapsed, [t for _, out in first for t in out.new_token_ids] + _finish(engine, "alone")


def hf_greedy(model_dir, prompt: list[int], max_new_tokens: int) -> list[int]:
    """The reference: HF transformers greedy decoding, fp32, EOS off."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    config = model.generation_config
    config.eos_token_id, config.pad_token_id = None, 0
    ids = torch.tensor([prompt])
    out = model.generate(ids, attention_mask=torch.ones_like(ids), generation_config=config,
                         max_new_tokens=max_new_tokens, do_sample=False)
    return out[0, len(prompt):].tolist()


def _finish(engine: LLMEngine, request_id: str) -> list[int]:
    tokens = []
    while engine.unfinished_request_ids():
        tokens += [t for rid, out in engine.step() if rid == request_id for t in out.new_token_ids]
    return tokens


# --- (c) memory -----------------------------------------------------------------------------------
def memory_run(factory: EngineFactory, num_requests=192, static_rows=32, static_len=1024, new_tokens=64) -> dict:
    budget = static_rows * static_len * factory.token_bytes()
    engine = factory.engine(kv_cache_bytes=budget, max_num_seqs=256, max_num_batched_tokens=4096)
    rng = random.Random(3)
    for i in range(num_requests):
        engine.add_request(f"m{i}", _ids(rng, rng.randrange(32, 257)), greedy(new_tokens), None)
    num_finished, started = 0, time.perf_counter()
    while engine.unfinished_request_ids():
        num_finished += sum(1 for _, out in engine.step() if out.is_finished)
    stats = engine.stats()
    return {"kv_cache_bytes": budget, "num_kv_blocks": stats["num_kv_blocks"], "num_requests": num_requests,
            "num_finished": num_finished, "max_num_running": stats["max_num_running"],
            "static_rows": static_rows, "num_preemptions": stats["num_preemptions"],
            "wall_s": time.perf_counter() - started}


def _quantile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]
