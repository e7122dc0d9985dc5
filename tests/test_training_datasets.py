"""Training files: every class of bad line is reported with its 1-based line number; masks cover only
what the model should learn to write; hyperparameters are refused with the offending field named."""
from __future__ import annotations

import json

import pytest
from transformers import AutoTokenizer

from loraplex.training.datasets import (
    _tokenize_chat_by_prefixes,
    CHAT,
    IGNORE_INDEX,
    LINES_PER_STOP_CHECK,
    MAX_REPORTED_PROBLEMS,
    PROMPT_COMPLETION,
    ChatExample,
    ChatMessage,
    DatasetError,
    PreparationStopped,
    PromptCompletion,
    tokenize_dataset,
    tokenize_example,
    validate_jsonl,
)
from loraplex.training.hyperparams import (
    BASE_LEARNING_RATE,
    HyperparameterError,
    Hyperparameters,
    learning_rate_at,
)

PC = {"prompt": "Review: good\nSentiment:", "completion": " positive"}
CHAT_OK = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}


def jsonl(*lines) -> bytes:
    return b"".join((line if isinstance(line, bytes) else json.dumps(line).encode()) + b"\n" for line in lines)


def problems(data: bytes, **limits) -> list[tuple[int, str]]:
    with pytest.raises(DatasetError) as info:
        validate_jsonl(data, **limits)
    return info.value.problems


@pytest.fixture(scope="module")
def tokenizer(demo_model_dir):
    return AutoTokenizer.from_pretrained(demo_model_dir)


# --- validation -------------------------------------------------------------------------------------


def test_accepts_both_forms_and_skips_blank_lines():
    parsed = validate_jsonl(jsonl(PC, b"", PC) + b"\n")
    assert parsed.format == PROMPT_COMPLETION and len(parsed) == 2
    assert parsed.examples[0] == PromptCompletion(PC["prompt"], PC["completion"])
    chat = validate_jsonl(jsonl(CHAT_OK, {"messages": [{"role": "system", "content": "s"}, *CHAT_OK["messages"]]}))
    assert chat.format == CHAT and len(chat) == 2
    assert chat.examples[0] == ChatExample((ChatMessage("user", "hi"), ChatMessage("assistant", "hello")))


def test_bad_json_is_reported_on_its_line():
    found = problems(jsonl(PC, b'{"prompt": "x", ', PC, b"[1, 2]"))
    assert [line for line, _ in found] == [2, 4]
    assert "invalid JSON" in found[0][1] and "JSON object" in found[1][1]


@pytest.mark.parametrize(
    ("messages", "needle"),
    [
        ([{"role": "tool", "content": "x"}, {"role": "assistant", "content": "y"}], "messages[0].role"),
        ([{"role": "user", "content": "x"}], "last message must be from the assistant"),
        ([{"role": "assistant", "content": "x"}, {"role": "user", "content": "y"}], "last message"),
        ([{"role": "assistant", "content": "x"}, {"role": "user", "content": "y"}, {"role": "assistant", "content": "z"}],
         "first message must be from the system or the user"),
        ([{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}] * 129, "258 messages, more than the limit of 256"),
        ([{"role": "user", "content": "x"}, {"role": "assistant", "content": "y", "weight": 0}], "nothing to train"),
        ([{"role": "user", "content": ["parts"]}, {"role": "assistant", "content": "y"}], "content must be a string"),
        ([], "non-empty list"),
    ],
)
def test_bad_chat_lines(messages, needle):
    found = problems(jsonl(CHAT_OK, CHAT_OK, {"messages": messages}))
    assert len(found) == 1 and found[0][0] == 3 and needle in found[0][1], found


def test_bad_prompt_completion_lines():
    found = problems(
        jsonl({"prompt": "x"}, {"prompt": 1, "completion": "y"}, {"prompt": "x", "completion": ""}, {"x": 1})
    )
    assert [line for line, _ in found] == [1, 2, 3, 4]
    assert "'completion'" in found[0][1] and "'prompt'" in found[1][1] and "empty" in found[2][1]


