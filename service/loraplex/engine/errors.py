"""Typed engine errors. Each carries its HTTP status and code (see loraplex/errors.py); the API maps the
base class in one handler."""
from loraplex.errors import LoraplexError


class EngineError(LoraplexError):
    """Base class for errors the engine raises to its callers; raised as is, a 500 (unsupported setup)."""


class QueueFullError(EngineError):
    status = 429
    code = "queue_full"
    is_rate_limit = True

    def __init__(self, message: str, retry_after_s: int = 1):
        super().__init__(message or "Server is at capacity.", headers={"Retry-After": str(retry_after_s)})
        self.retry_after_s = retry_after_s


class PromptTooLongError(EngineError):
    """Prompt tokens + max_tokens exceed the context the engine can hold."""

    status = 400
    code = "context_length_exceeded"


class InvalidRequestError(EngineError):
    """A request the engine cannot run as asked (bad sampling parameters, empty prompt...); `param` names the
    request field at fault, when the engine knows it."""

    status = 400
    code = "invalid_parameter"


class AdapterError(EngineError):
    """An adapter that cannot be loaded or is not supported (rank too high, unknown module...)."""

    status = 400
    code = "invalid_adapter"
    param = "model"


class EngineNotRunningError(EngineError):
    """The engine loop is not running (starting up, draining or dead)."""

    status = 503
    code = "engine_not_running"

    def __init__(self, message: str = "The engine is not running."):
        super().__init__(message or "The engine is not running.", headers={"Retry-After": "1"})
