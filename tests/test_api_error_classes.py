"""Every typed error of every layer reaches the caller through the API's one handler, as the OpenAI
envelope with the status, code, param and type the class declares (no per-layer table)."""
from __future__ import annotations

import errno

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient

from loraplex.api import errors as api
from loraplex.api.errors import install_error_handlers
from loraplex.engine import errors as engine
from loraplex.errors import LoraplexError
from loraplex.registry import errors as registry
from loraplex.training.datasets import DatasetError
from loraplex.training.errors import FileNotFound, JobNotFound, JobStoreUnavailable, TooManyJobs
from loraplex.training.hyperparams import HyperparameterError

BAD, RATE, SERVER = "invalid_request_error", "rate_limit_error", "server_error"
HIDDEN = "Internal server error."  # a 500 tells the caller nothing more
# error, status, code, param, type, message (None: the error's own), headers that must come along
CASES = [
    (engine.EngineError("rope type 'x' is not supported"), 500, "internal_error", None, SERVER, HIDDEN, {}),
    (engine.QueueFullError("", retry_after_s=3), 429, "queue_full", None, RATE, "Server is at capacity.", {"retry-after": "3"}),
    (engine.PromptTooLongError("too long"), 400, "context_length_exceeded", None, BAD, None, {}),
    (engine.InvalidRequestError("bad bias", param="logit_bias"), 400, "invalid_parameter", "logit_bias", BAD, None, {}),
    (engine.InvalidRequestError("the prompt is empty"), 400, "invalid_parameter", None, BAD, None, {}),
    (engine.AdapterError("rank 64 exceeds max_lora_rank 16"), 400, "invalid_adapter", "model", BAD, None, {}),
    (engine.EngineNotRunningError(), 503, "engine_not_running", None, SERVER, "The engine is not running.", {"retry-after": "1"}),
    (registry.RegistryError("?"), 500, "internal_error", None, SERVER, HIDDEN, {}),
    (registry.AdapterNotFound("acme/nope"), 404, "model_not_found", "model", BAD, "The model `acme/nope` does not exist.", {}),
    (registry.InvalidAdapter("acme/sql", "bad"), 400, "invalid_adapter", "model", BAD, None, {}),
    (registry.InvalidAdapterFile("must be an integer", "r"), 400, "invalid_adapter", "r", BAD, None, {}),
    (registry.AdapterTooLarge(2, 1), 413, "adapter_too_large", None, BAD, None, {}),
    (registry.QuotaExceeded("full"), 403, "quota_exceeded", None, BAD, None, {}),
    (registry.Unauthorized("who"), 401, "unauthorized", None, BAD, None, {"www-authenticate": "Bearer"}),
    (registry.Forbidden("no"), 403, "forbidden", None, BAD, None, {}),
    (registry.RegistryUnavailable("disk"), 503, "registry_unavailable", None, SERVER, None, {}),
    (registry.StorageFull("full"), 507, "insufficient_storage", None, SERVER, None, {}),
    (registry.StorageUnavailable("ro"), 503, "storage_unavailable", None, SERVER, None, {}),
    (JobNotFound("ftjob-x"), 404, "job_not_found", "fine_tuning_job_id", BAD, "No such fine-tuning job: ftjob-x", {}),
    (TooManyJobs("3 active"), 429, "too_many_jobs", None, BAD, None, {}),
    (JobStoreUnavailable("redis"), 503, "job_store_unavailable", None, SERVER, None, {}),
    (FileNotFound("file-x"), 404, "file_not_found", "file_id", BAD, "No such File object: file-x", {}),
    (FileNotFound("file-x", "training_file"), 404, "file_not_found", "training_file", BAD, None, {}),
    (HyperparameterError("lora_r", "must be between 1 and 64"), 400, "invalid_hyperparameters", "lora_r", BAD,
     "lora_r: must be between 1 and 64", {}),
    (DatasetError([(3, "too many tokens")]), 400, "invalid_file_format", "file", BAD, None, {}),
    (api.APIError("Not Found", code="not_found", status_code=404), 404, "not_found", None, BAD, None, {}),
    (api.InvalidParameter("n: too big", param="n"), 400, "invalid_parameter", "n", BAD, None, {}),
    (api.ModelNotFound("no", param="model"), 404, "model_not_found", "model", BAD, None, {}),
    (api.ContextLengthExceeded("long"), 400, "context_length_exceeded", None, BAD, None, {}),
    (api.PayloadTooLarge("big", param="file"), 413, "request_too_large", "file", BAD, None, {}),
    (api.RateLimited("slow down", headers={"Retry-After": "2"}), 429, "queue_full", None, RATE, None, {"retry-after": "2"}),
    (api.ServiceUnavailable("draining"), 503, "engine_not_running", None, SERVER, None, {}),
    (api.InternalError("The engine returned no output."), 500, "internal_error", None, SERVER, None, {}),
    (api.ClientDisconnected("gone"), 499, "client_disconnected", None, BAD, None, {}),
    (OSError(errno.ENOSPC, "No space left on device"), 507, "insufficient_storage", None, SERVER, None, {}),
    (OSError(errno.EROFS, "Read-only file system"), 503, "storage_unavailable", None, SERVER, None, {}),
    (RuntimeError("secret detail"), 500, "internal_error", None, SERVER, HIDDEN, {}),
]


@pytest.fixture(scope="module")
def client():
    app = FastAPI()
    install_error_handlers(app)

    @app.get("/raise/{index}")
    def raise_case(index: int):
        raise CASES[index][0]

    with TestClient(app, raise_server_exceptions=False) as test_client:
        yield test_client


@pytest.mark.parametrize("index", range(len(CASES)), ids=[type(case[0]).__name__ for case in CASES])
def test_error_maps_to_its_envelope_through_the_one_handler(client, index):
    error, status, code, param, error_type, message, headers = CASES[index]
    response = client.get(f"/raise/{index}")
    assert response.status_code == status
    expected = message or (error.message if isinstance(error, LoraplexError) else None)
    body = response.json()["error"]
    assert body["code"] == code and body["param"] == param and body["type"] == error_type, body
    if expected is not None:
        assert body["message"] == expected
    else:  # an OSError: the storage error names the action and the reason
        assert "cannot write to storage" in body["message"] and error.strerror in body["message"]
    for name, value in headers.items():
        assert response.headers[name] == value


def _all_subclasses(cls: type) -> set[type]:
    return {sub for direct in cls.__subclasses__() for sub in {direct, *_all_subclasses(direct)}}


def test_every_error_class_is_covered_and_declares_a_status_and_code():
    everywhere = {cls for cls in _all_subclasses(LoraplexError) if cls.__module__.startswith("loraplex.")}
    for cls in everywhere:  # classes added elsewhere later too: a status the envelope can carry, a stable code
        assert 400 <= cls.status <= 599 and (cls.code is None or cls.code.islower()), cls
    error_modules = {"loraplex.api.errors", "loraplex.engine.errors", "loraplex.registry.errors",
                     "loraplex.training.errors"}
    listed = {cls for cls in everywhere if cls.__module__ in error_modules}
    assert listed - {type(case[0]) for case in CASES} == set(), "add the new error classes to CASES"
