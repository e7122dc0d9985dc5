"""Continuous batching, admission limits, aborts and adapter errors on the real engine."""
from __future__ import annotations

import json
import time

import pytest

from loraplex.engine.errors import AdapterError, InvalidRequestError, PromptTooLongError
from loraplex.engine.types import FinishReason, LoraRequest, SamplingParams
from tests.engine_helpers import build_llm_engine, greedy, lora, step_until_idle


@pytest.fixture
def engine(demo_model_dir):
    return build_llm_engine(demo_model_dir, max_loras=2, max_lora_rank=8, max_model_len=256, max_num_seqs=4)


def _collect(engine):
    done, outputs = {}, []
    for request_id, out in step_until_idle(engine):
        outputs.append((request_id, out))
        if isinstance(out, Exception) or out.is_finished:
            done[request_id] = out
    return done, outputs


def test_short_request_overtakes_running_long_ones(engine):
    for i in range(3):
        engine.add_request(f"long{i}", [0, 5, 6, 7], greedy(200), None)
    for _ in range(5):
        engine.step()
    engine.add_request("short", [0, 9, 9], greedy(4), None)
    finished_at, step = {}, 0
    while engine.unfinished_request_ids():
        step += 1
        for request_id, out in engine.step():
            if out.is_finished:
                finished_at[request_id] = step
    assert finished_at["short"] <= 5  # joins the running batch at the next step
    assert all(finished_at[f"long{i}"] > 150 for i in range(3))


def test_admission_bounded_by_kv_rows(engine):
    for i in range(6):
        engine.add_request(f"r{i}", [0, 1 + i, 3], greedy(20), None)
    engine.step()
    assert engine.scheduler.num_running == 4 and engine.scheduler.num_waiting == 2
    done, _ = _collect(engine)
    assert set(done) == {f"r{i}" for i in range(6)}
    assert engine.blocks.num_used == 0


def test_abort_frees_row_and_slot(engine, make_adapter):
    adapter = make_adapter("acme/sched", r=8, seed=11)
    engine.add_request("a", [0, 4, 5], greedy(100), lora(adapter))
    deadline = time.monotonic() + 30
    while engine.scheduler.num_running == 0 and time.monotonic() < deadline:
        engine.step()  # the adapter loads on another thread; admission follows
        time.sleep(0.01)
    assert engine.scheduler.num_running == 1
    output = engine.abort("a")
    assert output.finish_reason is FinishReason.ABORT
    assert engine.blocks.num_used == 0
    assert engine.slots.slot_of("acme/sched").num_refs == 0
    assert not engine.unfinished_request_ids()


def test_max_tokens_and_eos_finish_reasons(engine):
    engine.add_request("len", [0, 4, 5], SamplingParams(max_tokens=7, temperature=0), None)
    done, _ = _collect(engine)
    assert done["len"].finish_reason in (FinishReason.LENGTH, FinishReason.STOP)
    if done["len"].finish_reason is FinishReason.LENGTH:
        assert done["len"].num_output_tokens == 7


def test_stop_token_ids_finish_with_stop(engine):
    engine.add_request("probe", [0, 4, 5], greedy(5), None)
    first = _collect(engine)[1][0][1].new_token_ids[0]
    engine.add_request("stop", [0, 4, 5], SamplingParams(max_tokens=5, temperature=0, stop_token_ids=(first,)), None)
    done, _ = _collect(engine)
    assert done["stop"].finish_reason is FinishReason.STOP and done["stop"].num_output_tokens == 1


def test_validation_errors(engine):
    with pytest.raises(InvalidRequestError):
        engine.validate([], greedy(4))
    with pytest.raises(InvalidRequestError):
        engine.validate([0, 10**7], greedy(4))
    with pytest.raises(PromptTooLongError):
        engine.validate([0] * 250, greedy(10))


def test_seeded_sampling_is_reproducible(engine):
    params = SamplingParams(max_tokens=12, temperature=1.0, top_p=0.9, top_k=50, seed=1234)
    runs = []
    for i in range(2):
        engine.add_request(f"s{i}", [0, 7, 8], params, None)
        engine.add_request(f"noise{i}", [0, 3, 3, 3], SamplingParams(max_tokens=3 + i, temperature=1.0), None)
        done, outputs = _collect(engine)
        runs.append([t for rid, o in outputs if rid == f"s{i}" for t in o.new_token_ids])
    assert runs[0] == runs[1]
    engine.add_request("other", [0, 7, 8], SamplingParams(max_tokens=12, temperature=1.0, top_p=0.9, top_k=50, seed=99), None)
    _, outputs = _collect(engine)
    assert [t for _, o in outputs for t in o.new_token_ids] != runs[0]


def _broken_adapter(make_adapter, tmp_path, name, edit):
    src = make_adapter("acme/base-for-broken", r=8, seed=12)
    dst = tmp_path / name
    dst.mkdir()
    config = json.loads((src / "adapter_config.json").read_text())
    edit(config)
    (dst / "adapter_config.json").write_text(json.dumps(config))
    (dst / "adapter_model.safetensors").write_bytes((src / "adapter_model.safetensors").read_bytes())
    return LoraRequest(key=f"broken/{name}", path=str(dst))


@pytest.mark.parametrize("name,edit", [
    ("dora", lambda c: c.update(use_dora=True)),
    ("bias", lambda c: c.update(bias="all")),
    ("not-lora", lambda c: c.update(peft_type="IA3")),
])
def test_unsupported_adapter_fails_request_not_engine(engine, make_adapter, tmp_path, name, edit):
    bad = _broken_adapter(make_adapter, tmp_path, name, edit)
    engine.add_request("bad", [0, 4, 5], greedy(5), bad)
    engine.add_request("good", [0, 4, 5], greedy(5), None)
    done, _ = _collect(engine)
    assert isinstance(done["bad"], AdapterError)
    assert done["good"].finish_reason is FinishReason.LENGTH
    assert engine.slots.slot_of(bad.key) is None


def test_rank_over_limit_is_refused(engine, make_adapter):
    big = make_adapter("acme/rank16", r=16, seed=13)
    engine.add_request("big", [0, 4, 5], greedy(5), lora(big))
    done, _ = _collect(engine)
    assert isinstance(done["big"], AdapterError) and "max_lora_rank" in str(done["big"])


def test_one_tenants_flood_does_not_starve_another(demo_model_dir):
    engine = build_llm_engine(demo_model_dir, max_loras=2, max_lora_rank=8, max_model_len=256, max_num_seqs=2)
    for i in range(12):
        engine.add_request(f"flood{i}", [0, 5, 6 + i], greedy(20), None, tenant="acme")
    engine.step()  # the flood fills both rows
    engine.add_request("victim", [0, 9, 9], greedy(20), None, tenant="globex")
    finished = []
    while engine.unfinished_request_ids():
        finished += [rid for rid, out in engine.step() if out.is_finished]
    # FIFO would finish the victim 13th; fair admission lets it in at the first free row.
    assert finished.index("victim") <= 3, finished
