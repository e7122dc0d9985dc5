"""Weighted composition (engine/composition.py) equals PEFT `add_weighted_adapter`: `linear` == `cat`,
`ties` / `dare_linear` / `dare_ties` == PEFT's methods of those names for the same density and seed
(weights compared module by module, then greedy tokens and logprobs, alone and batched with plain requests).
The dare seed's meaning is in tests/composition_helpers.py.
"""
from __future__ import annotations

import random
import threading
from dataclasses import replace

import pytest
import torch

from loraplex.engine.composition import CompositionError, MergeSpec, compose, composed_lora
from loraplex.engine.lora_weights import read_adapter
from loraplex.engine.types import LoraRequest, SamplingParams
from tests.composition_helpers import peft_weighted
from tests.engine_helpers import build_llm_engine, greedy, lora, peft_reference, run_to_completion, step_until_idle

pytestmark = pytest.mark.usefixtures("one_torch_thread")

NUM_NEW = 8
ALL = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
ADAPTERS = {  # same rank (ties and dare_* need it), different modules and scales (2, 1, 3, rsLoRA)
    "acme/tone": dict(r=8, alpha=16, target_modules=("q_proj", "v_proj"), seed=11),
    "acme/sql": dict(r=8, alpha=8, target_modules=("q_proj", "k_proj", "v_proj", "o_proj"), seed=12),
    "acme/mlp": dict(r=8, alpha=24, target_modules=("q_proj", "up_proj", "down_proj"), seed=13),
    "acme/small": dict(r=4, alpha=8, target_modules=ALL, seed=14, use_rslora=True),
}
CASES = {  # name -> (adapters, weights, PEFT combination_type, MergeSpec)
    "linear-2": (["acme/tone", "acme/sql"], [0.7, 0.3], "cat", MergeSpec()),
    "linear-3": (["acme/tone", "acme/sql", "acme/small"], [1.5, -0.4, 0.9], "cat", MergeSpec()),
    "ties": (["acme/tone", "acme/sql", "acme/mlp"], [0.8, 0.5, 0.6], "ties", MergeSpec("ties", density=0.4)),
    "ties-frequency": (["acme/tone", "acme/mlp"], [1.0, -0.7], "ties",
                       MergeSpec("ties", density=0.6, majority_sign_method="frequency")),
    "dare_linear": (["acme/tone", "acme/sql", "acme/mlp"], [0.9, 0.4, 0.5], "dare_linear",
                    MergeSpec("dare_linear", density=0.5, seed=7)),
    "dare_ties": (["acme/sql", "acme/mlp"], [1.2, 0.8], "dare_ties", MergeSpec("dare_ties", density=0.3, seed=123)),
}


@pytest.fixture(scope="module")
def adapter_dirs(make_adapter):
    return {name: make_adapter(name, **kwargs) for name, kwargs in ADAPTERS.items()}


@pytest.fixture(scope="module")
def prompts():
    rng = random.Random(5)
    return [[0] + [rng.randrange(3, 1000) for _ in range(n)] for n in (4, 13, 21)]


def _composed(adapter_dirs, case: str):
    names, weights, _, merge = CASES[case]
    return composed_lora([lora(adapter_dirs[n]) for n in names], weights, merge)


def _peft_weighted(demo_model_dir, adapter_dirs, case: str):
    names, weights, _, merge = CASES[case]
    return peft_weighted(demo_model_dir, [adapter_dirs[n] for n in names], names, weights, merge)


def _peft_linears(model):
    """(layer, module) -> PEFT LoRA layer, for every module the merged adapter `mix` has."""
    found = {}
    for layer_index, layer in enumerate(model.base_model.model.model.layers):
        for module in ALL:
            target = getattr(layer.self_attn if module in ALL[:4] else layer.mlp, module)
            if hasattr(target, "lora_A") and "mix" in target.lora_A:
                found[(layer_index, module)] = target
    return found


def _host(adapter_dirs, composed, shapes, max_rank=64):
    hosts = [read_adapter(c.key, c.path, 32, shapes, torch.float32) for c in composed.components]
    return compose(composed, hosts, max_rank, torch.float32)


@pytest.mark.parametrize("case", CASES)
def test_composed_weights_equal_peft_module_by_module(demo_model_dir, adapter_dirs, case):
    model = _peft_weighted(demo_model_dir, adapter_dirs, case)
    linears = _peft_linears(model)
    shapes = {where: tuple(t.base_layer.weight.shape) for where, t in linears.items()}
    host = _host(adapter_dirs, _composed(adapter_dirs, case), shapes)
    assert set(host.weights) == set(linears)
    for where, target in linears.items():
        a, b = host.weights[where]
        peft_a, peft_b = target.lora_A["mix"].weight, target.lora_B["mix"].weight
        assert target.scaling["mix"] == 1.0
        if CASES[case][2] == "cat":  # PEFT puts the scale on A, we on B: compare the products
            torch.testing.assert_close(b @ a, target.get_delta_weight("mix"), rtol=1e-5, atol=1e-6)
        else:  # the same factors, entry by entry (same masks, same kept entries)
            torch.testing.assert_close(a, peft_a.detach(), rtol=1e-5, atol=1e-6)
            torch.testing.assert_close(b, peft_b.detach()[:, : b.shape[1]], rtol=1e-5, atol=1e-6)
            assert (a == 0).any() and (b == 0).any(), "nothing was pruned: the comparison would be linear's"
    if case.startswith("dare"):  # and the mask is the seed's: another seed gives other factors
        names, weights, _, merge = CASES[case]
        reseeded = composed_lora([lora(adapter_dirs[n]) for n in names], weights, replace(merge, seed=merge.seed + 1))
        other = _host(adapter_dirs, reseeded, shapes)
        assert not torch.equal(other.weights[(0, "q_proj")][0], host.weights[(0, "q_proj")][0])


