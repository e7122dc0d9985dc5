"""Per-row logits processing in one mixed batch, against HF + PEFT in fp32: logprobs and top-k
alternatives (output and prompt), repetition penalty (HF's processor), presence/frequency penalties
(OpenAI's formula written out here), logit_bias, min_tokens, and grammar-constrained rows."""
from __future__ import annotations

import json

import jsonschema
import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM
from transformers.generation.logits_process import RepetitionPenaltyLogitsProcessor

from loraplex.engine.errors import InvalidRequestError
from loraplex.engine.types import Guide, SamplingParams
from tests.engine_helpers import build_llm_engine, lora, step_until_idle

PROMPTS = [[0, 17, 403, 88, 51, 9], [0, 250, 31, 7], [0, 600, 12, 99, 140, 3, 77, 5]]
ADAPTERS = ("acme/lp-a", "globex/lp-b")
NUM_NEW = 6


@pytest.fixture(scope="module")
def adapter_dirs(make_adapter):
    return {name: make_adapter(name, r=8, alpha=16, target_modules=("q_proj", "v_proj", "down_proj"), seed=i + 11)
            for i, name in enumerate(ADAPTERS)}


@pytest.fixture(scope="module")
def engine(demo_model_dir, adapter_dirs):
    return build_llm_engine(demo_model_dir, max_loras=2, max_lora_rank=16, max_model_len=256)


@pytest.fixture(scope="module")
def hf_models(demo_model_dir, adapter_dirs):
    models = {None: AutoModelForCausalLM.from_pretrained(demo_model_dir, dtype=torch.float32).eval()}
    for name, path in adapter_dirs.items():
        base = AutoModelForCausalLM.from_pretrained(demo_model_dir, dtype=torch.float32)
        models[name] = PeftModel.from_pretrained(base, path).eval()
    return models


def run(engine, requests: dict[str, tuple]) -> dict[str, dict]:
    """id -> (prompt, params, adapter dir or None) -> id -> {tokens, logprobs, top, prompt_logprobs, finish}."""
    for request_id, (prompt, params, adapter) in requests.items():
        engine.validate(prompt, params)
        engine.add_request(request_id, prompt, params, lora(adapter))
    out = {rid: {"tokens": [], "logprobs": [], "top": [], "prompt_logprobs": None, "text": ""} for rid in requests}
    for request_id, output in step_until_idle(engine):
        assert not isinstance(output, Exception), output
        record = out[request_id]
        record["tokens"] += output.new_token_ids
        record["logprobs"] += output.new_logprobs
        record["top"] += output.new_top_logprobs
        record["text"] += output.new_text
        record["prompt_logprobs"] = record["prompt_logprobs"] or output.prompt_logprobs
        record["finish"] = output.finish_reason
    return out


