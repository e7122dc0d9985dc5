"""Typed engine errors; the API layer maps each to an HTTP status in one place."""


class EngineError(Exception):
    """Base class for errors the engine raises to its callers."""


class QueueFullError(EngineError):
    def __init__(self, message: str, retry_after_s: int = 1):
        super().__init__(message)
        self.retry_after_s = retry_after_s


class PromptTooLongError(EngineError):
    """Prompt tokens + max_tokens exceed the context the engine can hold."""


class InvalidRequestError(EngineError):
    """A request the engine cannot run as asked (bad sampling parameters, empty prompt...)."""

    def __init__(self, message: str, param: str | None = None):
        super().__init__(message)
        self.param = param  # the request field at fault, when the engine knows it


class AdapterError(EngineError):
    """An adapter that cannot be loaded or is not supported (DoRA, rank too high, unknown module)."""


class EngineNotRunningError(EngineError):
    """The engine loop is not running (starting up, draining or dead)."""
