"""Shared fixtures: the demo model built once per session, and PEFT adapters made on demand."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from loraplex.models.demo import ensure_demo_model, make_demo_adapter

pytest_plugins = ["tests.api_fixtures", "tests.console_server"]


@pytest.fixture(scope="session")
def demo_data_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("engine-data")


@pytest.fixture(scope="session")
def demo_model_dir(demo_data_dir) -> Path:
    return ensure_demo_model(demo_data_dir)


@pytest.fixture(scope="session")
def make_adapter(demo_model_dir, demo_data_dir):
    """make_adapter("tenant/name", r=..., target_modules=..., ...) -> adapter dir (built once per name)."""

    def make(adapter_id: str, **kwargs) -> Path:
        out = demo_data_dir / adapter_id
        if not out.exists():
            make_demo_adapter(demo_model_dir, out, **kwargs)
        return out

    return make


def has_cuda() -> bool:
    return torch.cuda.is_available()


def pytest_collection_modifyitems(config, items):
    """Tests marked `cuda` are skipped on machines without a GPU."""
    if has_cuda():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="module")
def one_torch_thread():
    """For training tests: tiny matmuls gain nothing from a second thread, and on a shared 2-core box
    they lose a lot. Use with `pytestmark = pytest.mark.usefixtures("one_torch_thread")`."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
