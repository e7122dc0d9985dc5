"""The API on a quantized base (nf4): /v1/models shows it, completions equal transformers + bitsandbytes + peft,
merging is refused with a 400 naming `mode` (auto never merges), and settings the model cannot take stop
`loraplex serve` at start with one line naming the cause."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from fastapi.testclient import TestClient
from transformers import AutoTokenizer

from loraplex.api import create_app
from loraplex.config import Settings
from loraplex.engine.model_loader import load_model
from loraplex.engine.quantized_layers import weight_bytes
from loraplex.engine_factory import build_engine
from loraplex.models.demo import ensure_demo_model, make_demo_adapter
from tests.quant_helpers import quantized_reference
from tests.server_process import REPO_ROOT

pytest.importorskip("bitsandbytes")
ADAPTER = "acme/sql"
PROMPT = "The river ran"
NUM_NEW = 8


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    data_dir = tmp_path_factory.mktemp("quant-api")
    settings = Settings(model="demo", data_dir=data_dir, device="cpu", dtype="float32", max_model_len=256,
                        max_num_seqs=8, max_loras=2, max_lora_rank=16, quantization="nf4", default_merge_mode="auto",
                        start_local_worker=False, log_format="text")
    model_dir = ensure_demo_model(data_dir, seed=settings.seed)
    adapter_dir = make_demo_adapter(model_dir, data_dir / ADAPTER, r=8, seed=1)
    engine = build_engine(settings)
    engine.start()
    with TestClient(create_app(settings, engine)) as client:
        yield client, model_dir, adapter_dir
    engine.shutdown()


def _complete(client, model: str) -> str:
    body = {"model": model, "prompt": PROMPT, "max_tokens": NUM_NEW, "temperature": 0, "ignore_eos": True}
    response = client.post("/v1/completions", json=body)
    assert response.status_code == 200, response.text
    return response.json()["choices"][0]["text"]


def test_models_show_the_quantization_and_resident_weight_bytes(served):
    client, model_dir, _ = served
    cards = {c["id"]: c for c in client.get("/v1/models").json()["data"]}
    base = cards["demo"]
    full = weight_bytes(load_model(str(model_dir), torch.float32, torch.device("cpu"), 256))
    assert base["quantization"] == "nf4"
    assert 0 < base["weight_bytes"] < full
    assert cards[ADAPTER]["quantization"] is None and cards[ADAPTER]["parent"] == "demo"


def test_completions_equal_transformers_on_the_same_quantized_weights(served):
    client, model_dir, adapter_dir = served
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    prompt_ids = tokenizer(PROMPT).input_ids
    for model, adapter in (("demo", None), (ADAPTER, adapter_dir)):
        [reference] = quantized_reference(model_dir, "nf4", adapter, [prompt_ids], NUM_NEW)
        assert _complete(client, model) == tokenizer.decode(reference), model


def test_merged_mode_is_refused_and_auto_never_merges(served):
    client, _, _ = served
    response = client.post(f"/v1/adapters/{ADAPTER}/mode", json={"mode": "merged"})
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["param"] == "mode" and "quantized base" in error["message"]
    assert client.post(f"/v1/adapters/{ADAPTER}/mode", json={"mode": "auto"}).status_code == 200
    for _ in range(6):  # the only traffic: auto would merge it on a full-precision base
        _complete(client, ADAPTER)
    state = client.get(f"/v1/adapters/{ADAPTER}").json()
    assert state["residency"] != "merged" and state["merge_mode"] == "auto"
    _complete(client, "demo")  # still serving


def _serve_fails(tmp_path, env: dict[str, str], pythonpath: str = "") -> str:
    """`loraplex serve` with these settings: exits 2 at once with one line, no traceback."""
    full = {"PATH": "/usr/bin:/bin", "HOME": str(tmp_path), "PYTHONPATH": f"{pythonpath}:{REPO_ROOT / 'service'}",
            "LORAPLEX_DATA_DIR": str(tmp_path / "data"), "LORAPLEX_PORT": "1", "LORAPLEX_START_LOCAL_WORKER": "false", **env}
    proc = subprocess.run([sys.executable, "-m", "loraplex", "serve"], cwd=REPO_ROOT, env=full, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    return proc.stderr


def test_start_up_errors_name_the_cause(tmp_path, served):
    _, model_dir, _ = served
    assert "quantization" in _serve_fails(tmp_path, {"LORAPLEX_QUANTIZATION": "int4"})
    gptq = tmp_path / "gptq-model"
    gptq.mkdir()
    config = json.loads((model_dir / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "gptq", "bits": 4}
    (gptq / "config.json").write_text(json.dumps(config))
    stderr = _serve_fails(tmp_path, {"LORAPLEX_MODEL": str(gptq)})
    assert "quantized with 'gptq'" in stderr and "bitsandbytes" in stderr
    missing = tmp_path / "no-bnb" / "bitsandbytes"  # an installation without the extra
    missing.mkdir(parents=True)
    (missing / "__init__.py").write_text("raise ImportError('No module named bitsandbytes')\n")
    stderr = _serve_fails(tmp_path, {"LORAPLEX_MODEL": str(model_dir), "LORAPLEX_QUANTIZATION": "nf4"}, str(missing.parent))
    assert "pip install 'loraplex[quant]'" in stderr
