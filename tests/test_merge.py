"""Merged serving: same tokens as PEFT, exact base after cycles, no weight mixing while switching."""
from __future__ import annotations

import random
import time
from collections import Counter

import pytest
import torch

from loraplex.engine.merge_policy import MergePolicy
from tests.engine_helpers import build_llm_engine, greedy, lora, peft_reference, run_to_completion

NUM_NEW = 10
ADAPTERS = {
    "acme/merge-a": dict(r=8, alpha=16, target_modules=("q_proj", "v_proj", "down_proj"), seed=101),
    "acme/merge-b": dict(r=4, alpha=8, target_modules=("q_proj", "o_proj", "up_proj"), seed=102, use_rslora=True),
}


@pytest.fixture(scope="module")
def setup(demo_model_dir, make_adapter):
    dirs = {name: make_adapter(name, **kw) for name, kw in ADAPTERS.items()}
    rng = random.Random(7)
    prompts = [[0] + [rng.randrange(3, 1000) for _ in range(n)] for n in (5, 12, 20)]
    refs = {None: peft_reference(demo_model_dir, None, prompts, NUM_NEW)}
    refs.update({name: peft_reference(demo_model_dir, d, prompts, NUM_NEW) for name, d in dirs.items()})
    return dirs, prompts, refs


def _engine(demo_model_dir):
    return build_llm_engine(demo_model_dir, max_loras=3, max_lora_rank=8, max_model_len=128)


def _wait_merged(engine, key, timeout_s=30):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:  # the adapter loads on the loader thread first
        engine.step()
        if engine.merged_key == key:
            return
        time.sleep(0.002)
    raise AssertionError("adapter never merged")


def _mixed_requests(dirs, prompts):
    return {f"{a}|{i}": (p, greedy(NUM_NEW), lora(dirs.get(a))) for a in [None, *ADAPTERS] for i, p in enumerate(prompts)}


def _check(tokens, refs):
    for key, generated in tokens.items():
        adapter, i = key.split("|")
        assert generated == refs[None if adapter == "None" else adapter][int(i)], key


def test_merged_mode_matches_peft_for_merged_other_and_base(demo_model_dir, setup):
    dirs, prompts, refs = setup
    engine = _engine(demo_model_dir)
    merged = lora(dirs["acme/merge-a"])
    assert engine.set_merge_mode(merged, "merged")
    _wait_merged(engine, merged.key)
    assert engine.residency(merged.key) == "merged"
    _check(run_to_completion(engine, _mixed_requests(dirs, prompts)), refs)
    assert engine.merged_key == merged.key and engine.num_merge_switches == 1


def test_only_merged_traffic_does_no_lora_work(demo_model_dir, setup):
    dirs, prompts, _ = setup
    engine = _engine(demo_model_dir)
    merged = lora(dirs["acme/merge-a"])
    engine.set_merge_mode(merged, "merged")
    _wait_merged(engine, merged.key)
    engine.add_request("m", prompts[0], greedy(3), merged)
    engine.step()  # prefill
    batch = engine.runner._lora_batch(engine.scheduler.running, [])
    assert batch.is_empty or (not batch.used_slots and batch.compensation.is_empty)


def test_base_weights_bit_identical_after_100_merge_cycles(demo_model_dir, setup):
    dirs, prompts, refs = setup
    engine = _engine(demo_model_dir)
    snapshot = {name: p.detach().clone() for name, p in engine.model.named_parameters()}
    keys = [lora(dirs[a]) for a in ADAPTERS]
    for cycle in range(100):
        engine.set_merge_mode(keys[cycle % 2], "merged")
        _wait_merged(engine, keys[cycle % 2].key)
        engine.set_merge_mode(keys[cycle % 2], "unmerged")
        engine.step()
        assert engine.merged_key is None
    assert engine.num_merge_switches == 200
    for name, param in engine.model.named_parameters():
        assert torch.equal(param, snapshot[name]), name
    tokens = run_to_completion(engine, {f"r{i}": (p, greedy(NUM_NEW), None) for i, p in enumerate(prompts)})
    assert [tokens[f"r{i}"] for i in range(len(prompts))] == refs[None]


def test_switching_during_mixed_traffic_never_mixes_weights(demo_model_dir, setup):
    dirs, prompts, refs = setup
    engine = _engine(demo_model_dir)
    requests = _mixed_requests(dirs, prompts)
    for request_id, (prompt, params, adapter) in requests.items():
        engine.add_request(request_id, prompt, params, adapter)
    tokens = {request_id: [] for request_id in requests}
    plan = [lora(dirs["acme/merge-a"]), None, lora(dirs["acme/merge-b"]), lora(dirs["acme/merge-a"])]
    step = 0
    while engine.unfinished_request_ids():
        if step % 3 == 0:  # switch modes every few steps while everyone decodes
            target = plan[(step // 3) % len(plan)]
            for name in ADAPTERS:
                engine.set_merge_mode(lora(dirs[name]), "merged" if target and target.key == lora(dirs[name]).key else "unmerged")
        for request_id, output in engine.step():
            tokens[request_id] += output.new_token_ids
        step += 1
    assert engine.num_merge_switches >= 3
    _check(tokens, refs)


def test_auto_policy_merges_dominant_adapter_with_hysteresis():
    policy = MergePolicy(window_steps=10, merge_share=0.75, unmerge_share=0.5, min_dwell_steps=5)
    policy.modes.update({"a": "auto", "b": "auto"})
    current, switches = None, 0
    traffic = [Counter(a=9, b=1)] * 20 + [Counter(a=6, b=4)] * 20 + [Counter(a=3, b=7)] * 20 + [Counter(a=5, b=5)] * 20
    history = []
    for counts in traffic:
        policy.observe(counts)
        desired = policy.desired(current)
        if desired != current:
            current, switches = desired, switches + 1
            policy.switched()
        history.append(current)
    assert history[19] == "a"  # 90% a: merged
    assert history[39] == "a"  # 60% a: above the unmerge threshold, stays (hysteresis)
    assert history[59] is None  # 30% a, 70% b: a unmerged, b below the merge threshold
    assert switches == 2  # no flapping on the 50/50 mix


def test_explicit_modes_override_auto():
    policy = MergePolicy()
    policy.modes.update({"a": "auto", "b": "merged"})
    assert policy.desired(None) == "b"
    policy.modes["b"] = "unmerged"
    assert policy.desired("b") is None


def test_auto_mode_merges_the_adapter_that_dominates_real_traffic(demo_model_dir, setup):
    dirs, prompts, refs = setup
    engine = _engine(demo_model_dir)
    engine.merging.policy = MergePolicy(window_steps=8, min_dwell_steps=4, default_mode="auto")
    hot, cold = "acme/merge-a", "acme/merge-b"
    requests = {f"{hot}|{i % 3}#{i}": (prompts[i % 3], greedy(NUM_NEW), lora(dirs[hot])) for i in range(9)}
    requests[f"{cold}|0#x"] = (prompts[0], greedy(NUM_NEW), lora(dirs[cold]))
    merged_seen = set()
    for request_id, (prompt, params, adapter) in requests.items():
        engine.add_request(request_id, prompt, params, adapter)
    tokens = {request_id: [] for request_id in requests}
    while engine.unfinished_request_ids():
        for request_id, output in engine.step():
            tokens[request_id] += output.new_token_ids
        merged_seen.add(engine.merged_key)
        time.sleep(0.001)
    assert lora(dirs[hot]).key in merged_seen  # 90% of the tokens: merged
    assert lora(dirs[cold]).key not in merged_seen
    _check({key.split("#")[0]: t for key, t in tokens.items()}, refs)
