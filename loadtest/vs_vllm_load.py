"""What the vLLM comparison sends: the other-load probe, the Poisson mix and the greedy token check.

The machine is shared, so every burst is wrapped in a `LoadProbe`: the 1-minute load average at its
start and end (which counts the server under test too) and, from /proc, the cores busy with anything
other than the server's process tree and this benchmark process -- the load that skews the numbers.
"""
from __future__ import annotations

import asyncio
import os
import random
import time
from dataclasses import dataclass
from pathlib import Path

import httpx

from loadtest.http_load import complete
from loadtest.metrics import RunResult
from loadtest.mix import WORDS, Mix
from loadtest.vs_vllm_servers import System

_TICK = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


class LoadProbe:
    """`with LoadProbe(server_pid) as probe:` ... `probe.result` (dict) once the block is done."""

    def __init__(self, server_pid: int | None):
        self.server_pid = server_pid
        self.result: dict = {}

    def __enter__(self) -> LoadProbe:
        self._load0, self._t0 = os.getloadavg()[0], time.perf_counter()
        self._busy0, self._server0, self._self0 = _busy_ticks(), _tree_ticks(self.server_pid), _own_cpu_s()
        return self

    def __exit__(self, *exc) -> None:
        wall_s = max(time.perf_counter() - self._t0, 1e-9)
        cores = lambda ticks: ticks / _TICK / wall_s  # noqa: E731
        busy = cores(_busy_ticks() - self._busy0)
        server = cores(_tree_ticks(self.server_pid) - self._server0)
        mine = (_own_cpu_s() - self._self0) / wall_s  # this process only: the server is a child of it
        self.result = {"load_avg_1m_start": self._load0, "load_avg_1m_end": os.getloadavg()[0],
                       "busy_cores": busy, "server_cores": server, "client_cores": mine,
                       "other_cores": max(0.0, busy - server - mine)}


def _busy_ticks() -> int:
    """Busy jiffies of all CPUs since boot (user, nice, system, irq, softirq, steal); 0 off Linux."""
    try:
        fields = Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]
    except OSError:
        return 0
    user, nice, system, _idle, _iowait, irq, softirq, steal = (int(f) for f in fields[:8])
    return user + nice + system + irq + softirq + steal


def _own_cpu_s() -> float:
    times = os.times()
    return times.user + times.system


def _tree_ticks(root: int | None) -> int:
    """CPU jiffies (utime + stime) of `root` and every live descendant."""
    if root is None:
        return 0
    stats = {}
    for entry in Path("/proc").iterdir() if Path("/proc").exists() else []:
        if entry.name.isdigit():
            try:
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            except (OSError, IndexError):
                continue
            stats[int(entry.name)] = (int(fields[1]), int(fields[11]) + int(fields[12]))  # ppid, utime + stime
    tree, frontier = {root}, [root]
    while frontier:
        parent = frontier.pop()
        children = [pid for pid, (ppid, _) in stats.items() if ppid == parent and pid not in tree]
        tree.update(children), frontier.extend(children)
    return sum(stats[pid][1] for pid in tree if pid in stats)


@dataclass(frozen=True)
class MixRequest:
    at_s: float  # arrival, seconds after the run's start
    adapter: str | None  # None: the base model
    prompt: str
    max_tokens: int


def poisson_schedule(adapters: list[str], num_requests: int = 96, rate: float = 0.47, base_share: float = 0.1,
                     zipf_s: float = 1.1, prompt_chars: tuple[int, int] = (32, 256),
                     new_tokens: tuple[int, int] = (16, 96), seed: int = 0) -> list[MixRequest]:
    """Arrivals of a Poisson process at `rate` req/s; each request is the base model with `base_share`, else
    an adapter by Zipf popularity (mix.Mix's weights; a seeded shuffle picks which adapter is rank 1)."""
    rng = random.Random(seed)
    weights = Mix(num_tenants=1, adapters_per_tenant=len(adapters), zipf_s=zipf_s).zipf_weights()
    ranked = rng.sample(adapters, len(adapters))
    out, at_s = [], 0.0
    for _ in range(num_requests):
        at_s += rng.expovariate(rate)
        adapter = None if rng.random() < base_share else rng.choices(ranked, weights=weights)[0]
        out.append(MixRequest(at_s, adapter, _prompt(rng, rng.randint(*prompt_chars)), rng.randint(*new_tokens)))
    return out


