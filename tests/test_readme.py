"""README stays true: its settings table is the one generated from Settings."""
from __future__ import annotations

import re
from pathlib import Path

from scripts.settings_table import settings_table

README = Path(__file__).resolve().parents[1] / "README.md"


def test_settings_table_matches_config():
    text = README.read_text()
    match = re.search(r"<!-- settings-table:start -->\n(.*?)\n<!-- settings-table:end -->", text, re.S)
    assert match, "README lost its settings table markers"
    assert match.group(1).strip() == settings_table(), "run `python scripts/settings_table.py` and paste into README"


def test_readme_names_the_two_commands_and_ci_runs_the_test_one():
    text = README.read_text()
    assert "make run" in text and "make test" in text
    assert "make test" in (README.parent / ".ci" / "run").read_text()
