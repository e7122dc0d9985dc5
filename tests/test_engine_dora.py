"""DoRA served batched (engine/dora.py): greedy tokens equal PEFT's (fp32) for DoRA adapters alone (rank
and alpha patterns, rsLoRA), mixed in one batch with a plain LoRA adapter and base requests, with a DoRA
adapter merged (PEFT's merged weight) and with a plain adapter merged while DoRA requests run."""
from __future__ import annotations

import random
import time

import pytest
import torch

from loraplex.engine.dora import dora_scale
from loraplex.engine.lora_weights import read_adapter
from tests.dora_adapters import make_dora_adapter
from tests.engine_helpers import build_llm_engine, greedy, lora, peft_reference, run_to_completion

pytestmark = pytest.mark.usefixtures("one_torch_thread")

NUM_NEW = 8
DORA = {
    "acme/dora-qv": dict(r=8, alpha=16, target_modules=("q_proj", "v_proj"), seed=201),
    "acme/dora-patterns": dict(r=8, alpha=8, target_modules=("q_proj", "k_proj", "o_proj", "up_proj", "down_proj"),
                               seed=202, rank_pattern={"down_proj": 4, "layers.1.self_attn.k_proj": 2},
                               alpha_pattern={"o_proj": 32}, use_rslora=True),
}
LORA = {"acme/plain": dict(r=4, alpha=8, target_modules=("q_proj", "v_proj", "down_proj"), seed=203)}


@pytest.fixture(scope="module")
def setup(demo_model_dir, demo_data_dir, make_adapter):
    dirs = {name: make_dora_adapter(demo_model_dir, demo_data_dir / name, **kw) for name, kw in DORA.items()}
    dirs.update({name: make_adapter(name, **kw) for name, kw in LORA.items()})
    rng = random.Random(11)
    prompts = [[0] + [rng.randrange(3, 1000) for _ in range(n)] for n in (4, 11, 19)]
    refs = {None: peft_reference(demo_model_dir, None, prompts, NUM_NEW)}
    refs.update({name: peft_reference(demo_model_dir, d, prompts, NUM_NEW) for name, d in dirs.items()})
    for name in DORA:  # the perturbed magnitudes matter: DoRA's tokens differ from its LoRA part's
        assert refs[name] != refs[None], name
    return dirs, prompts, refs


def _engine(demo_model_dir):
    return build_llm_engine(demo_model_dir, max_loras=4, max_lora_rank=8, max_model_len=128)


def _requests(dirs, prompts, adapters):
    return {f"{a}|{i}": (p, greedy(NUM_NEW), lora(dirs.get(a))) for a in adapters for i, p in enumerate(prompts)}


def _check(tokens, refs):
    for key, generated in tokens.items():
        adapter, i = key.split("|")
        assert generated == refs[None if adapter == "None" else adapter][int(i)], key


def _wait_merged(engine, key, timeout_s=30):
    deadline = time.monotonic() + timeout_s
    while engine.merged_key != key:  # the adapter loads on the loader thread first
        assert time.monotonic() < deadline, "adapter never merged"
        engine.step()
        time.sleep(0.002)


def test_scale_is_peft_magnitude_over_weight_norm(demo_model_dir, setup):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    dirs, _, _ = setup
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(demo_model_dir, dtype=torch.float32),
                                      dirs["acme/dora-patterns"])
    peft_layer = model.base_model.model.model.layers[1].self_attn.k_proj
    lora_weight = peft_layer.lora_B["default"].weight @ peft_layer.lora_A["default"].weight
    norm = peft_layer.lora_magnitude_vector["default"].get_weight_norm(
        peft_layer.base_layer.weight, lora_weight, peft_layer.scaling["default"])
    expected = peft_layer.lora_magnitude_vector["default"].weight / norm
    host = read_adapter("k", str(dirs["acme/dora-patterns"]), 8, _shapes(model), torch.float32)
    a, b = host.weights[(1, "k_proj")]
    assert a.shape[0] == 2  # rank_pattern
    got = dora_scale(peft_layer.base_layer.weight, a, b, host.magnitudes[(1, "k_proj")])
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
    assert (expected - 1).abs().max() > 0.05  # not a no-op


def _shapes(peft_model):
    found = {}
    for i, layer in enumerate(peft_model.base_model.model.model.layers):
        for block, names in ((layer.self_attn, ("q_proj", "k_proj", "v_proj", "o_proj")),
                             (layer.mlp, ("gate_proj", "up_proj", "down_proj"))):
            for name in names:
                module = getattr(block, name)
                weight = getattr(module, "base_layer", module).weight
                found[(i, name)] = tuple(weight.shape)
    return found


