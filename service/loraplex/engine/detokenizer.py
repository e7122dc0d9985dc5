"""Incremental detokenization with stop strings, O(1) work per token.

The text of a completion is decode(prompt + output) minus decode(prompt). Decoding the output ids
alone is wrong on sentencepiece tokenizers (Llama 2, Mistral, TinyLlama): their decoder drops the
leading space of the first token, so "Lily wanted to" + "▁go" would read "go". Decoding the whole
sequence every step would be right but O(n^2). So each step decodes a short window of ids that starts
a few tokens before the text already read (in the prompt at first): both `decode(window[:read])` and
`decode(window)` treat the window's first token alike, so their difference is exactly the new text.
"""
from __future__ import annotations

NUM_CONTEXT_TOKENS = 5  # prompt tokens kept as context for the first output token
REPLACEMENT_CHAR = "\ufffd"  # what decode() gives for an incomplete UTF-8 sequence


class IncrementalDetokenizer:
    """Turns a growing list of output ids into text deltas, holding back partial stop strings."""

    def __init__(self, tokenizer, stop: tuple[str, ...] = (), prompt_ids: list[int] = ()):
        self.tokenizer = tokenizer
        self.stop = tuple(s for s in stop if s)
        self.max_stop_len = max((len(s) for s in self.stop), default=0)
        self.text = ""
        self.num_emitted_chars = 0
        self.is_stopped = False
        self._context = list(prompt_ids[-NUM_CONTEXT_TOKENS:])
        self._ids: list[int] = list(self._context)  # context + output ids seen so far
        self._prefix_offset = 0  # window start: decode(ids[prefix:read]) is text already read
        self._read_offset = len(self._ids)

    def append(self, output_ids: list[int]) -> str | None:
        """Add the newest token(s) (output_ids is the whole output). Returns the stop string hit, if any."""
        self._ids.extend(output_ids[len(self._ids) - len(self._context) :])
        prefix, full = self._window_texts()
        if len(full) <= len(prefix) or full.endswith(REPLACEMENT_CHAR):
            return None  # an incomplete UTF-8 sequence or a token with no text: wait for more
        previous_len = len(self.text)
        self.text += full[len(prefix) :]
        self._prefix_offset, self._read_offset = self._read_offset, len(self._ids)
        return self._truncate_at_stop(previous_len)

    def take_delta(self, is_finished: bool) -> str:
        """Text not yet emitted; while running, keep back what could be the start of a stop string.
        At the finish, text held back for an incomplete character is flushed as decode() gives it."""
        if is_finished:
            self._flush()
        end = len(self.text)
        if not is_finished and self.stop:
            end = max(self.num_emitted_chars, end - (self.max_stop_len - 1))
        delta = self.text[self.num_emitted_chars : end]
        self.num_emitted_chars = end
        return delta

    def _flush(self) -> None:
        if self.is_stopped or self._read_offset == len(self._ids):
            return
        prefix, full = self._window_texts()
        self.text += full[len(prefix) :]
        self._prefix_offset = self._read_offset = len(self._ids)

    def _window_texts(self) -> tuple[str, str]:
        window = self._ids[self._prefix_offset :]
        num_read = self._read_offset - self._prefix_offset
        return self._decode(window[:num_read]), self._decode(window)

    def _decode(self, token_ids: list[int]) -> str:
        return self.tokenizer.decode(token_ids, skip_special_tokens=True) if token_ids else ""

    def _truncate_at_stop(self, previous_len: int) -> str | None:
        if not self.stop:
            return None
        search_from = max(0, previous_len - self.max_stop_len + 1)
        hits = [(self.text.find(s, search_from), s) for s in self.stop]
        hits = [(i, s) for i, s in hits if i >= 0]
        if not hits:
            return None
        index, stop = min(hits)
        self.text = self.text[:index]
        self.is_stopped = True
        return stop
