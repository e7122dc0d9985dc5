"""Every failure leaves the service in one envelope: `{"error": {message, type, param, code}}`.

Engine and registry errors are typed; this module is the only place that maps them to HTTP statuses.
FastAPI's own failures (validation, unknown route, wrong method, oversized body) get the same envelope.
"""
from __future__ import annotations

import logging
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
        return InvalidParameter(str(exc))
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


def error_response(error: APIError) -> JSONResponse:
    return JSONResponse(error_body(error), status_code=error.status_code, headers=error.headers)


def error_body(error: APIError) -> dict[str, Any]:
    info = ErrorInfo(message=error.message, type=error.error_type, param=error.param, code=error.code)
    return ErrorResponse(error=info).model_dump()


def install_error_handlers(app: FastAPI) -> None:
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
    param = ".".join(str(part) for part in first.get("loc", ()) if part != "body") or None
    message = str(first.get("msg", "Invalid request.")).removeprefix("Value error, ")
    return error_response(InvalidParameter(f"{param}: {message}" if param else message, param=param))


async def _on_http_exception(request: Request, exc: StarletteHTTPException) -> JSONResponse:
    headers = getattr(exc, "headers", None)
    code = _HTTP_CODES.get(exc.status_code)
    return error_response(APIError(str(exc.detail), headers=headers, code=code, status_code=exc.status_code))


_HTTP_CODES = {404: "not_found", 405: "method_not_allowed", 413: "request_too_large"}
