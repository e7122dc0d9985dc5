"""Throughput and latency percentiles vs concurrency: one real server, locust at each concurrency level.

    python loadtest/sweep.py                          # levels 1,2,4,8,16, 40 s each: about 5 minutes
    python loadtest/sweep.py --levels 1,4 --duration 20 --out /tmp/sweep
    make loadtest                                     # the default run, results into docs/

Starts `loraplex serve` on the demo model (loadtest/server.py) with one API key per tenant and an
admin key, uploads the mix's adapters through the HTTP API (loadtest/locust_setup.py), then runs
`locust --headless -u N -r N -t <duration>` with loadtest/locustfile.py once per level against the same
warm server. The mix comes from the LOADTEST_* env vars (loadtest/mix.py). Each level's numbers are
the locustfile's summary: requests that ended after the warm-up and before the stop. Writes
<out>/loadtest.json and <out>/loadtest.png and prints the setup and a table; locust's CSVs and the
server log go to <work-dir>/runs/.
"""
from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import json
import math
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import httpx

if __package__ in (None, ""):  # run as a script: make `loadtest` importable from the repo root
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
if importlib.util.find_spec("loraplex") is None:  # not installed: use the checkout's
    sys.path.append(str(Path(__file__).resolve().parents[1] / "service"))

from loadtest import locust_setup, sweep_report  # noqa: E402
from loadtest.mix import Mix  # noqa: E402
from loadtest.runtime import pick_runtime  # noqa: E402
from loadtest.server import Server, ServerConfig  # noqa: E402

REPO_ROOT = Path(__file__).resolve().parents[1]
LOCUSTFILE = REPO_ROOT / "loadtest" / "locustfile.py"
BASE_MODEL = "demo"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--levels", default="1,2,4,8,16", help="concurrent users per level, comma-separated")
    p.add_argument("--duration", type=float, default=40.0, help="seconds of load per level (locust -t)")
    p.add_argument("--warmup", type=float, default=5.0, help="first seconds of each level left out of the numbers")
    p.add_argument("--max-loras", type=int, default=8, help="server device adapter slots (fewer than adapters: loads happen)")
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    p.add_argument("--out", type=Path, default=REPO_ROOT / "docs", help="where loadtest.json and loadtest.png go")
    p.add_argument("--work-dir", type=Path, default=locust_setup.DEFAULT_WORK_DIR, help="model, adapter files, run logs")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    levels = [int(n) for n in args.levels.split(",")]
    rt = pick_runtime(args.device)
    mix = _with_keys(Mix.from_env())
    model_dir = locust_setup.demo_model_dir(args.work_dir)
    runs_dir = args.work_dir / "runs"
    shutil.rmtree(runs_dir, ignore_errors=True)
    data_dir = args.work_dir / "server-data"  # fresh each run: every adapter is uploaded by the setup
    shutil.rmtree(data_dir, ignore_errors=True)
    config = ServerConfig(
        model_dir=model_dir, data_dir=data_dir, device=rt.device.type, dtype=rt.dtype_name, max_loras=args.max_loras,
        max_lora_rank=max(16, mix.lora_rank), max_num_seqs=32, max_model_len=512,
        extra_env={"LORAPLEX_SERVED_MODEL_NAME": BASE_MODEL, "LORAPLEX_START_LOCAL_WORKER": "false",
                   "LORAPLEX_API_KEYS": _keys_setting(mix), "LORAPLEX_ADMIN_KEY": mix.admin_key},
    )
    setup = {**rt.setup(), "model": _describe_model(model_dir), "duration_s": args.duration,
             "warmup_s": args.warmup, "date": time.strftime("%Y-%m-%d"), "locust": _locust_version(),
             "command": " ".join(["python loadtest/sweep.py", *(argv if argv is not None else sys.argv[1:])])}
    started = time.perf_counter()
    with Server(config, runs_dir / "server.log") as server:
        print(f"server ready in {server.startup_s:.1f}s at {server.url}", flush=True)
        locust_setup.ensure_adapters(server.url, mix, model_dir, args.work_dir)
        results_levels = []
        for users in levels:
            before = _server_samples(server.url, mix.admin_key)
            summary = run_level(server.url, mix, users, args.duration, args.warmup, runs_dir)
            engine = _engine_view(before, _server_samples(server.url, mix.admin_key))
            results_levels.append({"concurrency": users, **summary, "server_side": engine})
            print(f"{users:>3} users: {summary['requests_per_s']:.1f} req/s, {summary['output_tokens_per_s']:.0f} "
                  f"tok/s, failures {summary['num_failures']}", flush=True)
    server_env = {k: v for k, v in config.env(0).items()
                  if k.startswith("LORAPLEX_") and k not in ("LORAPLEX_PORT", "LORAPLEX_API_KEYS", "LORAPLEX_ADMIN_KEY")}
    results = {"setup": {**setup, "total_s": time.perf_counter() - started}, "mix": mix.describe(),
               "server": {"startup_s": server.startup_s, "env": server_env}, "levels": results_levels}
    sweep_report.write_json(results, args.out / "loadtest.json")
    sweep_report.write_plot(results, args.out / "loadtest.png")
    sweep_report.print_report(results)
    print(f"\nwrote {args.out / 'loadtest.json'} and {args.out / 'loadtest.png'} ({results['setup']['total_s']:.0f} s)")
    return results


