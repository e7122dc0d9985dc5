"""Prometheus metrics: HTTP traffic, engine request latencies, and engine state read at scrape time.

Names follow two conventions at once: `loraplex_*` for our dashboards, and the vLLM names the
Gateway API Inference Extension endpoint picker reads (`vllm:num_requests_waiting`,
`vllm:num_requests_running`, `vllm:gpu_cache_usage_perc`, `vllm:lora_requests_info`).
Per-adapter labels appear only on the LoRA info gauge, bounded by max_loras; the fine-tuning jobs gauge
has one series per job status.
"""
from __future__ import annotations

import logging
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from loraplex.engine.types import RequestOutput
from loraplex.training.jobs import ACTIVE, TERMINAL

log = logging.getLogger(__name__)

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)
TOKEN_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5)


class ServiceMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.http_requests = Counter("loraplex_http_requests", "HTTP requests by route and status", ["route", "method", "status"], registry=r)
        self.http_latency = Histogram("loraplex_http_request_duration_seconds", "HTTP request duration (until the last byte)", ["route", "status"], buckets=LATENCY_BUCKETS, registry=r)
        self.queue_time = Histogram("loraplex_request_queue_seconds", "Time from arrival to admission into the batch", buckets=LATENCY_BUCKETS, registry=r)
        self.ttft = Histogram("loraplex_time_to_first_token_seconds", "Time to first token", buckets=LATENCY_BUCKETS, registry=r)
        self.tpot = Histogram("loraplex_time_per_output_token_seconds", "Mean time per output token after the first", buckets=TOKEN_LATENCY_BUCKETS, registry=r)
        self.e2e = Histogram("loraplex_e2e_request_latency_seconds", "Engine time from arrival to the last token", buckets=LATENCY_BUCKETS, registry=r)
        self.prompt_tokens = Counter("loraplex_prompt_tokens", "Prompt tokens processed", registry=r)
        self.generation_tokens = Counter("loraplex_generation_tokens", "Tokens generated", registry=r)
        self.finished = Counter("loraplex_requests_finished", "Finished engine requests by reason", ["finish_reason"], registry=r)
        self.adapter_load = Histogram("loraplex_adapter_load_seconds", "Adapter load latency, storage to device slot", buckets=LATENCY_BUCKETS, registry=r)

    def observe_finished(self, output: RequestOutput) -> None:
        m = output.metrics
        for histogram, key in ((self.queue_time, "queue_s"), (self.ttft, "ttft_s"), (self.tpot, "tpot_s"), (self.e2e, "e2e_s")):
            if key in m:
                histogram.observe(m[key])
        self.prompt_tokens.inc(output.num_prompt_tokens)
        self.generation_tokens.inc(output.num_output_tokens)
        self.finished.labels(output.finish_reason.value).inc()

    def observe_adapter_load(self, key: str, seconds: float) -> None:
        self.adapter_load.observe(seconds)

    def observe_http(self, route: str, method: str, status: int, seconds: float) -> None:
        self.http_requests.labels(route, method, str(status)).inc()
        self.http_latency.labels(route, str(status)).observe(seconds)

    def watch_engine(self, engine, drain) -> None:
        engine.finish_listeners.append(self.observe_finished)
        engine.load_listeners.append(self.observe_adapter_load)
        self.registry.register(EngineStateCollector(engine, drain))

    def watch_jobs(self, get_store: Callable[[], object | None]) -> None:
        """`get_store()` returns the job store, or None while the app has not opened one yet."""
        self.registry.register(JobStatusCollector(get_store))


