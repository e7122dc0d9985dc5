"""Soak: adapter lifecycles, then mixed load, against a real `loraplex serve`, watching RSS and open fds.

    python loadtest/soak.py                         # 1000 cycles + 10 min of mixed load -> docs/soak.json
    python loadtest/soak.py --cycles 60 --minutes 0.5 --out /tmp/soak.json

Phase 1 runs `--cycles` adapter lifecycles, each under a new name: upload -> load (admin) -> one
completion on it -> evict (admin) -> delete -> 404. Phase 2 runs `--concurrency` clients for
`--minutes`, each picking at random: completions (base and adapters, streamed or not, some abandoned
mid-stream), chat, TGI, listings, reads, foreign and missing ids, training-file upload/read/delete and
fine-tuning job create/cancel (no worker runs: jobs stay queued until cancelled).

Before sampling starts, 3 cycles and `--warmup-s` seconds of mixed load run every code path once (lazy
setup is not a leak); the baseline is taken after them. A sampler thread then reads the server's
`/proc/<pid>/status` VmRSS and counts `/proc/<pid>/fd` every `--sample-s`. The report has start/end/max
per phase and overall, plus least-squares slopes after the warm-up (the first `--warmup-fraction` of
each phase: caches and pools filling up are not leaks).
Any 5xx during the run is counted and makes the exit status 1.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import httpx

if __package__ in (None, ""):  # run as a script: make `loadtest` importable from the repo root
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from loadtest.server import free_port, log_tail, serve_env, spawn_serve, wait_ready  # noqa: E402

REPO_ROOT = Path(__file__).resolve().parents[1]
KEYS = {"acme": "soak-acme", "globex": "soak-globex", "admin": "soak-admin"}
STABLE_ADAPTERS = {"acme": ("steady-0", "steady-1"), "globex": ("steady-0", "steady-1")}
TRAIN_LINES = b"".join(b'{"prompt": "Q%d: colour?", "completion": " blue"}\n' % i for i in range(8))
SERVER_SETTINGS = {
    "model": "demo", "device": "cpu", "dtype": "float32", "max_model_len": 256, "max_num_seqs": 8,
    "max_loras": 4, "max_cpu_loras": 8, "max_lora_rank": 8, "start_local_worker": "false", "log_level": "warning",
    "api_keys": f"{KEYS['acme']}:acme,{KEYS['globex']}:globex", "admin_key": KEYS["admin"],
    "max_adapters_per_tenant": 10_000, "max_jobs_per_tenant": 4,
}


def auth(who: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {KEYS[who]}"}


# --- the server and what it holds ---------------------------------------------------------------------
class SoakServer:
    """`loraplex serve` in a child process on a free port; `pid` is what the sampler watches."""

    def __init__(self, data_dir: Path, log_path: Path, **overrides):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        settings = {**SERVER_SETTINGS, **overrides, "data_dir": data_dir, "port": self.port, "host": "127.0.0.1"}
        self.log_path = log_path
        self.proc = spawn_serve(serve_env(settings), log_path)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def wait_ready(self, timeout_s: float = 180.0) -> None:
        wait_ready(self.url, self.proc, self.log_path, timeout_s)

    def stop(self, grace_s: float = 30.0) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(grace_s)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def log_tail(self, num_chars: int = 3000) -> str:
        return log_tail(self.log_path, num_chars)


def make_adapter_variants(data_dir: Path, count: int = 4, out_root: Path | None = None) -> list[dict[str, bytes]]:
    """`count` different small adapters for the demo model (uploads differ in content, not just name)."""
    from loraplex.models.demo import ensure_demo_model, make_demo_adapter

    model_dir = ensure_demo_model(data_dir)
    out_root = out_root or Path(tempfile.mkdtemp(prefix="soak-adapters-"))
    variants = []
    for seed in range(count):
        out = make_demo_adapter(model_dir, out_root / f"v{seed}", r=4, seed=100 + seed,
                                target_modules=("q_proj", "v_proj") if seed % 2 else ("o_proj", "down_proj"))
        variants.append({name: (out / name).read_bytes() for name in ("adapter_config.json", "adapter_model.safetensors")})
    return variants


def upload_parts(files: dict[str, bytes]) -> list:
    return [("files", (name, data)) for name, data in files.items()]


# --- sampling ---------------------------------------------------------------------------------------------
@dataclass
class Sample:
    t_s: float  # since the sampler started
    phase: str
    progress: float  # cycles done (phase "cycles") or seconds into the phase (phase "mixed")
    rss_kb: int
    num_fds: int


def read_rss_kb(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError(f"no VmRSS for pid {pid}")


def count_fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


class ProcSampler:
    """Samples one process every `interval_s` on a thread, tagged with the current phase and progress."""

    def __init__(self, pid: int, interval_s: float = 1.0):
        self.pid, self.interval_s = pid, interval_s
        self.samples: list[Sample] = []
        self.phase, self.progress = "idle", 0.0
        self._started = time.monotonic()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="soak-sampler", daemon=True)

    def start(self) -> ProcSampler:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()

    def sample_now(self) -> Sample:
        sample = Sample(round(time.monotonic() - self._started, 3), self.phase, self.progress,
                        read_rss_kb(self.pid), count_fds(self.pid))
        self.samples.append(sample)
        return sample

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            try:
                self.sample_now()
            except (OSError, RuntimeError):  # the process is gone: nothing more to sample
                return


# --- phase 1: adapter lifecycles ----------------------------------------------------------------------------
@dataclass
class PhaseStats:
    num_requests: int = 0
    statuses: Counter = field(default_factory=Counter)
    failures: list[str] = field(default_factory=list)  # unexpected answers (first 20 kept)
    seconds: float = 0.0

    def record(self, what: str, response: httpx.Response, expected: tuple[int, ...]) -> bool:
        self.num_requests += 1
        self.statuses[response.status_code] += 1
        if response.status_code in expected:
            return True
        if len(self.failures) < 20:
            self.failures.append(f"{what}: {response.status_code} {response.text[:200]}")
        return False

    @property
    def num_5xx(self) -> int:
        return sum(n for status, n in self.statuses.items() if isinstance(status, int) and status >= 500)

    def to_json(self) -> dict:
        return {"requests": self.num_requests, "seconds": round(self.seconds, 1),
                "statuses": {str(k): v for k, v in sorted(self.statuses.items(), key=lambda item: str(item[0]))},
                "num_5xx": self.num_5xx, "failures": self.failures}


def run_cycles(url: str, num_cycles: int, variants: list[dict[str, bytes]], sampler: ProcSampler | None = None,
               prefix: str = "cycle") -> PhaseStats:
    """upload -> load -> complete -> evict -> delete -> 404, each under a new name."""
    stats = PhaseStats()
    started = time.monotonic()
    with httpx.Client(base_url=url, timeout=60) as client:
        for i in range(num_cycles):
            name = f"{prefix}-{i}"
            adapter_id = f"acme/{name}"
            made = client.post("/v1/adapters", headers=auth("acme"), data={"name": name},
                               files=upload_parts(variants[i % len(variants)]))
            if not stats.record("upload", made, (201,)):
                continue
            stats.record("load", client.post(f"/v1/adapters/{adapter_id}/load", headers=auth("admin")), (200,))
            body = {"model": adapter_id, "prompt": "Once upon", "max_tokens": 4, "temperature": 0, "ignore_eos": True}
            stats.record("complete", client.post("/v1/completions", headers=auth("acme"), json=body), (200,))
            for _ in range(50):  # 503 while its last request is still releasing the slot
                evicted = client.post(f"/v1/adapters/{adapter_id}/evict", headers=auth("admin"))
                if evicted.status_code != 503:
                    break
                time.sleep(0.02)
            stats.record("evict", evicted, (200,))
            stats.record("delete", client.delete(f"/v1/adapters/{adapter_id}", headers=auth("acme")), (200,))
            stats.record("gone", client.get(f"/v1/adapters/{adapter_id}", headers=auth("acme")), (404,))
            if sampler is not None:
                sampler.progress = i + 1
    stats.seconds = time.monotonic() - started
    return stats


# --- phase 2: mixed load --------------------------------------------------------------------------------------
def install_stable_adapters(url: str, variants: list[dict[str, bytes]]) -> list[str]:
    ids = []
    with httpx.Client(base_url=url, timeout=60) as client:
        for tenant, names in STABLE_ADAPTERS.items():
            for i, name in enumerate(names):
                made = client.post("/v1/adapters", headers=auth(tenant), data={"name": name},
                                   files=upload_parts(variants[i % len(variants)]))
                if made.status_code != 201:
                    raise RuntimeError(f"cannot upload {tenant}/{name}: {made.status_code} {made.text}")
                ids.append(f"{tenant}/{name}")
    return ids


class MixedLoad:
    """Clients picking weighted random operations until the deadline; statuses are tallied per phase."""

    def __init__(self, url: str, seconds: float, concurrency: int, seed: int = 0):
        self.url, self.seconds, self.concurrency = url, seconds, concurrency
        self.stats = PhaseStats()
        self.random = random.Random(seed)
        self.ops = [  # (weight, coroutine function)
            (20, self.completion), (8, self.stream), (4, self.abandoned_stream), (6, self.chat), (6, self.tgi),
            (6, self.listing), (6, self.foreign_or_missing), (3, self.training_file), (2, self.job), (3, self.bad_request),
        ]

    def run(self, sampler: ProcSampler | None = None) -> PhaseStats:
        asyncio.run(self._run(sampler))
        return self.stats

    async def _run(self, sampler: ProcSampler | None) -> None:
        started = time.monotonic()
        deadline = started + self.seconds
        limits = httpx.Limits(max_connections=self.concurrency * 2, max_keepalive_connections=self.concurrency * 2)
        async with httpx.AsyncClient(base_url=self.url, timeout=120, limits=limits) as client:
            async def client_loop() -> None:
                while time.monotonic() < deadline:
                    op = self.random.choices([op for _, op in self.ops], weights=[w for w, _ in self.ops])[0]
                    try:
                        await op(client)
                    except httpx.HTTPError as exc:
                        self.stats.num_requests += 1
                        self.stats.statuses[f"transport:{type(exc).__name__}"] += 1
                    if sampler is not None:
                        sampler.progress = round(time.monotonic() - started, 1)

            await asyncio.gather(*(client_loop() for _ in range(self.concurrency)))
        self.stats.seconds = time.monotonic() - started

    def _tenant(self) -> str:
        return self.random.choice(("acme", "globex"))

    def _model(self, tenant: str) -> str:
        return self.random.choice(("demo", *(f"{tenant}/{n}" for n in STABLE_ADAPTERS[tenant])))

    async def completion(self, client: httpx.AsyncClient) -> None:
        tenant = self._tenant()
        body = {"model": self._model(tenant), "prompt": "The river", "max_tokens": self.random.randint(1, 12),
                "temperature": self.random.choice((0, 0.8)), "ignore_eos": True}
        self.stats.record("completion", await client.post("/v1/completions", headers=auth(tenant), json=body), (200,))

    async def stream(self, client: httpx.AsyncClient, abandon: bool = False) -> None:
        tenant = self._tenant()
        body = {"model": self._model(tenant), "prompt": "Once", "max_tokens": 24 if abandon else 8,
                "temperature": 0, "ignore_eos": True, "stream": True}
        async with client.stream("POST", "/v1/completions", headers=auth(tenant), json=body) as response:
            async for line in response.aiter_lines():
                if abandon and line.startswith("data: {"):
                    break  # leaving the block closes the connection: the server must abort the request
            self.stats.record("stream", response, (200,))

    async def abandoned_stream(self, client: httpx.AsyncClient) -> None:
        await self.stream(client, abandon=True)

    async def chat(self, client: httpx.AsyncClient) -> None:
        tenant = self._tenant()
        body = {"model": self._model(tenant), "messages": [{"role": "user", "content": "hi there"}], "max_tokens": 6}
        self.stats.record("chat", await client.post("/v1/chat/completions", headers=auth(tenant), json=body), (200,))

    async def tgi(self, client: httpx.AsyncClient) -> None:
        tenant = self._tenant()
        model = self._model(tenant)
        parameters = {"max_new_tokens": 6, "adapter_id": None if model == "demo" else model}
        path = self.random.choice(("/generate", "/generate_stream"))
        response = await client.post(path, headers=auth(tenant), json={"inputs": "Hello", "parameters": parameters})
        self.stats.record("tgi", response, (200,))

    async def listing(self, client: httpx.AsyncClient) -> None:
        tenant = self.random.choice(("acme", "globex", "admin"))
        path = self.random.choice(("/v1/adapters", "/v1/models", "/v1/files", "/v1/fine_tuning/jobs",
                                   "/v1/adapters/acme/steady-0", "/v1/models/globex/steady-1", "/metrics"))
        expected = (200, 404) if path.count("/") > 3 else (200,)  # a tenant reading the other's adapter: 404
        if path == "/metrics" and tenant != "admin":
            expected = (403,)  # it names every tenant's adapters: the admin key (or the metrics port) only
        self.stats.record("listing", await client.get(path, headers=auth(tenant)), expected)

    async def foreign_or_missing(self, client: httpx.AsyncClient) -> None:
        model = self.random.choice(("globex/steady-0", "acme/missing", "ACME/steady-0", "acme%2Fsteady-0"))
        body = {"model": model, "prompt": "x", "max_tokens": 2}
        self.stats.record("foreign", await client.post("/v1/completions", headers=auth("acme"), json=body), (200, 404))

    async def training_file(self, client: httpx.AsyncClient) -> None:
        tenant = self._tenant()
        made = await client.post("/v1/files", headers=auth(tenant), data={"purpose": "fine-tune"},
                                 files={"file": ("t.jsonl", TRAIN_LINES)})
        if not self.stats.record("file upload", made, (200,)):
            return
        file_id = made.json()["id"]
        self.stats.record("file content", await client.get(f"/v1/files/{file_id}/content", headers=auth(tenant)), (200,))
        self.stats.record("file delete", await client.delete(f"/v1/files/{file_id}", headers=auth(tenant)), (200,))

    async def job(self, client: httpx.AsyncClient) -> None:
        tenant = self._tenant()
        made = await client.post("/v1/files", headers=auth(tenant), data={"purpose": "fine-tune"},
                                 files={"file": ("t.jsonl", TRAIN_LINES)})
        if not self.stats.record("job file", made, (200,)):
            return
        body = {"model": "demo", "training_file": made.json()["id"], "hyperparameters": {"n_epochs": 1}}
        created = await client.post("/v1/fine_tuning/jobs", headers=auth(tenant), json=body)
        if self.stats.record("job create", created, (200, 429)) and created.status_code == 200:
            job_id = created.json()["id"]
            self.stats.record("job cancel", await client.post(f"/v1/fine_tuning/jobs/{job_id}/cancel", headers=auth(tenant)), (200,))
            self.stats.record("job events", await client.get(f"/v1/fine_tuning/jobs/{job_id}/events", headers=auth(tenant)), (200,))
        await client.delete(f"/v1/files/{made.json()['id']}", headers=auth(tenant))

    async def bad_request(self, client: httpx.AsyncClient) -> None:
        body = self.random.choice(({"model": "demo", "prompt": "x", "max_tokens": -1}, {"model": "demo"}, {"prompt": 3}))
        self.stats.record("bad", await client.post("/v1/completions", headers=auth("acme"), json=body), (400,))


# --- the report ---------------------------------------------------------------------------------------------
def slope(xs: list[float], ys: list[float]) -> float:
    """Least-squares slope of ys over xs (0 when there are fewer than two distinct xs)."""
    if len(xs) < 2:
        return 0.0
    mean_x, mean_y = sum(xs) / len(xs), sum(ys) / len(ys)
    var = sum((x - mean_x) ** 2 for x in xs)
    return 0.0 if var == 0 else sum((x - mean_x) * (y - mean_y) for x, y in zip(xs, ys)) / var


def figures(samples: list[Sample], warmup_fraction: float) -> dict:
    """start/end/max of RSS (MB) and fds, growth and slopes after warm-up, for one run of samples."""
    if not samples:
        return {}
    num_warmup = int(len(samples) * warmup_fraction)
    steady = samples[num_warmup:] or samples[-1:]
    minutes = [s.t_s / 60 for s in steady]
    rss_mb = [s.rss_kb / 1024 for s in steady]
    return {
        "num_samples": len(samples),
        "rss_mb": {"start": round(samples[0].rss_kb / 1024, 1), "after_warmup": round(steady[0].rss_kb / 1024, 1),
                   "end": round(samples[-1].rss_kb / 1024, 1), "max": round(max(s.rss_kb for s in samples) / 1024, 1)},
        "fds": {"start": samples[0].num_fds, "after_warmup": steady[0].num_fds, "end": samples[-1].num_fds,
                "max": max(s.num_fds for s in samples)},
        "rss_slope_mb_per_hour": round(slope(minutes, rss_mb) * 60, 2),
        "fds_slope_per_hour": round(slope(minutes, [s.num_fds for s in steady]) * 60, 2),
    }


def cycle_slope_kb(samples: list[Sample], warmup_fraction: float) -> float:
    """RSS growth per adapter lifecycle (KB/cycle) after warm-up."""
    points = [s for s in samples if s.phase == "cycles" and s.progress > 0]
    steady = points[int(len(points) * warmup_fraction):]
    return round(slope([s.progress for s in steady], [s.rss_kb for s in steady]), 3)


def report(samples: list[Sample], phases: dict[str, PhaseStats], baseline: Sample, settled: Sample,
           warmup_fraction: float, config: dict) -> dict:
    by_phase = {name: figures([s for s in samples if s.phase == name], warmup_fraction) for name in phases}
    for name, stats in phases.items():
        by_phase[name]["traffic"] = stats.to_json()
    if "cycles" in by_phase:
        by_phase["cycles"]["rss_kb_per_cycle_after_warmup"] = cycle_slope_kb(samples, warmup_fraction)
    return {
        "config": config,
        "baseline": {"rss_mb": round(baseline.rss_kb / 1024, 1), "fds": baseline.num_fds},
        "settled": {"rss_mb": round(settled.rss_kb / 1024, 1), "fds": settled.num_fds},
        "phases": by_phase,
        "overall": figures([s for s in samples if s.phase in phases], warmup_fraction),
        "num_5xx": sum(stats.num_5xx for stats in phases.values()),
        "samples": [[s.t_s, s.phase, s.progress, s.rss_kb, s.num_fds] for s in samples],
    }


def settle(url: str, sampler: ProcSampler, seconds: float = 3.0) -> Sample:
    """After the clients closed their connections: let the server notice, then sample."""
    deadline = time.monotonic() + seconds
    best = sampler.sample_now()
    while time.monotonic() < deadline:
        time.sleep(0.25)
        now = sampler.sample_now()
        best = now if now.num_fds < best.num_fds else best
    return best


@dataclass
class SoakResult:
    report: dict
    server_log: Path


def run_soak(num_cycles: int, mixed_s: float, concurrency: int = 4, sample_s: float = 1.0,
             warmup_fraction: float = 0.2, work_dir: Path | None = None, seed: int = 0, warmup_s: float = 5.0) -> SoakResult:
    work_dir = Path(work_dir or tempfile.mkdtemp(prefix="loraplex-soak-"))
    data_dir = work_dir / "data"
    variants = make_adapter_variants(data_dir, out_root=work_dir / "adapters")
    server = SoakServer(data_dir, work_dir / "server.log")
    try:
        server.wait_ready()
        install_stable_adapters(server.url, variants)
        # Every code path once before the baseline: lazy setup (first upload, first stream...) is not a leak.
        run_cycles(server.url, 3, variants, prefix="warmup")
        MixedLoad(server.url, warmup_s, concurrency, seed + 1).run()
        sampler = ProcSampler(server.pid, sample_s).start()
        baseline = settle(server.url, sampler, 1.0)
        phases: dict[str, PhaseStats] = {}
        if num_cycles:
            sampler.phase, sampler.progress = "cycles", 0
            sampler.sample_now()
            phases["cycles"] = run_cycles(server.url, num_cycles, variants, sampler)
            sampler.sample_now()
        if mixed_s > 0:
            sampler.phase, sampler.progress = "mixed", 0
            sampler.sample_now()
            phases["mixed"] = MixedLoad(server.url, mixed_s, concurrency, seed).run(sampler)
            sampler.sample_now()
        sampler.phase = "settled"
        settled = settle(server.url, sampler)
        sampler.stop()
        config = {"cycles": num_cycles, "mixed_s": mixed_s, "concurrency": concurrency, "sample_s": sample_s, "warmup_s": warmup_s,
                  "warmup_fraction": warmup_fraction, "server": {k: v for k, v in SERVER_SETTINGS.items() if "key" not in k},
                  "cpu_count": os.cpu_count(), "python": sys.version.split()[0], "date": time.strftime("%Y-%m-%d %H:%M")}
        return SoakResult(report(sampler.samples, phases, baseline, settled, warmup_fraction, config), server.log_path)
    finally:
        server.stop()


def report_text(result: dict) -> str:
    """The report as JSON, one line per sample (thousands of them), the rest indented."""
    head = json.dumps({k: v for k, v in result.items() if k != "samples"}, indent=1)
    rows = ",\n  ".join(json.dumps(sample) for sample in result["samples"])
    return f'{head[:-2]},\n "samples": [\n  {rows}\n ]\n}}\n'


def summary_lines(result: dict) -> list[str]:
    lines = [f"baseline: RSS {result['baseline']['rss_mb']} MB, {result['baseline']['fds']} fds; "
             f"settled after the run: RSS {result['settled']['rss_mb']} MB, {result['settled']['fds']} fds"]
    for name, phase in {**result["phases"], "overall": result["overall"]}.items():
        if not phase:
            continue
        rss, fds = phase["rss_mb"], phase["fds"]
        traffic = phase.get("traffic")
        lines.append(
            f"{name:8s} RSS MB start {rss['start']} / after warm-up {rss['after_warmup']} / end {rss['end']} / max {rss['max']}"
            f" (slope {phase['rss_slope_mb_per_hour']} MB/h); fds start {fds['start']} / end {fds['end']} / max {fds['max']}"
            + (f"; {traffic['requests']} requests in {traffic['seconds']} s, 5xx {traffic['num_5xx']}" if traffic else "")
            + (f"; {phase['rss_kb_per_cycle_after_warmup']} KB/cycle" if "rss_kb_per_cycle_after_warmup" in phase else "")
        )
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cycles", type=int, default=1000, help="adapter lifecycles (default 1000)")
    parser.add_argument("--minutes", type=float, default=10.0, help="minutes of mixed load (default 10)")
    parser.add_argument("--concurrency", type=int, default=4, help="clients during the mixed load")
    parser.add_argument("--sample-s", type=float, default=1.0, help="sampling interval of RSS and fds")
    parser.add_argument("--warmup-fraction", type=float, default=0.2, help="share of each phase left out of the slopes")
    parser.add_argument("--warmup-s", type=float, default=10.0, help="mixed load before the baseline is taken")
    parser.add_argument("--out", type=Path, default=REPO_ROOT / "docs" / "soak.json", help="JSON report")
    parser.add_argument("--work-dir", type=Path, default=None, help="data dir and server log (default: a temp dir)")
    args = parser.parse_args(argv)
    result = run_soak(args.cycles, args.minutes * 60, args.concurrency, args.sample_s, args.warmup_fraction, args.work_dir,
                      warmup_s=args.warmup_s)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(report_text(result.report))
    for line in summary_lines(result.report):
        print(line)
    for name, phase in result.report["phases"].items():
        for failure in phase["traffic"]["failures"]:
            print(f"{name}: unexpected {failure}")
    print(f"report: {args.out}; server log: {result.server_log}")
    return 1 if result.report["num_5xx"] else 0


if __name__ == "__main__":
    sys.path.insert(0, str(REPO_ROOT / "service"))
    raise SystemExit(main())
