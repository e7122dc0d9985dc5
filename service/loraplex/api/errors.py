"""Every failure leaves the service in one envelope: `{"error": {message, type, param, code}}`.

Engine, registry and training errors derive from `LoraplexError` (loraplex/errors.py) and carry their own
status, code and param; this module maps that one base class. FastAPI's own failures (validation, unknown
route, wrong method, oversized body) get the same envelope.
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

from loraplex.api.openapi import publish_errors_in_openapi
from loraplex.api.schemas.errors import ErrorInfo, ErrorResponse
from loraplex.errors import LoraplexError
from loraplex.registry.errors import storage_error

log = logging.getLogger(__name__)


class APIError(LoraplexError):
    """An error raised by the API layer itself (a parameter only the API checks, a probe, a size limit)."""

    status = 400
    code = None

    def __init__(self, message: str, param: str | None = None, headers: dict[str, str] | None = None,
                 code: str | None = None, status_code: int | None = None):
        super().__init__(message, param, code=code, status=status_code, headers=headers)


class InvalidParameter(APIError):
    code = "invalid_parameter"


class ModelNotFound(APIError):
    status = 404
    code = "model_not_found"


class ContextLengthExceeded(APIError):
    code = "context_length_exceeded"


class PayloadTooLarge(APIError):
    status = 413
    code = "request_too_large"


class RateLimited(APIError):
    status = 429
    code = "queue_full"
    is_rate_limit = True


class ServiceUnavailable(APIError):
    status = 503
    code = "engine_not_running"


class InternalError(APIError):
    status = 500
    code = "internal_error"


class ClientDisconnected(APIError):
    status = 499  # nginx's convention; nobody is left to read it
    code = "client_disconnected"


class RequestTooLarge(StarletteHTTPException):
    """An HTTPException so that FastAPI re-raises it unchanged when reading the body fails."""

    def __init__(self, max_bytes: int):
        super().__init__(status_code=413, detail=f"Request body is larger than {max_bytes} bytes.")


def to_api_error(exc: Exception) -> LoraplexError:
    """Every typed error as it is; a full or read-only volume as its storage error; anything else (a bug)
    a logged 500 that tells the caller nothing more."""
    if isinstance(exc, OSError) and (storage := storage_error(exc, "write to storage")) is not None:
        log.error("storage failure: %s", exc)  # a full or read-only volume: 507/503, not a 500 "bug"
        return storage
    if not isinstance(exc, LoraplexError) or (exc.status == 500 and not isinstance(exc, InternalError)):
        log.error("unhandled error", exc_info=exc)
        return InternalError("Internal server error.")
    if exc.status > 500:
        log.error("%s (%s): %s", type(exc).__name__, exc.status, exc.message)
    return exc


class EnvelopeResponse(JSONResponse):
    """ASCII-escaped JSON: a message may quote the caller's input (a model id, a parameter), and no input,
    not even a lone surrogate, may turn the refusal of it into a failure to encode the refusal."""

    def render(self, content: Any) -> bytes:
        return json.dumps(content, ensure_ascii=True, allow_nan=False, separators=(",", ":")).encode("ascii")


def error_response(error: LoraplexError) -> JSONResponse:
    return EnvelopeResponse(error_body(error), status_code=error.status, headers=error.headers)


def error_body(error: LoraplexError) -> dict[str, Any]:
    info = ErrorInfo(message=error.message, type=error.error_type, param=error.param, code=error.code)
    return ErrorResponse(error=info).model_dump()


def install_error_handlers(app: FastAPI) -> None:
    publish_errors_in_openapi(app)
    app.add_exception_handler(RequestValidationError, _on_validation_error)
    app.add_exception_handler(StarletteHTTPException, _on_http_exception)
    for known in (LoraplexError, OSError):  # OSError: a full or read-only volume
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