def _peft_generate(model, prompts):
    """Greedy tokens and each chosen token's logprob, fp32, one prompt at a time."""
    config = model.generation_config
    config.eos_token_id, config.pad_token_id = None, 0
    out = []
    for prompt in prompts:
        ids = torch.tensor([prompt])
        result = model.generate(ids, attention_mask=torch.ones_like(ids), generation_config=config,
                                max_new_tokens=NUM_NEW, do_sample=False, output_scores=True, return_dict_in_generate=True)
        tokens = result.sequences[0, len(prompt):].tolist()
        logprobs = [torch.log_softmax(s[0].float(), -1)[t].item() for s, t in zip(result.scores, tokens)]
        out.append((tokens, logprobs))
    return out


def _engine_generate(engine, requests: dict[str, tuple]) -> dict[str, tuple[list[int], list[float]]]:
    params = SamplingParams(max_tokens=NUM_NEW, temperature=0.0, ignore_eos=True, logprobs=0)
    for request_id, (prompt, adapter) in requests.items():
        engine.add_request(request_id, prompt, params, adapter)
    got = {request_id: ([], []) for request_id in requests}
    for request_id, output in step_until_idle(engine):
        assert not isinstance(output, Exception), output
        got[request_id][0].extend(output.new_token_ids)
        got[request_id][1].extend(output.new_logprobs)
    return got


@pytest.mark.parametrize("case", ["linear-3", "ties", "dare_ties"])
def test_greedy_tokens_and_logprobs_equal_peft_batched_with_plain_requests(demo_model_dir, adapter_dirs, prompts, case):
    """The composition in one batch with a base request and a plain-adapter request, each equal to its reference."""
    reference = _peft_generate(_peft_weighted(demo_model_dir, adapter_dirs, case), prompts)
    engine = build_llm_engine(demo_model_dir, max_loras=3, max_lora_rank=32, max_model_len=128, max_num_seqs=16)
    composed, plain = _composed(adapter_dirs, case), lora(adapter_dirs["acme/tone"])
    requests = {f"mix{i}": (p, composed) for i, p in enumerate(prompts)}
    requests |= {"base": (prompts[1], None), "plain": (prompts[2], plain)}
    got = _engine_generate(engine, requests)
    for i in range(len(prompts)):
        assert got[f"mix{i}"][0] == reference[i][0], (case, i)
        torch.testing.assert_close(got[f"mix{i}"][1], reference[i][1], rtol=0, atol=2e-4)
    base_reference = peft_reference(demo_model_dir, None, [prompts[1]], NUM_NEW)[0]
    assert got["plain"][0] == peft_reference(demo_model_dir, adapter_dirs["acme/tone"], [prompts[2]], NUM_NEW)[0]
    assert got["base"][0] == base_reference
    assert reference[1][0] != base_reference, "the composition is a no-op; the test would prove nothing"


def test_key_holds_versions_weights_and_used_parameters_only():
    one, two = LoraRequest("acme/a@1:aaa", "/x"), LoraRequest("acme/b@3:bbb", "/y")
    key = composed_lora([one, two], [0.7, 0.3], MergeSpec()).key
    assert key == composed_lora([one, two], [0.7, 0.3], MergeSpec()).key
    assert key.startswith("linear(0.7*acme/a+0.3*acme/b)@")  # what metrics show of it
    newer = LoraRequest("acme/a@2:ccc", "/z")
    others = [composed_lora([newer, two], [0.7, 0.3], MergeSpec()), composed_lora([one, two], [0.7, 0.31], MergeSpec()),
              composed_lora([two, one], [0.3, 0.7], MergeSpec()),
              composed_lora([one, two], [0.7, 0.3], MergeSpec("ties", density=0.5)),
              composed_lora([one, two], [0.7, 0.3], MergeSpec("dare_ties", density=0.5, seed=1))]
    assert len({key, *(c.key for c in others)}) == 1 + len(others)
    unused = composed_lora([one, two], [0.7, 0.3], MergeSpec("ties", density=0.5, seed=99))
    assert unused.key == others[3].key  # ties draws nothing: the seed does not split the cache
    assert composed_lora([one], [1.0], MergeSpec("ties", density=0.2)).merge == MergeSpec()  # PEFT: one is linear


