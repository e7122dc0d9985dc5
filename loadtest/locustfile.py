"""Locust load test of loraplex: many tenants and adapters with Zipf popularity, chat and completions,
streamed and not, some requests for the base model (the mix and its env vars: loadtest/mix.py).

    locust -f loadtest/locustfile.py --host http://127.0.0.1:8000                 # web UI
    locust -f loadtest/locustfile.py --host URL --headless -u 8 -r 8 -t 60s --stop-timeout 60

Each user sends one request after another (no think time), so `-u` is the concurrency. Locust reports
every request under its kind (`chat`, `chat stream`, `completions`, `completions stream`) with its
end-to-end latency, and each streamed request a second time as request type `TTFT`: the time to its
first chunk with text. Streamed requests are timed to their last byte (locust alone would stop the
clock at the response headers). Run `--stop-timeout` so the requests in flight at the end finish
instead of being cut off and counted as failures.

Before the run (locust's `init` hook) loadtest/locust_setup.py uploads the mix's adapters the server
lacks (`LOADTEST_SETUP=0` skips it), and the base model's name is read from /v1/models
(`LOADTEST_BASE_MODEL` overrides). With `LOADTEST_SUMMARY` set to a path, the run ends by writing a
JSON summary there: throughput (requests/s, output tokens/s from the server's `usage`) and TTFT /
end-to-end percentiles over the requests that ended between `LOADTEST_WARMUP_S` (default 0) after
the last user started and the start of the stop, plus counts per model and kind over the whole run.
loadtest/sweep.py reads it.
"""
from __future__ import annotations

import importlib.util
import itertools
import json
import os
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

if __package__ in (None, ""):  # locust imports this file by path: make `loadtest` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
if importlib.util.find_spec("loraplex") is None:  # the setup builds adapter files with the checkout's loraplex
    sys.path.append(str(Path(__file__).resolve().parents[1] / "service"))

from locust import FastHttpUser, constant, events, task  # noqa: E402

from loadtest import locust_setup  # noqa: E402
from loadtest.metrics import percentiles  # noqa: E402
from loadtest.mix import Mix, RequestSpec  # noqa: E402

MIX = Mix.from_env()
TTFT = "TTFT"  # request type of the time-to-first-token entries


class Recorder:
    """Every finished request as locust reports it (failures included), with the model and tokens."""

    def __init__(self):
        self.records: list[dict] = []
        self.base_model = ""
        self.started_at = self.all_spawned_at = self.stopping_at = None

    def on_request(self, request_type, name, response_time, exception=None, context=None, **_):
        if request_type == TTFT:
            return  # already in its request's record
        context = context or {}
        self.records.append({
            "ended_at": time.time(), "name": name, "e2e_s": response_time / 1000, "ok": exception is None,
            "model": context.get("model"), "output_tokens": context.get("output_tokens", 0),
            "ttft_s": context["ttft_ms"] / 1000 if context.get("ttft_ms") is not None else None,
        })

    def summary(self, warmup_s: float) -> dict:
        window_start = (self.all_spawned_at or self.started_at or 0) + warmup_s
        window_end = self.stopping_at or time.time()
        window_s = max(window_end - window_start, 1e-9)
        measured = [r for r in self.records if r["ok"] and window_start <= r["ended_at"] <= window_end]
        ttfts = [r["ttft_s"] for r in measured if r["ttft_s"] is not None]
        return {
            "window_s": window_s,
            "num_requests": len(measured),
            "requests_per_s": len(measured) / window_s,
            "output_tokens": sum(r["output_tokens"] for r in measured),
            "output_tokens_per_s": sum(r["output_tokens"] for r in measured) / window_s,
            "e2e_s": percentiles([r["e2e_s"] for r in measured]) if measured else None,
            "ttft_s": percentiles(ttfts) if ttfts else None,
            "num_requests_total": len(self.records),
            "num_failures": sum(not r["ok"] for r in self.records),
            "by_kind": dict(Counter(r["name"] for r in self.records)),
            "by_model": dict(Counter(r["model"] for r in self.records).most_common()),
            "base_model": self.base_model,
            "mix": MIX.describe(),
        }


RECORDER = Recorder()
USER_SEEDS = itertools.count(MIX.seed * 1000)
events.request.add_listener(RECORDER.on_request)


