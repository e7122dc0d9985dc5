"""Preference pairs for DPO, in OpenAI's file shape, one per line:

    {"input": {"messages": [{"role": "user", "content": "..."}]},
     "preferred_output": [{"role": "assistant", "content": "..."}],
     "non_preferred_output": [{"role": "assistant", "content": "..."}]}

Each pair becomes two chat examples that share the prompt: the conversation followed by the preferred
answer, and followed by the rejected one. Only the answer carries labels, so a sequence's summed label
log-probability is log p(answer | prompt), the quantity the DPO loss compares.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from loraplex.training.datasets import ChatExample, ChatMessage, _parse_message, tokenize_example

PAIR_KEYS = {"input", "preferred_output", "non_preferred_output"}


@dataclass(frozen=True)
class PreferenceExample:
    messages: tuple[ChatMessage, ...]  # the prompt conversation
    preferred: str
    rejected: str

    def as_chats(self) -> tuple[ChatExample, ChatExample]:
        return (ChatExample((*self.messages, ChatMessage("assistant", self.preferred))),
                ChatExample((*self.messages, ChatMessage("assistant", self.rejected))))


def parse_preference(obj: dict[str, Any]) -> PreferenceExample:
    unknown = sorted(set(obj) - PAIR_KEYS)
    if unknown:
        raise ValueError(f"unknown keys {unknown} in a preference pair; expected {sorted(PAIR_KEYS)}")
    prompt = obj.get("input")
    if not isinstance(prompt, dict) or not isinstance(prompt.get("messages"), list) or not prompt["messages"]:
        raise ValueError("'input' must be an object with a non-empty 'messages' list")
    if set(prompt) - {"messages"}:
        raise ValueError(f"unsupported keys in 'input': {sorted(set(prompt) - {'messages'})} (tools are not supported)")
    messages = tuple(_parse_message(i, message) for i, message in enumerate(prompt["messages"]))
    if any(m.role == "assistant" and not m.weight for m in messages):
        raise ValueError("'input' messages take no weight: only the outputs are trained")
    preferred = _single_answer(obj.get("preferred_output"), "preferred_output")
    rejected = _single_answer(obj.get("non_preferred_output"), "non_preferred_output")
    if preferred == rejected:
        raise ValueError("preferred_output and non_preferred_output are the same: nothing to prefer")
    return PreferenceExample(messages, preferred, rejected)


def _single_answer(output: Any, key: str) -> str:
    if not isinstance(output, list) or len(output) != 1:
        raise ValueError(f"'{key}' must be a list holding one assistant message")
    message = _parse_message(0, output[0])
    if message.role != "assistant" or not message.content:
        raise ValueError(f"'{key}' must hold one non-empty assistant message")
    return message.content


def tokenize_pair(tokenizer, example: PreferenceExample, max_len: int) -> tuple[tuple[list[int], list[int]], ...]:
    """((ids, labels) preferred, (ids, labels) rejected), each cut to `max_len`."""
    preferred, rejected = example.as_chats()
    return tokenize_example(tokenizer, preferred, max_len), tokenize_example(tokenizer, rejected, max_len)
