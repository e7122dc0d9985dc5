"""Every failure leaves the service in one envelope: `{"error": {message, type, param, code}}`.

Engine and registry errors are typed; this module is the only place that maps them to HTTP statuses.
FastAPI's own failures (validation, unknown route, wrong method, oversized body) get the same envelope.
"""
from __future__ import annotations

import json
import logging
import re
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from loraplex.api.schemas.errors import ErrorInfo, ErrorResponse
from loraplex.engine import errors as engine_errors
from loraplex.registry import AdapterNotFound, InvalidAdapter, RegistryError
from loraplex.registry import errors as registry_errors

log = logging.getLogger(__name__)

INVALID_REQUEST = "invalid_request_error"
SERVER_ERROR = "server_error"


class APIError(Exception):
    """An error raised by the API layer itself, carrying everything the envelope needs."""

    status_code = 400
    error_type = INVALID_REQUEST
    code: str | int | None = None

    def __init__(self, message: str, param: str | None = None, headers: dict[str, str] | None = None,
                 code: str | None = None, status_code: int | None = None):
        super().__init__(message)
        self.message = message
        self.param = param
        self.headers = headers
        if code is not None:
            self.code = code
        if status_code is not None:
            self.status_code = status_code
            self.error_type = INVALID_REQUEST if status_code < 500 else SERVER_ERROR


class InvalidParameter(APIError):
    code = "invalid_parameter"


class ModelNotFound(APIError):
    status_code = 404
    code = "model_not_found"


class ContextLengthExceeded(APIError):
    code = "context_length_exceeded"


class PayloadTooLarge(APIError):
    status_code = 413
    code = "request_too_large"


class RateLimited(APIError):
    status_code = 429
    error_type = "rate_limit_error"
    code = "queue_full"


class ServiceUnavailable(APIError):
    status_code = 503
    error_type = SERVER_ERROR
    code = "engine_not_running"


class InternalError(APIError):
    status_code = 500
    error_type = SERVER_ERROR
    code = "internal_error"


class ClientDisconnected(APIError):
    status_code = 499  # nginx's convention; nobody is left to read it
    code = "client_disconnected"


class RequestTooLarge(StarletteHTTPException):
    """An HTTPException so that FastAPI re-raises it unchanged when reading the body fails."""

    def __init__(self, max_bytes: int):
        super().__init__(status_code=413, detail=f"Request body is larger than {max_bytes} bytes.")


def to_api_error(exc: Exception) -> APIError:
    """Translate an engine or registry error into the API's terms; anything else is a logged 500."""
    if isinstance(exc, APIError):
        return exc
    if isinstance(exc, AdapterNotFound):
        return ModelNotFound(f"The model `{exc.adapter_id}` does not exist.", param="model")
    if isinstance(exc, InvalidAdapter | engine_errors.AdapterError):
        param = getattr(exc, "param", None) or "model"  # uploads name the offending file or field
        return InvalidParameter(str(exc), param=param, code="invalid_adapter")
    if isinstance(exc, RegistryError):
        return _registry_error(exc)
    if isinstance(exc, engine_errors.PromptTooLongError):
        return ContextLengthExceeded(str(exc))
    if isinstance(exc, engine_errors.InvalidRequestError):
        return InvalidParameter(str(exc), param=exc.param)
    if isinstance(exc, engine_errors.QueueFullError):
        return RateLimited(str(exc) or "Server is at capacity.", headers={"Retry-After": str(exc.retry_after_s)})
    if isinstance(exc, engine_errors.EngineNotRunningError):
        return ServiceUnavailable(str(exc) or "The engine is not running.", headers={"Retry-After": "1"})
    if isinstance(exc, OSError) and (storage := registry_errors.storage_error(exc, "write to storage")) is not None:
        log.error("storage failure: %s", exc)  # a full or read-only volume: 507/503, not a 500 "bug"
        return _registry_error(storage)
    log.error("unhandled error", exc_info=exc)
    return InternalError("Internal server error.")


def _registry_error(exc: RegistryError) -> APIError:
    """Registry errors carry their own status and code (see registry/errors.py)."""
    status = registry_errors.http_status(exc)
    headers = {"WWW-Authenticate": "Bearer"} if status == 401 else None
    code = registry_errors.error_code(exc)
    return APIError(str(exc), registry_errors.error_param(exc), headers, code=code, status_code=status)


class EnvelopeResponse(JSONResponse):
    """ASCII-escaped JSON: a message may quote the caller's input (a model id, a parameter), and no input,
    not even a lone surrogate, may turn the refusal of it into a failure to encode the refusal."""

    def render(self, content: Any) -> bytes:
        return json.dumps(content, ensure_ascii=True, allow_nan=False, separators=(",", ":")).encode("ascii")


def error_response(error: APIError) -> JSONResponse:
    return EnvelopeResponse(error_body(error), status_code=error.status_code, headers=error.headers)


def error_body(error: APIError) -> dict[str, Any]:
    info = ErrorInfo(message=error.message, type=error.error_type, param=error.param, code=error.code)
    return ErrorResponse(error=info).model_dump()


def install_error_handlers(app: FastAPI) -> None:
    _publish_errors_in_openapi(app)
    app.add_exception_handler(RequestValidationError, _on_validation_error)
    app.add_exception_handler(StarletteHTTPException, _on_http_exception)
    for known in (APIError, engine_errors.EngineError, RegistryError, OSError):  # OSError: a full or read-only volume
        app.add_exception_handler(known, _on_any_error)
    app.add_exception_handler(Exception, _on_any_error)  # bugs: logged, 500 envelope (then re-raised by Starlette)