def test_too_large_or_unequal_ranks_are_refused_naming_the_param(demo_model_dir, adapter_dirs):
    engine = build_llm_engine(demo_model_dir, max_loras=2, max_lora_rank=16, max_model_len=128)
    shapes = engine.lora_pool.module_shapes
    linear = composed_lora([lora(adapter_dirs[n]) for n in ("acme/tone", "acme/sql", "acme/mlp")], [1, 1, 1], MergeSpec(),
                           param="parameters.merged_adapters")
    with pytest.raises(CompositionError, match="rank at layer 0 q_proj is 24.*max_lora_rank is 16") as caught:
        _host(adapter_dirs, linear, shapes, max_rank=16)
    assert caught.value.param == "parameters.merged_adapters"
    ties = composed_lora([lora(adapter_dirs[n]) for n in ("acme/tone", "acme/small")], [1, 1], MergeSpec("ties", density=0.5))
    with pytest.raises(CompositionError, match=r"same rank.*\[8, 4\]"):
        _host(adapter_dirs, ties, shapes)
    engine.add_request("r", [0, 5, 6], greedy(2), linear)  # through the engine: the request fails, nothing else
    results = list(step_until_idle(engine))
    assert len(results) == 1 and isinstance(results[0][1], CompositionError)
    assert engine.slots.slot_of(linear.key) is None


def test_a_composition_is_listed_in_metrics_and_cached_like_an_adapter(demo_model_dir, adapter_dirs, prompts):
    from loraplex.api.metrics import _lora_info

    engine = build_llm_engine(demo_model_dir, max_loras=2, max_lora_rank=32, max_model_len=128)
    composed = _composed(adapter_dirs, "linear-2")
    engine.add_request("a", prompts[0], greedy(NUM_NEW), composed)
    labels = set()
    for _ in step_until_idle(engine):
        if engine.scheduler.num_running:
            labels.add(_lora_info(engine.stats()).samples[0].labels["running_lora_adapters"])
    assert labels == {"linear(0.7*acme/tone+0.3*acme/sql)"}
    tone, sql = (lora(adapter_dirs[n]).key for n in ("acme/tone", "acme/sql"))
    assert {composed.key, tone, sql} <= set(engine.residency_control.host_cache.keys())
    assert engine.residency(composed.key) == "device" and engine.residency_control.num_loads == 1
    again = composed_lora([lora(adapter_dirs[n]) for n in ("acme/tone", "acme/sql")], [0.7, 0.3], MergeSpec())
    run_to_completion(engine, {"b": (prompts[1], greedy(2), again)})  # an equal request reuses the slot
    assert engine.residency_control.num_loads == 1


def test_only_lora_adapters_compose_and_a_composition_has_no_files_to_probe(demo_model_dir, adapter_dirs, prompts,
                                                                           tmp_path, monkeypatch):
    from loraplex.engine import virtual_tokens
    from tests.virtual_token_adapters import make_virtual_adapter

    probed, peft_type_of = [], virtual_tokens.peft_type_of
    monkeypatch.setattr(virtual_tokens, "peft_type_of", lambda path: probed.append(path) or peft_type_of(path))
    prompt_tuning = make_virtual_adapter(demo_model_dir, tmp_path / "acme" / "prompt", "PROMPT_TUNING", 4)
    engine = build_llm_engine(demo_model_dir, max_loras=2, max_lora_rank=32, max_model_len=128)
    bad = composed_lora([lora(adapter_dirs["acme/tone"]), lora(prompt_tuning)], [1.0, 1.0], MergeSpec())
    engine.add_request("bad", prompts[0], greedy(2), bad)
    engine.add_request("good", prompts[0], greedy(2), _composed(adapter_dirs, "linear-2"))
    failed = {rid: out for rid, out in step_until_idle(engine) if isinstance(out, Exception)}
    assert list(failed) == ["bad"] and isinstance(failed["bad"], CompositionError)
    assert failed["bad"].param == "adapters" and "adapter acme/prompt cannot be composed" in str(failed["bad"])
    assert "PROMPT_TUNING" in str(failed["bad"]) and "" not in probed


def test_a_slow_composition_does_not_hold_up_plain_adapter_loads(demo_model_dir, adapter_dirs, prompts, monkeypatch):
    """Compositions build on a thread of their own (a ties merge of 8 large adapters takes many seconds)."""
    from loraplex.engine import adapter_residency

    release, compose_now = threading.Event(), adapter_residency.compose
    monkeypatch.setattr(adapter_residency, "compose", lambda *args: release.wait(60) and compose_now(*args))
    engine = build_llm_engine(demo_model_dir, max_loras=2, max_lora_rank=32, max_model_len=128)
    engine.add_request("mix", prompts[0], greedy(2), _composed(adapter_dirs, "linear-2"))
    engine.add_request("plain", prompts[0], greedy(2), lora(adapter_dirs["acme/mlp"]))
    finished = []
    for request_id, output in step_until_idle(engine, timeout_s=60):
        if output.is_finished:
            finished.append(request_id)
            release.set()
    assert finished == ["plain", "mix"]
