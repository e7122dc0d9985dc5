"""Training files: check an uploaded JSONL file, then turn its examples into masked token sequences.

A file holds one example per line, all of one form:

- prompt/completion: `{"prompt": "...", "completion": "..."}`; the loss covers the completion + EOS.
- chat: `{"messages": [{"role": "system"|"user"|"assistant", "content": "...", "weight": 0|1}, ...]}`;
  the loss covers each assistant turn (content + end-of-turn) whose `weight` is not 0, as in OpenAI's
  format. The conversation must start with a system or user message, end with an assistant turn, and hold
  at most `MAX_CHAT_MESSAGES` messages.

Chat examples are tokenized in time linear in their length: the conversation is rendered and tokenized once,
and the trained spans are found in the text from the template's assistant header and end-of-turn (learned
from a probe conversation), then checked against the exact prefix renderings of the first and last assistant
turns. A template that fails the check falls back to rendering every prefix (quadratic, but the message cap
bounds it). Every line is at most `max_line_bytes` (256 KB), which also bounds its tokens (each token of a
byte-level tokenizer covers at least one byte). `tokenize_dataset` polls `should_stop` between examples, so
a cancel is honoured while the data is prepared.

Validation reads every line and reports up to `MAX_REPORTED_PROBLEMS` problems with 1-based line
numbers (0 for the file as a whole), so a user fixes a file in one round trip, not one line at a time.
"""
from __future__ import annotations

import bisect
import functools
import json
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

from loraplex.errors import LoraplexError

PROMPT_COMPLETION = "prompt_completion"
CHAT = "chat"
PREFERENCE = "preference"  # OpenAI's DPO pairs, parsed in `preference`
DatasetFormat = Literal["prompt_completion", "chat", "preference"]

ROLES = ("system", "user", "assistant")
IGNORE_INDEX = -100  # labels with this value carry no loss (torch's cross_entropy default)
MAX_REPORTED_PROBLEMS = 20
DEFAULT_MAX_BYTES = 64 << 20
DEFAULT_MAX_LINES = 100_000
DEFAULT_MAX_LINE_BYTES = 256 << 10
MAX_CHAT_MESSAGES = 256
_PROBE_USER = "Probe question?"
_PROBE_ANSWER = "Probe answer."


LINES_PER_STOP_CHECK = 256  # ~40 us of parsing each: a cancel is seen at once, the check costs nothing


class PreparationStopped(Exception):
    """`should_stop()` returned True while the data was being parsed or tokenized."""


class DatasetError(LoraplexError, ValueError):
    """A training file is refused. `problems` lists (line number, message), line 0 meaning the whole file.
    `param` is the upload's form field; a job that finds its file bad names `training_file` instead."""

    status = 400
    code = "invalid_file_format"
    param = "file"

    def __init__(self, problems: list[tuple[int, str]], num_problems: int | None = None):
        self.problems = problems[:MAX_REPORTED_PROBLEMS]
        self.num_problems = max(num_problems or 0, len(problems))
        super().__init__(self._summary())

    def _summary(self) -> str:
        shown = "; ".join(f"line {line}: {msg}" if line else msg for line, msg in self.problems)
        more = self.num_problems - len(self.problems)
        suffix = f" (and {more} more)" if more > 0 else ""
        return f"invalid training file, {self.num_problems} problem(s): {shown}{suffix}"


@dataclass(frozen=True)
class ChatMessage:
    role: str
    content: str
    weight: int = 1  # 0: an assistant turn shown as context but not trained on


@dataclass(frozen=True)
class PromptCompletion:
    prompt: str
    completion: str


@dataclass(frozen=True)
class ChatExample:
    messages: tuple[ChatMessage, ...]


Example = PromptCompletion | ChatExample  # and preference.PreferenceExample in a preference file


@dataclass(frozen=True)
class ParsedDataset:
    format: DatasetFormat
    examples: tuple[Example, ...]
    num_bytes: int
    line_numbers: tuple[int, ...] = ()  # 1-based line of each example in the file, as validated

    def __len__(self) -> int:
        return len(self.examples)


@dataclass(frozen=True)
class TokenizedDataset:
    """Examples as (input_ids, labels); `num_truncated` were cut to max_len, `num_dropped` lost every label."""

    examples: tuple[tuple[list[int], list[int]], ...]
    num_truncated: int
    num_dropped: int

    @property
    def num_tokens(self) -> int:
        return sum(len(ids) for ids, _ in self.examples)


