"""What structured outputs and logprobs cost under load: one server, one run, three bursts of 32
concurrent completions over HTTP, repeated in turns, medians compared.

    python loadtest/structured_bench.py [--requests 32] [--max-tokens 64] [--repeats 3] [--out docs]

- free: 32 plain requests (greedy, ignore_eos, max_tokens each).
- half constrained: the same load with every other request under a JSON schema (guided_json) that cannot
  close before max_tokens (one long string), so both loads decode the same number of tokens.
- logprobs=5: every request asks for the chosen token's logprob and 5 alternatives.
Throughput is completion tokens (as the server reports them in usage) per second of burst wall time.
Targets (issue 12): half constrained >= 0.85x free; logprobs=5 >= 0.9x free.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import httpx

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    sys.path.append(str(Path(__file__).resolve().parents[1] / "service"))

from loadtest.server import BASE_MODEL_NAME, Server, ServerConfig  # noqa: E402
from loraplex.models.demo import ensure_demo_model  # noqa: E402

PROMPTS = ["Once upon a time", "The river ran", "Write a short note:", "In the morning the"]


def long_string_schema(max_tokens: int) -> dict:
    """An object whose one string must be longer than max_tokens tokens can spell: it runs to the limit."""
    return {"type": "object", "additionalProperties": False, "required": ["text"],
            "properties": {"text": {"type": "string", "minLength": 8 * max_tokens}}}


def bodies(kind: str, num: int, max_tokens: int) -> list[dict]:
    common = {"model": BASE_MODEL_NAME, "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True}
    out = []
    for i in range(num):
        body = {**common, "prompt": PROMPTS[i % len(PROMPTS)]}
        if kind == "half_constrained" and i % 2 == 1:
            body["guided_json"] = long_string_schema(max_tokens)
        if kind == "logprobs5":
            body["logprobs"] = 5
        out.append(body)
    return out


async def burst(url: str, requests: list[dict]) -> tuple[float, int]:
    """(wall seconds, completion tokens) of all requests sent at once."""
    limits = httpx.Limits(max_connections=len(requests) + 1)
    async with httpx.AsyncClient(base_url=url, timeout=600, limits=limits) as client:
        start = time.perf_counter()
        responses = await asyncio.gather(*(client.post("/v1/completions", json=b) for b in requests))
        wall_s = time.perf_counter() - start
    for response in responses:
        response.raise_for_status()
    return wall_s, sum(r.json()["usage"]["completion_tokens"] for r in responses)


KINDS = ("free", "half_constrained", "logprobs5")


def measure(url: str, args: argparse.Namespace) -> dict:
    """The kinds take turns (free, constrained, logprobs, free, ...) so load elsewhere hits them alike."""
    runs: dict[str, list[tuple[float, int]]] = {kind: [] for kind in KINDS}
    for _ in range(args.repeats):
        for kind in KINDS:
            runs[kind].append(asyncio.run(burst(url, bodies(kind, args.requests, args.max_tokens))))
    results = {}
    for kind, kind_runs in runs.items():
        throughputs = [tokens / wall for wall, tokens in kind_runs]
        results[kind] = {"tokens_per_s": statistics.median(throughputs), "runs": [round(t, 1) for t in throughputs],
                         "completion_tokens": kind_runs[0][1]}
    return results


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=32)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--out", type=Path, default=None, help="write <out>/structured_bench.json")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = ensure_demo_model(Path(tmp))
        config = ServerConfig(model_dir=model_dir, data_dir=Path(tmp) / "adapters", device=args.device,
                              dtype="float32", max_num_seqs=max(32, args.requests), max_model_len=256)
        with Server(config, Path(tmp) / "server.log") as server:
            asyncio.run(burst(server.url, bodies("half_constrained", 4, 4)))  # warm-up (+ grammar compile)
            results = measure(server.url, args)
    free = results["free"]["tokens_per_s"]
    report = {"requests": args.requests, "max_tokens": args.max_tokens, "repeats": args.repeats, "device": args.device,
              "results": results,
              "half_constrained_vs_free": results["half_constrained"]["tokens_per_s"] / free,
              "logprobs5_vs_free": results["logprobs5"]["tokens_per_s"] / free}
    print(json.dumps(report, indent=1))
    if args.out:
        (args.out / "structured_bench.json").write_text(json.dumps(report, indent=1) + "\n")
    return report


if __name__ == "__main__":
    main()
