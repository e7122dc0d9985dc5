"""Fire a burst of concurrent completions at the server over HTTP and time each request.

All requests are sent at once (one asyncio task each, one connection each) and the burst's wall time
runs from the first send to the last response. Throughput counts the `usage.completion_tokens` the
server reports, so a server that stopped early could not look faster than it is. Streamed requests
also record the arrival of the first chunk with a choice (their TTFT) -- meaningful only when every
token decodes to text, since servers send no chunk for an empty delta.
"""
from __future__ import annotations

import asyncio
import json
import time
from dataclasses import dataclass

import httpx

from loadtest.metrics import RunResult


@dataclass(frozen=True)
class Completion:
    latency_s: float
    ttft_s: float | None  # streamed requests only: first chunk carrying a choice
    completion_tokens: int


def run_burst(base_url: str, system: str, models: list[str], prompts: list[list[int]],
              max_tokens: int, stream: bool = False, timeout_s: float = 600.0) -> RunResult:
    """One request per prompt; request i asks for model models[i]."""
    return asyncio.run(_burst(base_url, system, models, prompts, max_tokens, stream, timeout_s))


async def _burst(base_url: str, system: str, models: list[str], prompts: list[list[int]],
                 max_tokens: int, stream: bool, timeout_s: float) -> RunResult:
    limits = httpx.Limits(max_connections=len(prompts) + 1, max_keepalive_connections=len(prompts) + 1)
    async with httpx.AsyncClient(base_url=base_url, timeout=timeout_s, limits=limits) as client:
        start = time.perf_counter()
        tasks = [complete(client, model, prompt, max_tokens, stream, start)
                 for model, prompt in zip(models, prompts, strict=True)]
        done = await asyncio.gather(*tasks)
        wall_s = time.perf_counter() - start
    tokens = [c.completion_tokens for c in done]
    notes = "HTTP /v1/completions, all requests concurrent" + (", streamed" if stream else "")
    if any(t != max_tokens for t in tokens):
        notes += f"; WARNING completion_tokens {min(tokens)}..{max(tokens)} != max_tokens {max_tokens}"
    return RunResult(system=system, wall_s=wall_s, num_requests=len(done), num_output_tokens=sum(tokens),
                     latencies_s=[c.latency_s for c in done],
                     ttfts_s=[c.ttft_s for c in done if c.ttft_s is not None], notes=notes)


def _body(model: str, prompt: list[int], max_tokens: int, stream: bool) -> dict:
    body = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0,
            "ignore_eos": True}
    if stream:
        body |= {"stream": True, "stream_options": {"include_usage": True}}
    return body


async def complete(client: httpx.AsyncClient, model: str, prompt: list[int] | str, max_tokens: int,
                   stream: bool, start: float) -> Completion:
    """One completion; its latency and TTFT count from `start` (the burst's start, or its own send time)."""
    body = _body(model, prompt, max_tokens, stream)
    if not stream:
        resp = await client.post("/v1/completions", json=body)
        _raise_for_status(resp, await resp.aread())
        return Completion(time.perf_counter() - start, None, resp.json()["usage"]["completion_tokens"])
    ttft_s, num_chunks, usage_tokens = None, 0, None
    async with client.stream("POST", "/v1/completions", json=body) as resp:
        _raise_for_status(resp, await resp.aread() if resp.status_code != 200 else b"")
        async for line in resp.aiter_lines():
            if not line.startswith("data:") or line.strip() == "data: [DONE]":
                continue
            chunk = json.loads(line[len("data:"):])
            if chunk.get("choices"):
                num_chunks += 1
                ttft_s = ttft_s if ttft_s is not None else time.perf_counter() - start
            if chunk.get("usage"):
                usage_tokens = chunk["usage"]["completion_tokens"]
    # Without a usage chunk, count content chunks (one token each on a per-token stream).
    return Completion(time.perf_counter() - start, ttft_s, usage_tokens if usage_tokens is not None else num_chunks)


def _raise_for_status(resp: httpx.Response, body: bytes) -> None:
    if resp.status_code != 200:
        raise RuntimeError(f"{resp.request.url} -> {resp.status_code}: {body[:500]!r}")
