"""Contamination audit: does the validation data repeat the data the adapter trains on?

Before training, every validation example is compared with the training file (and with the replay
file): an exact duplicate is the same example (same text in every field); an n-gram overlap is an
example sharing at least one run of NGRAM words with the other file (an example shorter than NGRAM
words counts as one n-gram of its own length). Counts and shares of the validation examples go into an
event and the job's `evaluation`; above WARN_SHARE the event is a warning: the validation score then
partly measures memorisation, not generalisation.
"""
from __future__ import annotations

from typing import Any

from loraplex.training.datasets import ChatExample, ParsedDataset, PromptCompletion

NGRAM = 8
WARN_SHARE = 0.1


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


def compare(validation: ParsedDataset, other: ParsedDataset) -> dict[str, Any]:
    """How many validation examples repeat `other` exactly, and how many share an n-gram with it."""
    texts = {example_text(example) for example in other.examples}
    other_ngrams = set().union(*(ngrams(text) for text in texts)) if texts else set()
    num_duplicates = num_overlapping = 0
    for example in validation.examples:
        text = example_text(example)
        num_duplicates += text in texts
        num_overlapping += not ngrams(text).isdisjoint(other_ngrams)
    total = max(1, len(validation))
    return {"num_valid_examples": len(validation), "num_exact_duplicates": num_duplicates,
            "exact_duplicate_share": num_duplicates / total, "num_ngram_overlaps": num_overlapping,
            "ngram_overlap_share": num_overlapping / total}


def audit(train: ParsedDataset, validation: ParsedDataset | None, replay: ParsedDataset | None) -> dict[str, Any] | None:
    """The `evaluation.contamination` record; None without validation data."""
    if validation is None or not len(validation):
        return None
    record: dict[str, Any] = {"ngram": NGRAM, "warn_share": WARN_SHARE,
                              "validation_vs_training": compare(validation, train),
                              "validation_vs_replay": compare(validation, replay) if replay is not None else None}
    shares = [part["exact_duplicate_share"] for part in _parts(record)] + [part["ngram_overlap_share"] for part in _parts(record)]
    record["warned"] = max(shares) > WARN_SHARE
    return record


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
