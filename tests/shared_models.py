"""Real models under ../shared/models (read at run time, never copied into the repository).
`LORAPLEX_SHARED_DIR` points elsewhere (a worktree whose parent holds no shared/)."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

SHARED_DIR = Path(os.environ.get("LORAPLEX_SHARED_DIR") or Path(__file__).resolve().parents[2] / "shared")


def shared_model(name: str) -> Path:
    """The model's directory; the calling test is skipped when it is absent."""
    path = SHARED_DIR / "models" / name
    if not (path / "config.json").is_file():
        pytest.skip(f"{path} is absent")
    return path
