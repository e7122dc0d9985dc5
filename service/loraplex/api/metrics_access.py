"""Who may read /metrics. It names the adapters each replica runs and queues
(`vllm:lora_requests_info{running_lora_adapters="globex/mlp"}`), so it must not answer tenants: a
tenant that gets 404 for another tenant's adapter must not read its name here either. Prometheus and
the gateway's endpoint picker (which routes on those labels) still need it, so:

- `LORAPLEX_METRICS_PORT` set: /metrics is served on that port only (a second listening socket of the
  same server, left out of the public Service), with no key, and nothing else is served there; the main
  port answers /metrics with 404. This is what the k8s manifests use.
- otherwise /metrics on the main port needs `Authorization: Bearer <LORAPLEX_METRICS_TOKEN>` or the admin
  key (dev mode, with no keys at all, has no tenants to protect and stays open like every route).
"""
from __future__ import annotations

import hashlib
import hmac

from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import Request
from starlette.types import ASGIApp, Receive, Scope, Send

from loraplex.api.errors import APIError, error_response
from loraplex.registry.auth import authenticate
from loraplex.registry.errors import Forbidden

METRICS_PATH = "/metrics"


def on_metrics_port(scope: Scope, metrics_port: int | None) -> bool:
    """Whether the connection came in on the metrics socket (the local address uvicorn reports)."""
    server = scope.get("server")
    return metrics_port is not None and server is not None and server[1] == metrics_port


def authorize_metrics(request: Request) -> None:
    """Raise unless this request may read the metrics (404 / 401 / 403, as the module docstring says)."""
    state = request.app.state
    settings = state.settings
    if settings.metrics_port is not None:
        if not on_metrics_port(request.scope, settings.metrics_port):
            raise StarletteHTTPException(404)  # read like any unknown path of the public port
        return
    header = request.headers.get("authorization") or ""
    if settings.metrics_token and _same_secret(header.removeprefix("Bearer ").strip(), settings.metrics_token):
        return
    if not authenticate(header or None, state.api_keys, settings.admin_key).is_admin:  # 401 without a valid key
        raise Forbidden("metrics need the admin key or LORAPLEX_METRICS_TOKEN")


class MetricsPortMiddleware:
    """On the metrics port, /metrics and nothing else: no API route is reachable through it."""

    def __init__(self, app: ASGIApp, metrics_port: int | None):
        self.app, self.metrics_port = app, metrics_port

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["path"] != METRICS_PATH and on_metrics_port(scope, self.metrics_port):
            return await error_response(APIError("Not Found", code="not_found", status_code=404))(scope, receive, send)
        await self.app(scope, receive, send)


def _same_secret(given: str, expected: str) -> bool:
    return hmac.compare_digest(hashlib.sha256(given.encode()).digest(), hashlib.sha256(expected.encode()).digest())
