"""Incremental detokenization with stop strings, O(1) work per token."""
from __future__ import annotations


class IncrementalDetokenizer:
    """Turns a growing list of token ids into text deltas, holding back partial stop strings."""

    def __init__(self, tokenizer, stop: tuple[str, ...] = ()):
        self.tokenizer = tokenizer
        self.stop = tuple(s for s in stop if s)
        self.max_stop_len = max((len(s) for s in self.stop), default=0)
        self.text = ""
        self.num_emitted_chars = 0
        self._prefix_offset = 0
        self._read_offset = 0

    def append(self, token_ids: list[int]) -> str | None:
        """Add the newest token (token_ids is the whole output). Returns the stop string hit, if any."""
        prefix = self._decode(token_ids[self._prefix_offset : self._read_offset])
        full = self._decode(token_ids[self._prefix_offset :])
        if len(full) <= len(prefix) or full.endswith("\ufffd"):
            return None  # an incomplete UTF-8 sequence or a token with no text: wait
        previous_len = len(self.text)
        self.text += full[len(prefix) :]
        self._prefix_offset, self._read_offset = self._read_offset, len(token_ids)
        return self._truncate_at_stop(previous_len)

    def take_delta(self, is_finished: bool) -> str:
        """Text not yet emitted; while running, keep back what could be the start of a stop string."""
        end = len(self.text)
        if not is_finished and self.stop:
            end = max(self.num_emitted_chars, end - (self.max_stop_len - 1))
        delta = self.text[self.num_emitted_chars : end]
        self.num_emitted_chars = end
        return delta

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
        return stop
