"""Running one request on the engine: admission errors surface before any byte is sent, the client
leaving aborts the request, and the engine's generator is always closed (which frees its batch slot).
"""
from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable
from dataclasses import dataclass, field
from typing import TypeVar

from fastapi import Request

from loraplex.api.errors import ClientDisconnected, InternalError, ServiceUnavailable
from loraplex.api.serving.context import GenerationContext
from loraplex.api.serving.prompts import PreparedRequest
from loraplex.engine.types import FinishReason, RequestOutput

T = TypeVar("T")


@dataclass
class Accumulator:
    """Everything the deltas of one request add up to."""

    num_prompt_tokens: int
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    token_texts: list[str] = field(default_factory=list)  # a delta's text goes to its last token
    finish_reason: FinishReason | None = None
    stop_reason: str | int | None = None

    def add(self, output: RequestOutput) -> None:
        if output.finish_reason is FinishReason.ABORT:
            raise ServiceUnavailable("The request was aborted by the server (shutting down).")
        self.text += output.new_text
        self.token_ids.extend(output.new_token_ids)
        self.logprobs.extend(output.new_logprobs)
        texts = [""] * len(output.new_token_ids)
        if texts:
            texts[-1] = output.new_text
        elif output.new_text and self.token_texts:
            self.token_texts[-1] += output.new_text
        self.token_texts.extend(texts)
        self.finish_reason = output.finish_reason
        self.stop_reason = output.stop_reason

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def openai_finish_reason(self) -> str | None:
        return None if self.finish_reason is None else self.finish_reason.value


class Generation:
    """An engine stream whose first output has already arrived (so admission errors were raised)."""

    def __init__(self, stream: AsyncIterator[RequestOutput], first: RequestOutput, request: Request):
        self._stream = stream
        self.first = first
        self.request = request

    async def outputs(self) -> AsyncIterator[RequestOutput]:
        yield self.first
        if not self.first.is_finished:
            async for output in self._stream:
                yield output

    async def aclose(self) -> None:
        await self._stream.aclose()  # aborts the request in the engine if it is still running


async def start(ctx: GenerationContext, prepared: PreparedRequest) -> Generation:
    ctx.rate_limiter.check(ctx.tenant, prepared.num_prompt_tokens + prepared.params.max_tokens)
    stream = ctx.engine.generate(
        prepared.engine_request_id, prepared.prompt_token_ids, prepared.params, prepared.lora, tenant=ctx.tenant
    )
    try:
        first = await until_disconnected(ctx.request, anext(stream))
    except StopAsyncIteration:
        raise InternalError("The engine returned no output.") from None
    except BaseException:
        await stream.aclose()
        raise
    return Generation(stream, first, ctx.request)


async def run_to_completion(ctx: GenerationContext, prepared: PreparedRequest) -> Accumulator:
    """Non-streaming: all deltas, abandoned (and aborted in the engine) if the client disconnects."""
    generation = await start(ctx, prepared)
    accumulator = Accumulator(prepared.num_prompt_tokens)

    async def consume() -> None:
        async for output in generation.outputs():
            accumulator.add(output)

    try:
        await until_disconnected(ctx.request, consume())
    finally:
        await generation.aclose()
    return accumulator


async def until_disconnected(request: Request, work: Awaitable[T]) -> T:
    """Await `work`, cancelling it (and raising ClientDisconnected) if the client goes away first."""
    task = asyncio.ensure_future(work)
    watcher = asyncio.ensure_future(_wait_for_disconnect(request))
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watcher.cancel()
        if not task.done():
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)  # let it run its finally blocks
    if task.cancelled():
        raise ClientDisconnected("The client disconnected.")
    return task.result()


async def _wait_for_disconnect(request: Request) -> None:
    # The body has been read already, so the next ASGI message can only be the disconnect.
    while (await request.receive())["type"] != "http.disconnect":
        pass