def hf_logprobs(model, ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits[0].float()  # [L, V]
    return torch.log_softmax(logits, dim=-1)


def greedy(**fields) -> SamplingParams:
    return SamplingParams(max_tokens=NUM_NEW, temperature=0.0, ignore_eos=True, **fields)


def test_logprobs_and_prompt_logprobs_match_peft_for_base_and_two_adapters_in_one_batch(engine, adapter_dirs, hf_models):
    names = [None, *ADAPTERS]
    requests = {f"r{i}": (PROMPTS[i], greedy(logprobs=5, prompt_logprobs=5), adapter_dirs.get(name))
                for i, name in enumerate(names)}
    out = run(engine, requests)
    for i, name in enumerate(names):
        record, prompt = out[f"r{i}"], PROMPTS[i]
        reference = hf_logprobs(hf_models[name], prompt + record["tokens"])  # [L, V]
        for step, token in enumerate(record["tokens"]):
            row = reference[len(prompt) - 1 + step]
            assert token == int(row.argmax())
            assert abs(record["logprobs"][step] - float(row[token])) < 1e-4
            _assert_top_equal(record["top"][step], row, 5)
        assert len(record["prompt_logprobs"]) == len(prompt) - 1
        for position, (logprob, top) in enumerate(record["prompt_logprobs"]):
            row = reference[position]
            assert abs(logprob - float(row[prompt[position + 1]])) < 1e-4
            _assert_top_equal(top, row, 5)


def _assert_top_equal(top: list[tuple[int, float]], row: torch.Tensor, k: int) -> None:
    values, ids = row.topk(k)
    assert [t for t, _ in top] == ids.tolist()
    assert max(abs(a - b) for (_, a), b in zip(top, values.tolist())) < 1e-4


def test_repetition_penalty_matches_hf_processor(engine, hf_models):
    penalty = 1.8
    out = run(engine, {f"r{i}": (p, greedy(repetition_penalty=penalty), None) for i, p in enumerate(PROMPTS)})
    processor = RepetitionPenaltyLogitsProcessor(penalty)
    plain = run(engine, {f"r{i}": (p, greedy(), None) for i, p in enumerate(PROMPTS)})
    for i, prompt in enumerate(PROMPTS):
        expected = _greedy_with(hf_models[None], prompt, lambda ids, logits: processor(ids, logits))
        assert out[f"r{i}"]["tokens"] == expected
    assert any(out[k]["tokens"] != plain[k]["tokens"] for k in out), "the penalty changed nothing: test proves nothing"


def test_presence_and_frequency_penalties_match_openai_formula(engine, hf_models):
    presence, frequency = 0.7, 1.3

    def openai_penalties(ids: torch.Tensor, logits: torch.Tensor, prompt_len: int) -> torch.Tensor:
        counts = torch.bincount(ids[0, prompt_len:], minlength=logits.shape[-1]).float()
        return logits - frequency * counts - presence * (counts > 0).float()

    params = greedy(presence_penalty=presence, frequency_penalty=frequency)
    out = run(engine, {f"r{i}": (p, params, None) for i, p in enumerate(PROMPTS)})
    plain = run(engine, {f"r{i}": (p, greedy(), None) for i, p in enumerate(PROMPTS)})
    for i, prompt in enumerate(PROMPTS):
        expected = _greedy_with(hf_models[None], prompt, lambda ids, logits: openai_penalties(ids, logits, len(prompt)))
        assert out[f"r{i}"]["tokens"] == expected
    assert any(out[k]["tokens"] != plain[k]["tokens"] for k in out)


def _greedy_with(model, prompt: list[int], process) -> list[int]:
    ids = torch.tensor([prompt])
    for _ in range(NUM_NEW):
        with torch.no_grad():
            logits = model(ids).logits[:, -1].float()  # [1, V]
        token = int(process(ids, logits).argmax(-1))
        ids = torch.cat([ids, torch.tensor([[token]])], dim=1)
    return ids[0, len(prompt):].tolist()


def test_logit_bias_bans_and_forces(engine):
    prompt = PROMPTS[0]
    plain = run(engine, {"p": (prompt, greedy(), None)})["p"]["tokens"]
    banned = run(engine, {"b": (prompt, greedy(logit_bias=((plain[0], -100.0),)), None)})["b"]["tokens"]
    assert banned[0] != plain[0] and plain[0] not in banned
    forced = run(engine, {"f": (prompt, greedy(logit_bias=((321, 100.0),)), None)})["f"]["tokens"]
    assert forced == [321] * NUM_NEW


def test_min_tokens_holds_back_eos(engine):
    eos = engine.tokenizer.eos_token_id
    params = SamplingParams(max_tokens=5, temperature=0.0, logit_bias=((eos, 100.0),), min_tokens=3)
    record = run(engine, {"m": (PROMPTS[1], params, None)})["m"]
    assert eos not in record["tokens"][:3] and record["tokens"][3] == eos and len(record["tokens"]) == 4


def test_constrained_and_free_rows_on_different_adapters_share_a_batch(engine, adapter_dirs):
    schema = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 6},
              "ok": {"type": "boolean"}, "n": {"type": "integer", "minimum": 0, "maximum": 999}},
              "required": ["name", "ok", "n"], "additionalProperties": False}
    json_params = SamplingParams(max_tokens=40, temperature=1.0, seed=5, guide=Guide("json_schema", json.dumps(schema)))
    regex_params = SamplingParams(max_tokens=20, temperature=1.0, seed=6, guide=Guide("regex", r"[a-z]{3}-[0-9]{2,4}"))
    choice_params = SamplingParams(max_tokens=20, temperature=0.0, guide=Guide("choice", '["alpha", "beta gamma"]'))
    free = SamplingParams(max_tokens=8, temperature=1.0, seed=7, ignore_eos=True)
    requests = {}
    for i, adapter in enumerate([None, *ADAPTERS]):
        requests |= {f"json{i}": (PROMPTS[i], json_params, adapter_dirs.get(adapter)),
                     f"regex{i}": (PROMPTS[i], regex_params, adapter_dirs.get(adapter)),
                     f"choice{i}": (PROMPTS[i], choice_params, adapter_dirs.get(adapter)),
                     f"free{i}": (PROMPTS[i], free, adapter_dirs.get(adapter))}
    out = run(engine, requests)
    for i in range(3):
        jsonschema.validate(json.loads(out[f"json{i}"]["text"]), schema)
        assert out[f"regex{i}"]["text"] and __import__("re").fullmatch(r"[a-z]{3}-[0-9]{2,4}", out[f"regex{i}"]["text"])
        assert out[f"choice{i}"]["text"] in ("alpha", "beta gamma")
        assert len(out[f"free{i}"]["tokens"]) == 8


@pytest.mark.parametrize("guide", [Guide("regex", "[a-"), Guide("json_schema", '{"type": "nope"}'),
                                   Guide("json_schema", "{not json"), Guide("choice", "[]"),
                                   Guide("regex", "a" * 40_000)])
def test_invalid_guides_are_refused(engine, guide):
    with pytest.raises(InvalidRequestError):
        engine.validate(PROMPTS[0], SamplingParams(guide=guide))
