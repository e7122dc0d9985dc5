"""Server-sent events: `data: <json>\n\n` frames, and a response that always closes its source."""
from __future__ import annotations

import json
from collections.abc import AsyncIterator

from pydantic import BaseModel
from starlette.responses import StreamingResponse
from starlette.types import Send

from loraplex.api.errors import error_body, to_api_error

DONE_FRAME = "data: [DONE]\n\n"
SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
# The OpenAPI description of a stream: each event's `data` is one JSON chunk, or `[DONE]` (OpenAI) at the end.
_EVENT_SCHEMA = {"type": "object", "required": ["data"],
                 "properties": {"data": {"type": "string"}, "event": {"type": "string"}, "id": {"type": "string"}}}
STREAM_RESPONSES = {200: {"content": {"text/event-stream": {"schema": _EVENT_SCHEMA}},
                          "description": "JSON, or server-sent events when the body asks for `stream: true`."}}
STREAM_ONLY_RESPONSES = {200: {"content": {"text/event-stream": {"schema": _EVENT_SCHEMA}}, "description": "Server-sent events."}}


def frame(payload: BaseModel | dict, prefix: str = "data: ") -> str:
    body = payload.model_dump_json() if isinstance(payload, BaseModel) else _json(payload)
    return f"{prefix}{body}\n\n"


def error_frame(exc: Exception, prefix: str = "data: ") -> str:
    """An error after the 200 was sent can only travel in-band, in the same envelope as the rest."""
    return frame(error_body(to_api_error(exc)), prefix)


class SSEResponse(StreamingResponse):
    media_type = "text/event-stream"

    def __init__(self, frames: AsyncIterator[str], status_code: int = 200):  # status_code: read by OpenAPI
        super().__init__(frames, status_code=status_code, headers=SSE_HEADERS)

    async def stream_response(self, send: Send) -> None:
        # Starlette stops iterating when the client goes away but does not close the iterator;
        # closing it runs our `finally`, which aborts the engine request and frees its slot.
        try:
            await super().stream_response(send)
        finally:
            await self.body_iterator.aclose()  # type: ignore[union-attr]


def _json(payload: dict) -> str:
    return json.dumps(payload, separators=(",", ":"))
