"""loraplex against vLLM's CPU build: same machine, same run, same model, adapters and prompts, over HTTP.

    python loadtest/vs_vllm.py                          # full run (about 30-40 min on a quiet 2-core CPU)
    python loadtest/vs_vllm.py --repeats 1 --skip-poisson --requests 8 --new-tokens 16   # smoke run

The workload is bench.py's (workload.py: random-weight Llama, hidden 576, 30 layers, 9 heads / 3 KV, ffn
1536; 16 PEFT adapters r=8 on q,v). Only one server runs at a time: each repeat starts vLLM, runs its
bursts, stops it, then does the same for loraplex (the order flips every repeat). A session warms up
(every adapter loaded), then times a 1-token base burst, a base burst and a 16-adapter burst, each on prompts
of its own (both servers cache prefixes, so no timed burst reuses an earlier one's KV); the first session of each system also runs the greedy token check, the last one the Poisson mix. Throughputs are
medians over repeats. The roofline is measured with no server running. Prints a table with the targets,
writes docs/vs_vllm.json and exits 1 if a target is missed (2 if vLLM is not set up).
"""
from __future__ import annotations

import argparse
import importlib.metadata
import importlib.util
import os
import signal
import subprocess
import sys
import time
from dataclasses import asdict, replace
from pathlib import Path

import torch

if __package__ in (None, ""):  # run as a script: make `loadtest` importable from the repo root
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
if importlib.util.find_spec("loraplex") is None:
    sys.path.append(str(Path(__file__).resolve().parents[1] / "service"))

from loadtest import roofline, serving, workload  # noqa: E402
from loadtest import vs_vllm_load as load  # noqa: E402
from loadtest import vs_vllm_report as report  # noqa: E402
from loadtest import vs_vllm_servers as servers  # noqa: E402
from loadtest.http_load import run_burst  # noqa: E402
from loadtest.runtime import pick_runtime  # noqa: E402

REPO_ROOT = Path(__file__).resolve().parents[1]


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--repeats", type=int, default=4, help="server sessions per system (bursts 1 and 2: medians)")
    p.add_argument("--skip-poisson", action="store_true", help="skip the Poisson mix")
    p.add_argument("--skip-greedy", action="store_true", help="skip the greedy token check")
    p.add_argument("--systems", default="loraplex,vllm", help="run only some, e.g. 'loraplex' (no ratios then)")
    p.add_argument("--requests", type=int, default=32, help="concurrent requests per burst")
    p.add_argument("--prompt-len", type=int, default=128, help="prompt tokens per burst request")
    p.add_argument("--new-tokens", type=int, default=64, help="new tokens per burst request")
    p.add_argument("--poisson-requests", type=int, default=96)
    p.add_argument("--poisson-rate", type=float, default=0.47, help="arrivals per second")
    p.add_argument("--greedy-tokens", type=int, default=16)
    p.add_argument("--max-num-seqs", type=int, default=256, help="given to both servers")
    p.add_argument("--max-model-len", type=int, default=1024, help="given to both servers")
    p.add_argument("--max-num-batched-tokens", type=int, default=2048, help="given to both servers")
    p.add_argument("--vllm-peer", type=Path, help="the vllm-cpu peer script (default: <shared>/peers/vllm-cpu)")
    p.add_argument("--work-dir", type=Path, default=REPO_ROOT / ".data" / "bench", help="model/adapter cache")
    p.add_argument("--log-dir", type=Path, default=REPO_ROOT / "loadtest" / "results", help="servers' logs")
    p.add_argument("--out", type=Path, default=REPO_ROOT / "docs" / "vs_vllm.json")
    return p.parse_args(argv)


