"""The vLLM comparison's summary, targets and printed table (pure functions of the results dict).

Per system: the median over repeats of the base and 16-adapter burst throughputs and of the base decode
step; the Poisson run's throughput, TTFT and end-to-end percentiles; the decode step against the roofline.
"""
from __future__ import annotations

import json
import statistics
from pathlib import Path

from loadtest import roofline

SYSTEMS = ("loraplex", "vllm")
# check -> (target, lower is better); the measured values come from check_values().
TARGETS = {
    "base_vs_vllm": (1.2, False),
    "adapters_vs_vllm": (2.5, False),
    "loraplex_adapters_over_base": (0.9, False),
    "poisson_ttft_p90_vs_vllm": (1.0, True),
    "loraplex_decode_roofline": (0.5, False),
    "greedy_tokens_equal": (1.0, False),
}


def summarize(results: dict) -> dict:
    """{system: medians and Poisson percentiles}, plus each system's decode step against the roofline."""
    out = {}
    wl = results["workload"]
    for system in SYSTEMS:
        sessions = [s for s in results["sessions"] if s["system"] == system]
        if not sessions:
            continue
        tps = lambda burst: [s["bursts"][burst]["tokens_per_s"] for s in sessions]  # noqa: E731
        step_s = statistics.median(s["decode_step_s"] for s in sessions)
        entry = {"base_tokens_per_s": statistics.median(tps("base")),
                 "adapters_tokens_per_s": statistics.median(tps("adapters")),
                 "burst_ttft_p50_s": statistics.median(s["bursts"]["first_token"]["latency_s"]["p50"] for s in sessions),
                 "decode_step_s": step_s, "num_repeats": len(sessions)}
        entry["adapters_over_base"] = entry["adapters_tokens_per_s"] / entry["base_tokens_per_s"]
        if results.get("roofline"):
            bound = roofline.decode_step_bound(results["roofline"]["machine"], results["model"]["num_params"],
                                               results["setup"]["dtype_bytes"], wl["num_requests"])
            entry["roofline"] = roofline.efficiency(bound, step_s)
        poisson = results.get("poisson", {}).get(system)
        if poisson:
            entry["poisson"] = {"tokens_per_s": poisson["tokens_per_s"], "ttft_s": poisson["ttft_s"],
                                "latency_s": poisson["latency_s"]}
        out[system] = entry
    return out


def check_values(summary: dict, greedy: dict | None) -> dict:
    """Each target's measured value (None when its inputs did not run)."""
    ours, theirs = summary.get("loraplex", {}), summary.get("vllm", {})
    ratio = lambda a, b: a / b if a is not None and b else None  # noqa: E731
    ttft90 = lambda s: s.get("poisson", {}).get("ttft_s", {}).get("p90")  # noqa: E731
    return {
        "base_vs_vllm": ratio(ours.get("base_tokens_per_s"), theirs.get("base_tokens_per_s")),
        "adapters_vs_vllm": ratio(ours.get("adapters_tokens_per_s"), theirs.get("adapters_tokens_per_s")),
        "loraplex_adapters_over_base": ours.get("adapters_over_base"),
        "poisson_ttft_p90_vs_vllm": ratio(ttft90(ours), ttft90(theirs)),
        "loraplex_decode_roofline": ours.get("roofline", {}).get("efficiency"),
        "greedy_tokens_equal": ratio(greedy["num_equal"], greedy["num_checks"]) if greedy else None,
    }


def checks(summary: dict, greedy: dict | None) -> dict:
    out = {}
    for name, value in check_values(summary, greedy).items():
        target, lower = TARGETS[name]
        passed = None if value is None else (value <= target if lower else value >= target)
        out[name] = {"value": value, "target": target, "lower_is_better": lower, "passed": passed}
    return out