class EngineStateCollector:
    """Gauges read from the engine's last step statistics at scrape time (no hot-path cost)."""

    def __init__(self, engine, drain):
        self.engine, self.drain = engine, drain

    def describe(self):
        return []

    def collect(self):
        stats = self.engine.stats()
        num_waiting = max(stats["num_pending"] - stats["num_running"], 0)
        yield from _gauges({
            "loraplex_num_requests_running": ("Requests in the running batch", stats["num_running"]),
            "loraplex_num_requests_waiting": ("Requests waiting for admission", num_waiting),
            "loraplex_kv_cache_usage": ("KV cache blocks in use / all blocks", stats["kv_cache_usage"]),
            "loraplex_kv_cache_blocks": ("KV cache blocks in the pool", stats["num_kv_blocks"]),
            "loraplex_kv_cache_blocks_used": ("KV cache blocks held by running sequences", stats["num_kv_blocks_used"]),
            "loraplex_kv_cache_blocks_cached": ("KV cache blocks findable in the prefix cache", stats["num_kv_blocks_cached"]),
            "loraplex_max_num_running": ("Peak number of running sequences since start", stats["max_num_running"]),
            "loraplex_batch_size": ("Sequences decoded in the last step", stats["num_running"]),
            "loraplex_adapters_resident": ("Adapters resident in device slots", len(stats["resident_adapters"])),
            "loraplex_adapter_slots": ("Device adapter slots (max_loras)", stats["max_loras"]),
            "loraplex_draining": ("1 while draining after SIGTERM", int(self.drain.is_draining)),
            "loraplex_adapter_merged": ("1 while an adapter is merged into the base weights", int(stats["merged_adapter"] is not None)),
            "loraplex_last_merge_switch_seconds": ("Duration of the last merge or unmerge", stats["last_merge_switch_s"]),
            "vllm:num_requests_running": ("Running requests (endpoint-picker name)", stats["num_running"]),
            "vllm:num_requests_waiting": ("Waiting requests (endpoint-picker name)", num_waiting),
            "vllm:gpu_cache_usage_perc": ("KV cache usage 0..1 (endpoint-picker name)", stats["kv_cache_usage"]),
            "vllm:kv_cache_usage_perc": ("KV cache usage 0..1 (vLLM's current name)", stats["kv_cache_usage"]),
        })
        for name, doc, value in (
            ("loraplex_adapter_loads", "Adapter loads into device slots", stats["num_adapter_loads"]),
            ("loraplex_adapter_evictions", "Adapters evicted from device slots", stats["num_adapter_evictions"]),
            ("loraplex_merge_switches", "Merge/unmerge switches (merged adapter changed)", stats["num_merge_switches"]),
            ("vllm:num_preemptions", "Running sequences preempted for KV blocks (recomputed later)", stats["num_preemptions"]),
            ("vllm:prefix_cache_queries", "Prompt tokens looked up in the prefix cache", stats["prefix_cache_queries"]),
            ("vllm:prefix_cache_hits", "Prompt tokens found in the prefix cache", stats["prefix_cache_hits"]),
        ):
            counter = CounterMetricFamily(name, doc)
            counter.add_metric([], value)
            yield counter
        yield _lora_info(stats)


class JobStatusCollector:
    """`loraplex_fine_tuning_jobs{status}`: jobs in the store by status, every known status always present.

    /metrics runs on the event loop, so the store is read on a helper thread and the scrape waits at most
    `timeout_s`: a Redis that hangs or is down drops this gauge from the scrape, never the scrape itself.
    """

    STATUSES = (*ACTIVE, *TERMINAL)

    def __init__(self, get_store: Callable[[], object | None], timeout_s: float = 0.5):
        self.get_store, self.timeout_s = get_store, timeout_s
        self._reader = ThreadPoolExecutor(max_workers=1, thread_name_prefix="metrics-jobs")
        self._pending = None  # a read still running from an earlier scrape: never pile up another

    def describe(self):
        return []

    def collect(self):
        counts = self._count_by_status()
        if counts is None:
            return
        gauge = GaugeMetricFamily("loraplex_fine_tuning_jobs", "Fine-tuning jobs by status", labels=["status"])
        for status in self.STATUSES:
            gauge.add_metric([status], counts.get(status, 0))
        yield gauge

    def _count_by_status(self) -> dict[str, int] | None:
        store = self.get_store()
        if store is None or (self._pending is not None and not self._pending.done()):
            return None
        self._pending = self._reader.submit(store.list, None)
        try:
            jobs = self._pending.result(timeout=self.timeout_s)
        except FutureTimeout:
            log.warning("job store too slow for /metrics: loraplex_fine_tuning_jobs left out of this scrape")
            return None
        except Exception as exc:  # Redis down (JobStoreUnavailable) or a store closed at shutdown
            log.warning("job store unavailable for /metrics: %s", exc)
            return None
        counts: dict[str, int] = {}
        for job in jobs:
            counts[job.status] = counts.get(job.status, 0) + 1
        return counts


def _gauges(values: dict[str, tuple[str, float]]):
    for name, (doc, value) in values.items():
        gauge = GaugeMetricFamily(name, doc)
        gauge.add_metric([], value)
        yield gauge


def _lora_info(stats: dict) -> GaugeMetricFamily:
    """The LoRA-affinity gauge: labels carry the adapter sets, the value is a timestamp (as vLLM does)."""
    gauge = GaugeMetricFamily(
        "vllm:lora_requests_info", "Running and waiting LoRA adapters",
        labels=["max_lora", "running_lora_adapters", "waiting_lora_adapters"],
    )
    running = ",".join(_adapter_name(k) for k in stats["running_adapters"])
    waiting = ",".join(_adapter_name(k) for k in stats["waiting_adapters"])
    gauge.add_metric([str(stats["max_loras"]), running, waiting], time.time())
    return gauge


def _adapter_name(key: str) -> str:
    """Engine keys are `<tenant>/<name>@<hash>`; the router matches on the model name a client sends."""
    return key.split("@", 1)[0]