async def _on_any_error(request: Request, exc: Exception) -> JSONResponse:
    return error_response(to_api_error(exc))


async def _on_validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
    first = exc.errors()[0] if exc.errors() else {"msg": "Invalid request.", "loc": ()}
    if first.get("type") == "json_invalid":
        message = f"Request body is not valid JSON: {first.get('ctx', {}).get('error', 'decode error')}"
        return error_response(InvalidParameter(message))
    if tuple(first.get("loc", ())) == ("body",):  # the body as a whole: absent, or not an object
        return error_response(InvalidParameter(_WHOLE_BODY_MESSAGES.get(first.get("type"), str(first.get("msg")))))
    param = _param_of(first.get("loc", ()))
    # A union field (`stop: str | list[str]`) fails once per alternative: one message naming them all.
    reasons = [str(e.get("msg", "")).removeprefix("Value error, ") for e in exc.errors() if _param_of(e.get("loc", ())) == param]
    message = " or ".join(dict.fromkeys(reasons[:4])) or str(first.get("msg", "Invalid request."))
    return error_response(InvalidParameter(f"{param}: {message}" if param else message, param=param))


async def _on_http_exception(request: Request, exc: StarletteHTTPException) -> JSONResponse:
    headers = getattr(exc, "headers", None)
    code = _HTTP_CODES.get(exc.status_code)
    message = _unparsable_body_message(exc.__cause__) or str(exc.detail)
    return error_response(APIError(message, headers=headers, code=code, status_code=exc.status_code))


def _param_of(loc: tuple) -> str | None:
    """("body", "stop", "list[str]", 0) -> "stop.0": no location prefix, no pydantic union tags."""
    parts = list(loc[1:] if loc and loc[0] in _LOCATIONS else loc)
    return ".".join(str(p) for p in parts if not (isinstance(p, str) and _UNION_TAG.fullmatch(p))) or None


def _unparsable_body_message(cause: BaseException | None) -> str | None:
    """FastAPI answers "There was an error parsing the body" for every body it cannot decode; its cause says why."""
    if isinstance(cause, UnicodeDecodeError):
        return f"Request body is not valid UTF-8 (invalid byte at position {cause.start})."
    if isinstance(cause, RecursionError):
        return "Request body cannot be parsed: it nests too deeply."
    if isinstance(cause, ValueError):  # e.g. a JSON integer over Python's digit limit
        return f"Request body cannot be parsed: {cause}"
    return None


_LOCATIONS = ("body", "query", "path", "header", "cookie")
_UNION_TAG = re.compile(r"str|int|float|bool|bytes|none|[a-z-]+\[.*\]")  # `list[int]`, `function-after[...]`
_HTTP_CODES = {400: "invalid_request_body", 404: "not_found", 405: "method_not_allowed", 413: "request_too_large"}
_WHOLE_BODY_MESSAGES = {
    "missing": "Request body is required: send a JSON object (Content-Type: application/json).",
    "model_attributes_type": "Request body must be a JSON object (Content-Type: application/json).",
    "dict_type": "Request body must be a JSON object (Content-Type: application/json).",
}


# --- the envelope in the published OpenAPI schema ----------------------------------------------------

_ERROR_DESCRIPTIONS = {
    400: "Invalid parameters, body or adapter (the message and `param` say which).",
    401: "Missing or unknown API key.",
    403: "Not allowed: an admin action, another tenant's upload, a quota.",
    404: "Unknown route object, or one of another tenant (the same answer for both).",
    413: "Request body or upload over its size limit.",
    429: "Queue full or tenant rate limit; retry after `Retry-After` seconds.",
    503: "Model loading, server draining or storage unavailable; retry after `Retry-After` seconds.",
    507: "The storage volume is full.",
}
_PROBES = ("/readyz", "/startupz")
_WRITES_STORAGE = {"adapters", "files", "fine-tuning"}  # router tags whose changes land on the data volume


def _publish_errors_in_openapi(app: FastAPI) -> None:
    """Every operation documents the envelope under the statuses it can answer, instead of the 422
    `HTTPValidationError` FastAPI would advertise and this service never sends (validation is a 400)."""
    build_schema = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            _describe_errors(build_schema())  # FastAPI caches what it built in app.openapi_schema
        return app.openapi_schema

    app.openapi = openapi


def _describe_errors(schema: dict[str, Any]) -> None:
    envelope = ErrorResponse.model_json_schema(ref_template="#/components/schemas/{model}")
    components = schema.setdefault("components", {}).setdefault("schemas", {})
    components.update(envelope.pop("$defs", {}), ErrorResponse=envelope)
    for unused in ("HTTPValidationError", "ValidationError"):
        components.pop(unused, None)
    for path, operations in schema.get("paths", {}).items():
        for method, operation in operations.items():
            responses = operation.setdefault("responses", {})
            responses.pop("422", None)
            for status in _error_statuses(path, method, operation):
                responses[str(status)] = {
                    "description": _ERROR_DESCRIPTIONS[status],
                    "content": {"application/json": {"schema": {"$ref": "#/components/schemas/ErrorResponse"}}},
                }


def _error_statuses(path: str, method: str, operation: dict[str, Any]) -> list[int]:
    statuses = []
    if operation.get("parameters") or operation.get("requestBody"):
        statuses.append(400)
    if operation.get("security"):  # every authenticated route: auth, ownership, limits, availability
        statuses += [401, 403, 404, 429, 503]
    elif path in _PROBES:
        statuses.append(503)
    if operation.get("requestBody"):
        statuses.append(413)
    if method != "get" and _WRITES_STORAGE & set(operation.get("tags", ())):
        statuses.append(507)
    return sorted(statuses)