def test_empty_file():
    for data in (b"", b"\n\n  \n"):
        assert problems(data) == [(0, "file holds no examples")]


def test_mixed_forms_name_the_line_that_set_the_form():
    found = problems(jsonl(b"not json", CHAT_OK, PC, CHAT_OK, {**PC, **CHAT_OK}))
    assert [line for line, _ in found] == [1, 3, 5]
    assert "line 2" in found[1][1] and "one form only" in found[1][1]
    assert "not both" in found[2][1]


def test_invalid_utf8_is_refused_per_line():
    found = problems(jsonl(PC, b'{"prompt": "caf\xe9", "completion": "x"}'))
    assert found[0][0] == 2 and "UTF-8" in found[0][1]


def test_size_limits():
    long_line = json.dumps({"prompt": "x" * 200, "completion": "y"}).encode()
    found = problems(jsonl(PC, long_line), max_line_bytes=100)
    assert found[0][0] == 2 and "more than the limit of 100 bytes" in found[0][1]
    found = problems(jsonl(PC, PC, b"", PC), max_lines=2)
    assert found == [(4, "more than 2 examples; split the file or remove lines")]
    data = jsonl(PC, PC)
    assert problems(data, max_bytes=len(data) - 1)[0][0] == 0


def test_reports_at_most_twenty_problems_but_counts_all():
    with pytest.raises(DatasetError) as info:
        validate_jsonl(b"nope\n" * 50)
    assert len(info.value.problems) == MAX_REPORTED_PROBLEMS and info.value.num_problems == 50
    assert info.value.problems[-1][0] == MAX_REPORTED_PROBLEMS
    assert "50 problem(s)" in str(info.value) and "(and 30 more)" in str(info.value)


# --- masking ----------------------------------------------------------------------------------------


def trained_text(tokenizer, input_ids, labels) -> str:
    assert len(input_ids) == len(labels)
    kept = [token for token, label in zip(input_ids, labels) if label != IGNORE_INDEX]
    assert all(label in (IGNORE_INDEX, token) for token, label in zip(input_ids, labels))
    return tokenizer.decode(kept)


def test_prompt_completion_masks_the_prompt(tokenizer):
    ids, labels = tokenize_example(tokenizer, PromptCompletion("Review: good\nSentiment:", " positive"), 512)
    prompt_ids = tokenizer("Review: good\nSentiment:")["input_ids"]
    assert ids[: len(prompt_ids)] == prompt_ids  # as the server tokenizes the prompt, BOS included
    assert labels[: len(prompt_ids)] == [IGNORE_INDEX] * len(prompt_ids)
    assert trained_text(tokenizer, ids, labels) == " positive" + tokenizer.eos_token
    assert ids[-1] == tokenizer.eos_token_id


def test_chat_trains_only_assistant_turns(tokenizer):
    messages = (
        ChatMessage("system", "Be brief."),
        ChatMessage("user", "Hi there"),
        ChatMessage("assistant", "Hello!"),
        ChatMessage("user", "Again"),
        ChatMessage("assistant", "skip me", weight=0),
        ChatMessage("user", "Once more"),
        ChatMessage("assistant", "Bye."),
    )
    ids, labels = tokenize_example(tokenizer, ChatExample(messages), 512)
    rendered = tokenizer.apply_chat_template(
        [{"role": m.role, "content": m.content} for m in messages], tokenize=False
    )
    assert ids == tokenizer(rendered, add_special_tokens=False)["input_ids"]
    eot = "<|end_of_turn|>"
    assert trained_text(tokenizer, ids, labels) == f"Hello!{eot}\nBye.{eot}\n"


