"""The per-example token cap at upload: exact counts with a real tokenizer, line-numbered refusals, and the
byte bound that lets short examples skip tokenizing."""
from __future__ import annotations

import json
import random

import pytest
from transformers import AutoTokenizer

from loraplex.training.datasets import DatasetError, validate_jsonl
from loraplex.training.example_tokens import check_example_tokens, example_texts, token_counter, upper_bound
from tests.shared_models import shared_model


@pytest.fixture(scope="module")
def tokenizer():
    return AutoTokenizer.from_pretrained(shared_model("stories260k"))


def _lines(*objects) -> bytes:
    return b"\n\n".join(json.dumps(obj).encode() for obj in objects) + b"\n"  # blank lines: numbers still count them


def test_an_example_over_the_cap_is_refused_naming_its_line(tokenizer):
    count = token_counter(tokenizer)
    short = {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello."}]}
    story = "Once upon a time there was a little girl. " * 40
    long = {"messages": [{"role": "user", "content": story}, {"role": "assistant", "content": story}]}
    dataset = validate_jsonl(_lines(short, long, short, long))
    exact = sum(count([text])[0] for text in example_texts(dataset.examples[1]))
    check_example_tokens(dataset, count, exact)  # exactly at the cap: accepted
    with pytest.raises(DatasetError) as refused:
        check_example_tokens(dataset, count, exact - 1)
    assert [line for line, _ in refused.value.problems] == [3, 7]
    assert f"the example has {exact} tokens, more than the limit of {exact - 1}" in str(refused.value)
    assert (refused.value.status, refused.value.param) == (400, "file")


def test_prompt_completion_and_preference_examples_are_counted_too(tokenizer):
    count = token_counter(tokenizer)
    pair = {"input": {"messages": [{"role": "user", "content": "Tell a story."}]},
            "preferred_output": [{"role": "assistant", "content": "Once upon a time " * 30}],
            "non_preferred_output": [{"role": "assistant", "content": "No."}]}
    for obj in ({"prompt": "Tell a story.", "completion": " Once upon a time" * 30}, pair):
        dataset = validate_jsonl(_lines(obj))
        with pytest.raises(DatasetError, match="line 1: the example has"):
            check_example_tokens(dataset, count, 60)


def test_the_byte_bound_is_never_below_the_real_count(tokenizer):
    """Why short examples may skip tokenizing: random text (multi-byte characters, spaces, newlines)."""
    rng = random.Random(0)
    alphabet = ["a", "Z", " ", "  ", "\n", ".", "\u00e9", "\u4e2d", "\U0001F600", "once", " upon"]
    for _ in range(300):
        text = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 120)))
        assert len(tokenizer(text, add_special_tokens=False)["input_ids"]) <= upper_bound([text]), text


def test_examples_within_the_byte_bound_are_not_tokenized(tokenizer):
    asked: list[list[str]] = []
    count = token_counter(tokenizer)
    dataset = validate_jsonl(_lines(*({"prompt": f"p{i}", "completion": " c"} for i in range(1000))))
    check_example_tokens(dataset, lambda texts: asked.append(texts) or count(texts), 16)
    assert asked == []