@pytest.mark.parametrize("name", list(DORA))
def test_dora_alone_matches_peft(demo_model_dir, setup, name):
    dirs, prompts, refs = setup
    _check(run_to_completion(_engine(demo_model_dir), _requests(dirs, prompts, [name])), refs)


@pytest.mark.parametrize("max_lora_rank", [8, 128])  # decode kernel: dense (small pool), gather (big pool)
def test_dora_batched_with_lora_and_base_matches_peft(demo_model_dir, setup, max_lora_rank):
    dirs, prompts, refs = setup
    engine = build_llm_engine(demo_model_dir, max_loras=4, max_lora_rank=max_lora_rank, max_model_len=128)
    _check(run_to_completion(engine, _requests(dirs, prompts, [None, *DORA, *LORA])), refs)
    assert engine.lora_pool.dora_slots  # the DoRA adapters really took the scaled path


def test_one_dora_request_among_many_base_requests(demo_model_dir, setup):
    """Few adapted decode tokens: the gather kernel over a subset of rows (index_copy back)."""
    dirs, prompts, refs = setup
    requests = {f"None|{i % 3}#{i}": (prompts[i % 3], greedy(NUM_NEW), None) for i in range(6)}
    requests["acme/dora-qv|1"] = (prompts[1], greedy(NUM_NEW), lora(dirs["acme/dora-qv"]))
    tokens = run_to_completion(_engine(demo_model_dir), requests)
    _check({key.split("#")[0]: generated for key, generated in tokens.items()}, refs)


@pytest.mark.parametrize("merged", ["acme/dora-patterns", "acme/plain"])
def test_merged_matches_unmerged_for_everyone(demo_model_dir, setup, merged):
    """A merged DoRA adapter (W' = scale * (W + sBA)) or a merged plain one, with every other kind batched."""
    dirs, prompts, refs = setup
    engine = _engine(demo_model_dir)
    request = lora(dirs[merged])
    assert engine.set_merge_mode(request, "merged")
    _wait_merged(engine, request.key)
    _check(run_to_completion(engine, _requests(dirs, prompts, [None, *DORA, *LORA])), refs)
    assert engine.merged_key == request.key


def test_merge_cycles_leave_the_base_bit_identical(demo_model_dir, setup):
    dirs, _, _ = setup
    engine = _engine(demo_model_dir)
    before = {where: l.weight.detach().clone() for where, l in engine.lora_pool.linears.items()}
    request = lora(dirs["acme/dora-qv"])
    for mode in ("merged", "unmerged") * 3:
        engine.set_merge_mode(request, mode)
        _wait_merged(engine, request.key if mode == "merged" else None)
    for where, weight in before.items():
        assert torch.equal(engine.lora_pool.linears[where].weight, weight), where
    assert engine.lora_pool.dora_slots == {engine.slots.slot_of(request.key).index}  # compensation row reset


def test_dora_on_projections_with_bias_matches_peft(tmp_path):
    """Qwen2 has q/k/v biases: PEFT scales W x + sBA x and adds the bias unscaled, merged or not."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from loraplex.models.demo import build_demo_tokenizer

    torch.manual_seed(0)
    model = Qwen2ForCausalLM(Qwen2Config(vocab_size=1024, hidden_size=64, intermediate_size=160, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256))
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("bias"):
                param.normal_(0, 0.5)  # HF initialises biases to zero: make them matter
    model.save_pretrained(tmp_path / "qwen2")
    build_demo_tokenizer().save_pretrained(tmp_path / "qwen2")
    adapter = make_dora_adapter(tmp_path / "qwen2", tmp_path / "acme" / "dora-bias", r=4, alpha=8,
                                target_modules=("q_proj", "k_proj", "v_proj", "o_proj"), seed=5)
    prompts = [[0, 5, 9, 33, 7], [0] + list(range(40, 60))]
    refs = {name: peft_reference(tmp_path / "qwen2", path, prompts, NUM_NEW) for name, path in
            (("None", None), ("dora", adapter))}
    assert refs["dora"] != refs["None"]
    requests = {f"{n}|{i}": (p, greedy(NUM_NEW), lora(adapter if n == "dora" else None))
                for n in refs for i, p in enumerate(prompts)}
    for merged in (False, True):
        engine = build_llm_engine(tmp_path / "qwen2", max_loras=2, max_lora_rank=8, max_model_len=128)
        if merged:
            engine.set_merge_mode(lora(adapter), "merged")
            _wait_merged(engine, lora(adapter).key)
        for key, generated in run_to_completion(engine, requests).items():
            name, i = key.split("|")
            assert generated == refs[name][int(i)], (merged, key)


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_cuda_dora_batched_and_merged(demo_model_dir, setup, dtype):
    """fp32 on CUDA equals PEFT's tokens; bf16 runs the same code (scales in bf16) and stays close."""
    dirs, prompts, refs = setup
    engine = build_llm_engine(demo_model_dir, device="cuda", dtype=dtype, max_loras=4, max_lora_rank=8, max_model_len=128)
    requests = _requests(dirs, prompts, [None, *DORA, *LORA])
    unmerged = run_to_completion(engine, requests)
    request = lora(dirs["acme/dora-patterns"])
    engine.set_merge_mode(request, "merged")
    _wait_merged(engine, request.key)
    merged = run_to_completion(engine, requests)
    if dtype == "float32":
        _check(unmerged, refs)
        _check(merged, refs)
    else:  # bf16 greedy may flip a near-tie; most rows agree with the fp32 reference
        agree = sum(t == refs[None if k.startswith("None") else k.split("|")[0]][int(k.split("|")[1])] for k, t in unmerged.items())
        assert agree >= len(unmerged) // 2, agree


