"""Engine v2 benchmarks: prefix caching, chunked prefill, paged-KV capacity. One command, one run.

    python loadtest/engine_v2.py            # all three (a few minutes on a 2-core CPU)
    python loadtest/engine_v2.py --quick    # smaller counts: a smoke test

Model: Llama-shaped, random weights (hidden 256, 4 layers, 4 heads / 2 KV heads, ffn 688, vocab 1024),
8 adapters r=8 on q,v. In-process on one LLMEngine (the features are the engine's; no HTTP noise).
Runs alternate (caching off, on, ...) `--repeats` times and medians are kept. Prints a table with the targets and
writes <out>/engine_v2.json; exits 1 if a target is missed.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import random
import statistics
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
if importlib.util.find_spec("loraplex") is None:
    sys.path.append(str(Path(__file__).resolve().parents[1] / "service"))

from loadtest import engine_v2_sections as sections  # noqa: E402
from loadtest import workload  # noqa: E402
from loadtest.runtime import pick_runtime  # noqa: E402

REPO_ROOT = Path(__file__).resolve().parents[1]
SHAPE = workload.ModelShape(hidden_size=256, intermediate_size=688, num_hidden_layers=4,
                            num_attention_heads=4, num_key_value_heads=2, vocab_size=1024)
TARGETS = {"a_ttft": 4.0, "a_throughput": 1.5, "b_gap_share": 0.35, "c_running": 4.0}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="fewer requests and repeats (smoke test)")
    p.add_argument("--repeats", type=int, default=1, help="alternating (off, on) pairs for (a)")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default); on a shared, "
                   "loaded CPU 1 thread avoids OpenMP barrier stalls that inflate every small op")
    p.add_argument("--only", default="abc", help="which sections to run, e.g. 'ab'")
    p.add_argument("--clock", default="wall", choices=["wall", "cpu"], help="(b) times: wall, or this thread's "
                   "CPU time (use with --threads 1: the engine's own work, independent of other load)")
    p.add_argument("--work-dir", type=Path, default=REPO_ROOT / ".data" / "bench")
    p.add_argument("--out", type=Path, default=REPO_ROOT / "loadtest" / "results")
    return p.parse_args(argv)


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    rt = pick_runtime(args.device)
    wl = replace(workload.Workload(), shape=SHAPE, num_adapters=8, num_requests=1)
    built = workload.build(wl, args.work_dir)
    factory = sections.EngineFactory(built, rt.device.type, rt.dtype_name, max_model_len=2048)
    results = {"setup": rt.setup() | {"load_average_start": os.getloadavg()}, "model": {"num_params": built.num_params, "shape": SHAPE.tag}}
    if "a" in args.only:
        results["a_shared_prefix"] = shared_prefix(factory, args)
    if "b" in args.only:
        results["b_chunked_prefill"] = chunked_prefill(factory, built, args)
    if "c" in args.only:
        _log("(c) peak running sequences with the KV bytes of 32 x 1024 static rows")
        results["c_memory"] = sections.memory_run(factory, num_requests=64 if args.quick else 192)
        results["c_memory"]["ratio"] = results["c_memory"]["max_num_running"] / results["c_memory"]["static_rows"]
    results["setup"]["load_average_end"] = os.getloadavg()
    results["checks"] = checks(results)
    print_table(results)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "engine_v2.json").write_text(json.dumps(results, indent=1))
    return results


def shared_prefix(factory, args) -> dict:
    runs = {False: [], True: []}
    size = dict(num_requests=32, concurrency=8) if args.quick else {}
    for i in range(1 if args.quick else args.repeats):
        for caching in (False, True):
            _log(f"(a) shared prefixes, caching {'on' if caching else 'off'} (round {i + 1}, load {os.getloadavg()[0]:.1f})")
            runs[caching].append(sections.shared_prefix_run(factory, caching, **size) | {"load_average": os.getloadavg()[0]})
    med = {c: {k: statistics.median(r[k] for r in runs[c]) for k in ("ttft_p50_s", "tokens_per_s")} for c in runs}
    return {"runs_off": runs[False], "runs_on": runs[True], "median_off": med[False], "median_on": med[True],
            "ttft_p50_ratio": med[False]["ttft_p50_s"] / med[True]["ttft_p50_s"],
            "throughput_ratio": med[True]["tokens_per_s"] / med[False]["tokens_per_s"]}


def chunked_prefill(factory, built, args) -> dict:
    """Rounds of (alone, chunks sized by tokens, chunks sized by compute); the gap share is the median of
    the rounds' max gap / that round's alone time (alternating keeps the machine's load comparable)."""
    long_prompt = [random.Random(7).randrange(3, 1000) for _ in range(2000)]
    clock = time.thread_time if args.clock == "cpu" else time.perf_counter
    rounds = []
    for i in range(1 if args.quick else max(3, args.repeats)):
        _log(f"(b) round {i + 1}: the 2000-token prompt alone, then beside 16 decoding streams, chunks of 512 "
             f"by tokens and by compute (load {os.getloadavg()[0]:.1f})")
        alone_s, alone_tokens = sections.prefill_alone_s(factory, long_prompt, clock)
        runs = {by: sections.chunked_prefill_run(factory, 512, long_prompt, clock=clock, chunk_by_compute=by) for by in (False, True)}
        rounds.append({"prefill_alone_s": alone_s, "alone_tokens": alone_tokens, "by_tokens": runs[False],
                       "by_compute": runs[True], "load_average": os.getloadavg()[0]})
    whole = sections.chunked_prefill_run(factory, 4096, long_prompt, clock=clock)
    chunked = rounds[-1]["by_compute"]
    reference = sections.hf_greedy(built.model_dir, long_prompt, len(chunked["long_tokens"]))
    share = lambda key: statistics.median(r[key]["max_stream_gap_s"] / r["prefill_alone_s"] for r in rounds)  # noqa: E731
    return {"clock": args.clock, "rounds": rounds, "prefill_alone_s": statistics.median(r["prefill_alone_s"] for r in rounds),
            "chunked": chunked, "whole": whole, "hf_reference_tokens": reference,
            "tokens_match_reference": all(r[k]["long_tokens"] == reference == r["alone_tokens"]
                                          for r in rounds for k in ("by_tokens", "by_compute")),
            "gap_share_chunked": share("by_compute"), "gap_share_by_tokens": share("by_tokens"),
            "gap_share_whole": whole["max_stream_gap_s"] / statistics.median(r["prefill_alone_s"] for r in rounds)}


def checks(results: dict) -> dict:
    out = {}
    if "a_shared_prefix" in results:
        a = results["a_shared_prefix"]
        out["a_ttft_p50_off_over_on"] = _check(a["ttft_p50_ratio"], TARGETS["a_ttft"])
        out["a_throughput_on_over_off"] = _check(a["throughput_ratio"], TARGETS["a_throughput"])
    if "b_chunked_prefill" in results:
        b = results["b_chunked_prefill"]
        out["b_max_gap_over_prefill_alone"] = _check(b["gap_share_chunked"], TARGETS["b_gap_share"], lower_is_better=True)
        out["b_long_tokens_equal_reference"] = {"value": b["tokens_match_reference"], "target": True, "passed": b["tokens_match_reference"]}
    if "c_memory" in results:
        out["c_peak_running_over_32_rows"] = _check(results["c_memory"]["ratio"], TARGETS["c_running"])
    return out


def _check(value: float, target: float, lower_is_better: bool = False) -> dict:
    return {"value": value, "target": target, "passed": value <= target if lower_is_better else value >= target}


def print_table(results: dict) -> None:
    print(f"\nsetup: {results['setup']}\nmodel: {results['model']}")
    print("| check | measured | target | |\n| --- | ---: | ---: | --- |")
    for name, c in results["checks"].items():
        value = c["value"] if isinstance(c["value"], bool) else f"{c['value']:.3g}"
        print(f"| {name} | {value} | {c['target']} | {'met' if c['passed'] else 'NOT met'} |")
    if "b_chunked_prefill" in results:
        b = results["b_chunked_prefill"]
        print(f"(b) gap share with chunks sized by tokens (the old policy): {b['gap_share_by_tokens']:.3g}; "
              f"whole prompt in one step: {b['gap_share_whole']:.3g}; chunks by compute: {b['chunked']['long_chunk_tokens']}")


def _log(message: str) -> None:
    print(f"[engine_v2 {time.strftime('%H:%M:%S')}] {message}", flush=True)


if __name__ == "__main__":
    out = main()
    sys.exit(0 if all(c["passed"] for c in out["checks"].values()) else 1)
