"""Unit tests of engine parts that need no model: LoRA kernels, slot pool, detokenizer, sampler."""
from __future__ import annotations

import pytest
import torch

from loraplex.engine.adapter_slots import AdapterSlots
from loraplex.engine.detokenizer import IncrementalDetokenizer
from loraplex.engine.lora_ops import add_lora, build_lora_batch
from loraplex.engine.sampler import sample
from loraplex.engine.types import SamplingParams


def _reference_lora(x, a, b, slots):
    return torch.stack([b[s] @ (a[s] @ x[t]) for t, s in enumerate(slots)])


@pytest.mark.parametrize("dense_limit", [0, 10_000])  # 0 forces the gather kernel
@pytest.mark.parametrize("decode_slots", [[3, 0, 1, 3], [2, 2, 4, 1], [0, 0], [0, 0, 0, 4]])
def test_decode_and_segment_kernels_match_per_token_reference(monkeypatch, dense_limit, decode_slots):
    monkeypatch.setattr("loraplex.engine.lora_ops.DENSE_MAX_POOL_COLUMNS", dense_limit)
    torch.manual_seed(0)
    num_slots, r, d_in, d_out = 5, 4, 16, 24
    a = torch.randn(num_slots, r, d_in)
    b = torch.randn(num_slots, d_out, r)
    a[0].zero_(), b[0].zero_()
    prefill_runs = [(5, 2), (3, 0), (4, 4)]
    slots = decode_slots + [s for n, s in prefill_runs for _ in range(n)]
    x = torch.randn(len(slots), d_in)
    batch = build_lora_batch(decode_slots, prefill_runs, torch.device("cpu"), num_slots, r)
    num_adapted = sum(1 for s in decode_slots if s)
    assert (batch.decode_onehot is not None) == (dense_limit > 0 and 2 * num_adapted >= len(decode_slots) > 0 < num_adapted)
    y = torch.zeros(len(slots), d_out)
    add_lora(y, x, a, b.transpose(1, 2).contiguous(), batch)
    torch.testing.assert_close(y, _reference_lora(x, a, b, slots))
    assert batch.used_slots == {s for s in slots if s}


def test_all_base_batch_is_empty():
    assert build_lora_batch([0, 0], [(4, 0)], torch.device("cpu"), 5, 4).is_empty


def test_slots_lru_eviction_skips_pinned_and_referenced():
    slots = AdapterSlots(max_loras=2)
    s1, _ = slots.load("a")
    s2, _ = slots.load("b")
    assert {s1, s2} == {1, 2}
    slots.mark_ready("a"), slots.mark_ready("b")
    slots.acquire("a")  # a is in use: not evictable
    assert slots.can_load()
    slot, evicted = slots.load("c")
    assert evicted == "b" and slot == s2
    slots.mark_ready("c")
    slots.pin("c")
    assert not slots.can_load()  # a referenced, c pinned
    slots.release("a")
    slot, evicted = slots.load("d")
    assert evicted == "a" and slot == s1


def test_slots_evict_least_recently_used_first():
    slots = AdapterSlots(max_loras=2)
    for key in ("a", "b"):
        slots.load(key), slots.mark_ready(key)
    slots.acquire("a"), slots.release("a")  # a used after b
    assert slots.load("c")[1] == "b"


class _CharTokenizer:
    """Token i decodes to chr(i); ids >= 0x110000 are specials that decode to nothing."""

    def decode(self, ids, skip_special_tokens=True):
        return "".join(chr(i) for i in ids if i < 0x110000)


def test_detokenizer_holds_back_partial_stop_and_truncates():
    detok = IncrementalDetokenizer(_CharTokenizer(), stop=("END",))
    ids, emitted = [], ""
    for ch in "hello EN":
        ids.append(ord(ch))
        assert detok.append(ids) is None
        emitted += detok.take_delta(is_finished=False)
    assert emitted == "hello "  # "EN" may start "END": held back
    ids.append(ord("D"))
    assert detok.append(ids) == "END"
    assert emitted + detok.take_delta(is_finished=True) == "hello "


def test_sampler_greedy_topk1_and_seeded_rows():
    torch.manual_seed(0)
    logits = torch.randn(3, 50)
    params = [
        SamplingParams(temperature=0),
        SamplingParams(temperature=1.0, top_k=1),
        SamplingParams(temperature=1.0, top_p=0.5, seed=7),
    ]
    gens = [None, None, torch.Generator().manual_seed(7)]
    tokens = sample(logits, params, gens)
    assert tokens[0] == logits[0].argmax() and tokens[1] == logits[1].argmax()
    again = sample(logits, params, [None, None, torch.Generator().manual_seed(7)])
    assert again[2] == tokens[2]


def test_a_row_with_non_finite_probabilities_decodes_greedily_and_spares_the_batch():
    logits = torch.randn(3, 50)
    logits[1, 7] = float("inf")  # overflowed logits: softmax gives NaN for the whole row
    params = [SamplingParams(temperature=1.0, seed=1)] * 3
    gens = [torch.Generator().manual_seed(i) for i in range(3)]
    tokens = sample(logits, params, gens)
    assert tokens[1] == 7
    healthy = sample(logits[[0, 2]], [params[0], params[2]], [torch.Generator().manual_seed(i) for i in (0, 2)])
    assert tokens[[0, 2]].tolist() == healthy.tolist()  # the other rows sample exactly as without it


def test_top_p_keeps_only_the_nucleus():
    logits = torch.tensor([[5.0, 4.9, -10.0, -10.0]])
    params = [SamplingParams(temperature=1.0, top_p=0.4)]
    seen = {int(sample(logits, params, [torch.Generator().manual_seed(s)])[0]) for s in range(30)}
    assert seen == {0}
