"""The error envelope in the published OpenAPI schema: every operation documents `ErrorResponse` under the
statuses it can answer, instead of the 422 `HTTPValidationError` FastAPI would advertise and this service
never sends (validation is a 400)."""
from __future__ import annotations

from typing import Any

from fastapi import FastAPI

from loraplex.api.schemas.errors import ErrorResponse

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


def publish_errors_in_openapi(app: FastAPI) -> None:
    """Wrap `app.openapi` so that the schema FastAPI builds is patched once, then cached as before."""
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
