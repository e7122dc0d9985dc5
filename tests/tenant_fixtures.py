"""A multi-tenant app (two tenant keys + an admin key) over a fresh data dir, and adapter upload bytes."""
from __future__ import annotations

import io
import json
import zipfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from loraplex.api.app import create_app
from loraplex.config import Settings
from loraplex.engine_factory import build_engine
from loraplex.models.demo import ensure_demo_model, make_demo_adapter

KEYS = {"acme": "key-acme", "globex": "key-globex", "admin": "key-admin"}


def auth(who: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {KEYS[who]}"}


@pytest.fixture(scope="module")
def tenant_settings(tmp_path_factory) -> Settings:
    return Settings(
        model="demo", data_dir=tmp_path_factory.mktemp("tenant-data"), device="cpu", dtype="float32",
        max_model_len=512, max_num_seqs=8, max_loras=2, max_lora_rank=8, max_adapter_bytes=2_000_000,
        api_keys=f"{KEYS['acme']}:acme,{KEYS['globex']}:globex", admin_key=KEYS["admin"],
    )


@pytest.fixture(scope="module")
def tenant_engine(tenant_settings):
    engine = build_engine(tenant_settings)
    engine.start()
    yield engine
    engine.shutdown()


@pytest.fixture(scope="module")
def tenant_client(tenant_settings, tenant_engine) -> Iterator[TestClient]:
    with TestClient(create_app(tenant_settings, tenant_engine)) as client:
        yield client


@pytest.fixture(scope="module")
def adapter_files(tenant_settings, tmp_path_factory):
    """adapter_files(seed, **kwargs) -> {"adapter_config.json": bytes, "adapter_model.safetensors": bytes}"""
    model_dir = ensure_demo_model(Path(tenant_settings.data_dir))
    out_root = tmp_path_factory.mktemp("uploads")

    def make(seed: int, **kwargs) -> dict[str, bytes]:
        out = make_demo_adapter(model_dir, out_root / f"a{seed}-{len(kwargs)}", seed=seed, **kwargs)
        return {name: (out / name).read_bytes() for name in ("adapter_config.json", "adapter_model.safetensors")}

    return make


def upload(client, who: str, name: str, files: dict[str, bytes], **form):
    parts = [("files", (filename, data)) for filename, data in files.items()]
    return client.post("/v1/adapters", headers=auth(who), data={"name": name, **form}, files=parts)


def zipped(files: dict[str, bytes], extra: dict[str, bytes] | None = None) -> dict[str, bytes]:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        for name, data in {**files, **(extra or {})}.items():
            archive.writestr(name, data)
    return {"adapter.zip": buffer.getvalue()}


def with_config(files: dict[str, bytes], **changes) -> dict[str, bytes]:
    config = json.loads(files["adapter_config.json"])
    config.update(changes)
    return {**files, "adapter_config.json": json.dumps(config).encode()}
