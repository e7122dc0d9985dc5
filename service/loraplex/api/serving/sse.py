"""Server-sent events: `data: <json>\n\n` frames, and a response that always closes its source."""
from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator

from pydantic import BaseModel
from starlette.responses import StreamingResponse
from starlette.types import Receive, Scope, Send

from loraplex.api.errors import ServiceUnavailable, error_body, to_api_error
from loraplex.failpoints import delay_s

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


class StreamEndedByDrain(ServiceUnavailable):
    code = "server_shutting_down"


class SSEResponse(StreamingResponse):
    """`end_frame`: what a stream ended early by the drain sends after its error event (`[DONE]` for
    OpenAI streams; None for TGI's, which have no end marker)."""

    media_type = "text/event-stream"

    def __init__(self, frames: AsyncIterator[str], status_code: int = 200,  # status_code: read by OpenAPI
                 end_frame: str | None = DONE_FRAME, error_prefix: str = "data: "):
        super().__init__(frames, status_code=status_code, headers=SSE_HEADERS)
        self._frames, self.end_frame, self.error_prefix = frames, end_frame, error_prefix

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        drain = getattr(scope["app"].state, "drain", None) if "app" in scope else None
        if drain is not None:
            self.body_iterator = _until_grace_over(self._frames, drain.grace_over, self._drain_frames())
        await super().__call__(scope, receive, send)

    async def stream_response(self, send: Send) -> None:
        # Starlette stops iterating when the client goes away but does not close the iterator;
        # closing it runs our `finally`, which aborts the engine request and frees its slot.
        try:
            await super().stream_response(send)
        finally:
            await self.body_iterator.aclose()  # type: ignore[union-attr]

    def _drain_frames(self) -> list[str]:
        ended = StreamEndedByDrain("The server is shutting down: this stream was ended when the drain grace period ran out.")
        return [error_frame(ended, self.error_prefix), *([self.end_frame] if self.end_frame else [])]


async def _until_grace_over(frames: AsyncIterator[str], grace_over: asyncio.Event, last_frames: list[str]) -> AsyncIterator[str]:
    """`frames` until they end, or until the drain's grace runs out: then `last_frames` and stop. Closing
    this closes `frames` (whose own cleanup aborts the engine request), wherever it stands."""
    grace = asyncio.ensure_future(grace_over.wait())
    following: asyncio.Future | None = None
    try:
        while True:
            if delay := delay_s("sse.before_frame"):  # a failpoint: a slow stream, for the drain test
                await asyncio.sleep(delay)
            if not grace.done():
                following = asyncio.ensure_future(anext(frames))
                await asyncio.wait({following, grace}, return_when=asyncio.FIRST_COMPLETED)
            if grace.done():  # checked first: a source that always has a frame ready still ends
                if following is not None and not following.done():
                    following.cancel()
                    await asyncio.wait({following})
                for last in last_frames:
                    yield last
                return
            try:
                next_frame = following.result()
            except StopAsyncIteration:
                return
            following = None
            yield next_frame
    finally:
        grace.cancel()
        if following is not None and not following.done():
            following.cancel()  # the source is mid-step: cancelling runs its cleanup in that task
        else:
            await frames.aclose()  # type: ignore[attr-defined]


def _json(payload: dict) -> str:
    return json.dumps(payload, separators=(",", ":"))
