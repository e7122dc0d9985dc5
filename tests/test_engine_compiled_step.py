"""The compiled decode step (engine/compiled_step.py): same greedy tokens as eager and as HF + PEFT,
one compile per batch-size bucket, and the setting off really runs eager."""
from __future__ import annotations

import random
import time

import pytest
import torch

from loraplex.engine.compiled_step import bucket_for
from loraplex.engine.config import EngineConfig
from tests.conftest import has_cuda
from tests.engine_helpers import build_llm_engine, greedy, lora, peft_reference, run_to_completion

NUM_NEW = 6
ADAPTERS = {
    "cmp/qv-r8": dict(r=8, alpha=16, target_modules=("q_proj", "v_proj"), seed=11),
    "cmp/all-r4": dict(r=4, alpha=8, seed=12,
                       target_modules=("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")),
}


@pytest.fixture(scope="module")
def prompts():
    rng = random.Random(5)
    return [[0] + [rng.randrange(3, 1000) for _ in range(n)] for n in (4, 11, 7, 19, 2)]


@pytest.fixture(scope="module")
def adapter_dirs(make_adapter):
    return {name: make_adapter(name, **kwargs) for name, kwargs in ADAPTERS.items()}


def _engine(model_dir, compile: str, device: str = "cpu", **limits):
    return build_llm_engine(model_dir, device=device, max_loras=2, max_lora_rank=8, max_model_len=64, compile=compile, **limits)


def _mixed_requests(prompts, adapter_dirs, count: int) -> dict[str, tuple]:
    """count requests cycling base, adapter 1, adapter 2 over the prompts."""
    names = [None, *ADAPTERS]
    return {f"{names[i % 3]}|{i}": (prompts[i % len(prompts)], greedy(NUM_NEW), lora(adapter_dirs.get(names[i % 3])))
            for i in range(count)}


def _unique_graphs() -> int:
    return torch._dynamo.utils.counters["stats"]["unique_graphs"]


def test_buckets_are_powers_of_two():
    assert [bucket_for(n) for n in (1, 2, 3, 5, 8, 9, 32, 33)] == [1, 2, 4, 8, 8, 16, 32, 64]


def test_setting_values():
    assert not EngineConfig(model="m", device="cpu").compile_decode  # auto on CPU: eager (README)
    assert EngineConfig(model="m", device="cpu", compile="on").compile_decode
    with pytest.raises(ValueError, match="compile"):
        EngineConfig(model="m", compile="yes")


@pytest.mark.parametrize("count", [3, pytest.param(5, marks=pytest.mark.slow)])
def test_compiled_equals_eager_mixed_adapters(demo_model_dir, adapter_dirs, prompts, count):
    """Base and two adapters in one padded batch (3 -> 4 rows, 5 -> 8 rows)."""
    eager = run_to_completion(_engine(demo_model_dir, "off"), _mixed_requests(prompts, adapter_dirs, count))
    engine = _engine(demo_model_dir, "on")
    compiled = run_to_completion(engine, _mixed_requests(prompts, adapter_dirs, count))
    assert compiled == eager
    assert bucket_for(count) in engine.runner.compiled.buckets  # the compiled path really ran, padded


def test_compiled_matches_peft(demo_model_dir, adapter_dirs, prompts):
    adapter = "cmp/all-r4"
    engine = _engine(demo_model_dir, "on")
    requests = {f"r{i}": (p, greedy(NUM_NEW), lora(adapter_dirs[adapter])) for i, p in enumerate(prompts[:3])}
    tokens = run_to_completion(engine, requests)
    assert [tokens[f"r{i}"] for i in range(3)] == peft_reference(demo_model_dir, adapter_dirs[adapter], prompts[:3], NUM_NEW)


def test_one_compile_per_bucket(demo_model_dir, adapter_dirs, prompts):
    """Decode batches shrinking 3 -> 1 as requests finish at different lengths hit buckets 4, 2, 1: at
    most two graphs (pre/post attention, shared by every layer) per bucket, none per layer or step;
    running it again, even on a second engine, compiles nothing."""
    adapter = lora(adapter_dirs["cmp/all-r4"])
    requests = lambda: {f"r{i}": (p, greedy(2 + 2 * i), adapter) for i, p in enumerate(prompts[:3])}  # noqa: E731
    engine = _engine(demo_model_dir, "on")
    first = _unique_graphs()
    run_to_completion(engine, requests())
    assert engine.runner.compiled.buckets == {1, 2, 4}
    second = _unique_graphs()
    assert second - first <= 2 * 3  # fewer when an earlier test already compiled a bucket
    run_to_completion(engine, requests())
    run_to_completion(_engine(demo_model_dir, "on"), requests())
    assert _unique_graphs() == second


def test_off_runs_eager(demo_model_dir, adapter_dirs, prompts):
    engine = _engine(demo_model_dir, "off")
    assert engine.runner.compiled is None
    before = _unique_graphs()
    run_to_completion(engine, _mixed_requests(prompts, adapter_dirs, 3))
    assert _unique_graphs() == before


def test_merged_adapter_compensation_compiled(demo_model_dir, adapter_dirs, prompts):
    """While an adapter is merged, the other rows' compensation (-merged delta) rides in the same
    multi-hot pass: tokens equal the unmerged eager run's."""
    requests = lambda: _mixed_requests(prompts, adapter_dirs, 3)  # noqa: E731
    eager = run_to_completion(_engine(demo_model_dir, "off"), requests())
    engine = _engine(demo_model_dir, "on")
    merged = lora(adapter_dirs["cmp/all-r4"])
    assert engine.set_merge_mode(merged, "merged")
    deadline = time.monotonic() + 60
    while engine.merged_key != merged.key:  # loads on the loader thread, then merges at a step
        assert time.monotonic() < deadline, "adapter never merged"
        engine.step()
        time.sleep(0.002)
    assert run_to_completion(engine, requests()) == eager


@pytest.mark.cuda
@pytest.mark.skipif(not has_cuda(), reason="needs CUDA")
@pytest.mark.parametrize("count", [3, 5])
def test_cuda_graphs_equal_eager(demo_model_dir, adapter_dirs, prompts, count):
    """reduce-overhead (CUDA graphs) on the GPU, fp32 so eager and compiled must agree token for token."""
    eager = run_to_completion(_engine(demo_model_dir, "off", "cuda"), _mixed_requests(prompts, adapter_dirs, count))
    engine = _engine(demo_model_dir, "on", "cuda")
    assert run_to_completion(engine, _mixed_requests(prompts, adapter_dirs, count)) == eager
    assert bucket_for(count) in engine.runner.compiled.buckets