def validate_jsonl(
    data: bytes,
    max_bytes: int = DEFAULT_MAX_BYTES,
    max_lines: int = DEFAULT_MAX_LINES,
    max_line_bytes: int = DEFAULT_MAX_LINE_BYTES,
    should_stop: Callable[[], bool] | None = None,
) -> ParsedDataset:
    """Parse and check a whole JSONL training file; raises DatasetError listing what is wrong.
    PreparationStopped as soon as `should_stop()` says so (asked every LINES_PER_STOP_CHECK lines: a
    32 MB file takes seconds to parse, and the worker re-parses it while the job is `validating_files`)."""
    if len(data) > max_bytes:
        raise DatasetError([(0, f"file is {len(data)} bytes, more than the limit of {max_bytes} bytes")])
    problems = _Problems()
    examples: list[Example] = []
    line_numbers: list[int] = []
    first_form: tuple[int, DatasetFormat] | None = None  # the line that decided the file's form
    num_lines = 0
    for line_no, raw in enumerate(data.split(b"\n"), start=1):
        if should_stop is not None and line_no % LINES_PER_STOP_CHECK == 0 and should_stop():
            raise PreparationStopped()
        if not raw.strip():
            continue  # blank lines (a trailing newline, CRLF leftovers) are not examples
        num_lines += 1
        if num_lines > max_lines:
            problems.add(line_no, f"more than {max_lines} examples; split the file or remove lines")
            break
        try:
            form, example = _parse_line(raw, max_line_bytes)
        except ValueError as exc:
            problems.add(line_no, str(exc))
            continue
        if first_form is None:
            first_form = (line_no, form)
        elif form != first_form[1]:
            problems.add(line_no, f"{_FORM_NAMES[form]} example, but line {first_form[0]} is "
                                  f"{_FORM_NAMES[first_form[1]]}: a file holds one form only")
            continue
        examples.append(example)
        line_numbers.append(line_no)
    if not problems.count and not examples:
        problems.add(0, "file holds no examples")
    if problems.count:
        raise DatasetError(problems.shown, num_problems=problems.count)
    return ParsedDataset(first_form[1], tuple(examples), len(data), tuple(line_numbers))


class _Problems:
    """Keeps the first MAX_REPORTED_PROBLEMS, counts them all (a broken 100k-line file stays cheap)."""

    def __init__(self):
        self.shown: list[tuple[int, str]] = []
        self.count = 0

    def add(self, line_no: int, message: str) -> None:
        self.count += 1
        if len(self.shown) < MAX_REPORTED_PROBLEMS:
            self.shown.append((line_no, message))


_FORM_NAMES = {PROMPT_COMPLETION: "a prompt/completion", CHAT: "a chat (messages)", PREFERENCE: "a preference pair"}


def _parse_line(raw: bytes, max_line_bytes: int) -> tuple[DatasetFormat, Example]:
    if len(raw) > max_line_bytes:
        raise ValueError(f"line is {len(raw)} bytes, more than the limit of {max_line_bytes} bytes")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ValueError(f"not valid UTF-8 (byte {exc.start})") from None
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ValueError(f"invalid JSON: {exc.msg} (column {exc.colno})") from None
    except RecursionError:  # not a ValueError: it would escape as a server error
        raise ValueError("invalid JSON: nested too deeply") from None
    if not isinstance(obj, dict):
        raise ValueError("each line must be a JSON object")
    if "input" in obj or "preferred_output" in obj or "non_preferred_output" in obj:
        from loraplex.training.preference import parse_preference  # it builds on this module's parsers

        return PREFERENCE, parse_preference(obj)
    has_chat = "messages" in obj
    has_completion = "prompt" in obj or "completion" in obj
    if has_chat and has_completion:
        raise ValueError("a line holds either 'messages' or 'prompt'/'completion', not both")
    if has_chat:
        return CHAT, _parse_chat(obj["messages"])
    if has_completion:
        return PROMPT_COMPLETION, _parse_prompt_completion(obj)
    raise ValueError("expected 'messages' (chat) or 'prompt' and 'completion' keys")


def _parse_prompt_completion(obj: dict[str, Any]) -> PromptCompletion:
    for key in ("prompt", "completion"):
        if not isinstance(obj.get(key), str):
            raise ValueError(f"'{key}' must be a string")
        _require_unicode(obj[key], f"'{key}'")
    if not obj["completion"]:
        raise ValueError("'completion' is empty: there is nothing to train on")
    return PromptCompletion(obj["prompt"], obj["completion"])


def _parse_chat(messages: Any) -> ChatExample:
    if not isinstance(messages, list) or not messages:
        raise ValueError("'messages' must be a non-empty list")
    if len(messages) > MAX_CHAT_MESSAGES:
        raise ValueError(f"{len(messages)} messages, more than the limit of {MAX_CHAT_MESSAGES} per example; "
                         "split the conversation")
    parsed = tuple(_parse_message(i, message) for i, message in enumerate(messages))
    if parsed[-1].role != "assistant":
        raise ValueError("the last message must be from the assistant (it is what the model learns to write)")
    if parsed[0].role == "assistant":
        raise ValueError("the first message must be from the system or the user (there is nothing before "
                         "the assistant's turn to answer)")
    if not any(m.role == "assistant" and m.weight for m in parsed):
        raise ValueError("no assistant message with weight 1: there is nothing to train on")
    return ChatExample(parsed)


