"""The per-example token cap, checked when a training file is uploaded.

The upload has the served base model's tokenizer (the API process loaded it with the engine), so the cap is
exact: an example's tokens are those of its texts (prompt and completion, or every message's content; a
preference pair's prompt messages and both answers), the chat template's few markers per turn not counted
(the message count is capped on its own). Tokenizing a whole 32 MB upload would cost seconds, so it is
skipped where it cannot matter: each token of a byte-level or byte-fallback tokenizer covers at least one
byte of text (plus, at most, one prefix token per text), so an example whose UTF-8 bytes plus one per text
fit the cap fits it without being tokenized. Only the longer examples are tokenized, in one batch call.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence

from loraplex.training.datasets import ChatExample, DatasetError, Example, ParsedDataset, PromptCompletion
from loraplex.training.preference import PreferenceExample

CountTokens = Callable[[list[str]], list[int]]  # texts -> tokens of each, without special tokens


def token_counter(tokenizer) -> CountTokens:
    """Counts with a Hugging Face tokenizer (a fast one batches in Rust)."""
    def count(texts: list[str]) -> list[int]:
        return [len(ids) for ids in tokenizer(texts, add_special_tokens=False)["input_ids"]]
    return count


def check_example_tokens(dataset: ParsedDataset, count_tokens: CountTokens, max_tokens: int) -> None:
    """DatasetError naming every line (up to the reporting limit) whose example has more than `max_tokens`."""
    long_ones = [(line, texts) for line, texts in zip(dataset.line_numbers, map(example_texts, dataset.examples))
                 if upper_bound(texts) > max_tokens]
    if not long_ones:
        return
    counts = iter(count_tokens([text for _, texts in long_ones for text in texts]))
    problems = []
    for line, texts in long_ones:
        num_tokens = sum(next(counts) for _ in texts)
        if num_tokens > max_tokens:
            problems.append((line, f"the example has {num_tokens} tokens, more than the limit of {max_tokens} "
                                   f"tokens per example; shorten or split it"))
    if problems:
        raise DatasetError(problems)


def upper_bound(texts: Sequence[str]) -> int:
    """At least the number of tokens of `texts` (one byte or more per token, one prefix token per text)."""
    return sum(len(text.encode("utf-8", "surrogatepass")) + 1 for text in texts)


def example_texts(example: Example | PreferenceExample) -> list[str]:
    if isinstance(example, PromptCompletion):
        return [example.prompt, example.completion]
    if isinstance(example, ChatExample):
        return [message.content for message in example.messages]
    return [*(message.content for message in example.messages), example.preferred, example.rejected]
