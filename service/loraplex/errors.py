"""The one base class of every error the service answers a caller with.

Registry, training and engine errors all derive from `LoraplexError` and carry what the OpenAI error
envelope needs: `status` (the HTTP status), `code` (stable, machine-readable), `param` (the request field
or uploaded file at fault, or None) and `message` (what the caller reads). The API maps the base class in
one handler (api/errors.py); no layer keeps a table of statuses. This module imports nothing, so the
engine (no FastAPI, Redis or pydantic) may raise these errors as freely as the API does.
"""
from __future__ import annotations

INVALID_REQUEST = "invalid_request_error"
RATE_LIMIT = "rate_limit_error"
SERVER_ERROR = "server_error"


class LoraplexError(Exception):
    """A failure with a status. Subclasses set `status` and `code` as class attributes; 500 means a bug or
    an unsupported setup: the handler logs it and tells the caller no more than "Internal server error."."""

    status: int = 500
    code: str | None = "internal_error"
    param: str | None = None
    headers: dict[str, str] | None = None  # e.g. Retry-After, WWW-Authenticate
    is_rate_limit: bool = False  # a full queue or a tenant's request rate: `rate_limit_error`, not other 429s

    def __init__(self, message: str, param: str | None = None, *, code: str | None = None,
                 status: int | None = None, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.message = message
        if param is not None:
            self.param = param
        if code is not None:
            self.code = code
        if status is not None:
            self.status = status
        if headers is not None:
            self.headers = headers

    @property
    def error_type(self) -> str:
        """The envelope's `type`, as OpenAI names them: its SDKs pick the exception class from the status."""
        if self.is_rate_limit:
            return RATE_LIMIT
        return INVALID_REQUEST if self.status < 500 else SERVER_ERROR