def main(argv=None) -> dict:
    args = parse_args(argv)
    systems = [s for s in (servers.VLLM, servers.LORAPLEX) if s.name in args.systems.split(",")]
    peer = servers.find_peer(args.vllm_peer) if servers.VLLM in systems else None
    vllm_python = servers.check_vllm_setup(peer) if peer else None
    # vLLM gets as many cores as loraplex's torch threads (the peer script's default binds cores 0-1)
    os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", f"0-{torch.get_num_threads() - 1}")
    rt = pick_runtime("cpu")  # vLLM's CPU build: loraplex runs on the CPU too
    wl = replace(workload.Workload(), num_requests=args.requests, prompt_len=args.prompt_len, new_tokens=args.new_tokens)
    started = time.perf_counter()
    _log(f"building workload under {args.work_dir}")
    bench = Bench(args, workload.build(wl, args.work_dir), rt, peer)
    results = bench.results
    results["setup"] = setup(rt, vllm_python)
    _log("roofline, no server running")
    machine_start = roofline.measure(rt)
    try:
        for repeat in range(args.repeats):
            for system in systems if repeat % 2 == 0 else systems[::-1]:
                results["sessions"].append(bench.session(system, repeat))
    except BaseException as exc:  # Ctrl-C, a server that died, a timeout: keep what was measured
        results["error"] = repr(exc)
        report.write_json(results, partial := args.log_dir / "vs_vllm.partial.json")
        _log(f"stopped by {exc!r}; what was measured so far is in {partial}")
        raise
    _log("roofline again, no server running (the best of both is kept)")
    machine_end = roofline.measure(rt)
    results["roofline"] = {"machine": roofline.best_of(machine_start, machine_end), "at_start": machine_start,
                           "at_end": machine_end}
    if len(bench.greedy) == 2:
        results["greedy"] = load.compare_greedy(bench.greedy["loraplex"], bench.greedy["vllm"])
    results["setup"]["load_avg_end"] = os.getloadavg()
    results["summary"] = report.summarize(results)
    results["checks"] = report.checks(results["summary"], results.get("greedy"))
    results["wall_s"] = time.perf_counter() - started
    report.print_report(results)
    report.write_json(results, args.out)
    _log(f"wrote {args.out} ({results['wall_s'] / 60:.1f} min)")
    return results