def _parse_message(index: int, message: Any) -> ChatMessage:
    where = f"messages[{index}]"
    if not isinstance(message, dict):
        raise ValueError(f"{where} must be an object with 'role' and 'content'")
    role = message.get("role")
    if role not in ROLES:
        raise ValueError(f"{where}.role is {role!r}; expected one of {', '.join(ROLES)}")
    if not isinstance(message.get("content"), str):
        raise ValueError(f"{where}.content must be a string")
    _require_unicode(message["content"], f"{where}.content")
    weight = message.get("weight", 1)
    if weight not in (0, 1) or isinstance(weight, bool):
        raise ValueError(f"{where}.weight must be 0 or 1")
    if weight == 0 and role != "assistant":
        raise ValueError(f"{where}.weight is only meaningful on assistant messages")
    return ChatMessage(role, message["content"], weight)


def _require_unicode(text: str, where: str) -> None:
    """JSON can escape a lone surrogate (`"\\ud800"`); no tokenizer can encode one."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise ValueError(f"{where} is not valid Unicode (a lone surrogate at character {exc.start})") from None


def tokenize_example(tokenizer, example: Example, max_len: int) -> tuple[list[int], list[int]]:
    """(input_ids, labels) cut to `max_len`; labels are IGNORE_INDEX on everything the model is given."""
    if isinstance(example, PromptCompletion):
        input_ids, labels = _tokenize_prompt_completion(tokenizer, example)
    else:
        input_ids, labels = _tokenize_chat(tokenizer, example)
    return input_ids[:max_len], labels[:max_len]


def tokenize_dataset(tokenizer, dataset: ParsedDataset, max_len: int,
                     should_stop: Callable[[], bool] | None = None) -> TokenizedDataset:
    """Tokenize every example; one that truncation leaves with no trained token is dropped and counted.
    PreparationStopped as soon as `should_stop()` says so (it is asked before every example)."""
    kept, num_truncated, num_dropped = [], 0, 0
    for example in dataset.examples:
        if should_stop is not None and should_stop():
            raise PreparationStopped()
        input_ids, labels = tokenize_example(tokenizer, example, max_len + 1)
        if len(input_ids) > max_len:
            num_truncated += 1
            input_ids, labels = input_ids[:max_len], labels[:max_len]
        # The first label is never predicted (nothing precedes it), so it does not count as trained.
        if all(label == IGNORE_INDEX for label in labels[1:]):
            num_dropped += 1
            continue
        kept.append((input_ids, labels))
    return TokenizedDataset(tuple(kept), num_truncated, num_dropped)


def _tokenize_prompt_completion(tokenizer, example: PromptCompletion) -> tuple[list[int], list[int]]:
    prompt_ids = tokenizer(example.prompt)["input_ids"]  # with BOS: what the server gets
    completion_ids = [*_completion_ids(tokenizer, prompt_ids, example), tokenizer.eos_token_id]
    return prompt_ids + completion_ids, [IGNORE_INDEX] * len(prompt_ids) + completion_ids


def _completion_ids(tokenizer, prompt_ids: list[int], example: PromptCompletion) -> list[int]:
    """The ids that follow the prompt when prompt + completion is tokenized as one text: what the model
    must generate after the server's prompt ids. Tokenized alone, a sentencepiece tokenizer would start
    the completion " blue" with a spurious dummy-prefix token ('▁', '▁b', ...)."""
    joint_ids = tokenizer(example.prompt + example.completion)["input_ids"]
    if joint_ids[: len(prompt_ids)] == prompt_ids and len(joint_ids) > len(prompt_ids):
        return joint_ids[len(prompt_ids) :]
    # The tokenizer merged text across the boundary: the server's prompt ids are not a prefix of the
    # joint ones, so no split is exact; the completion tokenized on its own is the closest.
    return tokenizer(example.completion, add_special_tokens=False)["input_ids"]


def _tokenize_chat(tokenizer, example: ChatExample) -> tuple[list[int], list[int]]:
    """An assistant turn i is trained from where template(messages[:i], add_generation_prompt=True) ends to
    where template(messages[:i+1]) ends; found in one rendering when the template allows (see the module doc)."""
    messages = [{"role": m.role, "content": m.content} for m in example.messages]
    text = _render_text(tokenizer, messages, add_generation_prompt=False)
    spans = _assistant_spans(tokenizer, example.messages, messages, text)
    if spans is None or not getattr(tokenizer, "is_fast", False):  # offsets need a fast tokenizer
        return _tokenize_chat_by_prefixes(tokenizer, example)
    encoding = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    input_ids, token_starts = encoding["input_ids"], [start for start, _ in encoding["offset_mapping"]]
    labels = [IGNORE_INDEX] * len(input_ids)
    for start_char, end_char in spans:
        first, last = bisect.bisect_left(token_starts, start_char), bisect.bisect_left(token_starts, end_char)
        if token_starts[first:first + 1] != [start_char] or token_starts[last:last + 1] not in ([end_char], []):
            return _tokenize_chat_by_prefixes(tokenizer, example)  # a token spans a turn boundary: the exact way decides
        labels[first:last] = input_ids[first:last]
    return input_ids, labels


def _assistant_spans(tokenizer, parsed: tuple[ChatMessage, ...], messages: list[dict[str, str]],
                     text: str) -> list[tuple[int, int]] | None:
    """Character spans of the trained assistant turns in `text`, or None if the template is not the common
    `header + content + end-of-turn` kind (checked exactly on the first and last assistant turns)."""
    markers = _turn_markers(tokenizer)
    if markers is None:
        return None
    header, end_of_turn = markers
    spans, cursor, checked = [], 0, {}
    for i, message in enumerate(parsed):
        if message.role != "assistant":
            found = text.find(message.content, cursor)
            if found < 0:
                return None
            cursor = found + len(message.content)
            continue
        found = text.find(header + message.content + end_of_turn, cursor)
        if found < 0:
            return None
        start = found + len(header)
        cursor = start + len(message.content) + len(end_of_turn)
        checked.setdefault("first", (i, start, cursor))
        checked["last"] = (i, start, cursor)
        if message.weight:
            spans.append((start, cursor))
    for i, start, end in checked.values():  # two exact prefix renderings: O(length), not O(turns x length)
        if _render_text(tokenizer, messages[:i], add_generation_prompt=True) != text[:start]:
            return None
        if _render_text(tokenizer, messages[:i + 1], add_generation_prompt=False) != text[:end]:
            return None
    return spans


@functools.lru_cache(maxsize=8)
def _turn_markers(tokenizer) -> tuple[str, str] | None:
    """(assistant header, end of turn) as the template writes them, learned from a probe conversation."""
    user = [{"role": "user", "content": _PROBE_USER}]
    try:
        before = _render_text(tokenizer, user, add_generation_prompt=False)
        prompted = _render_text(tokenizer, user, add_generation_prompt=True)
        answered = _render_text(tokenizer, [*user, {"role": "assistant", "content": _PROBE_ANSWER}], False)
    except Exception:  # a template that refuses the probe: use the exact way
        return None
    if not (prompted.startswith(before) and answered.startswith(prompted + _PROBE_ANSWER)):
        return None
    return prompted[len(before):], answered[len(prompted) + len(_PROBE_ANSWER):]


def _tokenize_chat_by_prefixes(tokenizer, example: ChatExample) -> tuple[list[int], list[int]]:
    """The exact way for any template: render every prefix (quadratic in turns; MAX_CHAT_MESSAGES bounds it)."""
    messages = [{"role": m.role, "content": m.content} for m in example.messages]
    input_ids = _render_ids(tokenizer, messages, add_generation_prompt=False)
    labels = [IGNORE_INDEX] * len(input_ids)
    for i, message in enumerate(example.messages):
        if message.role != "assistant" or not message.weight:
            continue
        start = _prefix_len(tokenizer, messages[:i], input_ids, add_generation_prompt=True)
        end = _prefix_len(tokenizer, messages[: i + 1], input_ids, add_generation_prompt=False)
        labels[start:end] = input_ids[start:end]
    return input_ids, labels


def _prefix_len(tokenizer, messages: list[dict[str, str]], full_ids: list[int], add_generation_prompt: bool) -> int:
    prefix_ids = _render_ids(tokenizer, messages, add_generation_prompt)
    if full_ids[: len(prefix_ids)] != prefix_ids:
        # A template that rewrites earlier turns, or BPE merging across a turn boundary: masks would be wrong.
        raise ValueError("the model's chat template does not render conversations prefix by prefix")
    return len(prefix_ids)


def _render_ids(tokenizer, messages: list[dict[str, str]], add_generation_prompt: bool) -> list[int]:
    if not messages and not add_generation_prompt:
        return []
    text = _render_text(tokenizer, messages, add_generation_prompt)
    # The template writes BOS itself; apply_chat_template(tokenize=True) also adds no special tokens.
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def _render_text(tokenizer, messages: list[dict[str, str]], add_generation_prompt: bool) -> str:
    if not messages and not add_generation_prompt:
        return ""
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)