def run_level(url: str, mix: Mix, users: int, duration_s: float, warmup_s: float, runs_dir: Path) -> dict:
    """One headless locust run at `users` concurrency; its summary (see locustfile.py)."""
    runs_dir.mkdir(parents=True, exist_ok=True)
    summary_path = runs_dir / f"users-{users}.json"
    env = {**os.environ, "LOADTEST_SETUP": "0", "LOADTEST_BASE_MODEL": BASE_MODEL, "LOADTEST_SUMMARY": str(summary_path),
           "LOADTEST_WARMUP_S": str(warmup_s), "LOADTEST_API_KEYS": _keys_setting(mix),
           "LOADTEST_ADMIN_KEY": mix.admin_key or ""}
    command = [sys.executable, "-m", "locust", "-f", str(LOCUSTFILE), "--host", url, "--headless",
               "-u", str(users), "-r", str(users), "-t", f"{duration_s:g}s", "--stop-timeout", "120",
               "--only-summary", "--csv", str(runs_dir / f"users-{users}"), "--loglevel", "WARNING"]
    with open(runs_dir / f"users-{users}.log", "wb") as log:
        proc = subprocess.run(command, cwd=REPO_ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, check=False)
    if not summary_path.exists():
        raise RuntimeError(f"locust at {users} users exited {proc.returncode} without a summary; "
                           f"see {runs_dir / f'users-{users}.log'}")
    return json.loads(summary_path.read_text())


ENGINE_HISTOGRAMS = {"queue": "loraplex_request_queue_seconds", "ttft": "loraplex_time_to_first_token_seconds",
                     "e2e": "loraplex_e2e_request_latency_seconds"}
ENGINE_COUNTERS = {"adapter_loads": "loraplex_adapter_loads_total", "adapter_evictions": "loraplex_adapter_evictions_total"}


def _server_samples(url: str, admin_key: str) -> dict[str, float]:
    """Every unlabelled sample of the server's /metrics (read with the admin key: it names tenants' adapters), by name."""
    from prometheus_client.parser import text_string_to_metric_families

    response = httpx.get(f"{url}/metrics", headers={"Authorization": f"Bearer {admin_key}"}, timeout=30)
    families = text_string_to_metric_families(response.raise_for_status().text)
    return {s.name: s.value for family in families for s in family.samples if not s.labels}


def _engine_view(before: dict[str, float], after: dict[str, float]) -> dict[str, float | None]:
    """The level as the server saw it (warm-up and drain included): mean queue time (arrival to admission),
    TTFT and end-to-end latency from the engine's histograms, and adapter loads/evictions into device slots."""
    view = {}
    for key, name in ENGINE_HISTOGRAMS.items():
        count = after[f"{name}_count"] - before[f"{name}_count"]
        view[f"{key}_mean_s"] = (after[f"{name}_sum"] - before[f"{name}_sum"]) / count if count else None
    view |= {key: after[name] - before[name] for key, name in ENGINE_COUNTERS.items()}
    return view


def _with_keys(mix: Mix) -> Mix:
    """One bearer key per tenant and an admin key, unless LOADTEST_API_KEYS / LOADTEST_ADMIN_KEY gave them."""
    keys = {t: mix.api_keys.get(t, f"key-{t}") for t in mix.tenants}
    return dataclasses.replace(mix, api_keys=keys, admin_key=mix.admin_key or "key-admin")


def _keys_setting(mix: Mix) -> str:
    return ",".join(f"{key}:{tenant}" for tenant, key in mix.api_keys.items())


def _describe_model(model_dir: Path) -> str:
    from safetensors import safe_open

    config = json.loads((model_dir / "config.json").read_text())
    with safe_open(model_dir / "model.safetensors", "pt") as weights:
        num_params = sum(math.prod(weights.get_slice(name).get_shape()) for name in weights.keys())  # noqa: SIM118 (safe_open is not a dict)
    return (f"demo Llama ({num_params / 1e6:.2g}M params: hidden {config['hidden_size']}, "
            f"{config['num_hidden_layers']} layers, vocab {config['vocab_size']}, random weights)")


def _locust_version() -> str:
    from importlib.metadata import version

    return version("locust")


if __name__ == "__main__":
    main()
