"""Print README's configuration table from `Settings` (tests/test_readme.py keeps README in sync)."""
from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "service"))

from loraplex.config import Settings  # noqa: E402


def settings_table() -> str:
    rows = ["| env var | CLI flag | default | meaning |", "| --- | --- | --- | --- |"]
    for name, field in Settings.model_fields.items():
        default = field.get_default(call_default_factory=True)
        shown = "—" if default is None else f"`{default}`"
        description = (field.description or "").replace("|", "\\|")
        rows.append(f"| `LORAPLEX_{name.upper()}` | `--{name.replace('_', '-')}` | {shown} | {description} |")
    return "\n".join(rows)


if __name__ == "__main__":
    print(settings_table())
