"""Running one request on the engine: admission errors surface before any byte is sent, the client
leaving aborts the request, and the engine's generator is always closed (which frees its batch slot).
"""
from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable
from dataclasses import dataclass, field
from typing import TypeVar

from dataclasses import replace

from fastapi import Request

from loraplex.api.errors import ClientDisconnected, InternalError, ServiceUnavailable
from loraplex.api.serving.context import GenerationContext
from loraplex.api.serving.prompts import PreparedRequest
from loraplex.engine.types import FinishReason, RequestOutput, TopLogprobs

T = TypeVar("T")


@dataclass
class Accumulator:
    """Everything the deltas of one request add up to."""

    num_prompt_tokens: int
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    top_logprobs: list[TopLogprobs] = field(default_factory=list)  # when the request asked for them
    prompt_logprobs: list[tuple[float, TopLogprobs]] | None = None
    token_texts: list[str] = field(default_factory=list)  # a delta's text goes to its last token
    finish_reason: FinishReason | None = None
    stop_reason: str | int | None = None

    def add(self, output: RequestOutput) -> None:
        if output.finish_reason is FinishReason.ABORT:
            raise ServiceUnavailable("The request was aborted by the server (shutting down).")
        self.text += output.new_text
        self.token_ids.extend(output.new_token_ids)
        self.logprobs.extend(output.new_logprobs)
        self.top_logprobs.extend(output.new_top_logprobs)
        self.prompt_logprobs = self.prompt_logprobs or output.prompt_logprobs
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
    def cumulative_logprob(self) -> float:
        return sum(self.logprobs)

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


SEED_STRIDE = 0x9E3779B97F4A7C15  # odd: choice i's seed (seed + i * stride) differs from every other's


def choices(prepared: PreparedRequest, num: int) -> list[PreparedRequest]:
    """`num` engine requests for one API request: each its own id and seed (seed + i * stride when the
    request has a seed, so the choices differ and a second call repeats them; the engine picks random
    ones otherwise)."""
    if num == 1:
        return [prepared]
    params, seed = prepared.params, prepared.params.seed
    return [
        replace(prepared, engine_request_id=f"{prepared.engine_request_id}-{i}", params=replace(
            params, seed=None if seed is None else (seed + i * SEED_STRIDE) % 2**63))
        for i in range(num)
    ]


async def start(ctx: GenerationContext, prepared: PreparedRequest) -> Generation:
    return (await start_all(ctx, [prepared]))[0]


async def start_all(ctx: GenerationContext, prepared: list[PreparedRequest]) -> list[Generation]:
    """Submit every request first (so they are batched together), then wait for each first output."""
    for p in prepared:
        ctx.rate_limiter.check(ctx.tenant, p.num_prompt_tokens + p.params.max_tokens)
    streams = [ctx.engine.generate(p.engine_request_id, p.prompt_token_ids, p.params, p.lora, tenant=ctx.tenant)
               for p in prepared]
    try:
        firsts = await until_disconnected(ctx.request, asyncio.gather(*(_first(s) for s in streams)))
    except BaseException:
        await asyncio.gather(*(s.aclose() for s in streams), return_exceptions=True)
        raise
    return [Generation(s, first, ctx.request) for s, first in zip(streams, firsts)]


async def _first(stream: AsyncIterator[RequestOutput]) -> RequestOutput:
    try:
        return await anext(stream)
    except StopAsyncIteration:
        raise InternalError("The engine returned no output.") from None


async def run_to_completion(ctx: GenerationContext, prepared: PreparedRequest) -> Accumulator:
    return (await run_all(ctx, [prepared]))[0]


async def run_all(ctx: GenerationContext, prepared: list[PreparedRequest]) -> list[Accumulator]:
    """Non-streaming: all deltas of every request, abandoned (and aborted in the engine) if the client
    disconnects."""
    generations = await start_all(ctx, prepared)
    accumulators = [Accumulator(p.num_prompt_tokens) for p in prepared]

    async def consume(generation: Generation, accumulator: Accumulator) -> None:
        async for output in generation.outputs():
            accumulator.add(output)

    try:
        await until_disconnected(ctx.request, asyncio.gather(*map(consume, generations, accumulators)))
    finally:
        await asyncio.gather(*(g.aclose() for g in generations), return_exceptions=True)
    return accumulators


async def interleaved(generations: list[Generation]) -> AsyncIterator[tuple[int, RequestOutput]]:
    """(choice index, output) from several generations as they arrive; every generation is closed at the end."""
    if len(generations) == 1:
        async for output in generations[0].outputs():
            yield 0, output
        return
    queue: asyncio.Queue = asyncio.Queue()

    async def pump(index: int, generation: Generation) -> None:
        try:
            async for output in generation.outputs():
                await queue.put((index, output))
        except Exception as exc:
            await queue.put((index, exc))
        await queue.put((index, None))

    tasks = [asyncio.ensure_future(pump(i, g)) for i, g in enumerate(generations)]
    try:
        num_open = len(tasks)
        while num_open:
            index, item = await queue.get()
            if item is None:
                num_open -= 1
            elif isinstance(item, Exception):
                raise item
            else:
                yield index, item
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await asyncio.gather(*(g.aclose() for g in generations), return_exceptions=True)


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
