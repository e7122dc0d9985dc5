"""The two files of an adapter and the one way to parse its config, for uploads and for adapters on disk.

`AdapterRefused` is what every check raises: a ValueError with the reason and the `field` it is about
(a config field such as `peft_type`, or a file name). The upload path turns it into a 400 whose `param`
is that field; the read-only store into an `InvalidAdapter`.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
MAX_CONFIG_BYTES = 1_000_000


class AdapterRefused(ValueError):
    """An adapter that cannot be served; `field` names the config field or the file at fault."""

    def __init__(self, reason: str, field: str = CONFIG_FILE):
        super().__init__(reason)
        self.reason = reason
        self.field = field


def parse_config(raw: bytes) -> dict[str, Any]:
    """adapter_config.json bytes -> the JSON object, size-limited, deep nesting refused."""
    if len(raw) > MAX_CONFIG_BYTES:
        raise AdapterRefused(f"larger than {MAX_CONFIG_BYTES} bytes", CONFIG_FILE)
    try:
        config = json.loads(raw)
    except (ValueError, RecursionError):  # UnicodeDecodeError and JSONDecodeError are ValueErrors; deep nesting is not
        raise AdapterRefused("not valid JSON", CONFIG_FILE) from None
    if not isinstance(config, dict):
        raise AdapterRefused("must hold a JSON object", CONFIG_FILE)
    return config


def read_config_file(path: Path) -> dict[str, Any]:
    """The same checks for a config on disk; the OS error's text only, never the server's path."""
    try:
        with path.open("rb") as handle:
            raw = handle.read(MAX_CONFIG_BYTES + 1)
    except OSError as exc:
        raise AdapterRefused(f"cannot read it: {exc.strerror or 'I/O error'}", CONFIG_FILE) from None
    return parse_config(raw)


def field_of(exc: ValueError) -> str:
    """The field a refusal names (PatternError carries one too); the config file when none."""
    return getattr(exc, "field", None) or CONFIG_FILE


def shown_reason(exc: ValueError) -> str:
    """`adapter_config.json: not valid JSON`: the reason with the file it is about, when that is a file."""
    reason, field = str(exc), field_of(exc)
    if field in (CONFIG_FILE, WEIGHTS_FILE) and field not in reason:
        return f"{field}: {reason}"
    return reason
