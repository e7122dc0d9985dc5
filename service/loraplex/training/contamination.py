"""Contamination audit: does the validation data repeat the data the adapter trains on?

Before training, every validation example is compared with the training file (and with the replay
file): an exact duplicate is the same example (same text in every field); an n-gram overlap is an
example sharing at least one run of NGRAM words with the other file (an example shorter than NGRAM
words counts as one n-gram of its own length). Counts and shares of the validation examples go into an
event and the job's `evaluation`; above WARN_SHARE the event is a warning: the validation score then
partly measures memorisation, not generalisation.
"""
from __future__ import annotations

from collections.abc import Callable
from typing import Any

from loraplex.training.datasets import ChatExample, ParsedDataset, PreparationStopped, PromptCompletion

NGRAM = 8
WARN_SHARE = 0.1
EXAMPLES_PER_STOP_CHECK = 256  # 60k examples take seconds: a cancel must not wait for all of them


def example_text(example) -> str:
    """Every field of an example, in order, joined by newlines."""
    if isinstance(example, PromptCompletion):
        return f"{example.prompt}\n{example.completion}"
    if isinstance(example, ChatExample):
        return "\n".join(f"{m.role}: {m.content}" for m in example.messages)
    messages = "\n".join(f"{m.role}: {m.content}" for m in example.messages)  # a preference pair
    return f"{messages}\n{example.preferred}\n{example.rejected}"


def ngrams(text: str, n: int = NGRAM) -> set[tuple[str, ...]]:
    words = text.lower().split()
    if len(words) < n:
        return {tuple(words)} if words else set()
    return {tuple(words[i : i + n]) for i in range(len(words) - n + 1)}


def compare(validation: ParsedDataset, other: ParsedDataset, should_stop: Callable[[], bool] = lambda: False,
            ) -> dict[str, Any]:
    """How many validation examples repeat `other` exactly, and how many share an n-gram with it.
    PreparationStopped as soon as `should_stop()` says so (asked every EXAMPLES_PER_STOP_CHECK examples)."""
    texts = {example_text(example) for example in other.examples}
    other_ngrams: set[tuple[str, ...]] = set()
    for index, text in enumerate(texts):
        _check(index, should_stop)
        other_ngrams |= ngrams(text)
    num_duplicates = num_overlapping = 0
    for index, example in enumerate(validation.examples):
        _check(index, should_stop)
        text = example_text(example)
        num_duplicates += text in texts
        num_overlapping += not ngrams(text).isdisjoint(other_ngrams)
    total = max(1, len(validation))
    return {"num_valid_examples": len(validation), "num_exact_duplicates": num_duplicates,
            "exact_duplicate_share": num_duplicates / total, "num_ngram_overlaps": num_overlapping,
            "ngram_overlap_share": num_overlapping / total}


def audit(train: ParsedDataset, validation: ParsedDataset | None, replay: ParsedDataset | None,
          should_stop: Callable[[], bool] = lambda: False) -> dict[str, Any] | None:
    """The `evaluation.contamination` record; None without validation data."""
    if validation is None or not len(validation):
        return None
    record: dict[str, Any] = {"ngram": NGRAM, "warn_share": WARN_SHARE,
                              "validation_vs_training": compare(validation, train, should_stop),
                              "validation_vs_replay": compare(validation, replay, should_stop) if replay is not None else None}
    shares = [part["exact_duplicate_share"] for part in _parts(record)] + [part["ngram_overlap_share"] for part in _parts(record)]
    record["warned"] = max(shares) > WARN_SHARE
    return record


def _check(index: int, should_stop: Callable[[], bool]) -> None:
    if index % EXAMPLES_PER_STOP_CHECK == 0 and should_stop():
        raise PreparationStopped


def _parts(record: dict[str, Any]) -> list[dict[str, Any]]:
    return [record[key] for key in ("validation_vs_training", "validation_vs_replay") if record[key] is not None]


def describe(record: dict[str, Any]) -> str:
    """One sentence per compared file, and the warning when there is one."""
    sentences = []
    for key, name in (("validation_vs_training", "the training file"), ("validation_vs_replay", "the replay file")):
        part = record[key]
        if part is not None:
            sentences.append(
                f"{part['num_exact_duplicates']} of {part['num_valid_examples']} validation examples "
                f"({part['exact_duplicate_share']:.1%}) are exact duplicates of {name}, {part['num_ngram_overlaps']} "
                f"({part['ngram_overlap_share']:.1%}) share a {record['ngram']}-gram with it")
    text = "Contamination audit: " + "; ".join(sentences) + "."
    if record["warned"]:
        text += (f" Above {record['warn_share']:.0%}: the validation score partly measures memorised examples "
                 f"and is not trustworthy.")
    return text