@events.init.add_listener
def _setup(environment, **_):
    """Before the run: locust starts the `-t` clock together with test_start, so setup there would eat it.
    The setup runs as its own process (it builds adapter files with torch, which has no place under gevent)."""
    if not environment.host or getattr(environment.parsed_options, "worker", False):
        return  # no --host yet (web UI), or a worker: the master sets up
    if os.environ.get("LOADTEST_SETUP", "1") != "0":
        subprocess.run([sys.executable, locust_setup.__file__, "--host", environment.host], check=True)
    RECORDER.base_model = os.environ.get("LOADTEST_BASE_MODEL") or locust_setup.base_model(environment.host, MIX)


@events.test_start.add_listener
def _start(environment, **_):
    RECORDER.base_model = RECORDER.base_model or locust_setup.base_model(environment.host, MIX)
    RECORDER.started_at = time.time()


@events.spawning_complete.add_listener
def _all_spawned(user_count, **_):
    RECORDER.all_spawned_at = RECORDER.all_spawned_at or time.time()


@events.test_stopping.add_listener
def _stopping(**_):
    RECORDER.stopping_at = time.time()


@events.quitting.add_listener
def _write_summary(environment, **_):
    path = os.environ.get("LOADTEST_SUMMARY")
    if path:
        summary = RECORDER.summary(float(os.environ.get("LOADTEST_WARMUP_S", "0")))
        summary["users"] = getattr(environment.parsed_options, "num_users", None)
        Path(path).write_text(json.dumps(summary, indent=1) + "\n")


class MixUser(FastHttpUser):
    wait_time = constant(0)
    network_timeout = 600.0  # a long queue at high concurrency is a slow request, not a failed one
    connection_timeout = 30.0

    def on_start(self):
        self.sampler = MIX.sampler(RECORDER.base_model, seed=next(USER_SEEDS))

    @task
    def one_request(self):
        spec = self.sampler.next()
        if spec.is_stream:
            self._streamed(spec)
        else:
            self._unary(spec)

    def _unary(self, spec: RequestSpec) -> None:
        with self.client.post(spec.path, json=spec.body(), headers=MIX.headers(spec.tenant), name=spec.name,
                              catch_response=True) as response:
            response.request_meta["context"]["model"] = spec.model
            if response.status_code != 200:
                response.failure(f"{response.status_code}: {(response.text or '')[:300]}")
                return
            usage = response.json().get("usage") or {}
            response.request_meta["context"]["output_tokens"] = usage.get("completion_tokens", 0)

    def _streamed(self, spec: RequestSpec) -> None:
        start = time.perf_counter()
        with self.client.post(spec.path, json=spec.body(), headers=MIX.headers(spec.tenant), name=spec.name,
                              stream=True, catch_response=True) as response:
            context = response.request_meta["context"]
            context["model"] = spec.model
            if response.status_code != 200:
                response.failure(f"{response.status_code}: {(response.text or '')[:300]}")
                return
            ttft_s, usage, error, is_done = None, {}, None, False
            for payload in _sse_payloads(response):
                if payload == "[DONE]":
                    is_done = True
                    continue
                chunk = json.loads(payload)
                error = error or chunk.get("error")
                usage = chunk.get("usage") or usage
                if ttft_s is None and _has_text(chunk):
                    ttft_s = time.perf_counter() - start
            response.request_meta["response_time"] = (time.perf_counter() - start) * 1000  # to the last byte
            context["output_tokens"] = usage.get("completion_tokens", 0)
            if error or not is_done:
                response.failure(f"stream {'error: ' + str(error) if error else 'ended without [DONE]'}")
                return
            if ttft_s is not None:
                context["ttft_ms"] = ttft_s * 1000
                self.environment.events.request.fire(
                    request_type=TTFT, name=spec.name, response_time=ttft_s * 1000, response_length=0,
                    exception=None, context={"model": spec.model},
                )


def _sse_payloads(response):
    """The `data:` payloads of a server-sent event stream, each as soon as its line arrives.

    Not `response.iter_content(n)`: geventhttpclient's read(n) waits until n bytes are buffered, so a
    short stream would reach us in one piece at its end and TTFT would read as nearly the whole latency.
    Its `readline` returns each line as soon as it is in (locust's FastResponse keeps that response in
    `_response`, which its own iter_content reads too)."""
    raw = response._response
    while line := raw.readline(b"\n"):
        if line.startswith(b"data:"):
            yield line[len(b"data:"):].strip().decode()


def _has_text(chunk: dict) -> bool:
    for choice in chunk.get("choices") or []:
        if choice.get("text") or (choice.get("delta") or {}).get("content"):
            return True
    return False
