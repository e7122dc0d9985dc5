"""Each malformed input in tests/malformed_corpus.py, sent through real HTTP to one multi-tenant app:

- the exact 4xx status, in the one error envelope, with a message that says what was wrong (and `param`);
- nothing stored: the adapter and file listings are unchanged, and so is every file under the data dir
  (staging and trash dirs included);
- nothing unpickled: `pickle` and `torch.load` fail the test if anything calls them;
- the service is healthy after the whole corpus: probes, generation with the base model and an adapter,
  and a good upload of each kind all succeed.

Then the three parsers that read uploaded bytes (archives, safetensors + config, JSONL) take randomly
damaged copies of good inputs: they may only refuse them with their own typed errors.
"""
from __future__ import annotations

import contextlib
import pickle
import re
from pathlib import Path

import pytest
import torch
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, given
from hypothesis import settings as hypothesis_settings
from hypothesis import strategies as st

from loraplex.api.app import create_app
from loraplex.config import Settings
from loraplex.engine_factory import build_engine
from loraplex.models.demo import ensure_demo_model, make_demo_adapter
from loraplex.registry.archive import extract_adapter_archive
from loraplex.registry.errors import AdapterTooLarge, InvalidAdapterFile
from loraplex.registry.validation import validate_adapter_files
from loraplex.training.datasets import DatasetError, validate_jsonl
from tests.malformed_corpus import (
    ADAPTER_CASES, DATASET_CASES, GOOD_LINE, MAX_ADAPTER_BYTES, MAX_FILE_BYTES, MAX_LORA_RANK, MAX_MODEL_LEN,
    MAX_PROMPT_CHARS, MAX_REQUEST_BYTES, MAX_STOP_SEQUENCES, PROMPT_CASES, FileUpload, Malformed, jsonl, tgz_of, zip_of,
)

KEYS = {"acme": "corpus-acme", "admin": "corpus-admin"}


def auth(who: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {KEYS[who]}"}


@pytest.fixture(scope="module")
def app_settings(tmp_path_factory) -> Settings:
    return Settings(
        model="demo", data_dir=tmp_path_factory.mktemp("corpus-data"), device="cpu", dtype="float32",
        max_model_len=MAX_MODEL_LEN, max_num_seqs=4, max_loras=2, max_lora_rank=MAX_LORA_RANK,
        max_stop_sequences=MAX_STOP_SEQUENCES,
        max_request_bytes=MAX_REQUEST_BYTES, max_prompt_chars=MAX_PROMPT_CHARS, max_adapter_bytes=MAX_ADAPTER_BYTES,
        max_file_bytes=MAX_FILE_BYTES, start_local_worker=False,
        api_keys=f"{KEYS['acme']}:acme", admin_key=KEYS["admin"],
    )


@pytest.fixture(scope="module")
def client(app_settings):
    engine = build_engine(app_settings)
    engine.start()
    try:
        # raise_server_exceptions=False: a bug must show up as the 500 a client would get, not as a traceback
        with TestClient(create_app(app_settings, engine), raise_server_exceptions=False) as client:
            yield client
    finally:
        engine.shutdown()


@pytest.fixture(scope="module")
def good_adapter(app_settings, tmp_path_factory) -> dict[str, bytes]:
    """r=4 on q/v of the demo model, as PEFT saves it."""
    model_dir = ensure_demo_model(Path(app_settings.data_dir))
    out = make_demo_adapter(model_dir, tmp_path_factory.mktemp("corpus-adapter"), r=4, seed=7)
    return {name: (out / name).read_bytes() for name in ("adapter_config.json", "adapter_model.safetensors")}


@pytest.fixture(autouse=True)
def never_unpickle(monkeypatch):
    """Anything that unpickles during a request turns it into a 500, which every case below refuses."""
    def refuse(*args, **kwargs):
        raise AssertionError("an upload was unpickled")

    for module, name in ((pickle, "load"), (pickle, "loads"), (torch, "load")):
        monkeypatch.setattr(module, name, refuse)


def stored_state(client, app_settings: Settings) -> tuple:
    """What a refused request must not change: both listings, and every file under the data dir."""
    adapters = client.get("/v1/adapters", headers=auth("admin"), params={"limit": 100})
    files = client.get("/v1/files", headers=auth("admin"))
    assert adapters.status_code == files.status_code == 200
    data_dir = Path(app_settings.data_dir)
    on_disk = sorted((str(p.relative_to(data_dir)), p.stat().st_size) for p in data_dir.rglob("*")
                     if p.is_file() and ".locks" not in p.parts)
    return adapters.json()["data"], files.json()["data"], on_disk


def assert_refused(response, case: Malformed) -> None:
    assert response.status_code == case.status, f"{case.id}: {response.status_code} {response.text[:500]}"
    body = response.json()
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}, body
    error = body["error"]
    assert error["type"] == "invalid_request_error" and error["code"], error
    assert re.search(case.message, error["message"], re.IGNORECASE | re.DOTALL), f"{case.id}: {error['message']!r}"
    if case.param is not None:
        assert error["param"] == case.param, f"{case.id}: {error}"


def ids(cases: list[Malformed]) -> list[str]:
    return [case.id for case in cases]