def table_rows(results: dict) -> list[tuple[str, str, str, str, str]]:
    """(metric, loraplex, vLLM, loraplex/vLLM, target) rows; "-" where a side did not run."""
    s, c, wl = results["summary"], results["checks"], results["workload"]
    ours, theirs = s.get("loraplex", {}), s.get("vllm", {})

    def row(label: str, path: str, fmt: str, check: str | None = None, target: str = "", scale: float = 1.0):
        a, b = (None if (v := _get(x, path)) is None else v * scale for x in (ours, theirs))
        ratio = f"{a / b:.2f}x" if a is not None and b else "-"
        if check:
            verdict = {True: "met", False: "NOT met", None: "not run"}[c[check]["passed"]]
            target = f"{'<=' if TARGETS[check][1] else '>='} {target} {verdict}"
        return (label, _fmt(a, fmt), _fmt(b, fmt), ratio, target)

    burst = f"{wl['num_requests']} x ({wl['prompt_len']}+{wl['new_tokens']})"
    return [
        row(f"base, {burst} tok/s", "base_tokens_per_s", ".1f", "base_vs_vllm", "1.2x"),
        row(f"{wl['num_adapters']} adapters, {burst} tok/s", "adapters_tokens_per_s", ".1f", "adapters_vs_vllm", "2.5x"),
        row("adapters / base", "adapters_over_base", ".2f", "loraplex_adapters_over_base", "0.9 (ours)"),
        row("burst TTFT p50 s (1-token burst)", "burst_ttft_p50_s", ".2f"),
        row(f"decode step at batch {wl['num_requests']}, ms", "decode_step_s", ".0f", scale=1000.0),
        row("decode step / roofline", "roofline.efficiency", ".0%", "loraplex_decode_roofline", "50% (ours)"),
        row("Poisson tok/s", "poisson.tokens_per_s", ".1f"),
        row("Poisson TTFT p50 s", "poisson.ttft_s.p50", ".2f"),
        row("Poisson TTFT p90 s", "poisson.ttft_s.p90", ".2f", "poisson_ttft_p90_vs_vllm", "1.0x"),
        row("Poisson e2e p50 s", "poisson.latency_s.p50", ".2f"),
        row("Poisson e2e p90 s", "poisson.latency_s.p90", ".2f"),
    ]


def print_report(results: dict) -> None:
    setup, wl, shape = results["setup"], results["workload"], results["workload"]["shape"]
    print("\n== loraplex vs vLLM (CPU build), same machine, same run ==")
    print(f"setup: {setup['cpu_name']}, {setup['cpu_count']} CPUs, {setup['dtype']}; loraplex {setup['loraplex']} "
          f"(torch {setup['torch']}), vLLM {setup.get('vllm', '?')} (torch {setup.get('vllm_torch', '?')})")
    print(f"model: random-weight Llama, hidden {shape['hidden_size']}, {shape['num_hidden_layers']} layers, "
          f"{shape['num_attention_heads']} heads / {shape['num_key_value_heads']} KV, ffn {shape['intermediate_size']}, "
          f"vocab {shape['vocab_size']}, {results['model']['num_params'] / 1e6:.1f}M params; {wl['num_adapters']} "
          f"adapters r={wl['lora_rank']} on {','.join(wl['target_modules'])}; limits {results['limits']}")
    print(f"bursts: {wl['num_requests']} concurrent x {wl['prompt_len']} prompt -> {wl['new_tokens']} new tokens "
          f"(ignore_eos), non-streamed; medians of {results['args']['repeats']} alternating server sessions per system")
    print("\n| metric | loraplex | vLLM | loraplex/vLLM | target |\n|---|---:|---:|---:|---|")
    for r in table_rows(results):
        print("| " + " | ".join(r) + " |")
    if greedy := results.get("greedy"):
        print(f"\ngreedy tokens, loraplex == vLLM: {greedy['num_equal']}/{greedy['num_checks']} "
              f"({'met' if results['checks']['greedy_tokens_equal']['passed'] else 'NOT met'})")
    print("\nother load seen (cores busy outside the server under test and this client; load avg 1m at start/end):")
    for s in results["sessions"]:
        for burst, run in s["bursts"].items():
            p = run["load"]
            print(f"  {s['system']:<8} session {s['repeat'] + 1} {burst:<11} {run['tokens_per_s']:7.1f} tok/s  "
                  f"other {p['other_cores']:.2f} cores  load {p['load_avg_1m_start']:.2f}/{p['load_avg_1m_end']:.2f}")
    for system, run in results.get("poisson", {}).items():
        p = run["load"]
        print(f"  {system:<8} Poisson             other {p['other_cores']:.2f} cores  "
              f"load {p['load_avg_1m_start']:.2f}/{p['load_avg_1m_end']:.2f}")


def write_json(results: dict, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(results, indent=1) + "\n")


def _get(summary: dict, path: str):
    """summary["a"]["b"] for "a.b"; None where any part is missing."""
    for key in path.split("."):
        summary = summary.get(key) if isinstance(summary, dict) else None
    return summary


def _fmt(value, fmt: str) -> str:
    return "-" if value is None else format(value, fmt)
