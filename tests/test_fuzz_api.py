"""Fuzz every operation of the published OpenAPI schema against a real `loraplex serve` process.

Schemathesis turns the schema the app publishes into requests. Per operation: its coverage cases
(deterministic: boundary values, missing and wrong-typed fields, unexpected methods), then Hypothesis
examples that fit the schema (positive) and that violate it (negative). Requests carry a tenant's or
the admin's key (coverage cases also try without one), and about half get a real model, adapter, file
or job id in place of a random one, and sampling parameters at their edge values, so they get past the
404s into the code behind them.

Each response must: not be a 5xx (a 503 only with `Retry-After`), arrive within REQUEST_TIMEOUT_S, and
be the error envelope when it is an error. Responses to the Hypothesis examples must also conform to the
schema (documented status, media type and body), and a body that breaks the schema must be refused.
After the run the server must still be healthy, have logged no traceback, and have left no staging debris.

Generation stays cheap because the server's `max_model_len` is 32: no request decodes more than 32 tokens.
CI runs 40 coverage cases and 6 Hypothesis examples per operation and mode, derandomized (the same
requests every run, about 900 in a minute). The long run takes random seeds and every coverage case:

    make fuzz    # = LORAPLEX_FUZZ_EXAMPLES=200 .venv/bin/python -m pytest tests/test_fuzz_api.py -q
"""
from __future__ import annotations

import json
import os
from collections import Counter
from pathlib import Path

import httpx
import pytest
import requests
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from schemathesis import GenerationMode
from schemathesis.core.parameters import ParameterLocation
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    negative_data_rejection,
    response_schema_conformance,
    status_code_conformance,
)

from loraplex.api.app import create_app
from loraplex.config import Settings
from loraplex.models.demo import make_demo_adapter
from tests.server_process import ServerProcess

FUZZ_EXAMPLES = int(os.environ.get("LORAPLEX_FUZZ_EXAMPLES", "6"))
IS_LONG_RUN = "LORAPLEX_FUZZ_EXAMPLES" in os.environ  # random seeds; CI is derandomized, so repeatable
MAX_COVERAGE_CASES = int(os.environ.get("LORAPLEX_FUZZ_COVERAGE_CASES", "0")) or (10_000 if IS_LONG_RUN else 40)
REQUEST_TIMEOUT_S = 20.0  # a generation is at most 32 tokens of a 1M-parameter model: well under a second
KEYS = {"acme": "fuzz-key-acme", "admin": "fuzz-key-admin"}
SERVER_SETTINGS = {
    "max_model_len": 32, "max_num_seqs": 4, "max_loras": 2, "max_lora_rank": 8, "start_local_worker": "false",
    "api_keys": f"{KEYS['acme']}:acme", "admin_key": KEYS["admin"], "max_request_bytes": 200_000,
    "max_adapter_bytes": 1_000_000, "max_file_bytes": 100_000, "log_level": "warning",
}
SEEDED_ADAPTER = "acme/fuzz"
TRAINING_FILE = b'{"prompt": "Review: fine\\nSentiment:", "completion": " positive"}\n' * 4


def published_schema() -> dict:
    """What the app serves at /openapi.json, built without a model (the lifespan never runs)."""
    app = create_app(Settings(model="demo", data_dir="/nonexistent", api_keys="key:tenant", start_local_worker=False))
    return app.openapi()


SCHEMA = schemathesis.openapi.from_dict(published_schema())
SCHEMA.config.output.sanitization.enabled = False  # it masks `max_tokens` ("token"); the keys are test keys
OPERATIONS = [result.ok() for result in SCHEMA.get_all_operations()]
CONFORMANCE_CHECKS = [status_code_conformance, content_type_conformance, response_schema_conformance]
STATUSES: Counter = Counter()  # status -> responses seen, for the closing summary


