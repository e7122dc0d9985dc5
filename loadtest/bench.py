"""loraplex benchmark: one command, one run, every system on the same machine and the same prompts.

    python loadtest/bench.py            # full run (several minutes on a 2-core CPU)
    python loadtest/bench.py --quick    # tiny model, 4 requests, 8 tokens: a smoke test

Sections, in order (each in its own module): the machine's roofline (roofline.py), loraplex over HTTP
(serving.py: base vs adapters), HF/PEFT baselines in-process with the server stopped (baselines.py),
the roofline again (the best of both is kept). Results: a printed table, <out>/bench.json and
<out>/bench.png (report.py).
"""
from __future__ import annotations

import argparse
import importlib.util
import sys
import time
from dataclasses import replace
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make `loadtest` importable from the repo root
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
if importlib.util.find_spec("loraplex") is None:  # not installed: use the checkout's (demo tokenizer)
    sys.path.append(str(Path(__file__).resolve().parents[1] / "service"))

from loadtest import baselines, engine_sections, report, roofline, serving, workload  # noqa: E402
from loadtest.metrics import RunResult  # noqa: E402
from loadtest.runtime import Runtime, pick_runtime  # noqa: E402

REPO_ROOT = Path(__file__).resolve().parents[1]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="tiny model, 4 requests, 16+8 tokens (smoke test)")
    p.add_argument("--requests", type=int, help="concurrent requests (default 32)")
    p.add_argument("--prompt-len", type=int, help="prompt tokens per request (default 128)")
    p.add_argument("--new-tokens", type=int, help="generated tokens per request (default 64)")
    p.add_argument("--adapters", type=int, help="distinct adapters, used round-robin (default 16)")
    p.add_argument("--repeats", type=int, default=3, help="HTTP bursts per loraplex system; the median is kept")
    p.add_argument("--skip-naive", action="store_true", help="skip the per-request set_adapter baseline")
    p.add_argument("--naive-max-s", type=float, default=300.0,
                   help="time budget of the naive baseline; past it, throughput comes from the requests served")
    p.add_argument("--no-server", action="store_true", help="skip the loraplex HTTP section")
    p.add_argument("--skip-engine-sections", action="store_true", help="skip the in-process merge and cold-load sections")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--work-dir", type=Path, default=REPO_ROOT / ".data" / "bench", help="model/adapter cache")
    p.add_argument("--out", type=Path, default=REPO_ROOT / "loadtest" / "results", help="bench.json/png dir")
    return p.parse_args(argv)


def make_workload(args: argparse.Namespace) -> workload.Workload:
    wl = workload.Workload()
    wl = wl.quick() if args.quick else wl
    overrides = {"num_requests": args.requests, "prompt_len": args.prompt_len,
                 "new_tokens": args.new_tokens, "num_adapters": args.adapters}
    return replace(wl, **{k: v for k, v in overrides.items() if v is not None})


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    rt = pick_runtime(args.device)
    wl = make_workload(args)
    started = time.perf_counter()
    _log(f"building workload under {args.work_dir} ({wl.shape.tag}, {wl.num_adapters} adapters)")
    built = workload.build(wl, args.work_dir)
    results = {"setup": rt.setup(), "workload": wl.to_dict(),
               "model": {"num_params": built.num_params, "dir": str(built.model_dir)}}
    results |= run_sections(args, rt, built)
    results["bench_wall_s"] = time.perf_counter() - started
    report.print_report(results)
    report.write_json(results, args.out / "bench.json")
    report.write_plot(results, args.out / "bench.png")
    _log(f"wrote {args.out / 'bench.json'} and {args.out / 'bench.png'} ({results['bench_wall_s']:.0f}s)")
    return results


def run_sections(args: argparse.Namespace, rt: Runtime, built: workload.BuiltWorkload) -> dict:
    """Every section on the same prompts; the server is stopped before the in-process baselines run."""
    prompts = workload.make_prompts(built)
    runs: dict[str, RunResult] = {}
    out: dict = {}
    _log("roofline at start: memory bandwidth and matmul peak")
    machine_start = roofline.measure(rt, quick=args.quick)
    if not args.no_server:
        _log(f"loraplex over HTTP: {args.repeats} x (base, adapters), then 1-token and full base bursts")
        served = serving.run(built, rt, prompts, args.repeats, args.out / "server.log", log=_log)
        runs |= served["runs"]
        out["loraplex"] = {"server": served["server"], "first_token": served["first_token"].to_dict(),
                           "dedicated": served["dedicated"].to_dict(), "decode_step_s": served["decode_step_s"]}
    if not args.skip_engine_sections:
        _log("in-process engine: merged serving (latency, auto vs unmerged, switch time)")
        out["merge"] = engine_sections.merge_section(built, rt, prompts, repeats=1 if args.quick else 3)
        _log("in-process engine: cold adapter loads while decoding")
        out["cold_load"] = engine_sections.cold_load_section(built, rt, prompts)
    _log("HF transformers + PEFT baselines, in-process" + (" (naive skipped)" if args.skip_naive else ""))
    runs |= baselines.run_all(built, rt, prompts, args.skip_naive, args.naive_max_s, log=_log)
    _log("roofline at end: memory bandwidth and matmul peak")
    machine_end = roofline.measure(rt, quick=args.quick)
    machine = roofline.best_of(machine_start, machine_end)
    out["roofline"] = {"machine": machine, "at_start": machine_start, "at_end": machine_end}
    if "loraplex" in out:
        bound = roofline.decode_step_bound(machine, built.num_params, rt.dtype_bytes, built.workload.num_requests)
        out["roofline"]["decode"] = roofline.efficiency(bound, out["loraplex"]["decode_step_s"])
    out["systems"] = {name: run.to_dict() for name, run in runs.items()}
    out["ratios"] = report.compute_ratios(out["systems"])
    return out


def _log(message: str) -> None:
    print(f"[bench] {message}", flush=True)


if __name__ == "__main__":
    results = main()
    checks = list(results["ratios"].values()) + list(results.get("merge", {}).get("ratios", {}).values())
    sys.exit(0 if all(r["passed"] is not False for r in checks) else 1)