@pytest.mark.parametrize("messages", [
    (ChatMessage("user", "a"), ChatMessage("assistant", "<|assistant|>\nb<|end_of_turn|>\n"), ChatMessage("user", "c"),
     ChatMessage("assistant", "b")),  # content that looks like the template's own markers
    (ChatMessage("system", ""), ChatMessage("user", ""), ChatMessage("assistant", ""), ChatMessage("user", "x"),
     ChatMessage("assistant", " é 🙂 tail ")),  # empty turns, leading spaces, multi-byte characters
    (ChatMessage("user", "same"), ChatMessage("assistant", "same", weight=0), ChatMessage("user", "same"),
     ChatMessage("assistant", "same")),
])
def test_chat_spans_found_in_one_rendering_equal_the_prefix_by_prefix_ones(tokenizer, messages):
    assert tokenize_example(tokenizer, ChatExample(messages), 4096) == _tokenize_chat_by_prefixes(tokenizer, ChatExample(messages))


def _long_chat(num_turns: int) -> ChatExample:
    pairs = [(ChatMessage("user", f"question {i}?"), ChatMessage("assistant", f"answer {i}.")) for i in range(num_turns)]
    return ChatExample(tuple(m for pair in pairs for m in pair))


def test_chat_tokenization_is_linear_in_the_number_of_turns(tokenizer):
    """Issue 20 finding 2: 500 turns took 2 s and 2,000 turns 32 s per example (every prefix rendered and
    tokenized). Now: one rendering, one tokenization (the message cap at upload is 256; these go beyond it)."""
    import time

    def seconds(num_turns: int) -> float:
        example, best = _long_chat(num_turns), float("inf")
        for _ in range(2):
            started = time.perf_counter()
            ids, labels = tokenize_example(tokenizer, example, 10**6)
            best = min(best, time.perf_counter() - started)
        assert sum(label != IGNORE_INDEX for label in labels) > num_turns  # every answer trained
        return best

    short, long = seconds(500), seconds(2000)
    print(f"\nchat tokenization: 500 turns {short * 1000:.0f} ms, 2,000 turns {long * 1000:.0f} ms")
    assert long < 2.0 and long / short < 8, (short, long)  # quadratic would be 16x


def test_a_cancel_stops_data_preparation_within_2_s(tokenizer):
    import threading
    import time

    lines = [{"messages": [{"role": m.role, "content": m.content} for m in _long_chat(120).messages]}] * 400
    dataset, cancelled, set_at = validate_jsonl(jsonl(*lines)), threading.Event(), []

    def cancel() -> None:
        set_at.append(time.monotonic())
        cancelled.set()

    threading.Timer(0.3, cancel).start()
    with pytest.raises(PreparationStopped):
        tokenize_dataset(tokenizer, dataset, 512, should_stop=cancelled.is_set)
    assert time.monotonic() - set_at[0] < 2.0


def test_truncation_is_counted_and_label_free_examples_dropped(tokenizer):
    long_prompt = PromptCompletion("word " * 40, " yes")
    fits = PromptCompletion("hi", " yes")
    tokenized = tokenize_dataset(tokenizer, validate_jsonl(jsonl(
        {"prompt": fits.prompt, "completion": fits.completion},
        {"prompt": long_prompt.prompt, "completion": long_prompt.completion},
        {"prompt": "", "completion": " yes " * 40},
    )), max_len=16)
    assert tokenized.num_truncated == 2 and tokenized.num_dropped == 1  # the long prompt lost its completion
    assert len(tokenized.examples) == 2 and all(len(ids) <= 16 for ids, _ in tokenized.examples)


# --- hyperparameters --------------------------------------------------------------------------------


def test_auto_resolves_to_documented_defaults():
    resolved = Hyperparameters().resolve(num_examples=200)
    assert (resolved.n_epochs, resolved.batch_size, resolved.learning_rate) == (8, 8, BASE_LEARNING_RATE * 10)
    assert resolved.lora_alpha == 2 * resolved.lora_r and resolved.num_steps == 25 * 8
    large = Hyperparameters().resolve(num_examples=20_000)  # big sets: 3 epochs at the base rate
    assert (large.n_epochs, large.learning_rate) == (3, BASE_LEARNING_RATE)
    assert Hyperparameters().resolve(150).n_epochs == 10 and Hyperparameters().resolve(5000).learning_rate_multiplier == 2.0
    with_replay = Hyperparameters().resolve(200, has_replay=True)  # a quarter as many replayed examples per epoch
    assert (with_replay.replay_fraction, with_replay.num_steps) == (0.25, 32 * 8)
    assert (resolved.max_forgetting_ratio, resolved.early_stopping_min_delta, resolved.beta) == (2.0, 0.0, 0.1)
    assert Hyperparameters().resolve(num_examples=3).batch_size == 3
    assert Hyperparameters(n_epochs=10, max_steps=7).resolve(200).num_steps == 7


