"""The training package's import graph: the API never loads the trainer, and the job stores do not import
back through `jobs` (no import circle)."""
from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

TRAINING = Path(__file__).resolve().parents[1] / "service" / "loraplex" / "training"


def imported_modules(path: Path) -> set[str]:
    """Every `loraplex.*` module a file imports, at module level or inside a function."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("loraplex"):
            names.add(node.module)
        elif isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names if alias.name.startswith("loraplex"))
    return names


def test_jobs_imports_neither_store_and_the_factory_sits_apart():
    assert not {"loraplex.training.local_jobs", "loraplex.training.redis_jobs"} & imported_modules(TRAINING / "jobs.py")
    for store in ("local_jobs.py", "redis_jobs.py"):
        assert "loraplex.training.job_store" not in imported_modules(TRAINING / store)
    assert {"loraplex.training.local_jobs", "loraplex.training.redis_jobs"} <= imported_modules(TRAINING / "job_store.py")


def test_the_api_does_not_import_the_trainer_or_the_worker():
    code = ("import sys, loraplex.api.app, loraplex.api.routes.fine_tuning; "
            "print(sorted(m for m in sys.modules if m in ('loraplex.training.worker', 'loraplex.training.trainer')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env={"PYTHONPATH": str(TRAINING.parents[1])})
    assert out.stdout.strip() == "[]", out.stderr
