"""Prompt-tuning and prefix-tuning adapters through HTTP: uploaded as PEFT saves them, served with the
tokens PEFT generates, concurrently with LoRA and base requests; deleting one frees its prefix blocks."""
from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from loraplex.models.demo import ensure_demo_model
from tests.api_fixtures import wait_until
from tests.engine_helpers import peft_reference
from tests.tenant_fixtures import adapter_files, auth, tenant_client, tenant_engine, tenant_settings, upload  # noqa: F401
from tests.virtual_token_adapters import make_virtual_adapter

PROMPT = [0, 17, 203, 9, 88, 412, 5]
NUM_NEW = 8
VIRTUAL = {  # name -> (peft_type, num_virtual_tokens, prefix_projection)
    "soft-prompt": ("PROMPT_TUNING", 6, False),
    "prefix": ("PREFIX_TUNING", 9, False),
    "prefix-proj": ("PREFIX_TUNING", 21, True),
}


def files_of(directory: Path) -> dict[str, bytes]:
    return {name: (directory / name).read_bytes() for name in ("adapter_config.json", "adapter_model.safetensors")}


def complete(client, model: str) -> str:
    body = {"model": model, "prompt": PROMPT, "max_tokens": NUM_NEW, "temperature": 0, "ignore_eos": True}
    response = client.post("/v1/completions", headers=auth("acme"), json=body)
    assert response.status_code == 200, response.text
    return response.json()["choices"][0]["text"]


@pytest.fixture(scope="module")
def adapter_dirs(tenant_settings, tmp_path_factory):
    model_dir = ensure_demo_model(Path(tenant_settings.data_dir))
    root = tmp_path_factory.mktemp("virtual")
    return {name: make_virtual_adapter(model_dir, root / name, *spec, seed=i + 40) for i, (name, spec) in enumerate(VIRTUAL.items())}


@pytest.fixture(scope="module")
def uploaded(tenant_client, adapter_dirs, adapter_files):
    for name, directory in adapter_dirs.items():
        response = upload(tenant_client, "acme", name, files_of(directory))
        assert response.status_code == 201, response.text
        assert response.json()["versioned_id"] == f"acme/{name}@1"
        peft_type, num_virtual_tokens, _ = VIRTUAL[name]
        assert (response.json()["kind"], response.json()["num_virtual_tokens"]) == (peft_type.lower(), num_virtual_tokens)
    lora = upload(tenant_client, "acme", "lora", adapter_files(81))
    assert lora.status_code == 201 and (lora.json()["kind"], lora.json()["num_virtual_tokens"]) == ("lora", None)
    return adapter_dirs


def test_get_and_list_show_each_adapters_kind(tenant_client, uploaded):
    expected = {f"acme/{name}": (peft_type.lower(), tokens) for name, (peft_type, tokens, _) in VIRTUAL.items()}
    expected["acme/lora"] = ("lora", None)
    for adapter_id, kind in expected.items():
        response = tenant_client.get(f"/v1/adapters/{adapter_id}", headers=auth("acme"))
        assert response.status_code == 200 and (response.json()["kind"], response.json()["num_virtual_tokens"]) == kind
    listed = tenant_client.get("/v1/adapters", headers=auth("acme")).json()["data"]
    assert {a["id"]: (a["kind"], a["num_virtual_tokens"]) for a in listed if a["id"] in expected} == expected


def test_each_kind_serves_peft_tokens_batched_with_lora_and_base(tenant_client, tenant_settings, tenant_engine, uploaded):
    model_dir = ensure_demo_model(Path(tenant_settings.data_dir))
    text = lambda tokens: tenant_engine.tokenizer.decode(tokens, skip_special_tokens=True)  # noqa: E731
    expected = {f"acme/{name}": text(peft_reference(model_dir, d, [PROMPT], NUM_NEW)[0]) for name, d in uploaded.items()}
    expected["demo"] = text(peft_reference(model_dir, None, [PROMPT], NUM_NEW)[0])
    models = [*expected, "acme/lora"] * 2
    with ThreadPoolExecutor(len(models)) as pool:  # concurrent: the engine batches them together
        got = list(pool.map(lambda m: complete(tenant_client, m), models))
    for model, tokens in zip(models, got):
        if model in expected:
            assert tokens == expected[model], model
    assert len(set(expected.values())) == len(expected)  # every adapter changes the tokens


def test_upload_refuses_a_prefix_for_another_model(tenant_client, adapter_dirs):
    files = files_of(adapter_dirs["prefix"])
    config = json.loads(files["adapter_config.json"])
    config["num_layers"] = 3  # the demo model has 4
    response = upload(tenant_client, "acme", "wrong", {**files, "adapter_config.json": json.dumps(config).encode()})
    assert response.status_code == 400 and response.json()["error"]["param"] == "num_layers", response.text


def test_delete_frees_the_prefix_blocks(tenant_client, tenant_engine, uploaded):
    engine = tenant_engine.engine
    assert complete(tenant_client, "acme/prefix-proj")  # loaded: owns one 16-token block of its 21
    loaded = lambda: [k for k in tenant_engine.stats()["virtual_token_adapters"] if k.startswith("acme/prefix-proj@")]  # noqa: E731
    assert len(loaded()) == 1 and engine.blocks.num_cached_for("acme/prefix-proj@") >= 1
    assert tenant_client.delete("/v1/adapters/acme/prefix-proj", headers=auth("acme")).status_code == 200
    assert wait_until(lambda: not loaded())
    assert wait_until(lambda: engine.blocks.num_cached_for("acme/prefix-proj@") == 0)


def test_admin_pin_keeps_it_loaded_and_merged_mode_is_a_400(tenant_client, uploaded):
    pinned = tenant_client.post("/v1/adapters/acme/prefix/pin", headers=auth("admin"))
    assert pinned.status_code == 200, pinned.text
    assert pinned.json()["pinned"] is True and pinned.json()["residency"] == "device"
    merged = tenant_client.post("/v1/adapters/acme/prefix/mode", headers=auth("admin"), json={"mode": "merged"})
    assert merged.status_code == 400 and merged.json()["error"]["param"] == "mode", merged.text
    unpinned = tenant_client.post("/v1/adapters/acme/prefix/unpin", headers=auth("admin")).json()
    assert unpinned["pinned"] is False and unpinned["merge_mode"] == "unmerged"