@pytest.mark.parametrize("case", ADAPTER_CASES, ids=ids(ADAPTER_CASES))
def test_malformed_adapter_is_refused_and_nothing_is_stored(client, app_settings, good_adapter, case):
    upload = case.build(good_adapter)
    before = stored_state(client, app_settings)
    response = client.post("/v1/adapters", headers=auth("acme"), data=upload.form,
                           files=[("files", (name, data)) for name, data in upload.files])
    assert_refused(response, case)
    assert stored_state(client, app_settings) == before


@pytest.mark.parametrize("case", PROMPT_CASES, ids=ids(PROMPT_CASES))
def test_malformed_prompt_is_refused(client, app_settings, case):
    body = case.build()
    before = stored_state(client, app_settings)
    headers = {**auth("acme"), "content-type": body.content_type}
    if body.raw is not None:
        response = client.post(body.path, content=body.raw, headers=headers)
    else:
        response = client.post(body.path, json=body.json, headers=headers)
    assert_refused(response, case)
    assert stored_state(client, app_settings) == before


@pytest.mark.parametrize("case", DATASET_CASES, ids=ids(DATASET_CASES))
def test_malformed_training_file_is_refused_and_nothing_is_stored(client, app_settings, case):
    upload = case.build()
    upload = upload if isinstance(upload, FileUpload) else FileUpload(upload)
    files = None if upload.data is None else {"file": ("train.jsonl", upload.data)}
    before = stored_state(client, app_settings)
    response = client.post("/v1/files", headers=auth("acme"), data=upload.form, files=files)
    assert_refused(response, case)
    assert stored_state(client, app_settings) == before


def test_service_is_healthy_after_the_corpus(client, app_settings, good_adapter):
    assert client.get("/healthz").status_code == 200 and client.get("/readyz").status_code == 200
    files = [("files", (name, data)) for name, data in good_adapter.items()]
    uploaded = client.post("/v1/adapters", headers=auth("acme"), data={"name": "after-corpus"}, files=files)
    assert uploaded.status_code == 201, uploaded.text
    for model in ("demo", "acme/after-corpus"):
        body = {"model": model, "prompt": "Once upon a time", "max_tokens": 4, "temperature": 0}
        response = client.post("/v1/completions", headers=auth("acme"), json=body)
        assert response.status_code == 200, response.text
    dataset = client.post("/v1/files", headers=auth("acme"), data={"purpose": "fine-tune"},
                          files={"file": ("train.jsonl", jsonl(GOOD_LINE))})
    assert dataset.status_code == 200, dataset.text
    data_dir = Path(app_settings.data_dir)
    assert [p for hidden in (".staging", ".trash") for p in (data_dir / hidden).rglob("*")] == []


# --- the parsers under random byte damage ------------------------------------------------------------


@st.composite
def damaged(draw, data: bytes) -> bytes:
    """`data` with a few bytes overwritten, a slice cut out or random bytes inserted."""
    damaged = bytearray(data)
    for _ in range(draw(st.integers(1, 6))):
        at = draw(st.integers(0, max(0, len(damaged) - 1)))
        action = draw(st.sampled_from(["overwrite", "cut", "insert"]))
        if action == "overwrite" and damaged:
            damaged[at] = draw(st.integers(0, 255))
        elif action == "cut":
            del damaged[at : at + draw(st.integers(1, 64))]
        else:
            damaged[at:at] = draw(st.binary(min_size=1, max_size=16))
    return bytes(damaged)


MUTATIONS = hypothesis_settings(max_examples=150, deadline=None, database=None, derandomize=True,
                     suppress_health_check=list(HealthCheck))


@pytest.mark.parametrize("kind", ["zip", "tgz"])
def test_archive_reader_only_refuses_damaged_archives(good_adapter, kind):
    """However an archive is damaged, the reader answers with its typed refusals, never another exception."""
    archive = (zip_of if kind == "zip" else tgz_of)(list(good_adapter.items()))

    @MUTATIONS
    @given(data=damaged(archive))
    def read(data):
        with contextlib.suppress(InvalidAdapterFile, AdapterTooLarge):
            extract_adapter_archive(data, MAX_ADAPTER_BYTES)

    read()


def test_adapter_validation_only_refuses_damaged_files(good_adapter, client):
    """Damaged safetensors headers and configs: refused with InvalidAdapterFile, never another exception."""
    config, weights = good_adapter["adapter_config.json"], good_adapter["adapter_model.safetensors"]
    header_end = 8 + int.from_bytes(weights[:8], "little")
    shapes = client.app.state.registry.module_shapes

    @MUTATIONS
    @given(head=damaged(weights[: header_end + 16]), damaged_config=st.one_of(st.just(config), damaged(config)))
    def validate(head, damaged_config):
        with contextlib.suppress(InvalidAdapterFile, AdapterTooLarge):
            validate_adapter_files(damaged_config, head + weights[header_end + 16 :], shapes, MAX_LORA_RANK, MAX_ADAPTER_BYTES)

    validate()


def test_training_file_validation_only_refuses_damaged_files():
    good = jsonl(GOOD_LINE, {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]})

    @MUTATIONS
    @given(data=damaged(good))
    def parse(data):
        with contextlib.suppress(DatasetError):
            validate_jsonl(data)

    parse()