@pytest.mark.parametrize(
    ("fields", "param"),
    [
        ({"n_epochs": 0}, "n_epochs"),
        ({"n_epochs": 51}, "n_epochs"),
        ({"n_epochs": "3"}, "n_epochs"),
        ({"n_epochs": 2.5}, "n_epochs"),
        ({"batch_size": 65}, "batch_size"),
        ({"batch_size": True}, "batch_size"),
        ({"learning_rate_multiplier": 0}, "learning_rate_multiplier"),
        ({"learning_rate_multiplier": 10.5}, "learning_rate_multiplier"),
        ({"learning_rate_multiplier": float("nan")}, "learning_rate_multiplier"),
        ({"learning_rate_multiplier": "fast"}, "learning_rate_multiplier"),
        ({"lora_r": 0}, "lora_r"),
        ({"early_stopping_min_delta": -0.1}, "early_stopping_min_delta"),
        ({"max_forgetting_ratio": 0.5}, "max_forgetting_ratio"),
        ({"replay_fraction": 1.5}, "replay_fraction"),
        ({"beta": 0}, "beta"),
        ({"lora_r": 65}, "lora_r"),
        ({"lora_alpha": 0}, "lora_alpha"),
        ({"lora_dropout": 0.6}, "lora_dropout"),
        ({"target_modules": ("q_proj", "lm_head")}, "target_modules"),
        ({"target_modules": ()}, "target_modules"),
        ({"target_modules": "q_proj"}, "target_modules"),
        ({"seed": -1}, "seed"),
        ({"max_steps": 0}, "max_steps"),
    ],
)
def test_bad_hyperparameters_name_the_field(fields, param):
    with pytest.raises(HyperparameterError) as info:
        Hyperparameters(**fields).validate()
    assert info.value.param == param and str(info.value).startswith(f"{param}: ")


def test_rank_is_bounded_by_the_serving_engine():
    Hyperparameters(lora_r=16).validate(max_lora_rank=16)
    with pytest.raises(HyperparameterError, match="between 1 and 16"):
        Hyperparameters(lora_r=32).validate(max_lora_rank=16)


def test_too_many_steps_are_refused():
    with pytest.raises(HyperparameterError) as info:
        Hyperparameters(n_epochs=50, batch_size=1).resolve(num_examples=10_000)
    assert info.value.param == "n_epochs"


def test_learning_rate_schedule_warms_up_then_decays():
    rates = [learning_rate_at(step, 100, 1.0) for step in range(100)]
    assert rates[0] == pytest.approx(0.2) and rates[4] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(rates[4:], rates[5:])) and rates[-1] < 0.02


def test_validate_jsonl_asks_should_stop_every_few_hundred_lines_and_stops():
    lines = [json.dumps({"prompt": f"p{i}", "completion": f" c{i}"}) for i in range(10 * LINES_PER_STOP_CHECK)]
    data = "\n".join(lines).encode()
    asked = []
    assert len(validate_jsonl(data, should_stop=lambda: asked.append(1) and False)) == len(lines)
    assert len(asked) == len(lines) // LINES_PER_STOP_CHECK  # often enough, and cheap
    asked.clear()
    with pytest.raises(PreparationStopped):
        validate_jsonl(data, should_stop=lambda: asked.append(1) or len(asked) == 3)
    assert len(asked) == 3  # stopped at the third check: the rest of the file is not parsed