def _prompt(rng: random.Random, num_chars: int) -> str:
    words: list[str] = []
    while sum(map(len, words)) + len(words) < num_chars:
        words.append(rng.choice(WORDS))
    return " ".join(words)[:num_chars].strip()


def run_poisson(url: str, system: str, model_of, schedule: list[MixRequest], timeout_s: float = 900.0) -> RunResult:
    """Send each request at its arrival time, streamed; TTFT and latency count from its own send."""
    return asyncio.run(_poisson(url, system, model_of, schedule, timeout_s))


async def _poisson(url: str, system: str, model_of, schedule: list[MixRequest], timeout_s: float) -> RunResult:
    limits = httpx.Limits(max_connections=len(schedule) + 1, max_keepalive_connections=len(schedule) + 1)
    async with httpx.AsyncClient(base_url=url, timeout=timeout_s, limits=limits) as client:
        start = time.perf_counter()

        async def one(req: MixRequest):
            await asyncio.sleep(max(0.0, start + req.at_s - time.perf_counter()))
            sent = time.perf_counter()
            done = await complete(client, model_of(req.adapter), req.prompt, req.max_tokens, True, sent)
            return done, time.perf_counter() - start

        results = await asyncio.gather(*(one(r) for r in schedule))
    tokens = [c.completion_tokens for c, _ in results]
    notes = f"Poisson {len(schedule)} requests, streamed, wall = first arrival to last response"
    if tokens != [r.max_tokens for r in schedule]:
        notes += "; WARNING some completion_tokens != max_tokens"
    wall_s = max(end for _, end in results) - schedule[0].at_s
    return RunResult(system=system, wall_s=wall_s, num_requests=len(results), num_output_tokens=sum(tokens),
                     latencies_s=[c.latency_s for c, _ in results],
                     ttfts_s=[c.ttft_s for c, _ in results if c.ttft_s is not None], notes=notes)


GREEDY_PROMPTS = ["the adapter serves many tenants while one base model",
                  "quarterly revenue report for the support ticket",
                  "translate the weather story into a friendly summary"]


def greedy_ids(url: str, system: System, adapter: str | None, prompt: str, max_tokens: int) -> dict:
    """{"prompt_ids", "ids"} of a greedy completion: vLLM's `return_token_ids`; loraplex's TGI /generate
    details (its OpenAI routes return text only, and random weights mostly emit ids that decode to "")."""
    if system.name == "vllm":
        body = {"model": system.model(adapter), "prompt": prompt, "max_tokens": max_tokens, "temperature": 0,
                "ignore_eos": True, "return_token_ids": True}
        resp = httpx.post(f"{url}/v1/completions", json=body, timeout=300)
        resp.raise_for_status()
        choice = resp.json()["choices"][0]
        return {"prompt_ids": choice["prompt_token_ids"], "ids": choice["token_ids"]}
    params = {"max_new_tokens": max_tokens, "details": True, "decoder_input_details": True, "ignore_eos": True}
    if adapter is not None:
        params["adapter_id"] = system.model(adapter)
    resp = httpx.post(f"{url}/generate", json={"inputs": prompt, "parameters": params}, timeout=300)
    resp.raise_for_status()
    details = resp.json()["details"]
    return {"prompt_ids": [t["id"] for t in details["prefill"]], "ids": [t["id"] for t in details["tokens"]]}


def compare_greedy(ours: list[dict], theirs: list[dict]) -> dict:
    """Checks pairwise equal: same prompt ids and the same generated ids."""
    checks = [{"case": a["case"], "prompt_ids_equal": a["prompt_ids"] == b["prompt_ids"], "equal": a["ids"] == b["ids"],
               "loraplex": a["ids"], "vllm": b["ids"]} for a, b in zip(ours, theirs, strict=True)]
    return {"num_checks": len(checks), "num_equal": sum(c["equal"] and c["prompt_ids_equal"] for c in checks),
            "checks": checks}