def auth(who: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {KEYS[who]}"}


# --- the server under test ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    data_dir = tmp_path_factory.mktemp("fuzz-data")
    process = ServerProcess(data_dir, data_dir.parent / f"{data_dir.name}.log", **SERVER_SETTINGS)
    process.data_dir = data_dir
    try:
        process.wait_ready()
        yield process
    finally:
        process.stop()


@pytest.fixture(scope="module")
def http(server):
    with requests.Session() as session:  # keep-alive: one connection for thousands of requests
        yield session


@pytest.fixture(scope="module")
def adapter_upload(server, tmp_path_factory) -> list:
    out = make_demo_adapter(server.data_dir / ".models" / "demo", tmp_path_factory.mktemp("fuzz-adapter"), r=4, seed=5)
    return [("files", (name, (out / name).read_bytes())) for name in ("adapter_config.json", "adapter_model.safetensors")]


@pytest.fixture
def known_ids(server, http, adapter_upload) -> dict[str, list[str]]:
    """Real ids for the fuzz to use, re-created before each operation (a fuzzed DELETE may have hit them)."""
    url, headers = server.url, auth("acme")
    if http.get(f"{url}/v1/adapters/{SEEDED_ADAPTER}", headers=headers).status_code != 200:
        response = http.post(f"{url}/v1/adapters", headers=headers, data={"name": "fuzz"}, files=adapter_upload)
        assert response.status_code == 201, response.text
    files = http.get(f"{url}/v1/files", headers=headers).json()["data"]
    if not files:
        response = http.post(f"{url}/v1/files", headers=headers, data={"purpose": "fine-tune"},
                             files={"file": ("train.jsonl", TRAINING_FILE)})
        assert response.status_code == 200, response.text
        files = [response.json()]
    jobs = http.get(f"{url}/v1/fine_tuning/jobs", headers=headers).json()["data"]
    if not jobs:
        response = http.post(f"{url}/v1/fine_tuning/jobs", headers=headers,
                             json={"model": "demo", "training_file": files[0]["id"]})
        assert response.status_code == 200, response.text
        jobs = [response.json()]
    return {
        "model": ["demo", SEEDED_ADAPTER, f"{SEEDED_ADAPTER}@1"],
        "adapter": [SEEDED_ADAPTER, f"{SEEDED_ADAPTER}@1"],
        "file": [files[0]["id"]],
        "job": [jobs[0]["id"]],
    }


# --- steering random cases towards real objects ------------------------------------------------------

PATH_KINDS = {"model_id": "model", "adapter_id": "adapter", "file_id": "file", "job_id": "job"}
BODY_KINDS = {"model": "model", "training_file": "file", "validation_file": "file"}


# Valid by the schema, rarely drawn at random, and where numerical code breaks: subnormal temperatures
# divide logits to inf, a top_k beyond the vocabulary, the largest seed.
EDGE_VALUES = {
    "temperature": [5e-324, 1e-300, 1e-30, 2.0], "top_p": [5e-324, 1e-300, 1.0], "top_k": [1, 2**31, 10**12],
    "seed": [0, 2**63 - 1], "max_tokens": [1], "max_new_tokens": [1], "max_completion_tokens": [1],
}


def steer(case, known: dict[str, list[str]], pick: int) -> None:
    """Replace generated ids with real ones (the `pick`-th of each kind), where the case has such a field,
    and sampling parameters with edge values."""
    for name, kind in PATH_KINDS.items():
        if case.path_parameters and name in case.path_parameters:
            case.path_parameters[name] = known[kind][pick % len(known[kind])]
    body = case.body if isinstance(case.body, dict) else {}
    for name, kind in BODY_KINDS.items():
        if isinstance(body.get(name), str):
            body[name] = known[kind][pick % len(known[kind])]
    parameters = body.get("parameters")
    if isinstance(parameters, dict) and isinstance(parameters.get("adapter_id"), str):
        parameters["adapter_id"] = known["adapter"][pick % len(known["adapter"])]
    for fields in (body, parameters if isinstance(parameters, dict) else {}):
        for name, values in EDGE_VALUES.items():
            if isinstance(fields.get(name), int | float) and not isinstance(fields[name], bool):
                fields[name] = values[pick % len(values)]


# --- checks ------------------------------------------------------------------------------------------


def check_response(case, response: requests.Response, who: str) -> None:
    STATUSES[response.status_code] += 1
    where = f"{case.operation.label}: {case.as_curl_command(headers=auth(who))}"
    assert response.status_code < 500 or _is_retryable_503(response), f"{where}\n-> {response.status_code} {response.text[:500]}"
    if response.status_code >= 400:
        assert_envelope(response, where)


def _is_retryable_503(response: requests.Response) -> bool:
    """Admin residency actions answer 503 + Retry-After when every slot is busy: a state, not a bug."""
    return response.status_code == 503 and "retry-after" in {name.lower() for name in response.headers}


def assert_envelope(response: requests.Response, where: str) -> None:
    try:
        body = response.json()
    except ValueError:
        pytest.fail(f"{where}\n-> {response.status_code} is not JSON: {response.text[:300]!r}")
    assert isinstance(body, dict) and set(body) == {"error"}, f"{where}\n-> not the envelope: {body}"
    error = body["error"]
    assert isinstance(error, dict) and set(error) == {"message", "type", "param", "code"}, f"{where}\n-> {error}"
    assert isinstance(error["message"], str) and error["message"].strip(), f"{where}\n-> empty message"
    assert "Traceback" not in error["message"] and isinstance(error["type"], str), f"{where}\n-> {error}"


def call(case, server, http, who: str) -> requests.Response:
    try:
        return case.call(base_url=server.url, session=http, headers=auth(who), timeout=REQUEST_TIMEOUT_S)
    except requests.Timeout:
        pytest.fail(f"no answer within {REQUEST_TIMEOUT_S}s (hang): {case.as_curl_command(headers=auth(who))}")


def run_case(case, server, http, who: str, steered: bool) -> None:
    response = call(case, server, http, who)
    check_response(case, response, who)
    checks = CONFORMANCE_CHECKS + ([negative_data_rejection] if must_be_rejected(case) and not steered else [])
    case.validate_response(response, checks=checks)


def must_be_rejected(case) -> bool:
    """A body that breaks the schema must be refused (request models forbid extra fields). Unknown query
    parameters are ignored, as HTTP servers do, so a case negative in its query proves nothing."""
    meta = case.meta
    return meta is not None and meta.is_negative_at(ParameterLocation.BODY) and not meta.is_negative_at(ParameterLocation.QUERY)


def caller(pick: int) -> str:
    return "admin" if pick % 2 else "acme"  # the admin reaches the admin-only actions


# --- the fuzz ----------------------------------------------------------------------------------------


def test_served_schema_is_the_fuzzed_one(server):
    """The schema fuzzed below is built in-process; it must be the one the server publishes."""
    served = httpx.get(f"{server.url}/openapi.json", timeout=10).json()
    assert served == published_schema()
    assert "HTTPValidationError" not in json.dumps(served)  # every error is documented as the envelope


@pytest.mark.parametrize("operation", OPERATIONS, ids=lambda op: op.label)
def test_coverage_cases(operation, server, http, known_ids):
    """Schemathesis' deterministic cases: boundaries, each field missing or of a wrong type, other methods."""
    cases = list(SCHEMA.iter_coverage_cases(operation, generation_modes=list(GenerationMode),
                                            generation_config=SCHEMA.config.generation_for(operation=operation)))
    stride = -(-len(cases) // MAX_COVERAGE_CASES)  # an even sample over positive and negative cases alike
    for index, case in enumerate(cases[::stride]):
        if index % 2:
            steer(case, known_ids, index // 2)
        who = caller(index // 2)
        check_response(case, call(case, server, http, who), who)


def has_inputs(operation) -> bool:
    return bool(operation.path_parameters or operation.query or operation.body)


RANDOM_CASES = [(op, mode) for op in OPERATIONS for mode in GenerationMode if mode is GenerationMode.POSITIVE or has_inputs(op)]


@pytest.mark.parametrize(("operation", "mode"), RANDOM_CASES, ids=lambda value: getattr(value, "label", None) or value.value)
def test_random_cases(operation, mode, server, http, known_ids):
    """Hypothesis examples that fit the schema (positive) or break it (negative)."""

    @settings(max_examples=FUZZ_EXAMPLES, deadline=None, database=None, derandomize=not IS_LONG_RUN,
              suppress_health_check=list(HealthCheck), print_blob=True)
    @given(case=operation.as_strategy(generation_mode=mode), pick=st.integers(0, 5))
    def fuzz(case, pick):
        steered = bool(pick % 3)  # two thirds of the cases name real objects
        if steered:
            steer(case, known_ids, pick)
        run_case(case, server, http, caller(pick), steered)

    fuzz()


# --- regressions: what fuzzing found -----------------------------------------------------------------


def test_tiny_temperature_samples_greedily(server, http):
    """temperature=1e-300 (valid: the schema says >= 0) divided the logits to inf and the softmax to NaN;
    the failed engine step then failed every request in the batch with a 500, other tenants' included.
    Found probing the boundaries schemathesis probes (it sends top_p=5e-324), then added to EDGE_VALUES,
    with which the fuzz finds it on its own. Below 1e-5 a temperature now means greedy, as in vLLM."""
    def text(path: str, body: dict) -> str:
        response = http.post(f"{server.url}{path}", headers=auth("acme"), json=body, timeout=REQUEST_TIMEOUT_S)
        assert response.status_code == 200, response.text
        return response.text

    prompt = {"model": "demo", "prompt": "Once upon a time", "max_tokens": 6, "seed": 1}
    greedy = json.loads(text("/v1/completions", {**prompt, "temperature": 0}))["choices"][0]["text"]
    for temperature in (5e-324, 1e-300, 1e-6):
        sampled = json.loads(text("/v1/completions", {**prompt, "temperature": temperature, "top_p": 5e-324}))
        assert sampled["choices"][0]["text"] == greedy
    parameters = {"do_sample": True, "temperature": 1e-300, "max_new_tokens": 4}
    assert json.loads(text("/generate", {"inputs": "Once", "parameters": parameters}))["generated_text"]


def test_server_is_healthy_after_the_fuzz(server, http, known_ids):
    url = server.url
    assert http.get(f"{url}/healthz", timeout=5).status_code == 200
    assert http.get(f"{url}/readyz", timeout=5).status_code == 200
    for model in ("demo", SEEDED_ADAPTER):
        body = {"model": model, "prompt": "Once upon a time", "max_tokens": 8, "temperature": 0}
        response = http.post(f"{url}/v1/completions", headers=auth("acme"), json=body, timeout=REQUEST_TIMEOUT_S)
        assert response.status_code == 200, response.text
        assert response.json()["usage"]["completion_tokens"] >= 1
    log = Path(server.log_path).read_text(errors="replace")
    assert "Traceback" not in log and "unhandled error" not in log, log[-4000:]
    leftovers = [p for hidden in (".staging", ".trash") for p in (server.data_dir / hidden).rglob("*")]
    assert leftovers == []
    print(f"\nfuzz: {sum(STATUSES.values())} requests over {len(OPERATIONS)} operations, statuses {dict(sorted(STATUSES.items()))}")
