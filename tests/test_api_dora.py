"""A DoRA adapter uploaded through the API is accepted and served: greedy tokens equal PEFT's (fp32),
in the same batch as base requests; one without its magnitude vectors is a 400 naming `use_dora`."""
from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
from transformers import AutoTokenizer

from loraplex.models.demo import ensure_demo_model
from tests.dora_adapters import make_dora_adapter
from tests.engine_helpers import peft_reference
from tests.tenant_fixtures import auth, tenant_client, tenant_engine, tenant_settings, upload  # noqa: F401

NUM_NEW = 8
PROMPT = [0, 17, 230, 41, 9, 512, 77]


@pytest.fixture(scope="module")
def dora_dir(tenant_settings, tmp_path_factory) -> Path:
    model_dir = ensure_demo_model(Path(tenant_settings.data_dir))
    return make_dora_adapter(model_dir, tmp_path_factory.mktemp("dora") / "tone", r=8, alpha=16,
                             target_modules=("q_proj", "v_proj", "up_proj"), seed=31, rank_pattern={"up_proj": 4})


def _files(adapter_dir: Path) -> dict[str, bytes]:
    return {name: (adapter_dir / name).read_bytes() for name in ("adapter_config.json", "adapter_model.safetensors")}


def _complete(client, model: str):
    body = {"model": model, "prompt": PROMPT, "max_tokens": NUM_NEW, "temperature": 0, "ignore_eos": True}
    return client.post("/v1/completions", headers=auth("acme"), json=body)


def test_uploaded_dora_adapter_is_served_like_peft(tenant_client, tenant_settings, dora_dir):
    response = upload(tenant_client, "acme", "tone", _files(dora_dir))
    assert response.status_code in (200, 201), response.text
    assert response.json()["rank"] == 8 and set(response.json()["target_modules"]) == {"q_proj", "v_proj", "up_proj"}
    assert response.json()["kind"] == "dora" and response.json()["num_virtual_tokens"] is None
    shown = tenant_client.get("/v1/adapters/acme/tone", headers=auth("acme")).json()
    listed = tenant_client.get("/v1/adapters", headers=auth("acme")).json()["data"]
    assert shown["kind"] == "dora" and [a["kind"] for a in listed if a["id"] == "acme/tone"] == ["dora"]
    model_dir = ensure_demo_model(Path(tenant_settings.data_dir))
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    [expected] = peft_reference(model_dir, dora_dir, [PROMPT], NUM_NEW)
    [base] = peft_reference(model_dir, None, [PROMPT], NUM_NEW)
    assert expected != base  # the magnitudes matter

    async def both():  # submitted together: the DoRA request batches with a base request
        return await asyncio.gather(*(asyncio.to_thread(_complete, tenant_client, m) for m in ("acme/tone", "demo")))

    dora_response, base_response = asyncio.run(both())
    assert dora_response.status_code == 200, dora_response.text
    assert dora_response.json()["choices"][0]["text"] == tokenizer.decode(expected)
    assert base_response.json()["choices"][0]["text"] == tokenizer.decode(base)


def test_dora_upload_without_magnitudes_names_use_dora(tenant_client, dora_dir):
    import json

    from safetensors.torch import load, save

    files = _files(dora_dir)
    tensors = {k: v for k, v in load(files["adapter_model.safetensors"]).items() if "magnitude" not in k}
    response = upload(tenant_client, "acme", "no-magnitudes", {**files, "adapter_model.safetensors": save(tensors)})
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["param"] == "use_dora" and "lora_magnitude_vector" in error["message"]
    assert json.loads(files["adapter_config.json"])["use_dora"] is True


def test_quantized_server_refuses_dora_uploads_naming_use_dora(tenant_settings, dora_dir, tmp_path):
    """The engine cannot serve DoRA on a quantized base, so its registry refuses the upload up front."""
    from fastapi.testclient import TestClient

    from loraplex.api.app import create_app
    from loraplex.engine_factory import build_engine

    settings = tenant_settings.model_copy(update={"data_dir": tmp_path, "quantization": "int8"})
    engine = build_engine(settings)
    engine.start()
    try:
        with TestClient(create_app(settings, engine)) as client:
            response = upload(client, "acme", "tone", _files(dora_dir))
    finally:
        engine.shutdown()
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["param"] == "use_dora" and "DoRA (use_dora: true) adapters are not served by this server" in error["message"]
