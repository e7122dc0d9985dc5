"""The vLLM comparison's parts that run without vLLM: the report on a canned result, the Poisson schedule,
the other-load probe, the missing-setup error and the peer process group being killed whole."""
from __future__ import annotations

import statistics
import subprocess
import sys
import time
from pathlib import Path

import pytest

from loadtest import vs_vllm_load as load
from loadtest import vs_vllm_report as report
from loadtest import vs_vllm_servers as servers
from loadtest.workload import Workload


def _burst(tps: float, p50: float = 1.0) -> dict:
    lat = {"p50": p50, "p90": p50, "p99": p50, "mean": p50, "max": p50}
    return {"tokens_per_s": tps, "latency_s": lat, "load": {"other_cores": 0.1, "load_avg_1m_start": 1.0,
                                                            "load_avg_1m_end": 1.5}}


def _session(system: str, repeat: int, base: float, adapters: float, step_s: float) -> dict:
    return {"system": system, "repeat": repeat, "decode_step_s": step_s,
            "bursts": {"first_token": _burst(10.0, p50=3.0), "base": _burst(base), "adapters": _burst(adapters)}}


def _poisson(p90: float) -> dict:
    return {"tokens_per_s": 30.0, "ttft_s": {"p50": p90 / 2, "p90": p90}, "latency_s": {"p50": 5.0, "p90": 9.0},
            "load": {"other_cores": 0.0, "load_avg_1m_start": 1.0, "load_avg_1m_end": 1.0}}


def canned(with_vllm: bool = True) -> dict:
    """Three repeats: loraplex base 60/70/65 -> 65, adapters 60/63/58 -> 60; vLLM base 50, adapters 20."""
    sessions = [_session("loraplex", i, b, a, s) for i, (b, a, s) in enumerate([(60, 60, 0.4), (70, 63, 0.5), (65, 58, 0.45)])]
    if with_vllm:
        sessions += [_session("vllm", i, 50, 20, 0.6) for i in range(3)]
    machine = {"bandwidth": {"bytes_per_s": 10e9}, "matmul": {"flops_per_s": 100e9}}
    wl = Workload().to_dict()
    results = {"args": {"repeats": 3}, "workload": wl, "limits": {"max_num_seqs": 256}, "sessions": sessions,
               "model": {"num_params": 134_515_008}, "roofline": {"machine": machine},
               "poisson": {"loraplex": _poisson(4.0), **({"vllm": _poisson(5.0)} if with_vllm else {})},
               "setup": {"dtype_bytes": 4, "cpu_name": "test CPU", "cpu_count": 2, "dtype": "float32",
                         "loraplex": "0.1.0", "torch": "2.13", "vllm": "0.32.0", "vllm_torch": "2.13"}}
    greedy = {"num_checks": 9, "num_equal": 9 if with_vllm else 0}
    results["summary"] = report.summarize(results)
    results["checks"] = report.checks(results["summary"], greedy if with_vllm else None)
    results["greedy"] = greedy if with_vllm else None
    return results


def test_summary_takes_medians_and_checks_the_targets(capsys) -> None:
    results = canned()
    ours, theirs = results["summary"]["loraplex"], results["summary"]["vllm"]
    assert (ours["base_tokens_per_s"], ours["adapters_tokens_per_s"], ours["decode_step_s"]) == (65, 60, 0.45)
    assert theirs["base_tokens_per_s"] == 50 and theirs["adapters_tokens_per_s"] == 20
    # roofline: 538 MB / 10 GB/s = 54 ms vs 2 * 134.5M * 32 / 100 GFLOP/s = 86 ms: compute-bound
    assert ours["roofline"]["bound_by"] == "compute"
    assert ours["roofline"]["efficiency"] == pytest.approx(2 * 134_515_008 * 32 / 100e9 / 0.45)
    c = results["checks"]
    assert c["base_vs_vllm"]["value"] == pytest.approx(1.3) and c["base_vs_vllm"]["passed"] is True
    assert c["adapters_vs_vllm"]["value"] == pytest.approx(3.0) and c["adapters_vs_vllm"]["passed"] is True
    assert c["loraplex_adapters_over_base"]["value"] == pytest.approx(60 / 65) and c["loraplex_adapters_over_base"]["passed"]
    assert c["poisson_ttft_p90_vs_vllm"]["value"] == pytest.approx(0.8) and c["poisson_ttft_p90_vs_vllm"]["passed"]
    assert c["loraplex_decode_roofline"]["passed"] is False  # 19%
    assert c["greedy_tokens_equal"]["passed"] is True
    report.print_report(results)
    out = capsys.readouterr().out
    assert "| base, 32 x (128+64) tok/s | 65.0 | 50.0 | 1.30x | >= 1.2x met |" in out
    assert "| decode step / roofline | 19% | 14% | 1.33x | >= 50% (ours) NOT met |" in out
    assert "greedy tokens, loraplex == vLLM: 9/9 (met)" in out


def test_a_missing_side_is_not_run_not_failed() -> None:
    results = canned(with_vllm=False)
    c = results["checks"]
    assert c["base_vs_vllm"]["passed"] is None and c["poisson_ttft_p90_vs_vllm"]["passed"] is None
    assert c["loraplex_adapters_over_base"]["passed"] is True
    rows = {r[0]: r for r in report.table_rows(results)}
    assert rows["Poisson TTFT p90 s"] == ("Poisson TTFT p90 s", "4.00", "-", "-", "<= 1.0x not run")


