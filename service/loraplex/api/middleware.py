"""Pure ASGI middleware (no BaseHTTPMiddleware: it breaks streaming and disconnect detection)."""
from __future__ import annotations

import logging
import re
import time
import uuid

from starlette.datastructures import Headers, MutableHeaders
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from loraplex.api.drain import UNCOUNTED_PATHS, DrainState
from loraplex.api.errors import APIError, PayloadTooLarge, RequestTooLarge, ServiceUnavailable, error_response
from loraplex.api.log_config import request_id_var
from loraplex.api.metrics import ServiceMetrics

log = logging.getLogger("loraplex.access")

REQUEST_ID_HEADER = "X-Request-ID"
_REQUEST_ID_KEY = "loraplex.request_id"
_VALID_REQUEST_ID = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")  # also safe inside engine ids and logs
_CONTROL_CHARACTER = re.compile(r"[\x00-\x1f\x7f]")


def request_id_of(scope: Scope) -> str:
    return scope.get(_REQUEST_ID_KEY) or uuid.uuid4().hex


class RequestIdMiddleware:
    """Honour a well-formed X-Request-ID (else make one), keep it in the scope and echo it back."""

    def __init__(self, app: ASGIApp):
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        incoming = Headers(scope=scope).get(REQUEST_ID_HEADER, "")
        request_id = incoming if _VALID_REQUEST_ID.fullmatch(incoming) else uuid.uuid4().hex
        scope[_REQUEST_ID_KEY] = request_id
        request_id_var.set(request_id)

        async def send_with_id(message: Message) -> None:
            if message["type"] == "http.response.start":
                MutableHeaders(scope=message)[REQUEST_ID_HEADER] = request_id
            await send(message)

        await self.app(scope, receive, send_with_id)


class ControlCharacterPathMiddleware:
    """404 for a path holding a control character once percent-decoded: no route or id has one, and a
    Starlette route pattern ends in `$`, which also matches before a final newline, so without this
    `/v1/adapters/acme/x%0A` would be served as `acme/x` (one resource, two spellings)."""

    def __init__(self, app: ASGIApp):
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and _CONTROL_CHARACTER.search(scope["path"]):
            return await error_response(APIError("Not Found", code="not_found", status_code=404))(scope, receive, send)
        await self.app(scope, receive, send)


class BodySizeLimitMiddleware:
    """413 for bodies over the limit: at once when Content-Length says so, else while reading."""

    def __init__(self, app: ASGIApp, max_bytes: int, max_bytes_by_path: dict[str, int]):
        self.app = app
        self.max_bytes = max_bytes
        self.max_bytes_by_path = max_bytes_by_path  # upload routes (adapters, files) take more

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        max_bytes = self.max_bytes_by_path.get(scope["path"], self.max_bytes)
        declared = Headers(scope=scope).get("content-length", "")
        if declared.isdigit() and int(declared) > max_bytes:
            message = f"Request body is larger than {max_bytes} bytes."
            response = error_response(PayloadTooLarge(message, headers={"Connection": "close"}))
            return await response(scope, receive, send)
        num_received = 0

        async def receive_limited() -> Message:
            nonlocal num_received
            message = await receive()
            num_received += len(message.get("body", b""))
            if num_received > max_bytes:
                raise RequestTooLarge(max_bytes)  # FastAPI re-raises HTTPExceptions from body reads
            return message

        await self.app(scope, receive_limited, send)


class ObservabilityMiddleware:
    """Counts in-flight requests for the drain, refuses new work while draining, records HTTP metrics
    (labelled by route template, so cardinality stays bounded) and writes one access-log line each."""

    def __init__(self, app: ASGIApp, metrics: ServiceMetrics, drain: DrainState):
        self.app, self.metrics, self.drain = app, metrics, drain

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path = scope["path"]
        if path in UNCOUNTED_PATHS:
            return await self.app(scope, receive, send)
        started = time.monotonic()
        status = 500

        async def send_recording(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        self.drain.request_started()
        try:
            if self.drain.is_draining:
                refusal = ServiceUnavailable("The server is shutting down; retry on another replica.",
                                             headers={"Retry-After": "1", "Connection": "close"})
                await error_response(refusal)(scope, receive, send_recording)
            else:
                await self.app(scope, receive, send_recording)
        finally:
            self.drain.request_finished()
            seconds = time.monotonic() - started
            route = getattr(scope.get("route"), "path", "unmatched")
            self.metrics.observe_http(route, scope["method"], status, seconds)
            log.info("request", extra={"method": scope["method"], "path": path, "status": status,
                                       "duration_ms": round(seconds * 1000, 1)})
