"""Prefix caching never mixes adapters or adapter versions; deleting an adapter frees its blocks."""
from __future__ import annotations

import random
import re

from loraplex.engine.types import LoraRequest
from loraplex.models.demo import make_demo_adapter
from tests.api_fixtures import completion
from tests.engine_helpers import build_llm_engine, greedy, peft_reference, step_until_idle

NUM_NEW = 8
BLOCK = 8


def _run(engine, requests: dict) -> dict:
    """id -> (tokens, final metrics)."""
    for request_id, (prompt, lora) in requests.items():
        engine.add_request(request_id, prompt, greedy(NUM_NEW), lora)
    tokens, metrics = {rid: [] for rid in requests}, {}
    for request_id, output in step_until_idle(engine):
        assert not isinstance(output, Exception), output
        tokens[request_id] += output.new_token_ids
        if output.is_finished:
            metrics[request_id] = output.metrics
    return {rid: (tokens[rid], metrics[rid]) for rid in requests}


def test_cached_blocks_are_reused_only_within_one_adapter_version(demo_model_dir, make_adapter, tmp_path):
    dirs = {"a": make_adapter("acme/cache-a", r=8, seed=21), "b": make_adapter("globex/cache-b", r=8, seed=22),
            "a2": make_demo_adapter(demo_model_dir, tmp_path / "acme" / "cache-a-v2", r=8, seed=23)}
    loras = {"base": None, "a": LoraRequest("acme/cache-a@1:aaaa", str(dirs["a"])),
             "b": LoraRequest("globex/cache-b@1:bbbb", str(dirs["b"])),
             "a2": LoraRequest("acme/cache-a@2:cccc", str(dirs["a2"]))}
    rng = random.Random(4)
    prompt = [0] + [rng.randrange(3, 1000) for _ in range(49)]  # 50 tokens: 6 full blocks can be reused
    refs = {name: peft_reference(demo_model_dir, dirs.get(name), [prompt], NUM_NEW)[0] for name in loras}
    assert len({tuple(r) for r in refs.values()}) == 4  # every adapter changes the answer
    engine = build_llm_engine(demo_model_dir, max_loras=3, max_lora_rank=8, max_model_len=128, kv_block_size=BLOCK)

    first = _run(engine, {f"{name}#1": (prompt, loras[name]) for name in ("base", "a", "b")})
    assert engine.blocks.num_cache_hits == 0
    second = _run(engine, {f"{name}#2": (prompt, loras[name]) for name in ("base", "a", "b")})
    for name in ("base", "a", "b"):
        assert first[f"{name}#1"][0] == second[f"{name}#2"][0] == refs[name], name
        assert first[f"{name}#1"][1]["num_cached_tokens"] == 0
        assert second[f"{name}#2"][1]["num_cached_tokens"] == 48  # its own 6 blocks, nobody else's
    assert engine.stats()["prefix_cache_hits"] == 3 * 48
    for identity in ("base", "acme/cache-a@1", "globex/cache-b@1"):
        assert engine.blocks.num_cached_for(identity) == 7  # 6 prompt blocks + the block filled by decoding

    upgraded = _run(engine, {"a2": (prompt, loras["a2"])})  # a new version under the same name
    assert upgraded["a2"][0] == refs["a2"]
    assert upgraded["a2"][1]["num_cached_tokens"] == 0  # reuses no block of version 1
    assert engine.stats()["prefix_cache_hits"] == 3 * 48

    engine.evict_versions_of("acme/cache-a")  # what a delete of acme/cache-a triggers
    assert engine.blocks.num_cached_for("acme/cache-a@") == 0
    assert engine.blocks.num_cached_for("base") == engine.blocks.num_cached_for("globex/cache-b@1") == 7
    assert engine.blocks.num_used == 0 and engine.blocks.num_free == engine.blocks.num_blocks
    again = _run(engine, {"a#3": (prompt, loras["a"])})
    assert again["a#3"] == (refs["a"], again["a#3"][1]) and again["a#3"][1]["num_cached_tokens"] == 0


def _metric(text: str, name: str) -> float:
    match = re.search(r"^" + re.escape(name) + r" ([0-9.e+-]+)$", text, re.M)
    assert match, f"{name} not in /metrics"
    return float(match.group(1))


def test_metrics_report_prefix_cache_hits_kv_blocks_and_preemptions(api_client):
    prompt = [5 + (7 * i) % 900 for i in range(40)]  # 2 full blocks of 16 can be reused
    before = api_client.get("/metrics").text
    for _ in range(2):
        completion(api_client, prompt=prompt, max_tokens=2)
    after = api_client.get("/metrics").text
    hits = _metric(after, "vllm:prefix_cache_hits_total") - _metric(before, "vllm:prefix_cache_hits_total")
    queries = _metric(after, "vllm:prefix_cache_queries_total") - _metric(before, "vllm:prefix_cache_queries_total")
    assert hits >= 32 and queries >= 80
    assert _metric(after, "vllm:num_preemptions_total") >= 0
    assert _metric(after, "loraplex_kv_cache_blocks") > 0
    assert _metric(after, "loraplex_max_num_running") >= 1
    assert 0 <= _metric(after, "vllm:kv_cache_usage_perc") <= 1
