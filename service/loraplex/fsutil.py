"""Filesystem helpers shared by the demo model builder and the trainer."""
from __future__ import annotations

import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


@contextmanager
def staging_dir(out_dir: Path) -> Iterator[Path]:
    """A temp dir beside `out_dir` (same filesystem, so the final rename is atomic); removed if still there."""
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
    try:
        yield tmp
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
