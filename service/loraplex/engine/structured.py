"""Structured outputs with llguidance: a guide (JSON schema, regex, choice) compiles once into a matcher
template, cached by its text; each constrained request decodes with its own copy. Every step the
matchers fill one bitmask row each (in parallel, off the GIL), the mask sends disallowed logits to -inf
for those rows only, and each matcher consumes its row's sampled token. Free rows are untouched.

Compilation is bounded: the guide's text by MAX_GUIDE_CHARS, the grammar and lexer by llguidance's
parser limits (size, lexer states, fuel per step); a guide over them is refused as invalid.
"""
from __future__ import annotations

import json
import threading
from collections import OrderedDict

import llguidance
import torch

from loraplex.engine.errors import InvalidRequestError
from loraplex.engine.types import Guide

MAX_GUIDE_CHARS = 32_000  # a schema, regex or choice list longer than this is refused before compiling
MAX_CACHED_GRAMMARS = 256
_LIMITS = dict(max_grammar_size=100_000, max_lexer_states=50_000, initial_lexer_fuel=1_000_000,
               step_lexer_fuel=200_000, step_max_items=50_000, verbose_errors=False)
_JSON_OPTIONS = {"whitespace_flexible": False}  # compact JSON: a weak model cannot pad it with spaces forever


class GrammarCompiler:
    """Guide -> validated matcher template, LRU-cached. Thread-safe (the API warms it, the engine uses it)."""

    def __init__(self, tokenizer, vocab_size: int, max_cached: int = MAX_CACHED_GRAMMARS):
        self._hf_tokenizer, self.vocab_size, self.max_cached = tokenizer, vocab_size, max_cached
        self._ll_tokenizer: llguidance.LLTokenizer | None = None
        self._templates: OrderedDict[Guide, llguidance.LLMatcher] = OrderedDict()
        self._lock = threading.Lock()

    def compile(self, guide: Guide) -> llguidance.LLMatcher:
        """The guide's template matcher; raises InvalidRequestError naming what is wrong with it."""
        with self._lock:
            template = self._templates.get(guide)
            if template is not None:
                self._templates.move_to_end(guide)
                return template
        template = self._build(guide)
        with self._lock:
            self._templates[guide] = template
            while len(self._templates) > self.max_cached:
                self._templates.popitem(last=False)
        return template

    def new_matcher(self, guide: Guide) -> llguidance.LLMatcher:
        return self.compile(guide).deep_copy()

    def _tokenizer(self) -> llguidance.LLTokenizer:
        if self._ll_tokenizer is None:
            import llguidance.hf  # imports transformers: only when a guide is first used

            try:
                self._ll_tokenizer = llguidance.hf.from_tokenizer(self._hf_tokenizer, n_vocab=self.vocab_size)
            except ValueError as exc:
                raise InvalidRequestError(f"structured outputs are not available for this tokenizer: {exc}") from None
        return self._ll_tokenizer

    def _build(self, guide: Guide) -> llguidance.LLMatcher:
        if len(guide.spec) > MAX_GUIDE_CHARS:
            raise InvalidRequestError(f"the {_NAMES[guide.kind]} is {len(guide.spec)} characters long; "
                                      f"the limit is {MAX_GUIDE_CHARS}")
        grammar = _grammar(guide)
        tokenizer, limits = self._tokenizer(), llguidance.LLParserLimits(**_LIMITS)
        error = llguidance.LLMatcher.validate_grammar(grammar, tokenizer, limits=limits)
        if error:
            raise InvalidRequestError(f"invalid {_NAMES[guide.kind]}: {_first_line(error)}")
        matcher = llguidance.LLMatcher(tokenizer, grammar, log_level=0, limits=limits)
        if matcher.is_error():
            raise InvalidRequestError(f"invalid {_NAMES[guide.kind]}: {_first_line(matcher.get_error())}")
        return matcher


_NAMES = {"json_schema": "JSON schema", "regex": "regular expression", "choice": "choice list", "lark": "grammar"}


def _grammar(guide: Guide) -> str:
    """The llguidance grammar text for a guide (ValueError from llguidance becomes a 400)."""
    try:
        if guide.kind == "json_schema":
            return llguidance.LLMatcher.grammar_from_json_schema(guide.spec, defaults=_JSON_OPTIONS)
        if guide.kind == "regex":
            return llguidance.LLMatcher.grammar_from_regex(guide.spec)
        if guide.kind == "choice":
            return llguidance.LLMatcher.grammar_from_lark("start: " + " | ".join(map(json.dumps, _choices(guide))))
        return llguidance.LLMatcher.grammar_from_lark(guide.spec)
    except ValueError as exc:
        raise InvalidRequestError(f"invalid {_NAMES[guide.kind]}: {_first_line(str(exc))}") from None


def _choices(guide: Guide) -> list[str]:
    choices = json.loads(guide.spec)
    if not choices or not all(isinstance(c, str) and c for c in choices):
        raise InvalidRequestError("a choice list must hold at least one non-empty string")
    return choices


def _first_line(message: str) -> str:
    return message.strip().splitlines()[0][:300] if message.strip() else "rejected by the grammar compiler"


class GuidedRows:
    """The matchers of the running constrained requests, and the per-step mask / advance."""

    def __init__(self, compiler: GrammarCompiler, num_threads: int = 2):
        self.compiler = compiler
        self._matchers: dict[str, llguidance.LLMatcher] = {}
        self._executor = llguidance.LLExecutor(num_threads=num_threads)

    def release(self, request_id: str) -> None:
        self._matchers.pop(request_id, None)

    def mask(self, logits: torch.Tensor, rows: list[int], request_ids: list[str], guides: list[Guide]) -> torch.Tensor:
        """logits [n, V] -> logits [n, V] where `rows` (the constrained rows) have -inf on the tokens their
        grammar forbids."""
        matchers = [self._matcher(r, g) for r, g in zip(request_ids, guides)]
        num_words = (self.compiler.vocab_size + 31) // 32
        bitmask = torch.zeros((len(rows), num_words), dtype=torch.int32)  # [m, W] one bit per token
        self._executor.unsafe_compute_mask_ptr([(m, j) for j, m in enumerate(matchers)], bitmask.data_ptr(),
                                               num_words * 4, len(rows))
        shifts = torch.arange(32, dtype=torch.int32)
        bits = (bitmask.unsqueeze(-1) >> shifts) & 1  # [m, W, 32]
        allowed = bits.reshape(len(rows), -1)[:, : logits.shape[1]].bool().to(logits.device)  # [m, V]
        index = torch.tensor(rows, device=logits.device)
        return logits.index_put((index,), logits[index].masked_fill(~allowed, float("-inf")))

    def advance(self, request_ids: list[str], tokens: list[int]) -> list[bool]:
        """Each matcher consumes its row's token; True where the grammar is complete (the request ends)."""
        done = []
        for request_id, token in zip(request_ids, tokens):
            matcher = self._matchers[request_id]
            is_ok = matcher.consume_token(token)
            done.append(not is_ok or matcher.is_stopped())
        return done

    def _matcher(self, request_id: str, guide: Guide) -> llguidance.LLMatcher:
        matcher = self._matchers.get(request_id)
        if matcher is None:
            matcher = self._matchers[request_id] = self.compiler.new_matcher(guide)
        return matcher