def test_poisson_schedule_rate_mix_and_lengths() -> None:
    adapters = [f"a{i:02d}" for i in range(16)]
    schedule = load.poisson_schedule(adapters, num_requests=3000, rate=0.47)
    assert schedule == load.poisson_schedule(adapters, num_requests=3000, rate=0.47)  # seeded
    gaps = [b.at_s - a.at_s for a, b in zip(schedule, schedule[1:])]
    assert 1 / statistics.fmean(gaps) == pytest.approx(0.47, rel=0.08)
    base_share = sum(r.adapter is None for r in schedule) / len(schedule)
    assert base_share == pytest.approx(0.1, abs=0.02)
    counts = sorted((sum(r.adapter == a for r in schedule) for a in adapters), reverse=True)
    assert counts[0] > 4 * counts[-1] and min(counts) > 0  # Zipf: popular head, every adapter used
    assert all(32 - 1 <= len(r.prompt) <= 256 and 16 <= r.max_tokens <= 96 for r in schedule)
    assert {r.max_tokens for r in schedule} >= {16, 96}


def test_load_probe_counts_the_server_tree_apart() -> None:
    busy = "import time\nend = time.time() + 1.5\nwhile time.time() < end: pass"
    proc = subprocess.Popen([sys.executable, "-c", f"import subprocess, sys; subprocess.run([sys.executable, '-c', {busy!r}])"])
    try:
        with load.LoadProbe(proc.pid) as probe:
            time.sleep(1.0)
    finally:
        proc.wait()
    r = probe.result
    assert r["server_cores"] > 0.2  # the busy grandchild counts as the server's
    assert r["client_cores"] < 0.15  # ... and not as this (sleeping) process's, though it is its descendant
    assert r["other_cores"] >= 0 and r["busy_cores"] >= r["server_cores"] - 0.1


def test_missing_vllm_setup_says_how_to_set_it_up(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("VLLM_VENV", str(tmp_path / "venv"))
    peer = tmp_path / "vllm-cpu"
    peer.write_text("#!/bin/bash\n")
    with pytest.raises(servers.VllmMissing, match=f"run `bash {peer} setup`"):
        servers.check_vllm_setup(peer)
    with pytest.raises(servers.VllmMissing, match="not found"):
        servers.find_peer(tmp_path / "nope")


def test_greedy_comparison_needs_same_prompt_and_tokens() -> None:
    ours = [{"case": "x", "prompt_ids": [0, 5], "ids": [1, 2]}, {"case": "y", "prompt_ids": [0, 6], "ids": [3]}]
    theirs = [{"case": "x", "prompt_ids": [0, 5], "ids": [1, 2]}, {"case": "y", "prompt_ids": [6], "ids": [3]}]
    assert load.compare_greedy(ours, theirs)["num_equal"] == 1


FAKE_PEER = """#!/bin/bash
# serve MODEL PORT ...: answers 200 on any path, with a child process in the same group (as vLLM's engine core)
sleep 300 &
echo $! > "$(dirname "$0")/child.pid"
exec {python} -c 'import http.server, sys
class H(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        self.send_response(200); self.end_headers(); self.wfile.write(b"{{}}")
http.server.HTTPServer(("127.0.0.1", int(sys.argv[1])), H).serve_forever()' "$3"
"""


def test_vllm_server_stops_its_whole_process_group(tmp_path: Path) -> None:
    peer = tmp_path / "vllm-cpu"
    peer.write_text(FAKE_PEER.format(python=sys.executable))
    built = type("Built", (), {"workload": Workload(num_adapters=2), "model_dir": tmp_path,
                               "adapter_dir": lambda self, name: tmp_path / name})()
    with servers.VllmServer(peer, built, servers.Limits(), tmp_path / "vllm.log", ready_timeout_s=30) as server:
        pid, child = server.pid, int((tmp_path / "child.pid").read_text())
        assert "--lora-modules" in server.args() and f"a01={tmp_path / 'a01'}" in server.args()
    assert not servers._group_alive(pid)
    assert _gone(pid) and _gone(child)


def _gone(pid: int) -> bool:
    """No such process, or a zombie waiting for its reaper."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except FileNotFoundError:
        return True


def test_a_vllm_that_never_gets_ready_leaves_nothing_running(tmp_path: Path) -> None:
    peer = tmp_path / "vllm-cpu"
    peer.write_text('#!/bin/bash\nsleep 300 &\necho $! > "$(dirname "$0")/child.pid"\nexec sleep 300\n')
    built = type("Built", (), {"workload": Workload(num_adapters=1), "model_dir": tmp_path,
                               "adapter_dir": lambda self, name: tmp_path / name})()
    server = servers.VllmServer(peer, built, servers.Limits(), tmp_path / "vllm.log", ready_timeout_s=2)
    with pytest.raises(TimeoutError):
        server.__enter__()
    assert not servers._group_alive(server.pid) and _gone(int((tmp_path / "child.pid").read_text()))
