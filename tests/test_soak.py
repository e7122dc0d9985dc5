"""The soak's CI subset (loadtest/soak.py against a real server: adapter lifecycles, then mixed load) and
regression tests for the leaks the full soak found. `make soak` runs the full one (1000 cycles + 10 min).
"""
from __future__ import annotations

import gc
import time
import tracemalloc
from collections import Counter

import pytest

from loadtest import soak
from loraplex.engine.merge_policy import MergePolicy
from tests.tenant_fixtures import adapter_files, auth, tenant_client, tenant_engine, tenant_settings, upload  # noqa: F401

NUM_CYCLES = 60
MIXED_S = 20.0
FD_TOLERANCE = 3  # keep-alive sockets the server has not closed yet
MAX_RSS_GROWTH_MB = 10.0  # after warm-up; the full soak grows ~1 MB in 10 minutes


def test_soak_subset_returns_fds_to_baseline_and_bounds_rss(tmp_path):
    result = soak.run_soak(NUM_CYCLES, MIXED_S, concurrency=4, sample_s=0.5, work_dir=tmp_path).report
    print("\n" + "\n".join(soak.summary_lines(result)))
    for name, phase in result["phases"].items():
        assert phase["traffic"]["num_5xx"] == 0 and not phase["traffic"]["failures"], (name, phase["traffic"])
    assert result["phases"]["cycles"]["traffic"]["statuses"]["201"] == NUM_CYCLES
    assert result["settled"]["fds"] <= result["baseline"]["fds"] + FD_TOLERANCE, (result["baseline"], result["settled"])
    overall = result["overall"]
    assert overall["rss_mb"]["end"] - overall["rss_mb"]["after_warmup"] <= MAX_RSS_GROWTH_MB, overall["rss_mb"]


def test_reading_adapters_keeps_nothing_behind(tenant_settings, adapter_files, tmp_path):  # noqa: F811
    """safetensors' `safe_open(...).get_tensor` kept ~60 bytes per tensor for good: ~900 bytes per load of a
    demo adapter, ~25 KB per load of a 7B-sized one. The loader reads from the bytes now."""
    from loraplex.engine.lora_weights import read_adapter

    adapter_dir = tmp_path / "adapter"
    adapter_dir.mkdir()
    for name, data in adapter_files(7).items():
        (adapter_dir / name).write_bytes(data)
    shapes = tenant_engine_shapes(tenant_settings)

    def load_many(n: int) -> None:
        for i in range(n):
            read_adapter(f"k{i}", str(adapter_dir), 8, shapes, None)

    load_many(50)
    gc.collect()
    tracemalloc.start()
    before = tracemalloc.take_snapshot()
    load_many(300)
    gc.collect()
    grown = sum(stat.size_diff for stat in tracemalloc.take_snapshot().compare_to(before, "filename"))
    tracemalloc.stop()
    assert grown < 50_000, f"{grown} bytes kept after 300 adapter reads"


def tenant_engine_shapes(settings) -> dict:
    from transformers import AutoConfig

    from loraplex.models.demo import ensure_demo_model

    config = AutoConfig.from_pretrained(ensure_demo_model(settings.data_dir))
    hidden, kv = config.hidden_size, config.num_key_value_heads * config.hidden_size // config.num_attention_heads
    dims = {"q_proj": (hidden, hidden), "k_proj": (kv, hidden), "v_proj": (kv, hidden), "o_proj": (hidden, hidden),
            "gate_proj": (config.intermediate_size, hidden), "up_proj": (config.intermediate_size, hidden),
            "down_proj": (hidden, config.intermediate_size)}
    return {(layer, module): shape for layer in range(config.num_hidden_layers) for module, shape in dims.items()}


def test_merge_policy_forgets_adapters_that_left_its_window():
    """It counted tokens per adapter key and never dropped a key: one entry per adapter ever served, and
    every step iterated over all of them."""
    policy = MergePolicy(window_steps=64)
    for i in range(1000):
        policy.observe(Counter({f"acme/a{i}@1:0": 3, None: 1}))
    assert len(policy._totals) <= 64 + 1
    assert policy.desired(None) is None


def test_deleting_a_merged_adapter_unmerges_it_and_frees_its_slot(tenant_client, tenant_engine, adapter_files):  # noqa: F811
    """A deleted adapter used to stay merged into the base weights (and pinned in its slot) until restart."""
    c = tenant_client
    assert upload(c, "acme", "merged-then-deleted", adapter_files(97)).status_code == 201
    assert c.post("/v1/adapters/acme/merged-then-deleted/mode", headers=auth("admin"), json={"mode": "merged"}).status_code == 200
    deadline = time.monotonic() + 10
    while tenant_engine.engine.merged_key is None and time.monotonic() < deadline:
        c.post("/v1/completions", headers=auth("acme"), json={"model": "demo", "prompt": "x", "max_tokens": 1})
    key = tenant_engine.engine.merged_key
    assert key and key.startswith("acme/merged-then-deleted@")
    base = c.post("/v1/completions", headers=auth("acme"), json={"model": "demo", "prompt": "The cat", "max_tokens": 6,
                                                                "temperature": 0, "ignore_eos": True}).json()
    assert c.delete("/v1/adapters/acme/merged-then-deleted", headers=auth("acme")).status_code == 200
    deadline = time.monotonic() + 10
    while key in tenant_engine.engine.stats()["resident_adapters"] and time.monotonic() < deadline:
        time.sleep(0.05)
    stats = tenant_engine.engine.stats()
    assert stats["merged_adapter"] is None and key not in stats["resident_adapters"]
    assert key not in tenant_engine.engine.merging.policy.modes
    again = c.post("/v1/completions", headers=auth("acme"), json={"model": "demo", "prompt": "The cat", "max_tokens": 6,
                                                                 "temperature": 0, "ignore_eos": True}).json()
    assert again["choices"][0]["text"] == base["choices"][0]["text"]
