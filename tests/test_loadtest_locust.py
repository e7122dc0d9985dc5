"""The locust load test against a real server, and the concurrency sweep's report.

The locust run is a real `locust --headless` process with loadtest/locustfile.py: its setup uploads
the mix's adapters through the HTTP API as the admin, and each tenant then calls with its own key.
"""
from __future__ import annotations

import csv
import json
import os
import subprocess
import sys

import httpx
import pytest

from loadtest import locust_setup, sweep_report
from loadtest.mix import Mix
from tests.server_process import REPO_ROOT, ServerProcess

KEYS = {"t00": "key-t00", "t01": "key-t01", "t02": "key-t02"}
ADMIN_KEY = "key-admin"
MIX_ENV = {  # 6 adapters, a flat Zipf so a few seconds reach several of them; every request kind
    "LOADTEST_TENANTS": "3", "LOADTEST_ADAPTERS_PER_TENANT": "2", "LOADTEST_ZIPF_S": "0.8",
    "LOADTEST_BASE_SHARE": "0.2", "LOADTEST_STREAM_SHARE": "0.5", "LOADTEST_CHAT_SHARE": "0.5",
    "LOADTEST_MAX_TOKENS": "16", "LOADTEST_PROMPT_WORDS": "4-16",
    "LOADTEST_API_KEYS": ",".join(f"{key}:{tenant}" for tenant, key in KEYS.items()), "LOADTEST_ADMIN_KEY": ADMIN_KEY,
}


@pytest.fixture
def keyed_server(tmp_path, demo_model_dir):
    server = ServerProcess(
        tmp_path / "data", tmp_path / "server.log", model=demo_model_dir, served_model_name="demo",
        start_local_worker="false", max_loras=4, log_level="warning",
        api_keys=",".join(f"{key}:{tenant}" for tenant, key in KEYS.items()), admin_key=ADMIN_KEY,
    )
    # Built while the server starts (this process has torch loaded already); the setup finds them cached.
    locust_setup.build_adapter_files(demo_model_dir, tmp_path / "work", Mix.from_env(MIX_ENV))
    server.wait_ready()
    yield server
    server.stop()


def test_locust_mix_runs_without_failures_over_many_adapters(keyed_server, demo_model_dir, tmp_path):
    summary_path, csv_prefix = tmp_path / "summary.json", tmp_path / "run"
    env = {**os.environ, **MIX_ENV, "LOADTEST_MODEL_DIR": str(demo_model_dir), "LOADTEST_WORK_DIR": str(tmp_path / "work"),
           "LOADTEST_SUMMARY": str(summary_path)}
    command = [sys.executable, "-m", "locust", "-f", str(REPO_ROOT / "loadtest" / "locustfile.py"), "--headless",
               "--host", keyed_server.url, "-u", "4", "-r", "4", "-t", "6s", "--stop-timeout", "60",
               "--only-summary", "--csv", str(csv_prefix)]
    proc = subprocess.run(command, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=120, check=False)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "setup: 6 adapters uploaded" in proc.stdout + proc.stderr

    summary = json.loads(summary_path.read_text())
    assert summary["num_failures"] == 0 and summary["num_requests_total"] >= 10, summary
    assert set(summary["by_kind"]) == {"chat", "chat stream", "completions", "completions stream"}, summary
    adapters_hit = [m for m in summary["by_model"] if "/" in m]
    assert len(adapters_hit) >= 3 and "demo" in summary["by_model"], summary
    assert summary["output_tokens_per_s"] > 0 and summary["e2e_s"]["p50"] > 0
    # Streams are read line by line as they arrive: the first token comes well before the last.
    assert 0 < summary["ttft_s"]["p50"] < 0.8 * summary["e2e_s"]["p50"], summary

    with open(f"{csv_prefix}_stats.csv") as stats:
        rows = {(r["Type"], r["Name"]): r for r in csv.DictReader(stats)}
    assert int(rows[("TTFT", "chat stream")]["Request Count"]) > 0  # TTFT is its own locust entry
    assert int(rows[("", "Aggregated")]["Failure Count"]) == 0

    metrics = httpx.get(f"{keyed_server.url}/metrics", headers={"Authorization": f"Bearer {ADMIN_KEY}"}).text  # the server saw the adapters too
    loads = next(float(line.split()[-1]) for line in metrics.splitlines() if line.startswith("loraplex_adapter_loads_total"))
    assert loads >= 3


def _level(users: int) -> dict:
    pcts = lambda base: {"p50": base, "p90": 1.5 * base, "p99": 2 * base, "mean": base, "max": 2 * base}  # noqa: E731
    return {"concurrency": users, "requests_per_s": 3.0 * users ** 0.5, "output_tokens_per_s": 70.0 * users ** 0.5,
            "ttft_s": pcts(0.05 * users), "e2e_s": pcts(0.2 * users), "num_requests": 100 * users, "num_failures": 0}


def test_report_writes_png_and_json_with_every_level(tmp_path):
    mix = Mix(num_tenants=4, adapters_per_tenant=2).describe()
    setup = {"cpu_count": 2, "device": "cpu", "device_name": "test CPU", "dtype": "float32", "torch": "x",
             "load_avg_1m": 0.1, "model": "demo Llama", "duration_s": 10, "warmup_s": 2}
    results = {"setup": setup, "mix": mix, "server": {"env": {"LORAPLEX_MAX_LORAS": "8"}},
               "levels": [_level(n) for n in (1, 2, 4, 8)]}
    sweep_report.write_json(results, tmp_path / "loadtest.json")
    sweep_report.write_plot(results, tmp_path / "loadtest.png")

    png = (tmp_path / "loadtest.png").read_bytes()
    assert png.startswith(b"\x89PNG\r\n\x1a\n") and len(png) > 20_000
    saved = json.loads((tmp_path / "loadtest.json").read_text())
    assert [lv["concurrency"] for lv in saved["levels"]] == [1, 2, 4, 8]
    assert all({"requests_per_s", "output_tokens_per_s", "ttft_s", "e2e_s"} <= set(lv) for lv in saved["levels"])
    table = sweep_report.markdown_table(results).splitlines()
    assert len(table) == 2 + 4 and table[2].startswith("| 1 | 3.0 | 70 | 50 / 75 / 100 | 200 / 300 / 400 |")


@pytest.mark.slow
def test_sweep_end_to_end(tmp_path):
    """The runner itself, two short levels: server, setup, locust per level, JSON and PNG."""
    env = {**os.environ, **{k: v for k, v in MIX_ENV.items() if "KEY" not in k}}
    command = [sys.executable, str(REPO_ROOT / "loadtest" / "sweep.py"), "--levels", "1,3", "--duration", "8",
               "--warmup", "1", "--out", str(tmp_path / "out"), "--work-dir", str(tmp_path / "work")]
    proc = subprocess.run(command, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=600, check=False)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    results = json.loads((tmp_path / "out" / "loadtest.json").read_text())
    assert [lv["concurrency"] for lv in results["levels"]] == [1, 3]
    assert all(lv["num_failures"] == 0 and lv["num_requests"] > 0 for lv in results["levels"])
    assert (tmp_path / "out" / "loadtest.png").read_bytes().startswith(b"\x89PNG")
