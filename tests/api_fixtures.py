"""Session fixtures for the HTTP tests: one real engine on the demo model, tiny PEFT adapters, and the
app served two ways: `TestClient` (in-process ASGI) and uvicorn on a local port (for clients that
bring their own HTTP stack, such as `text_generation`, and for real disconnects).
"""
from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import uvicorn
from fastapi.testclient import TestClient

from loraplex.api import create_app
from loraplex.config import Settings
from loraplex.engine_factory import build_engine
from loraplex.models.demo import ensure_demo_model, ensure_example_adapter, make_demo_adapter

MAX_MODEL_LEN = 512
MAX_STOP_SEQUENCES = 4
MAX_REQUEST_BYTES = 100_000
GOOD_ADAPTER = "acme/sql"
OTHER_ADAPTER = "globex/chat"
DORA_ADAPTER = "acme/dora"
IA3_ADAPTER = "acme/ia3"  # a kind that cannot be served
BIG_RANK_ADAPTER = "acme/big"


@pytest.fixture(scope="session")
def api_settings(tmp_path_factory) -> Settings:
    return Settings(
        model="demo",
        data_dir=tmp_path_factory.mktemp("api-data"),
        device="cpu",
        dtype="float32",
        max_model_len=MAX_MODEL_LEN,
        max_num_seqs=8,
        max_loras=2,
        max_lora_rank=16,
        max_stop_sequences=MAX_STOP_SEQUENCES,
        max_request_bytes=MAX_REQUEST_BYTES,
        max_prompt_chars=20_000,
    )


@pytest.fixture(scope="session")
def api_adapters(api_settings) -> dict[str, Path]:
    """Adapters written the way users write them: PEFT `save_pretrained` into `<data_dir>/<tenant>/<name>/`."""
    data_dir = Path(api_settings.data_dir)
    model_dir = ensure_demo_model(data_dir, seed=api_settings.seed)
    paths = {
        GOOD_ADAPTER: make_demo_adapter(model_dir, data_dir / GOOD_ADAPTER, r=8, seed=1),
        OTHER_ADAPTER: make_demo_adapter(
            model_dir, data_dir / OTHER_ADAPTER, r=4, target_modules=("q_proj", "o_proj", "down_proj"), seed=2
        ),
        BIG_RANK_ADAPTER: make_demo_adapter(model_dir, data_dir / BIG_RANK_ADAPTER, r=32, seed=3),
    }
    paths[DORA_ADAPTER] = make_peft_adapter(model_dir, data_dir / DORA_ADAPTER, use_dora=True)
    paths[IA3_ADAPTER] = make_ia3_adapter(model_dir, data_dir / IA3_ADAPTER)
    paths["demo/example"] = ensure_example_adapter(data_dir, seed=api_settings.seed)  # README's examples use it
    return paths


def make_peft_adapter(model_dir: Path, out_dir: Path, **lora_fields) -> Path:
    """A LoRA variant `make_demo_adapter` cannot express (DoRA, biases...), from real base weights."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(model_dir)
    fields = {"r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj"], "init_lora_weights": False}
    config = LoraConfig(task_type="CAUSAL_LM", **{**fields, **lora_fields})
    torch.manual_seed(0)
    get_peft_model(base, config).save_pretrained(out_dir)
    return out_dir


def make_ia3_adapter(model_dir: Path, out_dir: Path) -> Path:
    from peft import IA3Config, get_peft_model
    from transformers import AutoModelForCausalLM

    config = IA3Config(task_type="CAUSAL_LM", target_modules=["k_proj", "v_proj", "down_proj"], feedforward_modules=["down_proj"])
    get_peft_model(AutoModelForCausalLM.from_pretrained(model_dir), config).save_pretrained(out_dir)
    return out_dir


@pytest.fixture(scope="session")
def api_engine(api_settings, api_adapters):
    engine = build_engine(api_settings)
    engine.start()
    yield engine
    engine.shutdown()


@pytest.fixture(scope="session")
def api_client(api_settings, api_engine) -> Iterator[TestClient]:
    with TestClient(create_app(api_settings, api_engine)) as client:
        yield client


@pytest.fixture(scope="session")
def api_server_url(api_settings, api_engine) -> Iterator[str]:
    """The same engine behind a real uvicorn server on 127.0.0.1 (another app instance)."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    config = uvicorn.Config(create_app(api_settings, api_engine), log_level="warning", lifespan="on")
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert time.monotonic() < deadline, "uvicorn did not start"
        time.sleep(0.02)
    yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    server.should_exit = True
    thread.join(timeout=10)
    sock.close()


def completion(client, **fields) -> dict:
    """POST /v1/completions with greedy defaults; asserts 200 and returns the JSON body."""
    body = {"model": "demo", "prompt": "The river ran", "max_tokens": 12, "temperature": 0, **fields}
    response = client.post("/v1/completions", json=body)
    assert response.status_code == 200, response.text
    return response.json()


def sse_payloads(text: str, prefix: str = "data: ") -> list[str]:
    """The data of each SSE event, in order (raw strings: the last OpenAI one is `[DONE]`)."""
    return [line[len(prefix):] for line in text.split("\n") if line.startswith(prefix)]


def wait_until(predicate, timeout_s: float = 5.0, interval_s: float = 0.01) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval_s)
    return predicate()