def test_compiled_decode_falls_back_to_eager_for_dora(demo_model_dir, setup):
    """The compiled decode step has no DoRA scale: steps with DoRA rows (or a merged DoRA adapter) run eager."""
    dirs, prompts, refs = setup
    engine = build_llm_engine(demo_model_dir, max_loras=4, max_lora_rank=8, max_model_len=128, compile="on")
    _check(run_to_completion(engine, _requests(dirs, prompts, [None, *LORA])), refs)
    assert engine.runner.compiled.buckets  # without DoRA rows the compiled step runs
    _check(run_to_completion(engine, _requests(dirs, prompts, [None, *DORA, *LORA])), refs)
    request = lora(dirs["acme/dora-qv"])
    engine.set_merge_mode(request, "merged")
    _wait_merged(engine, request.key)
    _check(run_to_completion(engine, _requests(dirs, prompts, [None, *LORA])), refs)


def test_dora_adapters_cannot_be_composed(demo_model_dir, setup):
    """PEFT's add_weighted_adapter refuses DoRA; a composition would silently drop the magnitudes."""
    from loraplex.engine.composition import CompositionError, MergeSpec, compose, composed_lora

    dirs, _, _ = setup
    names = ["acme/dora-qv", "acme/plain"]
    request = composed_lora([lora(dirs[n]) for n in names], [0.5, 0.5], MergeSpec())
    shapes = build_llm_engine(demo_model_dir, max_loras=2, max_lora_rank=8, max_model_len=64).lora_pool.module_shapes
    hosts = [read_adapter(n, str(dirs[n]), 8, shapes, torch.float32) for n in names]
    with pytest.raises(CompositionError, match="DoRA adapters cannot be composed") as caught:
        compose(request, hosts, 16, torch.float32)
    assert caught.value.param == "adapters"


@pytest.mark.parametrize("max_lora_rank", [8, 128])  # dense and gather decode kernels
def test_bf16_dora_runs_and_stays_close(demo_model_dir, setup, max_lora_rank):
    """CUDA serves bf16: the same code in bf16 on CPU (the dense kernel once mixed an fp32 one-hot into a
    bf16 matmul); greedy rows may flip on near-ties, most agree with the fp32 reference."""
    dirs, prompts, refs = setup
    engine = build_llm_engine(demo_model_dir, dtype="bfloat16", max_loras=4, max_lora_rank=max_lora_rank, max_model_len=128)
    tokens = run_to_completion(engine, _requests(dirs, prompts, [None, *DORA, *LORA]))
    assert all(len(t) == NUM_NEW for t in tokens.values())
    agree = sum(t == refs[None if k.startswith("None") else k.split("|")[0]][int(k.split("|")[1])] for k, t in tokens.items())
    assert agree >= len(tokens) // 2, agree


def test_dora_on_a_quantized_base_fails_the_request_not_the_engine(demo_model_dir, setup):
    from loraplex.engine.errors import AdapterError
    from tests.engine_helpers import step_until_idle

    dirs, prompts, refs = setup
    engine = build_llm_engine(demo_model_dir, max_loras=2, max_lora_rank=8, max_model_len=128, quantization="int8")
    engine.add_request("dora", prompts[0], greedy(3), lora(dirs["acme/dora-qv"]))
    engine.add_request("plain", prompts[0], greedy(3), lora(dirs["acme/plain"]))
    done = dict(step_until_idle(engine))
    assert isinstance(done["dora"], AdapterError) and "quantized base" in str(done["dora"])
    assert not isinstance(done["plain"], Exception)
