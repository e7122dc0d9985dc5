"""PEFT's module-name patterns, matched in linear time.

An adapter config names modules by regex in three places: `rank_pattern` and `alpha_pattern` keys
(PEFT: `re.match(rf"(.*\\.)?({key})$", module_path)`, the first key that matches wins) and a string
`target_modules` (PEFT: `re.fullmatch(target_modules, module_path)`). The same semantics are kept here,
but the patterns are compiled with RE2, which matches in time linear in the text: a tenant's `(.+)+X`
cannot hold the interpreter (Python's backtracking `re` takes minutes on it). What RE2 cannot compile
(backreferences, lookarounds, `\\Z`...), what is not a regex at all (`(`) and what exceeds the size
limits below is refused with a `PatternError` naming the field and the key, so an adapter accepted at
upload is one every later use can match.

Engine, registry upload validation and the read-only store all call this module: one rule for all.
"""
from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import re2

MAX_PATTERN_CHARS = 256  # a real key is a module path suffix or a short alternation
MAX_PATTERN_KEYS = 256  # per rank_pattern / alpha_pattern: one key per module of a 32-layer q/k/v/o model fits
_MAX_PROGRAM_BYTES = 1 << 20  # RE2's compile memory for one pattern; bigger programs fail to compile

_OPTIONS = re2.Options()
_OPTIONS.max_mem = _MAX_PROGRAM_BYTES
_OPTIONS.log_errors = False  # a refused pattern is the caller's error, not a server log line
_OPTIONS.never_capture = True  # only "does it match" is asked; no submatch bookkeeping


class PatternError(ValueError):
    """A pattern that cannot be matched safely; `field` is the config field (`rank_pattern`...)."""

    def __init__(self, field: str, pattern: Any, reason: str):
        what = field if field == "target_modules" else f"{field} key"
        super().__init__(f"{what} {_shown(pattern)} {reason}")
        self.field = field


class ModuleRegex:
    """One compiled pattern; `fullmatch(module_path)` runs in linear time."""

    def __init__(self, field: str, pattern: str, wrapped: str | None = None):
        if not isinstance(pattern, str):
            raise PatternError(field, pattern, "must be a string")
        if len(pattern) > MAX_PATTERN_CHARS:
            raise PatternError(field, pattern, f"is longer than {MAX_PATTERN_CHARS} characters")
        _compile(field, pattern, pattern)  # the key must be a regex on its own, not only once wrapped
        self._regex = _compile(field, pattern, wrapped or pattern)

    def fullmatch(self, module_path: str) -> bool:
        return self._regex.fullmatch(module_path) is not None


class PatternTable:
    """rank_pattern / alpha_pattern: ordered key -> value; `lookup` gives PEFT's first matching key's value."""

    def __init__(self, field: str, patterns: Any):
        patterns = {} if patterns is None else patterns
        if not isinstance(patterns, Mapping):
            raise PatternError(field, patterns, "must be an object mapping module patterns to values")
        if len(patterns) > MAX_PATTERN_KEYS:
            raise PatternError(field, f"<{len(patterns)} keys>", f"exceeds the limit of {MAX_PATTERN_KEYS} keys")
        # PEFT wraps each key as `(.*\.)?(key)$`: the key matches the whole path or a suffix after a dot.
        self._entries = [(ModuleRegex(field, key, rf"(?:.*\.)?(?:{key})"), value) for key, value in patterns.items()]

    def lookup(self, module_path: str, default: Any) -> Any:
        for regex, value in self._entries:
            if regex.fullmatch(module_path):
                return value
        return default


def _compile(field: str, pattern: str, text: str):
    try:
        return re2.compile(text, _OPTIONS)
    except re2.error as exc:
        raise PatternError(field, pattern, f"is not a regex this server can match in linear time (RE2: {_reason(exc)})") from None


def _reason(exc: Exception) -> str:
    reason = exc.args[0] if exc.args else "invalid"
    return reason.decode("utf-8", "replace") if isinstance(reason, bytes) else str(reason)


def _shown(pattern: Any) -> str:
    text = repr(pattern)
    return text if len(text) <= 80 else text[:77] + "..."