class Bench:
    """What every session shares: the workload, its prompts, the Poisson schedule, the results so far."""

    def __init__(self, args: argparse.Namespace, built: workload.BuiltWorkload, rt, peer: Path | None):
        self.args, self.built, self.rt, self.peer = args, built, rt, peer
        self.limits = servers.Limits(args.max_num_seqs, args.max_model_len, args.max_num_batched_tokens)
        wl = built.workload
        # Both servers cache prompt prefixes (on by default in each): every burst of a session gets prompts of its
        # own, so no timed burst reuses what the warm-up or an earlier burst computed. Same sets for both systems.
        self.prompts = {burst: workload.make_prompts(replace(built, workload=replace(wl, seed=wl.seed + i)))
                        for i, burst in enumerate(("base", "adapters", "first_token", "warmup"))}
        self.schedule = load.poisson_schedule([wl.adapter_name(i) for i in range(wl.num_adapters)],
                                              args.poisson_requests, args.poisson_rate)
        self.greedy: dict[str, list[dict]] = {}
        self.results = {
            "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
            "workload": wl.to_dict(), "limits": asdict(self.limits),
            "model": {"num_params": built.num_params, "dir": str(built.model_dir)}, "sessions": [], "poisson": {},
            "poisson_schedule": {"num_requests": len(self.schedule), "rate": args.poisson_rate,
                                 "last_arrival_s": self.schedule[-1].at_s,
                                 "num_base": sum(r.adapter is None for r in self.schedule)},
        }

    def session(self, system: servers.System, repeat: int) -> dict:
        """Start `system`, warm up, time its bursts (and the greedy check / Poisson mix when due), stop it."""
        args, wl = self.args, self.built.workload
        base = [system.model(None)] * wl.num_requests
        adapted = [system.model(wl.adapter_for_request(i)) for i in range(wl.num_requests)]
        _log(f"session {repeat + 1}/{args.repeats}: starting {system.name} (load {os.getloadavg()[0]:.2f})")
        with servers.start(system, self.built, self.rt, self.limits, self.peer, args.log_dir) as server:
            _log(f"{system.name} ready in {server.startup_s:.0f}s; warming up (every adapter)")
            self.warm_up(server.url, system)
            if repeat == 0 and not args.skip_greedy:
                self.greedy[system.name] = self.greedy_check(server.url, system)
            runs, probes = {}, {}
            for burst, models, max_tokens in (("first_token", base, 1), ("base", base, wl.new_tokens),
                                              ("adapters", adapted, wl.new_tokens)):
                with load.LoadProbe(server.pid) as probe:
                    runs[burst] = run_burst(server.url, f"{system.name}_{burst}", models, self.prompts[burst], max_tokens)
                probes[burst] = probe.result
                _log(f"{system.name} {burst}: {runs[burst].tokens_per_s:.1f} tok/s, "
                     f"other load {probe.result['other_cores']:.2f} cores")
            if repeat == args.repeats - 1 and not args.skip_poisson:
                self.poisson(server, system)
            if system is servers.VLLM:
                self.results["setup"]["vllm_server_version"] = server.version()
        step_s = serving.decode_step_time(runs["first_token"], runs["base"], wl.new_tokens)
        return {"system": system.name, "repeat": repeat, "startup_s": server.startup_s, "decode_step_s": step_s,
                "bursts": {name: run.to_dict() | {"load": probes[name]} for name, run in runs.items()}}

    def warm_up(self, url: str, system: servers.System) -> None:
        """A 2-token burst on the base model and one on each adapter: nothing timed loads an adapter."""
        wl, prompts = self.built.workload, self.prompts["warmup"]
        run_burst(url, "warmup", [system.model(None)] * len(prompts), prompts, max_tokens=2)
        adapters = [system.model(wl.adapter_name(i)) for i in range(wl.num_adapters)]
        run_burst(url, "warmup", adapters, [prompts[i % len(prompts)] for i in range(len(adapters))], max_tokens=2)

    def greedy_check(self, url: str, system: servers.System) -> list[dict]:
        wl = self.built.workload
        return [{"case": f"{adapter or 'base'}: {prompt}",
                 **load.greedy_ids(url, system, adapter, prompt, self.args.greedy_tokens)}
                for adapter in (None, wl.adapter_name(0), wl.adapter_name(1)) for prompt in load.GREEDY_PROMPTS]

    def poisson(self, server, system: servers.System) -> None:
        _log(f"{system.name}: Poisson mix, {len(self.schedule)} requests at {self.args.poisson_rate} req/s")
        with load.LoadProbe(server.pid) as probe:
            run = load.run_poisson(server.url, f"{system.name}_poisson", system.model, self.schedule)
        self.results["poisson"][system.name] = run.to_dict() | {"load": probe.result}
        _log(f"{system.name} Poisson: {run.tokens_per_s:.1f} tok/s, TTFT p90 "
             f"{self.results['poisson'][system.name].get('ttft_s', {}).get('p90', float('nan')):.2f}s")


def setup(rt, vllm_python: Path | None) -> dict:
    out = rt.setup()
    out |= {"cpu_name": out["device_name"], "dtype_bytes": rt.dtype_bytes, "load_avg_start": os.getloadavg(),
            "loraplex": _loraplex_version(), "vllm_cpu_omp_threads_bind": os.environ["VLLM_CPU_OMP_THREADS_BIND"],
            "vllm_cpu_kvcache_space_gib": os.environ.get("VLLM_CPU_KVCACHE_SPACE", "4")}
    return out | (servers.peer_versions(vllm_python) if vllm_python else {})


def _loraplex_version() -> str:
    try:
        version = importlib.metadata.version("loraplex")
    except importlib.metadata.PackageNotFoundError:
        version = "checkout"
    commit = subprocess.run(["git", "-C", str(REPO_ROOT), "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
    return f"{version} ({commit.stdout.strip() or 'no git'})"


def _interrupt(signum, frame):
    raise KeyboardInterrupt(f"signal {signum}")  # unwinds every `with server:` block: servers are stopped


def _log(message: str) -> None:
    print(f"[vs_vllm {time.strftime('%H:%M:%S')}] {message}", flush=True)


if __name__ == "__main__":
    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, _interrupt)
    try:
        out = main()
    except servers.VllmMissing as exc:
        print(f"vs_vllm: {exc}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt as exc:
        print(f"vs_vllm: interrupted ({exc}); every server it started is stopped", file=sys.stderr)
        sys.exit(130)
    sys.exit(0 if all(c["passed"] is not False for c in out["checks"].values()) else 1)
